"""STAR stage I: the self-attention score against a direct dense computation, blocking, the Selector."""

from __future__ import annotations

import math
from typing import Any

import pytest
import tokred
import torch
import torch.nn as nn
from tokred import ImageLayout, OptionsError, VisualTokens, top_k_indices
from torch.overrides import TorchFunctionMode

from tokred_star import DEFAULT_BLOCK_SIZE, SelfAttentionSelector, self_attention_scores


def dense_scores(h: torch.Tensor, include_self: bool) -> torch.Tensor:
    """The formula written out: column means of softmax(H H^T / sqrt(d)) over the queries ``[N, N]``."""
    h = h.double()
    attention = torch.softmax(h @ h.T / math.sqrt(h.shape[1]), dim=-1) if include_self else _masked(h)
    queries = h.shape[0] if include_self else h.shape[0] - 1
    return attention.sum(dim=0) / queries


def _masked(h: torch.Tensor) -> torch.Tensor:
    """Each query's softmax over the *other* tokens, built element by element from the definition."""
    n = h.shape[0]
    logits = h @ h.T / math.sqrt(h.shape[1])
    out = torch.zeros(n, n, dtype=h.dtype)
    for i in range(n):
        others = [j for j in range(n) if j != i]
        out[i, others] = torch.softmax(logits[i, others], dim=0)
    return out


def clustered(n: int, dim: int, seed: int = 0) -> torch.Tensor:
    """``[n, dim]`` features in clusters with spread norms, so scores are far from uniform."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(2, n // 50), dim, generator=g)
    h = centres[torch.randint(0, centres.shape[0], (n,), generator=g)] + 0.5 * torch.randn(n, dim, generator=g)
    return h / h.norm(dim=1, keepdim=True) * (2 + torch.rand(n, 1, generator=g))


@pytest.mark.parametrize("include_self", [False, True])
@pytest.mark.parametrize(("n", "dim", "block_size"),
                         [(3, 3, 1), (7, 5, 3), (40, 16, 1), (40, 16, 7), (40, 16, 40), (97, 64, 1000)])
def test_matches_the_dense_formula(n: int, dim: int, block_size: int, include_self: bool) -> None:
    h = clustered(n, dim, seed=n + dim)
    got = self_attention_scores(h, include_self=include_self, block_size=block_size)
    expected = dense_scores(h, include_self)
    assert got.dtype == torch.float32 and got.shape == (n,)
    torch.testing.assert_close(got.double(), expected, rtol=2e-6, atol=1e-9)
    assert float(expected.std()) > 1e-3 * float(expected.mean()), "test data must not give uniform scores"


def test_the_diagonal_changes_the_scores() -> None:
    h = clustered(30, 8)
    with_self = self_attention_scores(h, include_self=True)
    without = self_attention_scores(h, include_self=False)
    assert not torch.allclose(with_self, without, rtol=1e-3)
    torch.testing.assert_close(with_self.sum(), torch.tensor(1.0))
    torch.testing.assert_close(without.sum(), torch.tensor(30 / 29))


def test_scale_is_one_over_sqrt_d() -> None:
    # Doubling every feature multiplies the logits by 4: same as a model without the sqrt(d).
    h = clustered(25, 16)
    base = self_attention_scores(h)
    assert not torch.allclose(base, self_attention_scores(2 * h), rtol=1e-3)
    h2 = torch.cat([h, torch.zeros(25, 48)], dim=1)   # d 16 -> 64 with the same dot products: logits halve
    torch.testing.assert_close(self_attention_scores(h2), self_attention_scores(h / math.sqrt(2)))


def test_lone_token_and_input_checks() -> None:
    assert self_attention_scores(torch.randn(1, 4)).tolist() == [1.0]
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        self_attention_scores(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="block_size"):
        self_attention_scores(torch.randn(5, 4), block_size=0)


def test_low_precision_input_is_scored_in_float32() -> None:
    h = clustered(50, 32).bfloat16()
    torch.testing.assert_close(self_attention_scores(h), self_attention_scores(h.float()), rtol=0, atol=0)


@pytest.mark.parametrize("include_self", [False, True])
def test_blocked_equals_dense_at_n_3000(include_self: bool) -> None:
    n = 3000
    h = clustered(n, 256, seed=3)
    dense = self_attention_scores(h, include_self=include_self, block_size=n)   # one block: the [N, N] matrix
    reference = dense_scores(h, include_self)
    torch.testing.assert_close(dense.double(), reference, rtol=2e-6, atol=1e-12)
    for block_size in (256, 1000, DEFAULT_BLOCK_SIZE):
        blocked = self_attention_scores(h, include_self=include_self, block_size=block_size)
        # Complete softmax rows per block, summed in float64: bit for bit the dense result.
        assert torch.equal(blocked, dense), f"block_size={block_size}"
    odd = self_attention_scores(h, include_self=include_self, block_size=7)   # other matmul kernels: rounding only
    torch.testing.assert_close(odd, dense, rtol=1e-6, atol=0)
    for k in (30, 300, 1500):
        assert set(top_k_indices(odd, k).tolist()) == set(top_k_indices(dense, k).tolist())


class _LargestTensor(TorchFunctionMode):
    """Records the largest tensor any torch function returns inside the block."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_is_o_n_times_block() -> None:
    n, block = 3000, 256
    h = clustered(n, 64)
    with _LargestTensor() as blocked:
        self_attention_scores(h, block_size=block)
    with _LargestTensor() as dense:
        self_attention_scores(h, block_size=n)
    assert blocked.largest == block * n
    assert dense.largest == n * n


