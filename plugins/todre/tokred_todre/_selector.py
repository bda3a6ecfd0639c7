"""``todre.diversity``: ToDRE's stage-I Selector (token diversity, before the language model).

Li, Yang, Lu, "ToDRE: Effective Visual Token Pruning via Token Diversity and Task Relevance",
arXiv 2505.18757 v2, section on token diversity: the projected visual tokens (the LLM's input
embeddings of the image) are compared by cosine similarity; a pivot token is chosen by the vision
encoder's [CLS] attention, then greedy max-sum diversification adds the most dissimilar tokens until
the budget is reached. The v1 paper used greedy k-center instead (``objective="k_center"``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AfterValidator, Field
from tokred import OptionsError, Selector, VisualTokens

from ._greedy import k_center, max_sum_diversity, row_norms

if TYPE_CHECKING:
    import torch

__all__ = ["DiversitySelector", "Objective", "PivotRule", "pivot_index"]

_PIVOT = re.compile(r"^(cls_attention|max_norm|index:(0|[1-9][0-9]*))$")


def _check_pivot(rule: str) -> str:
    if not _PIVOT.match(rule):
        raise ValueError(f"pivot must be 'cls_attention', 'max_norm' or 'index:<i>' with an integer i >= 0, got {rule!r}")
    return rule


#: How the first token is chosen: ``"cls_attention"``, ``"max_norm"`` or ``"index:<i>"``.
PivotRule = Annotated[str, AfterValidator(_check_pivot)]
#: The greedy rule: ToDRE v2's max-sum diversification or v1's k-center.
Objective = Literal["max_sum", "k_center"]


def pivot_index(tokens: VisualTokens, rule: str) -> int:
    """The index (into the image's ``N`` tokens) of the first token the greedy selection keeps.

    Rules:

    * ``"cls_attention"`` (the paper's): the token with the highest [CLS] -> patch attention of the
      vision encoder (``tokens.cls_attention`` ``[N]``). For tiled images (LLaVA-NeXT, InternVL)
      only the global thumbnail's tokens are candidates (``tokens.layout.thumbnail_mask()``), as the
      paper does; layouts without a thumbnail (video: every frame) make every token a candidate.
      Ours: tokens marked ``layout.extra`` (a [CLS] token kept as a visual token, LLaVA-NeXT's row
      separators) are never candidates, since the paper's rule ranks patches; if that leaves no
      candidate, every token is one. **Fallback (ours)** for encoders without a
      [CLS] token (Qwen2/2.5/3-VL: ``tokens.cls_attention is None``): the ``"max_norm"`` rule,
      which is deterministic and needs no extra input.
    * ``"max_norm"`` (ours): the candidate token whose projected feature has the largest L2 norm.
    * ``"index:<i>"`` (ours, for experiments): token ``i``; an error if ``i >= N``.

    Ties go to the lowest index.
    """
    import torch

    _check_pivot(rule)
    n = tokens.num_tokens
    if rule.startswith("index:"):
        index = int(rule.split(":", 1)[1])
        if index >= n:
            raise ValueError(f"pivot {rule!r} is outside this image's {n} visual tokens")
        return index
    layout = tokens.layout
    candidates = layout.thumbnail_mask().to(torch.bool)                        # [N]
    if layout.extra is not None:
        candidates = candidates & ~layout.extra.to(torch.bool)
    if not bool(candidates.any()):
        candidates = torch.ones(n, dtype=torch.bool)
    if rule == "cls_attention" and tokens.cls_attention is not None:
        scores = tokens.cls_attention.detach().float().flatten()               # [N]
        if scores.numel() != n:
            raise ValueError(f"cls_attention has {scores.numel()} entries for an image of {n} visual tokens")
    else:
        features = tokens.features.detach()
        scores = row_norms(features, torch.promote_types(features.dtype, torch.float32))  # [N]
    scores = scores.cpu().masked_fill(~candidates, float("-inf"))
    return int(torch.argmax(scores))                                          # first maximum: lowest index


class DiversitySelector(Selector):
    """ToDRE stage I: keep a diverse subset of an image's projected visual tokens (arXiv 2505.18757 v2).

    ``select(tokens, k)`` reads ``tokens.features`` ``[N, D]`` (the projected tokens; similarities
    are cosine, i.e. rows L2-normalised), picks the pivot with :func:`pivot_index`, runs
    :func:`~tokred_todre.max_sum_diversity` (default) or :func:`~tokred_todre.k_center`, and returns
    the ``[k]`` chosen indices in the order they were chosen; the runtime restores spatial order.
    Cost: ``O(N * k * D)`` time, ``O(N)`` extra memory. When ``k == N`` every token is kept and the
    greedy loop is skipped (ours: the kept set is the same, only its irrelevant order differs).
    """

    objective: Objective = Field(
        "max_sum",
        description="Greedy rule: 'max_sum' (ToDRE v2, default) or 'k_center' (farthest point, ToDRE v1).",
    )
    pivot: PivotRule = Field(
        "cls_attention",
        description="First token: 'cls_attention' (paper; falls back to 'max_norm' without a [CLS] token), "
        "'max_norm' or 'index:<i>'.",
    )

    @property
    def inputs(self) -> frozenset[str]:  # type: ignore[override]
        """What the runtime must capture: the [CLS] attention, only for the ``cls_attention`` pivot
        (so ``pivot="max_norm"`` also runs where none can be captured, e.g. under beam search)."""
        return frozenset({"cls_attention"}) if self.pivot == "cls_attention" else frozenset()

    def validate(self, num_tokens: int) -> None:
        """``pivot="index:<i>"`` needs ``i < N`` on every image (every tile with ``spread="tiles"``)."""
        if self.pivot.startswith("index:") and int(self.pivot.split(":", 1)[1]) >= num_tokens:
            raise OptionsError(
                f"todre.diversity: pivot={self.pivot!r} is outside an image of {num_tokens} visual tokens "
                f"(valid: index:0 to index:{num_tokens - 1})"
            )

    def select(self, tokens: VisualTokens, k: int) -> torch.Tensor:
        import torch

        if k == tokens.num_tokens:
            return torch.arange(k)
        greedy = max_sum_diversity if self.objective == "max_sum" else k_center
        return greedy(tokens.features, k, pivot_index(tokens, self.pivot))
