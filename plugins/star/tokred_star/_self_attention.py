"""STAR stage I: visual self-attention scores and the Selector built on them.

Guo et al., "STAR: Stage-Wise Attention-Guided Token Reduction for Efficient Large Vision-Language
Models Inference", arXiv 2505.12359. Before the language model, every visual token of an image is
scored by the attention it receives from the image's other visual tokens, computed directly on the
visual embeddings ``H`` (``[N, D]``) with no learned projection::

    A = softmax(H H^T / sqrt(D))      # [N, N], row i: how query i spreads its attention
    score_j = mean_i A[i, j]          # [N], column mean over the queries

and the highest-scoring tokens are kept. What the paper leaves open, and what we chose:

* **which embeddings** (ours): the projected features (the language model's input embeddings,
  ``features="projected"``) by default, because every adapter provides them and they are the space
  the language model attends in; ``features="pre_projector"`` uses the vision encoder's output
  before the projector, where the adapter captures it (LLaVA does).
* **self-attention on the diagonal** (ours): ``include_self=False`` by default. The score is meant as
  the attention a token receives from the *other* tokens, and without learned query/key projections
  the diagonal logit ``|h_i|^2 / sqrt(D)`` is the largest of its row whenever ``|h_i| >= |h_j|``
  (Cauchy-Schwarz), so much of a row's mass would go to the query itself. Each query's softmax
  therefore runs over the other ``N - 1`` tokens, and the column mean over those ``N - 1`` queries.
  ``include_self=True`` is the literal formula above (diagonal kept, mean over all ``N`` queries).
* **tiles, newline tokens, video frames** (ours): every token of the image is both a query and a
  key; tiled images and videos are scored as one set of ``N`` tokens.
* **precision** (ours): logits and softmax in float32 whatever the model's dtype, column sums
  accumulated in float64, scores returned as float32.

Memory: the column means are accumulated over blocks of ``block_size`` query rows, so the largest
intermediate is ``[block_size, N]``, never ``[N, N]`` (LLaVA-NeXT gives N = 2880, InternVL 3328,
videos more). Each block's rows are complete softmax rows, so blocking changes nothing but the
order of the final summation, which runs in float64 so that it does not show in the float32
result: scores equal the dense computation's (bit for bit in our CPU tests at N = 3000).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

from pydantic import Field
from tokred import OptionsError, Selector, VisualTokens
from tokred.options import Integer

if TYPE_CHECKING:
    import torch

__all__ = ["self_attention_scores", "SelfAttentionSelector", "DEFAULT_BLOCK_SIZE"]

#: Query rows per block (ours): ``[1024, N]`` float32 blocks stay small for N of a few thousand.
DEFAULT_BLOCK_SIZE = 1024


def self_attention_scores(features: torch.Tensor, *, include_self: bool = False,
                          block_size: int = DEFAULT_BLOCK_SIZE) -> torch.Tensor:
    """STAR's stage-I score: the attention each visual token receives from the image's tokens.

    Args:
        features: ``[N, D]`` the visual embeddings ``H`` of one image (any float dtype).
        include_self: whether a query's attention to itself counts (see the module notes; our
            default ``False`` masks the diagonal out of the softmax and averages over the other
            ``N - 1`` queries).
        block_size: query rows processed at once; at most two ``[block_size, N]`` float32 buffers
            are alive. Any value gives the same scores up to float32 rounding of the logits (bit for
            bit in our CPU tests for blocks of 256 rows or more).

    Returns:
        ``[N]`` float32 scores: column means of ``softmax(H H^T / sqrt(D))`` over the queries.
        They sum to 1 with ``include_self=True`` (the mean of ``N`` probability rows) and to
        ``N / (N - 1)`` with ``include_self=False``. A lone token (``N == 1``) scores 1.
    """
    import torch

    if features.dim() != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(features.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    h = features.detach().float()
    n, dim = h.shape
    if n <= 1:
        return torch.ones(n, dtype=torch.float32, device=h.device)
    scale = 1.0 / math.sqrt(dim)
    totals = torch.zeros(n, dtype=torch.float64, device=h.device)
    for start in range(0, n, block_size):
        totals += _block_column_sums(h, start, min(start + block_size, n), scale, include_self)
    return (totals / (n if include_self else n - 1)).float()


def _block_column_sums(h: torch.Tensor, start: int, stop: int, scale: float, include_self: bool) -> torch.Tensor:
    """``[N]`` float64: column sums of the attention rows of queries ``start:stop``.

    At most two ``[stop - start, N]`` float32 buffers are alive (logits, probabilities), and both are
    freed on return, before the next block's are allocated.
    """
    import torch

    logits = torch.matmul(h[start:stop], h.T).mul_(scale)                     # [b, N]
    if not include_self:
        rows = torch.arange(stop - start, device=h.device)
        logits[rows, rows + start] = float("-inf")
    return torch.softmax(logits, dim=-1).sum(dim=0, dtype=torch.float64)     # [N]


class SelfAttentionSelector(Selector):
    """STAR stage I (Guo et al., arXiv 2505.12359): keep the visual tokens that receive the most
    self-attention from the image's visual tokens.

    Scores are :func:`self_attention_scores` of ``tokens.features`` (``[N, D]``) or
    ``tokens.pre_projector`` (``[N, D_v]``); the base class keeps the top ``k`` (ties to the lower
    index) and the runtime restores spatial order. Choices marked "ours" in the module notes.
    """

    features: Literal["projected", "pre_projector"] = Field(
        "projected",
        description="Embeddings to score: 'projected' (language-model input embeddings, every model) or "
        "'pre_projector' (vision-encoder output before the projector, where the adapter captures it). "
        "Default ours; the paper says 'visual embeddings'.",
    )
    include_self: bool = Field(
        False,
        description="Count each token's attention to itself (the literal softmax(HH^T/sqrt(d)) column mean). "
        "Default ours: False, the attention a token receives from the other tokens.",
    )
    block_size: Integer = Field(
        DEFAULT_BLOCK_SIZE, ge=1,
        description="Query rows per block; memory O(N * block_size). Does not change the scores beyond float rounding.",
    )

    @property
    def inputs(self) -> frozenset[str]:  # type: ignore[override]
        """What the runtime must capture: pre-projector features when ``features="pre_projector"``."""
        return frozenset({"pre_projector"}) if self.features == "pre_projector" else frozenset()

    def required_inputs(self) -> frozenset[str]:
        """``features="pre_projector"`` cannot run without them: ``tokred.apply`` refuses it on models
        whose adapter captures none (Qwen-VL)."""
        return self.inputs

    def score(self, tokens: VisualTokens) -> torch.Tensor:
        """``[N]`` float32 stage-I scores of one image's tokens."""
        if self.features == "pre_projector":
            if tokens.pre_projector is None:
                raise OptionsError(
                    "star.self_attention was asked for features='pre_projector', but this model's adapter "
                    "captured no pre-projector features; use features='projected'"
                )
            embeddings = tokens.pre_projector
        else:
            embeddings = tokens.features
        return self_attention_scores(embeddings, include_self=self.include_self, block_size=self.block_size)