# ------------------------------------------------------------------------- the Selector


def _tokens(features: torch.Tensor, pre_projector: torch.Tensor | None = None) -> VisualTokens:
    return VisualTokens(features=features, layout=ImageLayout.grid(1, features.shape[0]), pre_projector=pre_projector)


def test_selector_keeps_the_top_scores() -> None:
    h = clustered(60, 16)
    selector = SelfAttentionSelector()
    kept = selector.select(_tokens(h), 12)
    assert kept.tolist() == top_k_indices(self_attention_scores(h), 12).tolist()
    literal = SelfAttentionSelector(include_self=True).select(_tokens(h), 12)
    assert literal.tolist() == top_k_indices(self_attention_scores(h, include_self=True), 12).tolist()


def test_selector_features_option_and_inputs() -> None:
    projected, pre = clustered(40, 16, seed=1), clustered(40, 8, seed=2)
    assert SelfAttentionSelector().inputs == frozenset()
    selector = SelfAttentionSelector(features="pre_projector")
    assert selector.inputs == frozenset({"pre_projector"})
    torch.testing.assert_close(selector.score(_tokens(projected, pre)), self_attention_scores(pre))
    with pytest.raises(OptionsError, match="features='projected'"):
        selector.score(_tokens(projected))


def test_selector_options_are_validated() -> None:
    registry = tokred.default_registry()
    with pytest.raises(OptionsError, match="features"):
        registry.selector("star.self_attention", features="clip")
    with pytest.raises(OptionsError, match="block_size"):
        registry.selector("star.self_attention", block_size=0)
    with pytest.raises(OptionsError, match="valid options"):
        registry.selector("star.self_attention", blocks=3)


def _capture_full_embeds(model: nn.Module, store: list[torch.Tensor]) -> Any:
    """Capture ``inputs_embeds`` entering the language model ahead of every other pre-hook (tokred's
    included, when registered inside the run): the unreduced sequence."""
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        store.append(kwargs["inputs_embeds"].detach().clone())

    return model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True, prepend=True)


@pytest.mark.parametrize("features", ["projected", "pre_projector"])
def test_stage1_in_a_run_keeps_the_top_scored_tokens(llava: Any, one_prompt: dict, features: str) -> None:
    model, _ = llava
    embeds: list[torch.Tensor] = []
    projector_inputs: list[torch.Tensor] = []
    method = tokred.create("star", keep=40, stage2=False, stage1_features=features)
    with tokred.apply(model, method) as run, torch.no_grad():
        handles = [
            _capture_full_embeds(model, embeds),
            model.model.multi_modal_projector.register_forward_pre_hook(
                lambda module, args: projector_inputs.append(args[0].detach().clone())),
        ]
        try:
            model(**one_prompt)
        finally:
            for handle in handles:
                handle.remove()
    image_positions = one_prompt["input_ids"][0] == model.config.image_token_id
    scored = embeds[0][0, image_positions] if features == "projected" else projector_inputs[0][0]
    assert scored.shape[0] == 576
    expected = sorted(top_k_indices(self_attention_scores(scored), 40).tolist())
    assert run.report.images[0].kept_stage1 == expected


def test_pre_projector_features_reach_the_selector_in_generate(llava: Any, one_prompt: dict) -> None:
    model, _ = llava
    method = tokred.create("star", keep=40, stage2=False, stage1_features="pre_projector")
    with tokred.apply(model, method) as run, torch.no_grad():
        model(**one_prompt)
        by_forward = run.report.images[0].kept_stage1
        model.generate(**one_prompt, max_new_tokens=2, do_sample=False)
    assert run.report.images[0].kept_stage1 == by_forward
