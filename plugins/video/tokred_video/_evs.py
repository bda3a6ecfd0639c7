"""``evs``: Efficient Video Sampling, the temporal rule of vLLM's video pruning.

vLLM (``vllm/multimodal/video_prune/evs.py``, ``compute_retention_mask``; NVIDIA, used by its
Nemotron Nano VL models) scores every token of a video by how much it changed since the previous
frame: ``1 - cos(x[t, r, c], x[t - 1, r, c])`` on the projected video embeddings (the language
model's input features), the same cell ``(r, c)`` of the frame before. The first frame has no
previous frame and scores 255, above any dissimilarity (which lies in ``[0, 2]``), so all of it is
kept first. The tokens are ranked by a stable descending sort over the whole clip and the top ones
kept. Static background is then represented once, in the first frame, and later frames contribute
what moved.

How tokred's version relates to vLLM's, and what is ours:

* **The ranking is vLLM's.** Same score, same constant for the first frame, same stable order (ties
  to the lower index, which is the earlier frame, then row-major). ``tests/test_evs_vllm.py``
  checks the kept set against vLLM 0.32's own function on stored inputs.
* **The count is tokred's budget.** vLLM keeps ``max(tokens_per_frame, int(N * (1 - q)))`` for a
  pruning rate ``q``; tokred keeps ``Budget.tokens_for(N)`` (``keep``, or ``keep_ratio`` rounded
  half up). To reproduce vLLM's count, pass ``keep=max(tokens_per_frame, int(N * (1 - q)))``.
* **Fewer tokens than one frame (ours).** vLLM never keeps fewer than one frame's tokens, so the
  order among the first frame's tokens never matters there. A tokred budget may be smaller (10% of
  a 4-frame clip is less than one frame), and a still image has no previous frame at all. Then the
  ``k`` kept tokens without a previous frame are spread evenly over them (:func:`spread_evenly`:
  a lattice of stratum centres over each tile's rows and columns), not the first ``k`` (which would
  be the top rows of the picture). With ``k`` at least their number, this changes nothing.
* **Frames of different grids (ours).** A token whose previous frame has no cell at the same
  ``(row, col)`` counts as having no previous frame. Tokens that are not grid cells
  (``layout.extra``: LLaVA-OneVision's newline after a video, when ``newline_tokens="prune"``) score
  -1 and go last.
* **Per-frame budgets (ours).** ``per_frame=True`` splits each video's budget over its frames in
  proportion to their tokens (:func:`tokred.split_proportionally`) and keeps each frame's most
  changed tokens, the first frame's spread evenly. A budget spread over tiles by the runtime
  (``spread="tiles"``) would show the selector one frame at a time, without the frame before, so
  the method refuses it and points here.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from pydantic import Field, model_validator
from tokred import (
    BudgetOptions, ImageLayout, Method, OptionsError, Schedule, Selector, SelectorStage, VisualTokens, top_k_indices,
)
from tokred.budget import split_proportionally

if TYPE_CHECKING:
    import torch

__all__ = ["NO_PREVIOUS_FRAME", "EVSSelector", "EVSMethod", "evs_scores", "previous_cell", "spread_evenly"]

#: The score of a token without a previous frame (vLLM's constant for the first frame).
NO_PREVIOUS_FRAME = 255.0
#: The score of a token that is not a grid cell (ranked after every other token).
NOT_A_CELL = -1.0


def previous_cell(tokens: VisualTokens) -> torch.Tensor:
    """``[N]`` long: for each token, the index of the token at the same ``(row, col)`` of the
    previous frame, or -1 when there is none (the first frame, a still image, a frame whose grid
    has no such cell, tokens that are not grid cells)."""
    import torch

    layout = tokens.layout
    n = layout.num_tokens
    previous = torch.full((n,), -1, dtype=torch.long)
    if layout.frame is None or n == 0:
        return previous
    frame, row, col = layout.frame.long().cpu(), layout.row.long().cpu(), layout.col.long().cpu()
    cell = (row >= 0) & (col >= 0)
    if layout.extra is not None:
        cell &= ~layout.extra.bool().cpu()
    if not bool(cell.any()):
        return previous
    rows, cols = int(row[cell].max()) + 1, int(col[cell].max()) + 1
    key = (frame * rows + row) * cols + col                                   # [N], unique per cell
    lookup = torch.full(((int(frame.max()) + 1) * rows * cols,), -1, dtype=torch.long)
    lookup[key[cell]] = torch.nonzero(cell).flatten()
    has_frame_before = cell & (frame > 0)
    previous[has_frame_before] = lookup[key[has_frame_before] - rows * cols]
    return previous


def evs_scores(tokens: VisualTokens) -> torch.Tensor:
    """``[N]``: each token's EVS score, ``1 - cos`` with the same cell of the previous frame
    (:func:`previous_cell`) on ``tokens.features`` ``[N, D]``, computed in the features' dtype as
    vLLM does; :data:`NO_PREVIOUS_FRAME` without a previous frame, :data:`NOT_A_CELL` for tokens that
    are not grid cells. Float32 on the features' device."""
    import torch

    features = tokens.features.detach()
    previous = previous_cell(tokens).to(features.device)
    scores = torch.full((tokens.num_tokens,), NO_PREVIOUS_FRAME, dtype=torch.float32, device=features.device)
    paired = torch.nonzero(previous >= 0).flatten()
    if paired.numel():
        similarity = torch.nn.functional.cosine_similarity(features[paired], features[previous[paired]], dim=-1)
        scores[paired] = (1 - similarity).float()
    extra = tokens.layout.extra
    if extra is not None:
        scores[extra.to(features.device).bool()] = NOT_A_CELL
    return scores


