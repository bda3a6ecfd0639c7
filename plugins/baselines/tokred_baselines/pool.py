"""``pool``: spatial average pooling of each image's token grid to the budget (a merging baseline).

No paper proposes it as a method; papers and benchmarks use it as the plain-downsampling baseline
that many pruning methods fail to beat (VTC-Bench). The token-space reference is the pooling
LLaVA-OneVision and LLaVA-NeXT-Video apply to projected video frames, ``get_2dPool``
(``LLaVA-VL/LLaVA-NeXT@df179663ae8b83207df100a1f7af24caec633ff9``, ``llava/model/llava_arch.py``
171-190): the ``side x side`` grid of projected features pooled by ``avg_pool2d(stride)`` (or
bilinear ``interpolate`` to ``ceil(side / stride)``), flattened row-major. :func:`pool_2d` is that
operation, tested against its outputs.

tokred keeps **exactly** ``k`` tokens per image, and a stride rarely gives ``k`` cells, so the
selector pools to a grid of **row bands** (**ours**; :func:`band_cells`):

* the tile's ``R x C`` grid is cut into ``b`` horizontal bands of ``floor``-spaced row boundaries,
  ``b = round(sqrt(k R / C))`` clamped to ``ceil(k / C) .. min(R, k)``, so that cells stay about
  square (aspect preserving);
* the ``k`` cells are spread over the bands as evenly as possible (the tallest bands, then the
  earlier ones, get one more), and each band's columns are cut at ``floor``-spaced boundaries;
* every cell is a rectangle of patches; its token is the **mean** of their projected features,
  placed at the cell's centre patch (the upper-left of the four central patches for even sizes), so
  the run report's kept indices are those centre patches.

When the budget is an exact ``s x s`` pooling (``R`` and ``C`` divisible by ``s``,
``k = (R / s)(C / s)``), the bands are ``s`` rows high and the cells ``s x s``: the result equals
``avg_pool2d(s)`` (tested against ``get_2dPool``'s outputs). With ``k = N`` every cell is one patch
and nothing changes.

Tiled images (LLaVA-NeXT, InternVL) are pooled **per tile** (the thumbnail is a tile): the budget is
split over the tiles in proportion to their tokens (largest remainder, as ``spread="tiles"`` does),
and each tile's present cells must form a rectangle (LLaVA-NeXT's unpadding crops tiles to
rectangles). Tokens that are not grid cells (``layout.extra``: LLaVA-NeXT's newlines with
``newline_tokens="prune"``, a [CLS] token kept as a visual token) get their proportional share of
their tile's budget and are kept, unmerged, at evenly spaced positions (**ours**).

Cost: one pass over the features, ``O(N D)``.
"""

from __future__ import annotations

import math
from typing import Literal, TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: `tokred list` starts without it
    import torch
from tokred import BudgetOptions, Method, Schedule, Selection, Selector, SelectorStage, VisualTokens
from tokred.budget import split_proportionally

from ._common import PositionsOption

__all__ = ["pool_2d", "band_cells", "pool_grid", "PoolSelector", "PoolMethod"]

#: A cell of the grid: rows ``r0 .. r1 - 1`` and columns ``c0 .. c1 - 1``.
Cell = tuple[int, int, int, int]


def pool_2d(features: torch.Tensor, side: int, stride: int, mode: Literal["average", "bilinear"] = "average") -> torch.Tensor:
    """Pooling of ``side x side`` token grids as ``get_2dPool`` does it (``llava_arch.py`` 171-190).

    Args:
        features: ``[F, side * side, D]`` row-major grids (frames of a video, or one image).
        side: the grid's side.
        stride: the pooling stride.
        mode: ``"average"`` (``avg_pool2d(stride)``: no padding, a last partial row and column
            dropped) or ``"bilinear"`` (``interpolate`` to ``ceil(side / stride)``, ``align_corners=False``).

    Returns:
        ``[F, n', D]``, row-major over the pooled grid.
    """
    import torch.nn.functional as F

    frames, tokens, dim = features.shape
    if tokens != side * side:
        raise ValueError(f"{tokens} tokens are not a {side}x{side} grid")
    grid = features.view(frames, side, side, dim).permute(0, 3, 1, 2)        # [F, D, side, side]
    if mode == "average":
        pooled = F.avg_pool2d(grid, stride)
    elif mode == "bilinear":
        size = math.ceil(side / stride)
        pooled = F.interpolate(grid, size=[size, size], mode="bilinear")
    else:
        raise ValueError(f"mode must be 'average' or 'bilinear', got {mode!r}")
    return pooled.permute(0, 2, 3, 1).reshape(frames, -1, dim)


