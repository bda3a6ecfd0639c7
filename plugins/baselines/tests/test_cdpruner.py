"""CDPruner: relevance, kernel and greedy against the authors' outputs; the selector's contract."""

from __future__ import annotations

import pytest
import torch
import tokred
from tokred.testing import make_visual_tokens
from tokred_baselines import CDPrunerSelector, cdpruner_kernel, cdpruner_relevance, dpp_greedy


@pytest.mark.reference("cdpruner")
def test_reproduces_the_authors_kept_tokens(case: dict) -> None:
    """``encode_images`` (Theia-4869/CDPruner@9541616, llava_arch.py 140-187): relevance normalised
    over all crops together, one greedy DPP of T tokens per crop; kept indices exactly."""
    features, image_embeds, text_embeds = case["features"], case["image_embeds"], case["text_embeds"]
    t = int(case["visual_token_num"])
    relevance = cdpruner_relevance(image_embeds, text_embeds)                  # [B, N], joint over crops
    for crop in range(features.shape[0]):
        chosen = dpp_greedy(cdpruner_kernel(features[crop], relevance[crop]), t)
        assert torch.equal(torch.sort(chosen).values, case["kept_sorted"][crop])
        mask = torch.zeros(features.shape[1], dtype=torch.bool)
        mask[chosen] = True
        assert torch.equal(mask, case["index_masks"][crop])


def test_exhausted_kernel_keeps_distinct_tokens() -> None:
    """Rank 2 kernel, 5 tokens: the code would take sqrt of non-positive gains; we fill by relevance."""
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    relevance = torch.tensor([0.5, 0.4, 0.9, 0.3, 0.1])
    chosen = dpp_greedy(cdpruner_kernel(features, relevance), 5, fallback=relevance)
    # By gain: the most relevant of each direction (2, then 1); then the rest by relevance.
    assert chosen.tolist() == [2, 1, 0, 3, 4]


def test_relevance_without_instruction_is_uniform() -> None:
    features = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(cdpruner_relevance(features, features[:0]), torch.ones(20))
    assert torch.equal(cdpruner_relevance(features[:1].expand(20, -1), features[:3]), torch.ones(20))  # constant


def test_selector_conditions_on_the_instruction() -> None:
    g = torch.Generator().manual_seed(1)
    features = torch.randn(64, 16, generator=g)
    a = make_visual_tokens(features, grid=(8, 8), instruction_embeddings=torch.randn(5, 16, generator=g))
    b = make_visual_tokens(features, grid=(8, 8), instruction_embeddings=torch.randn(5, 16, generator=g))
    chosen_a, chosen_b = CDPrunerSelector().select(a, 8), CDPrunerSelector().select(b, 8)
    assert torch.unique(chosen_a).numel() == 8
    assert set(chosen_a.tolist()) != set(chosen_b.tolist())
    assert set(CDPrunerSelector(relevance="none").select(a, 8).tolist()) == set(CDPrunerSelector(relevance="none").select(b, 8).tolist())
    assert "instruction_embeddings" in CDPrunerSelector.inputs


def test_method_defaults() -> None:
    schedule = tokred.create("cdpruner").schedule()
    assert schedule.selector.budget.tokens_for(576) == 64 and schedule.selector.budget.spread == "tiles"
