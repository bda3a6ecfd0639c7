"""The ``todre`` method: options, schedules, registration and the command line."""

from __future__ import annotations

import json

import pytest

import tokred
from tokred import Budget, Schedule
from tokred.cli import main as tokred_main
from tokred_todre import DiversitySelector, InformationMigrationGate, ToDREMethod


def test_default_schedule_is_the_papers() -> None:
    schedule = tokred.create("todre").schedule()
    assert schedule.selector is not None
    assert schedule.selector.budget == Budget(keep_ratio=0.1)
    assert schedule.selector.selector == DiversitySelector(objective="max_sum", pivot="cls_attention")
    (gate,) = schedule.gates
    assert gate.layer == "7/8" and gate.budget is None
    assert gate.gate == InformationMigrationGate(tau=0.10)
    assert schedule.gate_layers(32) == [28]
    assert schedule.gate_layers(8) == [7]


def test_options_reach_the_components() -> None:
    schedule = tokred.create("todre", keep=64, objective="k_center", pivot="index:5", tau=0.2, gate_layer=-3).schedule()
    assert schedule.selector is not None and schedule.selector.budget == Budget(keep=64)
    assert schedule.selector.selector == DiversitySelector(objective="k_center", pivot="index:5")
    assert schedule.gates[0].layer == -3 and schedule.gates[0].gate == InformationMigrationGate(tau=0.2)


def test_single_stage_ablations() -> None:
    stage1 = tokred.create("todre", stage2=False, keep_ratio=0.2).schedule()
    assert stage1.selector is not None and stage1.gates == ()
    stage2 = tokred.create("todre", stage1=False, tau=0.05).schedule()
    assert stage2.selector is None and len(stage2.gates) == 1


@pytest.mark.parametrize(
    "options, match",
    [
        ({"stage1": False, "stage2": False}, "at least one stage"),
        ({"stage1": False, "keep": 64}, "keep configures stage1"),
        ({"stage1": False, "objective": "k_center", "pivot": "max_norm"}, "objective, pivot configure stage1"),
        ({"stage2": False, "tau": 0.2}, "tau configures stage2"),
        ({"tau": 1.5}, "tau"),
        ({"pivot": "centre"}, "pivot"),
        ({"objective": "max_min"}, "objective"),
        ({"bogus": 1}, "no option 'bogus'"),
    ],
)
def test_invalid_options_fail_at_create(options: dict, match: str) -> None:
    with pytest.raises(tokred.OptionsError, match=match):
        tokred.create("todre", **options)


@pytest.mark.parametrize(
    "options, match",
    [({"gate_layer": 0}, "layer 0"), ({"gate_layer": "9/8"}, "between 0 and 1"), ({"gate_layer": "deep"}, "depth fraction")],
)
def test_invalid_gate_layers_fail_at_create(options: dict, match: str) -> None:
    with pytest.raises(tokred.ScheduleError, match=match):
        tokred.create("todre", **options)


@pytest.mark.parametrize("options", [{"keep": 0}, {"keep_ratio": 0.0}, {"keep": 4, "keep_ratio": 0.5}])
def test_impossible_budgets(options: dict) -> None:
    with pytest.raises(tokred.BudgetError):
        tokred.create("todre", **options)


@pytest.mark.parametrize(
    "options, expected",
    [
        ({}, {"keep": None, "keep_ratio": 1.0, "tau": 0.0, "stage1": True, "stage2": True}),
        ({"keep": 8, "stage2": False}, {"keep": None, "keep_ratio": 1.0, "tau": 0.1, "stage2": False}),
        ({"stage1": False, "tau": 0.3}, {"keep": None, "keep_ratio": None, "tau": 0.0, "stage1": False}),
    ],
)
def test_keep_everything_switches_both_stages_off_but_runs_them(options: dict, expected: dict) -> None:
    method = tokred.create("todre", **options).keep_everything()
    assert isinstance(method, ToDREMethod)
    assert {name: getattr(method, name) for name in expected} == expected
    assert method.schedule().selector is None or method.schedule().selector.budget == Budget(keep_ratio=1.0)


def test_schedule_round_trips_through_registered_names() -> None:
    schedule = tokred.create("todre", keep=32, objective="k_center", tau=0.2).schedule()
    data = schedule.to_dict()
    assert data["selector"]["name"] == "todre.diversity"
    assert data["gates"][0]["name"] == "todre.migration"
    assert Schedule.from_dict(json.loads(json.dumps(data))) == schedule


def test_registered_through_the_entry_point_of_tokred_todre() -> None:
    registry = tokred.default_registry()
    assert "todre" in tokred.list_methods()
    assert "todre.diversity" in tokred.list_selectors()
    assert "todre.migration" in tokred.list_gates()
    for kind, name, cls in (("method", "todre", ToDREMethod), ("selector", "todre.diversity", DiversitySelector),
                            ("gate", "todre.migration", InformationMigrationGate)):
        entry = registry.entry(kind, name)  # type: ignore[arg-type]
        assert entry.obj is cls
        assert entry.distribution == "tokred-todre"
        assert entry.plugin == "todre"
    assert not [e for e in registry.errors if e.distribution == "tokred-todre"]


def test_tokred_list_shows_todre_from_tokred_todre(capsys: pytest.CaptureFixture[str]) -> None:
    assert tokred_main(["list", "--json", "--pattern", "todre*"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [(m["name"], m["distribution"]) for m in listing["methods"]] == [("todre", "tokred-todre")]
    assert set(listing["methods"][0]["options"]) == {
        "keep", "keep_ratio", "spread", "objective", "pivot", "tau", "gate_layer", "stage1", "stage2"}
    assert [s["name"] for s in listing["selectors"]] == ["todre.diversity"]
    assert [g["name"] for g in listing["gates"]] == ["todre.migration"]
    assert tokred_main(["list"]) == 0
    table = capsys.readouterr().out
    assert any("todre" in line and "tokred-todre" in line for line in table.splitlines())


def test_tokred_demo_includes_todre(capsys: pytest.CaptureFixture[str]) -> None:
    assert tokred_main(["demo", "--family", "llava", "--repeats", "1", "--json"]) == 0  # the 576-token tiny LLaVA
    rows = {row["method"]: row for row in json.loads(capsys.readouterr().out)["rows"]}
    assert "todre" in rows
    assert rows["todre"]["error"] is None
    assert rows["todre"]["entering_llm"] == 58                                 # keep_ratio 0.1 of 576
