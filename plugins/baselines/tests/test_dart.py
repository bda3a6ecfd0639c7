"""DART: the pure function against the authors' outputs, tokred's exact budget, the gate."""

from __future__ import annotations

import pytest
import torch
import tokred
from tokred.testing import make_gate_state
from tokred_baselines import DARTGate, dart_retain, dart_token_topk, split_over_pivots


def _authors_parameters(case: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The image rows, the text rows (every token after the image) and ``TOKEN_TOPK`` of a case,
    as ``get_retained_image_token`` derives them (modeling_llama_self.py 397-417; Qwen2.5 1553)."""
    start, length = int(case["image_token_start_index"]), int(case["image_token_length"])
    total = case["hidden"].shape[0]
    p_img, p_txt = int(case["pivot_image_token"]), int(case["pivot_text_token"])
    mnt = int(case["max_num_trunction"])
    ratio = float(case["reduction_ratio"])
    if "text_length" in case:  # the LLaVA-NeXT branch: N from the sequence length
        length = total - int(case["text_length"])
        topk = dart_token_topk(length, pivots=p_img + p_txt, variant="llava_next", image_pivots=p_img,
                               retain_token_num_for_llava_next=int(case["retain_token_num_for_llava_next"]))
    elif case["keys"].shape[0] == 2 and "qwen" in case["note"].lower():
        topk = dart_token_topk(length, pivots=p_img + p_txt, reduction_ratio=ratio, variant="qwen")
    else:
        topk = dart_token_topk(length, pivots=p_img + p_txt, reduction_ratio=ratio,
                               max_num_trunction=None if mnt < 0 else mnt)
    return torch.arange(start, start + length), torch.arange(start + length, total), topk


@pytest.mark.reference("dart")
def test_reproduces_the_authors_retained_tokens(case: dict) -> None:
    """``get_retained_image_token`` (ZichenWen1/DART@5a19452): pivots, their visiting order and the
    retained positions exactly, kept count ``p_img + 8 * TOKEN_TOPK``."""
    image, text, topk = _authors_parameters(case)
    result = dart_retain(case["hidden"], case["keys"], image, text, per_pivot=topk,
                         image_pivots=int(case["pivot_image_token"]), text_pivots=int(case["pivot_text_token"]),
                         visit="python_set")
    assert torch.equal(result.image_pivots, case["image_pivots"])
    assert torch.equal(result.text_pivots, case["text_pivots"])
    assert torch.equal(result.visit_order, case["pivot_visit_order"])
    assert torch.equal(result.kept, case["retained_sorted"])
    assert result.kept.numel() == int(case["pivot_image_token"]) + 8 * topk


@pytest.mark.reference("dart", ["pivot_order_matters_n64"])
def test_the_visiting_order_changes_the_result(case: dict) -> None:
    image, text, topk = _authors_parameters(case)
    by_position = dart_retain(case["hidden"], case["keys"], image, text, per_pivot=topk, visit="position")
    assert not torch.equal(by_position.kept, case["retained_sorted"])


@pytest.mark.reference("dart", ["path_b_tiny_llama_k2"])
def test_hidden_states_are_the_final_norm_of_the_layer_output(case: dict) -> None:
    """What ``GateState.normed_hidden_states`` gives a gate is what the authors' function receives:
    layer K-1's output through the model's final RMSNorm."""
    x = case["layer_output_prenorm"]
    normed = case["norm_weight"] * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + float(case["norm_eps"])))
    torch.testing.assert_close(normed, case["hidden"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k", [1, 4, 5, 64, 128, 131, 576])
def test_tokred_budget_is_exact(k: int) -> None:
    p, counts = split_over_pivots(k, 4, 8)
    assert p + sum(counts) == k and max(counts) - min(counts) <= 1


@pytest.mark.reference("dart", ["llava15_mnt128"])
def test_gate_keeps_exactly_the_budget_and_matches_the_authors_up_to_the_split(case: dict) -> None:
    """The registered gate on the fixture's states: 128 tokens (the authors keep 132 for "128");
    with the authors' 132 and the authors' L1 pivot norm it keeps the authors' tokens."""
    image, text, _ = _authors_parameters(case)
    length = case["hidden"].shape[0]
    attention = torch.full((1, length, length), 1.0 / length)
    for k, expected in ((128, None), (132, case["retained_sorted"])):
        state = make_gate_state(attention, visual=image.tolist(), instruction=text.tolist(),
                                system=list(range(int(image[0]))), keep_per_image=[k], keys=case["keys"],
                                hidden_states=case["hidden"], final_norm=lambda rows: rows)
        kept = DARTGate(pivot_norm="l1").select(state)
        assert kept.numel() == k and torch.unique(kept).numel() == k
        if expected is not None:
            assert torch.equal(image[kept.sort().values], expected)


def test_gate_needs_no_attention_probabilities() -> None:
    g = torch.Generator().manual_seed(0)
    length, visual = 30, list(range(2, 22))
    state = make_gate_state(torch.zeros(1, length, length), visual=visual, instruction=list(range(22, 30)), system=[0, 1],
                            keep_per_image=[7], keys=torch.randn(2, length, 4, generator=g),
                            hidden_states=torch.randn(length, 6, generator=g), final_norm=lambda rows: rows)
    state.attention_source = None  # any use of attention would raise
    assert DARTGate(pivot_order="position").select(state).numel() == 7


def test_method_defaults() -> None:
    schedule = tokred.create("dart").schedule()
    [gate] = schedule.gates
    assert gate.layer == 2 and gate.budget.tokens_for(576) == 128
    assert schedule.selector is None


def test_the_l2_norm_of_rotated_keys_does_not_depend_on_where_the_prompt_starts() -> None:
    """Why the gate ranks pivots by the L2 norm: shifting every position by the padding rotates each
    key, which keeps L2 norms and changes L1 norms (the code's), hence the pivots."""
    from tokred_baselines.pdrop import rotary

    g = torch.Generator().manual_seed(3)
    raw = torch.randn(2, 40, 8, generator=g)                                   # [H, L, d] before the rotation
    alone, padded = rotary(raw, torch.arange(40), 10000.0), rotary(raw, torch.arange(40) + 25, 10000.0)
    rows = torch.arange(40)
    from tokred_baselines.dart import _key_norm

    torch.testing.assert_close(_key_norm(alone, rows, "l2"), _key_norm(padded, rows, "l2"))
    assert not torch.allclose(_key_norm(alone, rows, "l1"), _key_norm(padded, rows, "l1"))
