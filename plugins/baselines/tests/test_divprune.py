"""DivPrune: the pure function against the authors' outputs, the selector's contract, the method."""

from __future__ import annotations

import pytest
import torch
import tokred
from tokred.testing import make_visual_tokens
from tokred_baselines import DivPruneSelector, divprune_budget, divprune_select


@pytest.mark.reference("divprune")
def test_reproduces_the_authors_selection_exactly(case: dict) -> None:
    """``LlavaMetaForCausalLM.DivPrune`` (vbdi/divprune@799e2d9, llava_arch.py 152-171): same indices
    in the same order, repeats included (``degenerate_k_exceeds_distinct``), with the authors' k."""
    k = divprune_budget(float(case["ratio"]), case["features"].shape[0])
    assert k == int(case["k"])
    chosen = divprune_select(case["features"], k)
    assert torch.equal(chosen, case["kept_in_selection_order"])
    assert torch.equal(torch.sort(chosen).values, case["kept_sorted"])


@pytest.mark.reference("divprune")
def test_tokred_budget_rounding_half_even_matches_the_authors(case: dict) -> None:
    n = case["features"].shape[0]
    budget = tokred.Budget(keep_ratio=float(case["ratio"]), rounding="half_even")
    assert budget.tokens_for(n) == int(case["k"])


def test_half_even_differs_from_half_up_at_an_exact_half() -> None:
    assert divprune_budget(0.1953125, 64) == 12            # 12.5 -> 12
    assert tokred.Budget(keep_ratio=0.1953125).tokens_for(64) == 13


@pytest.mark.reference("divprune")
def test_selector_keeps_distinct_tokens_and_agrees_where_the_authors_do_not_repeat(case: dict) -> None:
    k = int(case["k"])
    authors = case["kept_in_selection_order"]
    ours = divprune_select(case["features"], k, exclude_chosen=True)
    assert torch.unique(ours).numel() == k
    if torch.unique(authors).numel() == k:
        assert torch.equal(ours, authors)
    else:  # the authors re-pick chosen tokens once the distinct rows run out; the prefix agrees
        first_repeat = next(i for i in range(k) if int(authors[i]) in authors[:i].tolist())
        assert torch.equal(ours[:first_repeat], authors[:first_repeat])
        assert set(authors.tolist()) <= set(ours.tolist())


def test_selector_select_and_keep_everything() -> None:
    features = torch.randn(36, 8, generator=torch.Generator().manual_seed(0))
    tokens = make_visual_tokens(features, grid=(6, 6))
    assert DivPruneSelector().select(tokens, 36).tolist() == list(range(36))
    chosen = DivPruneSelector().select(tokens, 9)
    assert torch.equal(chosen, divprune_select(features, 9, exclude_chosen=True))


def test_zero_rows_do_not_produce_nan() -> None:
    features = torch.randn(10, 4, generator=torch.Generator().manual_seed(1))
    features[3] = 0
    chosen = divprune_select(features, 10, exclude_chosen=True)
    assert sorted(chosen.tolist()) == list(range(10))


def test_method_defaults_follow_the_code() -> None:
    method = tokred.create("divprune")
    schedule = method.schedule()
    assert schedule.selector is not None
    assert schedule.selector.budget.tokens_for(576) == 56   # SUBSET_RATIO 0.098, half-even
    assert schedule.positions == "original"
    assert tokred.create("divprune", positions="renumber").schedule().positions == "renumber"
    assert tokred.create("divprune", keep=64).schedule().selector.budget.tokens_for(576) == 64