def spread_evenly(candidates: torch.Tensor, k: int, layout: ImageLayout | None = None) -> torch.Tensor:
    """``k`` of ``candidates`` ``[m]`` (increasing token indices, ``k <= m``), evenly spread.

    Without a layout (or where the candidates' cells do not form a tile's full grid): the middle
    element of each of ``k`` equal strata of the candidates, ``floor((j + 0.5) * m / k)``. With one:
    ``k`` split over the candidates' tiles in proportion to their sizes, and within a tile of
    ``R x C`` cells a lattice of about ``k`` stratum centres spread over rows and columns alike (on a
    plain raster order, a spacing that divides the row width would keep whole columns)."""
    import torch

    m = candidates.numel()
    if k > m:
        raise ValueError(f"cannot spread {k} picks over {m} candidates")
    if layout is None:
        return candidates[_strata(m, k)]
    tiles = layout.tile[candidates]
    present = torch.unique(tiles)
    groups = [candidates[tiles == tile] for tile in present.tolist()]
    shares = split_proportionally(k, [g.numel() for g in groups])
    picked = [_spread_in_tile(group, share, layout, int(tile)) for group, share, tile in zip(groups, shares, present.tolist())]
    return torch.cat(picked) if picked else candidates[:0]


def _strata(m: int, k: int) -> torch.Tensor:
    import torch

    return ((torch.arange(k, dtype=torch.float64) + 0.5) * m / k).floor().long()


def _spread_in_tile(group: torch.Tensor, k: int, layout: ImageLayout, tile: int) -> torch.Tensor:
    import torch

    rows, cols = layout.grids[tile]
    if k == 0:
        return group[:0]
    if group.numel() != rows * cols:  # a cropped grid or extra tokens: stratify the raster order
        return group[_strata(group.numel(), k)]
    cell = layout.row[group].long() * cols + layout.col[group].long()
    lookup = torch.full((rows * cols,), -1, dtype=torch.long)
    lookup[cell] = group
    a = min(rows, max(1, round(math.sqrt(k * rows / cols))))
    b = min(cols, math.ceil(k / a))
    a = min(rows, math.ceil(k / b))
    centre_rows = ((torch.arange(a, dtype=torch.float64) + 0.5) * rows / a).floor().long()
    centre_cols = ((torch.arange(b, dtype=torch.float64) + 0.5) * cols / b).floor().long()
    lattice = (centre_rows[:, None] * cols + centre_cols[None, :]).flatten()     # [a * b >= k], row-major
    return lookup[lattice[_strata(lattice.numel(), k)]]


def _top(scores: torch.Tensor, members: torch.Tensor, k: int, layout: ImageLayout) -> torch.Tensor:
    """``k`` of ``members`` by descending score (stable), tokens without a previous frame first and,
    when they alone exceed ``k``, spread evenly among themselves."""
    if k == 0:
        return members[:0]
    first = members[scores[members] == NO_PREVIOUS_FRAME]
    if k < first.numel():
        return spread_evenly(first, k, layout)
    return members[top_k_indices(scores[members], k)]


class EVSSelector(Selector):
    """EVS (vLLM's Efficient Video Sampling): keep the tokens that changed most since the previous frame.

    What is vLLM's and what is ours: see the module documentation.

    ``select(tokens, k)`` reads ``tokens.features`` ``[N, D]`` and ``tokens.layout`` (``frame``,
    ``row``, ``col``), scores with :func:`evs_scores` and returns ``[k]`` indices. Still images (no
    ``layout.frame``) have no previous frame: ``k`` tokens spread evenly over the image. Cost:
    ``O(N * D)``.
    """

    per_frame: bool = Field(
        False,
        description="False (vLLM's rule): rank all of a video's tokens together. True (ours): split the video's "
        "budget over its frames in proportion to their tokens and keep each frame's most changed tokens.",
    )

    def select(self, tokens: VisualTokens, k: int) -> torch.Tensor:
        import torch

        scores = evs_scores(tokens).cpu()
        everything = torch.arange(tokens.num_tokens)
        layout = tokens.layout
        if not self.per_frame or layout.frame is None:
            return _top(scores, everything, k, layout)
        frame = layout.frame.long().cpu()
        frames = int(frame.max()) + 1 if frame.numel() else 0
        members = [everything[frame == f] for f in range(frames)]
        shares = split_proportionally(k, [m.numel() for m in members])
        return torch.cat([_top(scores, m, share, layout) for m, share in zip(members, shares)])


class EVSMethod(BudgetOptions, Method):
    """EVS: keep the video tokens that changed most since the previous frame (vLLM's Efficient Video
    Sampling), before the language model.

    Options: ``keep`` / ``keep_ratio`` per video (default ``keep_ratio=0.25``, ours: vLLM's pruning
    rate has no default; ``q = 0.75`` there keeps about the same); ``per_frame`` (see
    :class:`EVSSelector`). ``spread="tiles"`` is refused: it would hide each frame's previous frame
    from the selector.
    """

    default_keep_ratio = 0.25

    per_frame: bool = Field(
        False,
        description="False (vLLM's rule): rank all of a video's tokens together. True (ours): split the video's "
        "budget over its frames in proportion to their tokens and keep each frame's most changed tokens.",
    )

    @model_validator(mode="after")
    def _no_tile_spread(self) -> EVSMethod:
        if self.spread == "tiles":
            raise OptionsError(
                "evs: spread='tiles' would show the selector one frame at a time, without the frame before it; "
                "use per_frame=True for per-frame budgets"
            )
        return self

    def schedule(self) -> Schedule:
        return Schedule(selector=SelectorStage(selector=EVSSelector(per_frame=self.per_frame), budget=self.budget))

    def keep_everything(self) -> EVSMethod:
        return self.model_copy(update={"keep": None, "keep_ratio": 1.0})
