"""The greedy functions against hand-worked examples, a naive reference and a property."""

from __future__ import annotations

import pytest
import torch

import tokred_todre._greedy as greedy
from tokred_todre import k_center, max_sum_diversity

FUNCTIONS = (max_sum_diversity, k_center)


def _naive(features: torch.Tensor, k: int, pivot: int, objective: str) -> list[int]:
    """The textbook definition with a full float64 cosine matrix, for comparison only."""
    x = torch.nn.functional.normalize(features.double(), dim=1)
    gram = x @ x.T                                                             # [N, N]
    chosen = [pivot]
    while len(chosen) < k:
        to_chosen = gram[:, chosen]
        score = to_chosen.sum(1) if objective == "max_sum" else to_chosen.max(1).values
        score[chosen] = float("inf")
        chosen.append(int(score.argmin()))
    return chosen[:k]


def _total_similarity(features: torch.Tensor, subset: torch.Tensor) -> float:
    """Summed pairwise cosine similarity of ``subset`` (each unordered pair once)."""
    x = torch.nn.functional.normalize(features.double(), dim=1)[subset]
    gram = x @ x.T
    return float((gram.sum() - gram.diagonal().sum()) / 2)


# ------------------------------------------------------------------ hand-worked


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_compass_points(fn) -> None:
    # (1,0) first; (-1,0) is the only point with similarity -1; then (0,1) and (0,-1) tie at 0 on
    # both objectives (sum 0 + 0, max 0) and the lower index goes first.
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert fn(features, 4, 0).tolist() == [0, 2, 1, 3]
    assert fn(features, 4, 1).tolist() == [1, 3, 0, 2]


def test_circle_of_integer_points() -> None:
    # Twelve points of norm 5 on a circle, at roughly 30 degree steps: exact integer dot products,
    # so the ties below are exact. Pivot (5, 0).
    circle = [(5, 0), (4, 3), (3, 4), (0, 5), (-3, 4), (-4, 3), (-5, 0), (-4, -3), (-3, -4), (0, -5), (3, -4), (4, -3)]
    features = torch.tensor(circle, dtype=torch.float32)
    # Second: the antipode (-5, 0), index 6. Then every point's similarities to (5,0) and (-5,0)
    # cancel, sums are all 0 and max-sum takes the lowest index, 1; k-center takes the points
    # closest to the perpendicular, (0, 5) and (0, -5) (max |cos| = 0), lowest index first.
    assert max_sum_diversity(features, 3, 0).tolist() == [0, 6, 1]
    assert k_center(features, 4, 0).tolist() == [0, 6, 3, 9]
    # With (0, 5) and (0, -5) chosen, each of the eight remaining points has largest similarity
    # max(|x|, |y|) / 5 = 0.8 exactly (dot product 20): a tie, won by the lowest index.
    assert k_center(features, 5, 0).tolist() == [0, 6, 3, 9, 1]


