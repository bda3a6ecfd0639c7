"""Recipe: ToDRE's diversity selector as stage I, STAR's cross-attention gate as stage II.

Schedules compose components by their registered names, whichever plugin provides them. The
function :func:`todre_then_star` is the recipe; the tests check what each decoder layer receives.
"""

from __future__ import annotations

from typing import Any

import pytest
import tokred
import torch
from pydantic import PrivateAttr
from tokred import Budget, GateStage, GateState, Schedule, SelectorStage

from tokred_star import CrossAttentionGate

pytest.importorskip("tokred_todre", reason="the recipe needs the tokred-todre plugin (plugins/todre)")


def todre_then_star(stage1_keep: int = 128, keep: int = 64, layer: int | str = "1/4") -> Schedule:
    """Keep ``stage1_keep`` diverse tokens per image before the LLM (ToDRE, arXiv 2505.18757), then
    ``keep`` of them from ``layer`` on by instruction-text attention (STAR, arXiv 2505.12359)."""
    registry = tokred.default_registry()
    return Schedule(
        selector=SelectorStage(selector=registry.selector("todre.diversity"), budget=Budget(keep=stage1_keep)),
        gates=(GateStage(layer=layer, gate=registry.gate("star.cross_attention"), budget=Budget(keep=keep)),),
    )


def test_each_layer_sees_the_promised_tokens(llava: Any, one_prompt: dict, census: Any) -> None:
    model, _ = llava
    with tokred.apply(model, todre_then_star()) as run, census(model, one_prompt) as counts, torch.no_grad():
        model(**one_prompt)
    assert counts.visual == [[128, 128] + [64] * 6]
    assert run.report.equivalent_visual_tokens == [pytest.approx((2 * 128 + 6 * 64) / 8)]
    image = run.report.images[0]
    assert len(image.kept_final) == 64 and set(image.kept_final) <= set(image.kept_stage1)


class _ScoreLog(CrossAttentionGate):
    """STAR's gate, logging ``(visual_token [V], score [V])``."""

    _log: list[tuple[torch.Tensor, torch.Tensor]] = PrivateAttr(default_factory=list)

    def score(self, state: GateState) -> torch.Tensor:
        scores = super().score(state)
        self._log.append((state.visual_token.clone(), scores.detach().clone()))
        return scores


def test_stage1_is_todre_and_stage2_is_star(llava: Any, one_prompt: dict) -> None:
    model, _ = llava
    registry = tokred.default_registry()
    todre_only = Schedule(selector=SelectorStage(selector=registry.selector("todre.diversity"), budget=Budget(keep=128)))
    gate = _ScoreLog()
    logged = todre_then_star().model_copy(update={"gates": (GateStage(layer="1/4", gate=gate, budget=Budget(keep=64)),)})
    images = []
    for schedule in (todre_only, todre_then_star(), logged):
        with tokred.apply(model, schedule) as run, torch.no_grad():
            model(**one_prompt)
        images.append(run.report.images[0])
    assert images[1].kept_stage1 == images[0].kept_stage1          # stage I is ToDRE's choice
    (visual_token, scores), = gate._log
    assert visual_token.tolist() == images[1].kept_stage1          # stage II scores ToDRE's survivors
    star_choice = sorted(visual_token[tokred.top_k_indices(scores, 64)].tolist())
    assert images[1].kept_final == images[2].kept_final == star_choice


def test_recipe_generates_and_serialises(llava: Any, two_prompts: dict) -> None:
    model, _ = llava
    schedule = todre_then_star(stage1_keep=100, keep=30, layer=3)
    data = schedule.to_dict()
    assert (data["selector"]["name"], data["gates"][0]["name"]) == ("todre.diversity", "star.cross_attention")
    assert Schedule.from_dict(data) == schedule
    with tokred.apply(model, schedule) as run, torch.no_grad():
        out = model.generate(**two_prompts, max_new_tokens=3, do_sample=False)
    assert out.shape[0] == 2
    assert run.report.visual_tokens_per_layer[0] == [100, 100]
    assert run.report.visual_tokens_per_layer[3] == [30, 30]
