"""Greedy diversity selection on cosine similarity: ToDRE's stage-I algorithms as plain functions.

* :func:`max_sum_diversity`: greedy max-sum diversification, the rule of ToDRE v2 (Li, Yang, Lu,
  "ToDRE: Effective Visual Token Pruning via Token Diversity and Task Relevance", arXiv 2505.18757
  v2, Nov 2025). Starting from a pivot, each step adds the token whose summed cosine similarity to
  the tokens chosen so far is smallest (equivalently: whose summed cosine distance ``1 - cos`` to
  them is largest).
* :func:`k_center`: greedy k-center / farthest-point selection, the rule of ToDRE v1 (arXiv
  2505.18757 v1, May 2025; also DivPrune's max-min rule). Each step adds the token whose largest
  cosine similarity to the chosen tokens is smallest (the one farthest from the chosen set).

Both take ``features`` ``[N, D]`` and return the chosen indices ``[k]`` in the order they were
chosen, the pivot first. Cost: ``k - 1`` matrix-vector products, ``O(N * k * D)`` time, and
``O(N)`` extra memory beyond the input (a running score per token); no ``N x N`` similarity matrix
is ever formed.

Choices the papers leave open, which are ours:

* cosine similarity is computed as ``(x_i . x_c) / (|x_i| |x_c|)`` from the raw rows and their norms,
  which equals the dot product of L2-normalised rows without materialising a normalised copy;
  rows of zero norm get similarity 0 to everything (their norm is clamped to ``1e-12``);
* accumulation is in float32 (float64 inputs stay float64); inputs of lower precision (bf16,
  fp16) are upcast in row blocks of at most :data:`BLOCK_ELEMENTS` elements per product, so the
  extra memory stays ``O(N)`` plus one bounded block;
* ties are broken towards the lowest index (``torch.argmin`` returns the first minimum);
* ``k = 0`` returns an empty tensor; ``k`` outside ``0 .. N``, a pivot outside ``0 .. N - 1`` (so
  any pivot when ``N = 0``) and non-finite features raise :class:`ValueError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch

__all__ = ["max_sum_diversity", "k_center", "row_norms", "BLOCK_ELEMENTS"]

#: Upper bound on the elements of one upcast row block for low-precision inputs (16 MiB in fp32).
BLOCK_ELEMENTS = 1 << 22

_Reduction = Literal["sum", "max"]


def max_sum_diversity(features: torch.Tensor, k: int, pivot: int) -> torch.Tensor:
    """Greedy max-sum diversification on cosine similarity (ToDRE v2, arXiv 2505.18757 v2).

    Keeps a running sum ``s [N]`` of each token's cosine similarities to the chosen set; the pivot
    is chosen first, then each step chooses the unchosen token with the smallest ``s``.

    Args:
        features: ``[N, D]`` token features (any float dtype, any device). They need not be
            normalised: similarities are cosine similarities.
        k: number of tokens to choose, ``0 <= k <= N``.
        pivot: index of the first token, ``0 <= pivot < N``.

    Returns:
        ``[k]`` long tensor on ``features.device``: the chosen indices in the order they were
        chosen (``result[0] == pivot`` when ``k >= 1``). Ties go to the lowest index.
    """
    return _greedy(features, k, pivot, "sum")


def k_center(features: torch.Tensor, k: int, pivot: int) -> torch.Tensor:
    """Greedy k-center (farthest point) selection on cosine distance (ToDRE v1, arXiv 2505.18757 v1).

    Keeps ``m [N]``, each token's largest cosine similarity to the chosen set; the pivot is chosen
    first, then each step chooses the unchosen token with the smallest ``m``, i.e. the token whose
    cosine distance ``1 - cos`` to its nearest chosen token is largest.

    Args:
        features: ``[N, D]`` token features (any float dtype, any device).
        k: number of tokens to choose, ``0 <= k <= N``.
        pivot: index of the first token, ``0 <= pivot < N``.

    Returns:
        ``[k]`` long tensor on ``features.device``: the chosen indices in the order they were
        chosen (``result[0] == pivot`` when ``k >= 1``). Ties go to the lowest index.
    """
    return _greedy(features, k, pivot, "max")


def _greedy(features: torch.Tensor, k: int, pivot: int, reduction: _Reduction) -> torch.Tensor:
    """Shared loop: ``reduction`` folds each step's similarities ``[N]`` into the running score."""
    import torch

    if features.dim() != 2:
        raise ValueError(f"features must be 2-D [N, D], got shape {tuple(features.shape)}")
    if not features.is_floating_point():
        raise ValueError(f"features must be a floating-point tensor, got {features.dtype}")
    n = features.shape[0]
    if not 0 <= k <= n:
        raise ValueError(f"k must lie in 0..{n} for {n} tokens, got {k}")
    if not 0 <= pivot < n:
        raise ValueError(f"pivot must lie in 0..{n - 1} for {n} tokens, got {pivot}")
    device = features.device
    chosen = torch.empty(k, dtype=torch.long, device=device)
    if k == 0:
        return chosen
    features = features.detach()
    accumulate = torch.promote_types(features.dtype, torch.float32)
    norms = row_norms(features, accumulate)                                    # [N]
    if not bool(torch.isfinite(norms).all()):
        raise ValueError("features contain NaN or infinite values")
    inv_norm = norms.clamp_min_(1e-12).reciprocal_()                            # [N]

    initial = 0.0 if reduction == "sum" else float("-inf")
    score = torch.full((n,), initial, dtype=accumulate, device=device)          # [N]
    similarity = torch.empty(n, dtype=accumulate, device=device)                # [N]
    current = torch.tensor([pivot], dtype=torch.long, device=device)            # [1], stays on device
    chosen[0] = pivot
    for step in range(1, k):
        _cosine_to(features, inv_norm, current, accumulate, out=similarity)
        if reduction == "sum":
            score.add_(similarity)
        else:
            torch.maximum(score, similarity, out=score)
        score.index_fill_(0, current, float("inf"))                            # never choose twice
        current = torch.argmin(score).view(1)                                   # first minimum: lowest index
        chosen[step] = current[0]
    return chosen