def test_objectives_differ_where_sum_and_max_disagree() -> None:
    # p first, q = argmin similarity to p (-0.8). Then a has similarities (-0.5, 0.4) to (p, q):
    # sum -0.1, max 0.4; b has (0.1, 0.1): sum 0.2, max 0.1. Max-sum takes a, k-center takes b.
    p = [1.0, 0.0, 0.0]
    q = [-0.8, 0.6, 0.0]
    a = [-0.5, 0.0, 0.75**0.5]
    b = [0.1, 0.3, 0.9**0.5]
    features = torch.tensor([p, q, a, b])
    assert max_sum_diversity(features, 3, 0).tolist() == [0, 1, 2]
    assert k_center(features, 3, 0).tolist() == [0, 1, 3]
    assert max_sum_diversity(features, 4, 0).tolist() == [0, 1, 2, 3]
    assert k_center(features, 4, 0).tolist() == [0, 1, 3, 2]


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_duplicates_come_last(fn) -> None:
    e1, e2, e3 = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]
    features = torch.tensor([e1, e1, e2, e2, e3])
    # 0 (pivot) -> 2 (first distinct, lowest index) -> 4 -> duplicates 1 and 3 (score 1 each).
    assert fn(features, 5, 0).tolist() == [0, 2, 4, 1, 3]
    assert fn(features, 3, 0).tolist() == [0, 2, 4]


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_scale_does_not_matter(fn) -> None:
    # Cosine similarity: rows are compared after L2 normalisation.
    features = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    scales = torch.rand(40, 1, generator=torch.Generator().manual_seed(2)) * 100 + 0.01
    assert torch.equal(fn(features, 12, 5), fn(features * scales, 12, 5))


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_k_is_one_n_or_zero(fn) -> None:
    features = torch.randn(9, 4, generator=torch.Generator().manual_seed(0))
    assert fn(features, 1, 7).tolist() == [7]
    everything = fn(features, 9, 3)
    assert everything[0] == 3 and sorted(everything.tolist()) == list(range(9))
    empty = fn(features, 0, 3)
    assert empty.shape == (0,) and empty.dtype == torch.long


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_zero_rows_have_similarity_zero(fn) -> None:
    features = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0], [1.0, 0.1]])
    # The zero row has similarity 0 to everything. After 0 and then 2 (similarity -1), it scores 0
    # on both objectives; row 3 scores cos - cos = 0 (max-sum: a tie, lowest index wins) and
    # max(cos, -cos) = 0.995 (k-center: the zero row is farther). Either way row 1 is next.
    assert fn(features, 3, 0).tolist() == [0, 2, 1]


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_invalid_arguments(fn) -> None:
    features = torch.randn(5, 3)
    for k, pivot in ((6, 0), (-1, 0), (2, 5), (2, -1)):
        with pytest.raises(ValueError):
            fn(features, k, pivot)
    with pytest.raises(ValueError, match="2-D"):
        fn(features[0], 1, 0)
    with pytest.raises(ValueError, match="floating"):
        fn(torch.ones(5, 3, dtype=torch.long), 1, 0)
    bad = features.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        fn(bad, 2, 0)


# ------------------------------------------------------------------ references


@pytest.mark.parametrize("objective", ["max_sum", "k_center"])
@pytest.mark.parametrize("seed", range(8))
def test_matches_the_naive_definition(objective: str, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n, d = 30 + 17 * seed, 3 + 5 * seed
    features = torch.randn(n, d, generator=g) + torch.randn(1, d, generator=g)  # off-centre, like real tokens
    fn = max_sum_diversity if objective == "max_sum" else k_center
    k, pivot = n // 3, seed % n
    assert fn(features, k, pivot).tolist() == _naive(features, k, pivot, objective)


@pytest.mark.parametrize("fn", FUNCTIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_accumulate_in_float32_in_blocks(fn, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    features = torch.randn(50, 8, generator=torch.Generator().manual_seed(3)).to(dtype)
    expected = fn(features.float(), 20, 4)                                     # the same values, float32
    monkeypatch.setattr(greedy, "BLOCK_ELEMENTS", 24)                           # 3 rows per block: many blocks
    assert torch.equal(fn(features, 20, 4), expected)


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_no_quadratic_memory(fn) -> None:
    # An N x N similarity matrix for N = 200,000 would need 160 GB; the greedy loop needs O(N).
    features = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(0))
    chosen = fn(features, 3, 0)
    assert chosen.tolist()[0] == 0 and len(set(chosen.tolist())) == 3


# ------------------------------------------------------------------ property


@pytest.mark.parametrize("seed", range(30))
def test_max_sum_beats_random_subsets(seed: int) -> None:
    """The max-sum result's summed pairwise similarity is never worse than any of 20 random subsets
    of the same size, in the regime the selector works in (N in 50..400, k = 10% of N). Greedy
    max-sum is a heuristic: for tiny N with k near N/2 a lucky random subset can beat it."""
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(50, 400, (1,), generator=g))
    d = int(torch.randint(4, 64, (1,), generator=g))
    k = max(2, round(0.1 * n))
    features = torch.randn(n, d, generator=g) + 0.5 * torch.randn(1, d, generator=g)
    pivot = int(torch.randint(0, n, (1,), generator=g))
    ours = _total_similarity(features, max_sum_diversity(features, k, pivot))
    for _ in range(20):
        assert ours <= _total_similarity(features, torch.randperm(n, generator=g)[:k]) + 1e-9
