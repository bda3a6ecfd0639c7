"""Budgets and schedules: validation rules, layer resolution, serialisation."""

from __future__ import annotations

import pytest

import tokred
from tokred import Budget, BudgetError, GateStage, Schedule, ScheduleError, SelectorStage
from tokred.methods import LastTokenAttentionGate, RandomSelector
from tokred.schedule import resolve_layer


@pytest.mark.parametrize(
    ("budget", "n", "expected"),
    [
        (Budget(keep=64), 576, 64),
        (Budget(keep=576), 576, 576),
        (Budget(keep_ratio=0.1), 576, 58),  # 57.6 rounds half up
        (Budget(keep_ratio=0.5), 5, 3),  # 2.5 rounds up, not to even
        (Budget(keep_ratio=0.001), 576, 1),  # never below one token
        (Budget(keep_ratio=1.0), 2880, 2880),
    ],
)
def test_budget_resolves_per_image(budget: Budget, n: int, expected: int) -> None:
    assert budget.tokens_for(n) == expected


def test_keep_larger_than_image_is_an_error_not_a_clamp() -> None:
    with pytest.raises(BudgetError, match="larger than the 576 visual tokens"):
        Budget(keep=577).tokens_for(576)


@pytest.mark.parametrize(
    "options",
    [{"keep": 0}, {"keep": -3}, {"keep_ratio": 0.0}, {"keep_ratio": 1.5}, {"keep_ratio": float("nan")},
     {"keep": 4, "keep_ratio": 0.5}, {}],
)
def test_impossible_budgets_are_refused(options: dict) -> None:
    with pytest.raises(Exception, match="keep"):
        Budget(**options)


def test_create_reports_budget_errors_as_budget_errors() -> None:
    with pytest.raises(BudgetError, match="either keep or keep_ratio"):
        tokred.create("random", keep=4, keep_ratio=0.5)
    with pytest.raises(BudgetError, match=">= 1"):
        tokred.create("fastv", keep=0)


@pytest.mark.parametrize(("spec", "layers", "expected"), [("7/8", 32, 28), ("7/8", 8, 7), ("1/2", 5, 2), (2, 8, 2), (-1, 8, 7), ("0.25", 8, 2)])
def test_layer_specs_resolve_per_model(spec: int | str, layers: int, expected: int) -> None:
    assert resolve_layer(spec, layers) == expected


@pytest.mark.parametrize(("spec", "layers"), [(8, 8), ("1/16", 8), (-9, 8), ("3/2", 8), ("abc", 8)])
def test_layer_specs_outside_the_decoder_are_refused(spec: int | str, layers: int) -> None:
    with pytest.raises(ScheduleError):
        resolve_layer(spec, layers)


def test_gate_at_layer_zero_is_refused() -> None:
    with pytest.raises(Exception, match="layer 0"):
        GateStage(layer=0, gate=LastTokenAttentionGate(), budget=Budget(keep=8))


def test_gate_budget_cannot_exceed_earlier_stage() -> None:
    with pytest.raises(Exception, match="earlier stage keeps only 16"):
        Schedule(
            selector=SelectorStage(selector=RandomSelector(), budget=Budget(keep=16)),
            gates=(GateStage(layer=2, gate=LastTokenAttentionGate(), budget=Budget(keep=32)),),
        )


def test_gate_layers_must_increase() -> None:
    gate = LastTokenAttentionGate()
    schedule = Schedule(gates=(GateStage(layer=4, gate=gate, budget=Budget(keep=8)),
                               GateStage(layer="1/4", gate=gate, budget=Budget(keep=4))))
    with pytest.raises(ScheduleError, match="increasing"):
        schedule.gate_layers(8)


def test_schedule_round_trips_through_registered_names() -> None:
    schedule = Schedule(
        selector=SelectorStage(selector=RandomSelector(seed=3), budget=Budget(keep_ratio=0.25)),
        gates=(GateStage(layer="1/4", gate=LastTokenAttentionGate(), budget=Budget(keep=32)),),
        positions="renumber",
    )
    data = schedule.to_dict()
    assert data["selector"] == {"name": "random", "options": {"seed": 3}, "budget": {"keep_ratio": 0.25}}
    assert data["gates"][0]["name"] == "last_token_attention"
    assert Schedule.from_dict(data) == schedule


def test_method_schedules_follow_options() -> None:
    schedule = tokred.create("fastv", keep=32, layer=3).schedule()
    assert schedule.selector is None
    assert schedule.gates[0].layer == 3 and schedule.gates[0].budget == Budget(keep=32)
    default = tokred.create("random").schedule()
    assert default.selector is not None and default.selector.budget == Budget(keep_ratio=0.25)


def test_budget_errors_are_tokred_errors_even_through_pydantic() -> None:
    with pytest.raises(BudgetError):
        Budget(keep_ratio=2)
    with pytest.raises(ScheduleError):
        GateStage(layer="2/1", gate=LastTokenAttentionGate(), budget=Budget(keep=8))


def test_derived_budgets_may_cap_at_all_tokens_and_round_trip() -> None:
    capped = Budget(keep=1000, at_most_all=True)
    assert capped.tokens_for(576) == 576 and capped.tokens_for(2000) == 1000
    schedule = Schedule(selector=SelectorStage(selector=RandomSelector(), budget=capped))
    assert schedule.to_dict()["selector"]["budget"] == {"keep": 1000, "at_most_all": True}
    assert Schedule.from_dict(schedule.to_dict()) == schedule