def _row_blocks(n: int, dim: int, dtype: torch.dtype, accumulate: torch.dtype) -> list[slice]:
    """One slice when no upcast is needed, else row blocks of at most :data:`BLOCK_ELEMENTS`."""
    if dtype == accumulate:
        return [slice(0, n)]
    rows = max(1, BLOCK_ELEMENTS // max(dim, 1))
    return [slice(start, min(start + rows, n)) for start in range(0, n, rows)]


def row_norms(features: torch.Tensor, accumulate: torch.dtype) -> torch.Tensor:
    """``[N]`` L2 norms of the rows of ``features`` ``[N, D]``, computed in ``accumulate`` precision
    (low-precision rows are upcast block by block, never all at once)."""
    import torch

    n, dim = features.shape
    norms = torch.empty(n, dtype=accumulate, device=features.device)
    for rows in _row_blocks(n, dim, features.dtype, accumulate):
        norms[rows] = torch.linalg.vector_norm(features[rows].to(accumulate), dim=1)
    return norms


def _cosine_to(features: torch.Tensor, inv_norm: torch.Tensor, index: torch.Tensor, accumulate: torch.dtype,
               *, out: torch.Tensor) -> None:
    """Write into ``out`` ``[N]`` the cosine similarity of every row to row ``index`` (``[1]``)."""
    import torch

    n, dim = features.shape
    anchor = features.index_select(0, index)[0].to(accumulate)                 # [D]
    for rows in _row_blocks(n, dim, features.dtype, accumulate):
        torch.mv(features[rows].to(accumulate), anchor, out=out[rows])
    out.mul_(inv_norm).mul_(inv_norm.index_select(0, index))
