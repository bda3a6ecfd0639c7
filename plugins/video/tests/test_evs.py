"""What ``evs`` keeps, on hand-made layouts and on a tiny Qwen2.5-VL clip (the vLLM comparison is
test_evs_vllm.py)."""

from __future__ import annotations

import pytest
import torch

import tokred
from tokred import ImageLayout, OptionsError, VisualTokens
from tokred.testing import make_visual_tokens, tiny_model, tiny_video_inputs
from tokred_video import NO_PREVIOUS_FRAME, EVSMethod, EVSSelector, evs_scores, previous_cell, spread_evenly


def test_registered_as_a_method_and_a_selector() -> None:
    assert "evs" in tokred.list_methods()
    registry = tokred.default_registry()
    assert isinstance(registry.create("evs", keep_ratio=0.1), EVSMethod)
    assert isinstance(registry.selector("evs"), EVSSelector)
    assert "distribution tokred-video" in registry.describe(registry.selector("evs"))


def test_previous_cell_is_the_same_row_and_column_one_frame_earlier() -> None:
    tokens = VisualTokens(torch.randn(3 * 6, 4), ImageLayout.video(3, 2, 3))
    previous = previous_cell(tokens)
    assert previous[:6].tolist() == [-1] * 6
    assert previous[6:].tolist() == list(range(0, 12))


def test_scores_are_one_minus_cosine_and_255_for_the_first_frame() -> None:
    first = torch.randn(4, 8)
    second = first.clone()
    second[1] = -first[1]                       # opposite: dissimilarity 2
    second[2] = 3 * first[2]                    # same direction: dissimilarity 0
    scores = evs_scores(VisualTokens(torch.cat([first, second]), ImageLayout.video(2, 2, 2)))
    assert scores[:4].tolist() == [NO_PREVIOUS_FRAME] * 4
    assert scores[5].item() == pytest.approx(2.0, abs=1e-6)
    assert scores[6].item() == pytest.approx(0.0, abs=1e-6)


def test_the_first_frame_goes_first_then_what_changed_most() -> None:
    frames = torch.randn(1, 4, 8).repeat(3, 1, 1)
    frames[1, 3] = torch.randn(8)               # frame 1 changes one cell
    frames[2, 0] = -frames[1, 0]                # frame 2 flips another
    tokens = VisualTokens(frames.reshape(12, 8), ImageLayout.video(3, 2, 2))
    kept = EVSSelector().select(tokens, 6).sort().values
    assert kept.tolist() == [0, 1, 2, 3, 7, 8]


def test_fewer_tokens_than_one_frame_are_spread_evenly_not_the_top_rows() -> None:
    tokens = make_visual_tokens(torch.randn(576, 16), grid=(24, 24))   # a still image, no frames
    kept = EVSSelector().select(tokens, 4).sort().values
    assert [(int(i) // 24, int(i) % 24) for i in kept] == [(6, 6), (6, 18), (18, 6), (18, 18)]  # a 2 x 2 lattice
    kept = EVSSelector().select(tokens, 144)
    rows, cols = kept // 24, kept % 24
    assert torch.bincount(rows, minlength=24).tolist() == [0, 12] * 12   # every other row, every other column
    assert torch.bincount(cols, minlength=24).tolist() == [0, 12] * 12
    assert spread_evenly(torch.arange(10), 10).tolist() == list(range(10))
    assert spread_evenly(torch.arange(10), 2).tolist() == [2, 7]          # without a layout: 1-D strata
    with pytest.raises(ValueError, match="cannot spread"):
        spread_evenly(torch.arange(3), 4)


def test_per_frame_splits_the_budget_over_frames() -> None:
    tokens = VisualTokens(torch.randn(4 * 9, 8), ImageLayout.video(4, 3, 3))
    kept = EVSSelector(per_frame=True).select(tokens, 8)
    frames = tokens.layout.frame[kept]
    assert torch.bincount(frames, minlength=4).tolist() == [2, 2, 2, 2]
    whole_clip = EVSSelector().select(tokens, 8)
    assert set(tokens.layout.frame[whole_clip].tolist()) == {0}   # the first frame fills a clip-wide budget of 8 < 9


def test_tokens_that_are_not_cells_go_last() -> None:
    layout = ImageLayout.video(2, 2, 2, trailing_extra=1)
    assert layout.extra is not None and layout.extra.tolist() == [False] * 8 + [True]
    assert layout.frame is not None and layout.frame.tolist() == [0] * 4 + [1] * 5
    tokens = VisualTokens(torch.randn(9, 8), layout)
    assert evs_scores(tokens)[-1].item() == -1.0
    assert 8 not in EVSSelector().select(tokens, 8).tolist()


def test_a_tile_spread_is_refused_with_the_alternative() -> None:
    with pytest.raises(OptionsError, match="per_frame=True"):
        tokred.create("evs", keep_ratio=0.2, spread="tiles")


def test_on_a_tiny_qwen2_5_vl_clip_later_frames_keep_what_moved() -> None:
    """The synthetic clip's background stands still and its shapes move: after the first frame, evs
    keeps tokens where consecutive frames differ most."""
    model, processor = tiny_model("qwen2_5_vl")
    inputs = tiny_video_inputs(processor, ["What moves?"], frames=8)
    with tokred.apply(model, tokred.create("evs", keep_ratio=0.5)) as run, torch.no_grad():
        model(**inputs)
    record = run.report.images[0]
    assert record.kind == "video" and record.tile_sizes == [16, 16, 16, 16]
    assert record.kept_per_tile[0] == 16 and sum(record.kept_per_tile) == 32
