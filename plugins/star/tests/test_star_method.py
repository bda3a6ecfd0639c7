"""The ``star`` method: options, the Schedule they build, registration, and what a run reports."""

from __future__ import annotations

from typing import Any

import pytest
import tokred
import torch
from tokred import Budget, BudgetError, OptionsError, Schedule, ScheduleError
from tokred.testing import tiny_inputs

import tokred_star
import tokred_star._cross_attention
import tokred_star._method
import tokred_star._self_attention
from tokred_star import CrossAttentionGate, SelfAttentionSelector, StarMethod


def create(**options: Any) -> StarMethod:
    method = tokred.create("star", **options)
    assert isinstance(method, StarMethod)
    return method


def budgets(method: StarMethod, num_tokens: int = 576) -> tuple[int | None, int | None]:
    """Tokens per image that stage I and stage II keep, for an image of ``num_tokens`` tokens."""
    schedule = method.schedule()
    first = schedule.selector.budget.tokens_for(num_tokens) if schedule.selector else None
    final = schedule.gates[0].budget.tokens_for(num_tokens) if schedule.gates else None
    return first, final


def test_registered_by_the_tokred_star_distribution() -> None:
    registry = tokred.default_registry()
    for kind, name, cls in (("method", "star", StarMethod), ("selector", "star.self_attention", SelfAttentionSelector),
                            ("gate", "star.cross_attention", CrossAttentionGate)):
        entry = registry.entry(kind, name)
        assert (entry.obj, entry.plugin, entry.distribution) == (cls, "star", "tokred-star")
    assert "star" in tokred.list_methods()
    assert not [e for e in registry.errors if e.distribution == "tokred-star"]


def test_defaults_are_documented_ours() -> None:
    method = create()
    schedule = method.schedule()
    assert schedule.selector is not None and isinstance(schedule.selector.selector, SelfAttentionSelector)
    assert schedule.selector.selector == SelfAttentionSelector(features="projected", include_self=False)
    assert schedule.selector.budget == Budget(keep_ratio=0.5)
    (gate,) = schedule.gates
    assert isinstance(gate.gate, CrossAttentionGate)
    assert (gate.layer, gate.budget) == ("1/4", Budget(keep_ratio=0.25))
    assert schedule.gate_layers(32) == [8] and schedule.gate_layers(8) == [2]
    assert budgets(method) == (288, 144)


@pytest.mark.parametrize(("options", "expected"), [
    ({"keep": 64}, (128, 64)),
    ({"keep": 300}, (576, 300)),                     # twice the final budget, capped at all tokens
    ({"keep": 576}, (576, 576)),
    ({"keep_ratio": 0.1}, (115, 58)),
    ({"keep_ratio": 0.6}, (576, 346)),
    ({"keep": 64, "stage1_keep": 100}, (100, 64)),
    ({"keep": 64, "stage1_keep": 64}, (64, 64)),
    ({"keep": 64, "stage1_keep_ratio": 0.5}, (288, 64)),
    ({"keep_ratio": 0.1, "stage1_keep": 200}, (200, 58)),
    ({"keep": 64, "stage1": False}, (None, 64)),
    ({"keep": 64, "stage2": False}, (64, None)),     # stage I alone keeps the final budget
])
def test_budgets_per_stage(options: dict[str, Any], expected: tuple[int | None, int | None]) -> None:
    assert budgets(create(**options)) == expected


def test_capped_default_only_caps_what_the_user_did_not_write() -> None:
    assert budgets(create(keep=64), num_tokens=100) == (100, 64)
    with pytest.raises(BudgetError, match="keep=700 is larger"):
        budgets(create(keep=64, stage1_keep=700))


@pytest.mark.parametrize(("options", "error", "match"), [
    ({"stage1": False, "stage2": False}, OptionsError, "at least one stage"),
    ({"stage1": False, "stage1_keep": 100}, OptionsError, "two-stage run"),
    ({"stage2": False, "stage1_keep_ratio": 0.5}, OptionsError, "two-stage run"),
    ({"stage2": False, "gate_layer": 3}, OptionsError, "stage2=False"),
    ({"stage1_keep": 100, "stage1_keep_ratio": 0.5}, BudgetError, "not both"),
    ({"keep": 64, "stage1_keep": 32}, BudgetError, "fewer than the final budget"),
    ({"keep_ratio": 0.3, "stage1_keep_ratio": 0.2}, BudgetError, "fewer than the final budget"),
    ({"stage1_keep": 0}, BudgetError, "keep must be >= 1"),
    ({"stage1_keep_ratio": 1.5}, BudgetError, r"keep_ratio must be in \(0, 1\]"),
    ({"keep": 0}, BudgetError, "keep must be >= 1"),
    ({"keep": 3, "keep_ratio": 0.5}, BudgetError, "not both"),
    ({"gate_layer": 0}, ScheduleError, "layer 0"),
    ({"gate_layer": "9/8"}, ScheduleError, "between 0 and 1"),
    ({"gate_layer": "deep"}, ScheduleError, "depth fraction"),
    ({"stage1_features": "clip"}, OptionsError, "stage1_features"),
    ({"stage_1": False}, OptionsError, "valid options"),
])
def test_invalid_options_fail_at_create(options: dict[str, Any], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        tokred.create("star", **options)


def test_gate_layer_beyond_the_model_fails_before_any_forward(llava: Any) -> None:
    model, _ = llava
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ScheduleError, match="outside 1..7"):
            tokred.apply(model, create(gate_layer=8))
        with pytest.raises(BudgetError, match="keep=577"):
            tokred.apply(model, create(keep=577))
    finally:
        handle.remove()
    assert not calls