def _boundaries(length: int, parts: int) -> list[int]:
    """``parts + 1`` floor-spaced cut points of ``0 .. length``."""
    return [i * length // parts for i in range(parts + 1)]


def band_cells(rows: int, cols: int, k: int) -> list[Cell]:
    """``k`` disjoint rectangles covering an ``rows x cols`` grid, row-major (see the module
    documentation for the rule). Equal ``s x s`` blocks when ``s`` divides both sides and
    ``k = (rows / s) (cols / s)``."""
    if not 1 <= k <= rows * cols:
        raise ValueError(f"k must lie in 1..{rows * cols} for a {rows}x{cols} grid, got {k}")
    bands = round(math.sqrt(k * rows / cols))
    bands = max(math.ceil(k / cols), min(bands, rows, k))
    row_cuts = _boundaries(rows, bands)
    heights = [row_cuts[i + 1] - row_cuts[i] for i in range(bands)]
    base, extra = divmod(k, bands)
    favoured = sorted(range(bands), key=lambda i: (-heights[i], i))[:extra]   # tallest bands first, then earlier
    cells: list[Cell] = []
    for band in range(bands):
        count = base + (1 if band in favoured else 0)
        col_cuts = _boundaries(cols, count)
        cells += [(row_cuts[band], row_cuts[band + 1], col_cuts[j], col_cuts[j + 1]) for j in range(count)]
    return cells


def pool_grid(features: torch.Tensor, rows: int, cols: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool a row-major ``rows x cols`` grid ``[rows * cols, D]`` into ``k`` cells.

    Returns:
        ``(centres, pooled)``: ``[k]`` long, each cell's centre patch (row-major index, increasing),
        and ``[k, D]`` each cell's mean feature (float32 or wider, cast back to the input dtype).
    """
    import torch

    if features.shape[0] != rows * cols:
        raise ValueError(f"{features.shape[0]} features are not a {rows}x{cols} grid")
    grid = features.detach().view(rows, cols, -1)
    accumulate = torch.promote_types(features.dtype, torch.float32)
    centres, pooled = [], []
    for r0, r1, c0, c1 in band_cells(rows, cols, k):
        centres.append(((r0 + r1 - 1) // 2) * cols + (c0 + c1 - 1) // 2)
        block = grid[r0:r1, c0:c1].to(accumulate)
        pooled.append(block.sum(dim=(0, 1)) / ((r1 - r0) * (c1 - c0)))
    return torch.tensor(centres, dtype=torch.long), torch.stack(pooled).to(features.dtype)


def _tile_grid(tokens: VisualTokens, members: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    """``(R, C, order)``: the rectangle of grid cells ``members`` (indices of one tile's grid
    tokens) occupy, and ``order`` ``[R * C]``, the member at each cell in row-major order."""
    import torch

    rows, cols = tokens.layout.row[members], tokens.layout.col[members]
    r0, c0 = int(rows.min()), int(cols.min())
    height, width = int(rows.max()) - r0 + 1, int(cols.max()) - c0 + 1
    cell = (rows - r0) * width + (cols - c0)
    if members.numel() != height * width or torch.unique(cell).numel() != cell.numel():
        raise ValueError(f"a tile's {members.numel()} grid tokens do not fill a {height}x{width} rectangle; pool needs "
                         "rectangular tiles")
    order = torch.empty(height * width, dtype=torch.long)
    order[cell] = members
    return height, width, order


class PoolSelector(Selector):
    """Average pooling of each tile's grid to exactly ``k`` tokens (a merging baseline).

    ``select(tokens, k)`` splits ``k`` over the tiles in proportion to their tokens, pools each tile's
    grid with :func:`pool_grid` (row bands of cells, each averaged and placed at its centre patch)
    and keeps non-grid tokens (``layout.extra``) unmerged at evenly spaced positions; it returns a
    :class:`~tokred.Selection` with the pooled features.
    """

    def select(self, tokens: VisualTokens, k: int) -> Selection:
        import torch

        layout = tokens.layout
        extra = layout.extra if layout.extra is not None else torch.zeros(layout.num_tokens, dtype=torch.bool)
        tiles = [torch.nonzero(layout.tile == tile).flatten() for tile in range(layout.num_tiles)]
        shares = split_proportionally(k, [members.numel() for members in tiles])
        indices: list[torch.Tensor] = []
        features: list[torch.Tensor] = []
        for members, share in zip(tiles, shares):
            if share == 0:
                continue
            grid, others = members[~extra[members]], members[extra[members]]
            grid_share, other_share = split_proportionally(share, [grid.numel(), others.numel()])
            if grid_share:
                rows, cols, order = _tile_grid(tokens, grid)
                centres, pooled = pool_grid(tokens.features[order.to(tokens.features.device)], rows, cols, grid_share)
                indices.append(order[centres])
                features.append(pooled)
            if other_share:
                spaced = others[(torch.arange(other_share) * 2 + 1) * others.numel() // (2 * other_share)]
                indices.append(spaced)
                features.append(tokens.features[spaced.to(tokens.features.device)])
        return Selection(torch.cat(indices), torch.cat(features).to(tokens.features.device))


class PoolMethod(PositionsOption, BudgetOptions, Method):
    """Pool: average-pool each image's token grid to the budget before the LLM, per tile (a baseline).

    Options: ``keep`` / ``keep_ratio`` (default ``keep_ratio=0.25``: a stride-2 pooling of square
    grids), ``spread`` (pooling is per tile either way) and ``positions``.
    """

    default_keep_ratio = 0.25

    def schedule(self) -> Schedule:
        return Schedule(selector=SelectorStage(selector=PoolSelector(), budget=self.budget), positions=self.positions)
