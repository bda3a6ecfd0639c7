"""PyramidDrop: the score against the authors' choices, the stage budgets, the gate."""

from __future__ import annotations

import pytest
import torch
import tokred
from tokred.components import top_k_indices
from tokred_baselines import PDropGate, pdrop_scores


def _scores(case: dict) -> torch.Tensor:
    start, n = int(case["image_index"]), int(case["num_image_tokens_now"])
    return pdrop_scores(case["features"], case["position_ids"], int(case["query_position"]), torch.arange(start, start + n),
                        ln_weight=case["ln_weight"], ln_eps=float(case["ln_eps"]), q_weight=case["q_weight"],
                        k_weight=case["k_weight"], num_heads=int(case["num_heads"]), rope_theta=float(case["rope_theta"]))


@pytest.mark.reference("pdrop")
def test_reproduces_the_authors_kept_tokens(case: dict) -> None:
    """``pdrop_rank_drop`` (Cooperx521/PyramidDrop@6444f30, modeling_llama_pdrop.py 1291-1468): the
    top ``keep`` of our score are exactly the image tokens the authors kept; the score matches the
    fixture's re-derivation within float tolerance."""
    scores = _scores(case)
    torch.testing.assert_close(scores, case["scores"], rtol=1e-5, atol=1e-7)
    kept = torch.sort(top_k_indices(scores, int(case["keep"]))).values
    assert torch.equal(kept, case["kept_image_relative"])


@pytest.mark.reference("pdrop")
def test_stage_budgets_truncate_like_the_code(case: dict) -> None:
    """``keep = int(N * ratio)`` of the original N (1306-1307): ``rounding="down"``."""
    # The two settings of the fixtures (README): LLaVA-1.5's 576 tokens after 35 system tokens with
    # ratios [0.5, 0.25, 0.125], and 144 tokens after 5 with [0.3, 0.1].
    original, ratios = (576, [0.5, 0.25, 0.125]) if int(case["image_index"]) == 35 else (144, [0.3, 0.1])
    method = tokred.create("pdrop", keep_ratio=ratios[-1], ratio=ratios[-1] / ratios[-2] if len(ratios) == 2 else 0.5,
                           layers=tuple(range(1, len(ratios) + 1)))
    budgets = [stage.budget.tokens_for(original) for stage in method.schedule().gates]
    assert budgets[int(case["stage"])] == int(case["keep"])


def test_default_schedule_is_the_papers_pyramid() -> None:
    schedule = tokred.create("pdrop").schedule()
    assert [g.layer for g in schedule.gates] == ["1/4", "1/2", "3/4"]
    assert schedule.gate_layers(32) == [8, 16, 24]
    assert [g.budget.tokens_for(576) for g in schedule.gates] == [288, 144, 72]
    assert all(g.gate.attention_layer == "own" for g in schedule.gates)
    absolute = tokred.create("pdrop", keep=64).schedule()
    assert [g.budget.tokens_for(576) for g in absolute.gates] == [256, 128, 64]
    assert [g.budget.tokens_for(100) for g in absolute.gates[:2]] == [100, 100]  # derived budgets cap at N


def test_rounding_down_differs_from_tokred_at_halves() -> None:
    method = tokred.create("pdrop", keep_ratio=0.125)
    assert [g.budget.tokens_for(145) for g in method.schedule().gates] == [72, 36, 18]  # int(72.5), int(36.25), int(18.125)
    half_up = tokred.create("pdrop", keep_ratio=0.125, rounding="half_up")
    assert [g.budget.tokens_for(145) for g in half_up.schedule().gates] == [73, 36, 18]


def test_gate_reads_its_own_layer_or_the_previous_one() -> None:
    assert PDropGate().attention_layer == "own"
    assert PDropGate(score_layer="previous").attention_layer == "previous"
    with pytest.raises(tokred.OptionsError):
        tokred.create("pdrop", layers=())