def test_mixed_budgets_that_cannot_fit_fail_at_apply(llava: Any) -> None:
    model, _ = llava
    method = create(keep=64, stage1_keep_ratio=0.1)                     # 58 survive stage I, the gate wants 64
    with pytest.raises(BudgetError, match="only 58 survive"):
        tokred.apply(model, method)                                      # LLaVA fixes N = 576: known before any forward


@pytest.mark.parametrize("options", [{}, {"keep": 64}, {"stage1": False, "keep": 10},
                                     {"stage2": False, "stage1_features": "pre_projector"},
                                     {"keep_ratio": 0.1, "stage1_keep": 100, "gate_layer": -2, "stage1_include_self": True}])
def test_keep_everything_keeps_every_token_and_every_other_option(options: dict[str, Any]) -> None:
    method = create(**options)
    full = method.keep_everything()
    assert isinstance(full, StarMethod)
    assert budgets(full) == tuple(576 if b is not None else None for b in budgets(method))
    assert full.model_dump(exclude={"keep", "keep_ratio", "stage1_keep", "stage1_keep_ratio"}) == \
        method.model_dump(exclude={"keep", "keep_ratio", "stage1_keep", "stage1_keep_ratio"})


def test_schedule_round_trips_through_the_registry() -> None:
    schedule = create(keep_ratio=0.2, gate_layer="3/8", stage1_include_self=True).schedule()
    data = schedule.to_dict()
    assert data["selector"]["name"] == "star.self_attention" and data["gates"][0]["name"] == "star.cross_attention"
    assert Schedule.from_dict(data) == schedule


def test_capped_default_round_trips() -> None:
    schedule = create(keep=64).schedule()
    restored = Schedule.from_dict(schedule.to_dict())
    assert restored.selector is not None and restored.selector.budget.tokens_for(100) == 100


def test_docstrings_cite_the_paper() -> None:
    assert StarMethod.describe().startswith("STAR:")                     # the line `tokred list` shows
    for obj in (tokred_star, tokred_star._method, tokred_star._self_attention, tokred_star._cross_attention,
                SelfAttentionSelector, CrossAttentionGate):
        assert "2505.12359" in (obj.__doc__ or ""), obj


@pytest.mark.parametrize(("options", "stage1", "final", "layer"), [
    ({"keep": 64}, 128, 64, 2),
    ({"keep": 40, "stage1_keep": 200, "gate_layer": 5}, 200, 40, 5),
    ({"keep": 64, "stage1": False, "gate_layer": "1/2"}, 576, 64, 4),
    ({"keep": 64, "stage2": False}, 64, 64, 0),
])
def test_layers_see_what_the_stages_promise(llava: Any, one_prompt: dict, census: Any, options: dict[str, Any],
                                            stage1: int, final: int, layer: int) -> None:
    model, _ = llava
    with tokred.apply(model, create(**options)) as run, census(model, one_prompt) as counts, torch.no_grad():
        model(**one_prompt)
    promised = [stage1] * layer + [final] * (8 - layer)
    assert counts.visual == [promised]
    report = run.report
    assert [per_layer[0] for per_layer in report.visual_tokens_per_layer] == promised
    # The equivalent token count covers both stages: (K * k1 + (L - K) * k) / L.
    assert report.equivalent_visual_tokens == [pytest.approx((layer * stage1 + (8 - layer) * final) / 8)]
    image = report.images[0]
    assert len(image.kept_stage1) == stage1 and len(image.kept_final) == final
    assert set(image.kept_final) <= set(image.kept_stage1)


def test_generate_per_image_budgets_on_a_batch(llava: Any) -> None:
    model, processor = llava
    inputs = tiny_inputs(processor, ["What is shown?", "Compare the two pictures in detail."], images_per_prompt=2)
    with tokred.apply(model, create(keep=20)) as run, torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2
    assert [(i.sample, i.image, len(i.kept_stage1), len(i.kept_final)) for i in run.report.images] == [
        (0, 0, 40, 20), (0, 1, 40, 20), (1, 0, 40, 20), (1, 1, 40, 20)]
    assert run.report.visual_tokens_per_layer[-1] == [40, 40]
