"""Original positions in vLLM: provisional prompt positions plus the recompute hook give exactly the
unreduced sequence's positions at the kept columns, for 1-D RoPE (LLaVA) and M-RoPE (Qwen2-VL).

No vLLM needed: the expected positions come from the unmodified transformers model, read where its
multimodal model hands them to the language model.
"""

from __future__ import annotations

import pytest
import torch

from tokred.compat import Keyword
from tokred.integrations.vllm._positions import (
    CHANNELS,
    Media,
    decode_shifts,
    encode_shifts,
    grid_cells,
    line_cells,
    prompt_positions,
    recompute_positions,
)
from tokred.testing import make_image, tiny_model

IMAGE = 7


def _shortened(ids: torch.Tensor, runs: list[tuple[int, int, torch.Tensor]]) -> tuple[torch.Tensor, list[int]]:
    """The prompt with each run ``(start, length, kept)`` cut to its kept tokens, and the kept columns."""
    keep_cols, cursor = [], 0
    for start, length, kept in runs:
        keep_cols += list(range(cursor, start)) + [start + int(j) for j in kept]
        cursor = start + length
    keep_cols += list(range(cursor, ids.numel()))
    return ids[keep_cols], keep_cols


def _embeddings(cells: list[torch.Tensor], kept: list[torch.Tensor], dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Fake media embeddings ``[k, 4 + CHANNELS]`` carrying the shift columns, as the model builds them."""
    out = []
    for c, k in zip(cells, kept):
        shifts = (c[:, k] - c[:, :k.numel()]).T
        out.append(torch.cat([torch.zeros(k.numel(), 4, dtype=dtype), encode_shifts(shifts, dtype, "cpu")], dim=1))
    return out


def _media(short: torch.Tensor, runs: list[tuple[int, int, torch.Tensor]], cells: list[torch.Tensor]) -> list[Media]:
    media, removed = [], 0
    for (start, length, kept), c in zip(runs, cells):
        media.append(Media(start - removed, kept.numel(), c))
        removed += length - kept.numel()
    return media


def test_llava_positions_equal_the_unreduced_sequence_at_the_kept_columns() -> None:
    ids = torch.tensor([1, 2, 3] + [IMAGE] * 10 + [4, 5] + [IMAGE] * 6 + [6, 7, 8])
    runs = [(3, 10, torch.tensor([1, 3, 4, 8])), (15, 6, torch.tensor([0, 5]))]
    cells = [line_cells(10), line_cells(6)]
    short, keep_cols = _shortened(ids, runs)
    positions, delta = prompt_positions(short.numel(), _media(short, runs, cells))
    assert (positions[:, [0, 1, 2, 7, 8, 11, 12, 13]] >= 0).all() and (positions[:, [3, 4, 5, 6, 9, 10]] < 0).all()
    stripped, final, final_delta = recompute_positions(short, _embeddings(cells, [r[2] for r in runs]), positions, 0, [IMAGE])
    expected = torch.arange(ids.numel())[keep_cols].expand(3, -1)
    assert torch.equal(final, expected)
    assert delta == final_delta == ids.numel() - short.numel()      # decoding continues at the unreduced length
    assert [s.shape for s in stripped] == [(4, 4), (2, 4)]


def test_renumbered_positions_are_contiguous_and_need_no_recompute() -> None:
    positions, delta = prompt_positions(9, [Media(2, 3, line_cells(10))], renumber=True)
    assert torch.equal(positions, torch.arange(9).expand(3, -1)) and delta == 0


def test_chunked_prefill_and_a_second_pass_give_the_same_positions() -> None:
    ids = torch.tensor([1, 2] + [IMAGE] * 12 + [3] + [IMAGE] * 9 + [4, 5])
    runs = [(2, 12, torch.tensor([0, 2, 5, 7, 11])), (15, 9, torch.tensor([3, 4, 8]))]
    cells = [grid_cells(1, 3, 4), grid_cells(1, 3, 3)]
    short, _ = _shortened(ids, runs)
    positions, _ = prompt_positions(short.numel(), _media(short, runs, cells))
    embeddings = _embeddings(cells, [r[2] for r in runs])
    _, whole, delta = recompute_positions(short, embeddings, positions, 0, [IMAGE])
    # Chunk 1: tokens 0..4 (the first three kept tokens of image 0); chunk 2: the rest.
    _, part, _ = recompute_positions(short, [embeddings[0][:3]], positions, 0, [IMAGE])
    _, part, part_delta = recompute_positions(short, [embeddings[0][3:], embeddings[1]], part, 5, [IMAGE])
    assert torch.equal(part, whole) and part_delta == delta
    _, again, _ = recompute_positions(short, embeddings, whole, 0, [IMAGE])   # a preempted request resumed
    assert torch.equal(again, whole)
    _, unchanged, still = recompute_positions(short, [], whole, short.numel(), [IMAGE])   # a decoding step
    assert torch.equal(unchanged, whole) and still == delta


def test_shift_columns_survive_bfloat16() -> None:
    shifts = torch.tensor([[0, 0, 0], [-32768, 32767, 1], [255, 256, -257], [2900, -1, 12]])
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        columns = encode_shifts(shifts, dtype, "cpu")
        assert columns.shape == (4, CHANNELS) and torch.equal(decode_shifts(columns), shifts)
    with pytest.raises(ValueError, match="cannot be encoded"):
        encode_shifts(torch.tensor([[40000, 0, 0]]), torch.float32, "cpu")


def test_a_prompt_ending_in_a_reduced_image_decodes_after_its_largest_kept_position() -> None:
    """The documented limit: vLLM takes the decode offset from the largest prompt position."""
    ids = torch.tensor([1, 2] + [IMAGE] * 8)
    runs = [(2, 8, torch.tensor([1, 4]))]
    cells = [line_cells(8)]
    short, _ = _shortened(ids, runs)
    positions, delta = prompt_positions(short.numel(), _media(short, runs, cells))
    assert delta == ids.numel() - short.numel()                    # what get_mrope_input_positions says
    _, final, final_delta = recompute_positions(short, _embeddings(cells, [r[2] for r in runs]), positions, 0, [IMAGE])
    assert final_delta == int(final.max()) + 1 - short.numel() == 2 + 4 + 1 - short.numel()


def _qwen_full_positions(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """``[3, L]``: the unmodified model's M-RoPE positions, where its multimodal model hands them to
    the language model."""
    seen: dict[str, torch.Tensor] = {}

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen["positions"] = kwargs[Keyword.POSITION_IDS]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    positions = seen["positions"]
    return positions[-3:, 0]


@pytest.mark.parametrize("size", [(336, 336), (448, 224), (224, 448)])
def test_qwen2_vl_positions_equal_get_rope_index_at_the_kept_columns(size: tuple[int, int]) -> None:
    model, processor = tiny_model("qwen2_vl")
    content = [{"type": "image"}, {"type": "text", "text": "What is shown?"}, {"type": "image"}, {"type": "text", "text": "And?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = dict(processor(text=[prompt], images=[make_image(*size, seed=1), make_image(*size, seed=2)], return_tensors="pt"))
    full = _qwen_full_positions(model, inputs)
    ids = inputs["input_ids"][0]
    image_token = model.config.image_token_id
    merge = model.config.vision_config.spatial_merge_size
    grids = [(int(t), int(h) // merge, int(w) // merge) for t, h, w in inputs["image_grid_thw"].tolist()]
    starts = torch.nonzero((ids == image_token) & (torch.roll(ids, 1) != image_token)).flatten().tolist()
    runs, cells = [], []
    for i, (start, (t, h, w)) in enumerate(zip(starts, grids)):
        n = t * h * w
        kept = torch.sort(torch.randperm(n, generator=torch.Generator().manual_seed(i))[: max(1, n // 4)]).values
        runs.append((start, n, kept))
        cells.append(grid_cells(t, h, w))
    short, keep_cols = _shortened(ids, runs)
    positions, delta = prompt_positions(short.numel(), _media(short, runs, cells))
    _, final, final_delta = recompute_positions(short, _embeddings(cells, [r[2] for r in runs]), positions, 0, [image_token])
    assert torch.equal(final, full[:, keep_cols])
    full_delta = int(full.max()) + 1 - ids.numel()
    assert delta == final_delta == full_delta + ids.numel() - short.numel()


def test_unreduced_qwen_images_get_the_stock_positions_directly() -> None:
    model, processor = tiny_model("qwen2_vl")
    content = [{"type": "image"}, {"type": "text", "text": "What is shown?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = dict(processor(text=[prompt], images=[make_image(448, 224, seed=1)], return_tensors="pt"))
    full = _qwen_full_positions(model, inputs)
    ids = inputs["input_ids"][0]
    merge = model.config.vision_config.spatial_merge_size
    t, h, w = (int(v) for v in inputs["image_grid_thw"][0].tolist())
    start = int(torch.nonzero(ids == model.config.image_token_id)[0])
    positions, _ = prompt_positions(ids.numel(), [Media(start, t * h * w // merge**2, grid_cells(t, h // merge, w // merge))])
    assert torch.equal(positions, full)
