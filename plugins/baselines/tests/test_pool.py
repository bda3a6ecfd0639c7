"""pool: get_2dPool's outputs, the band rule equal to avg_pool2d on exact strides, tiles and extras."""

from __future__ import annotations

import pytest
import torch
import tokred
from tokred.testing import make_visual_tokens
from tokred_baselines import PoolSelector, band_cells, pool_2d, pool_grid


@pytest.mark.reference("pool")
def test_pool_2d_reproduces_get_2d_pool(case: dict) -> None:
    """``get_2dPool`` (LLaVA-VL/LLaVA-NeXT@df17966, llava_arch.py 171-190): average (floor) and bilinear."""
    pooled = pool_2d(case["features"], int(case["side"]), int(case["stride"]), case["mode"])
    torch.testing.assert_close(pooled, case["pooled"], rtol=1e-5, atol=1e-6)


@pytest.mark.reference("pool", ["avg_24_s2", "avg_24_s3", "avg_12_s2_two_frames"])
def test_band_rule_equals_average_pooling_on_exact_strides(case: dict) -> None:
    """Where the budget is an exact s x s pooling, tokred's band rule is ``avg_pool2d(s)``."""
    side, stride = int(case["side"]), int(case["stride"])
    k = (side // stride) ** 2
    for frame in range(case["features"].shape[0]):
        centres, pooled = pool_grid(case["features"][frame], side, side, k)
        torch.testing.assert_close(pooled, case["pooled"][frame], rtol=1e-5, atol=1e-6)
        rows, cols = centres // side, centres % side
        assert torch.equal(rows, torch.arange(side // stride).repeat_interleave(side // stride) * stride + (stride - 1) // 2)
        assert torch.equal(cols, torch.arange(side // stride).repeat(side // stride) * stride + (stride - 1) // 2)


@pytest.mark.parametrize(("rows", "cols", "k"), [(24, 24, 64), (24, 24, 100), (27, 27, 169), (3, 7, 5), (5, 1, 3),
                                                 (12, 16, 1), (12, 16, 192), (6, 6, 35)])
def test_band_cells_tile_the_grid_with_exactly_k_rectangles(rows: int, cols: int, k: int) -> None:
    cells = band_cells(rows, cols, k)
    assert len(cells) == k
    covered = torch.zeros(rows, cols, dtype=torch.long)
    for r0, r1, c0, c1 in cells:
        assert r1 > r0 and c1 > c0
        covered[r0:r1, c0:c1] += 1
    assert bool((covered == 1).all())


def test_keep_everything_is_exact_and_single_cells_keep_their_features() -> None:
    features = torch.randn(30, 5, generator=torch.Generator().manual_seed(0))
    selection = PoolSelector().select(make_visual_tokens(features, grid=(5, 6)), 30)
    order = torch.argsort(selection.indices)
    assert selection.indices[order].tolist() == list(range(30))
    assert torch.equal(selection.features[order], features)


def test_tiles_and_extras() -> None:
    """Two 4x4 tiles and two extra tokens (newlines of tile 1): 9 tokens -> shares by tile size."""
    grid = tokred.ImageLayout.grid(4, 4)
    tile = torch.cat([torch.zeros(16, dtype=torch.long), torch.ones(18, dtype=torch.long)])
    row = torch.cat([grid.row, grid.row[:8], torch.tensor([-1]), grid.row[8:], torch.tensor([-1])])
    col = torch.cat([grid.col, grid.col[:8], torch.tensor([-1]), grid.col[8:], torch.tensor([-1])])
    extra = torch.zeros(34, dtype=torch.bool)
    extra[[24, 33]] = True
    layout = tokred.ImageLayout(tile=tile, row=row, col=col, grids=((4, 4), (4, 4)), thumbnail_tile=0, extra=extra)
    features = torch.randn(34, 3, generator=torch.Generator().manual_seed(2))
    selection = PoolSelector().select(make_visual_tokens(features, layout=layout), 9)
    kept = sorted(selection.indices.tolist())
    assert len(kept) == 9 and len(set(kept)) == 9
    assert sum(1 for i in kept if i < 16) == 4                               # split_proportionally(9, [16, 18])
    # Tile 0 at k = 4 is a 2x2 pooling: its first token is the mean of the top-left 2x2 block.
    first = selection.features[selection.indices.tolist().index(min(kept))]
    torch.testing.assert_close(first, features[[0, 1, 4, 5]].mean(0))
