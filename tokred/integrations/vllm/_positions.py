"""Original positions for the kept tokens, through vLLM's M-RoPE machinery.

tokred keeps the positions of the unreduced sequence (``Schedule.positions == "original"``): a kept
visual token keeps the position it had among all of its image's tokens, and the text after an image
keeps the position it had after the whole image. vLLM computes a request's positions from its
(already shortened) token sequence before the vision encoder runs, so it cannot know which tokens a
Selector will keep. Two vLLM mechanisms together give the exact answer:

1. **Per-request positions** (``SupportsMRoPE.get_mrope_input_positions``, ``[3, L]`` for a
   request's ``L`` prompt tokens and a decode offset): :func:`prompt_positions` gives every text
   token its exact original position, and each kept placeholder an *encoded provisional* value,
   ``-1 - (start + cell[j])`` (negative, so it can never be mistaken for a final one), where
   ``cell[j]`` is the ``j``-th cell of the image's full grid.
2. **Recomputed positions** (``SupportsMultiModalPruning.recompute_mrope_positions``, vLLM's hook
   for Efficient Video Sampling): after the encoder ran, each kept embedding carries
   :data:`CHANNELS` extra columns, the shift ``cell[kept[j]] - cell[j]`` per axis
   (:func:`encode_shifts`); :func:`recompute_positions` strips them and decodes the final positions
   ``start + cell[kept[j]]``. Placeholders already final (non-negative) are left alone, so a chunk
   computed twice (a preempted request resumed) gets the same positions.

For 1-D RoPE models (LLaVA) the three rows are equal and the language model reads row 0; for
Qwen2-VL's M-RoPE the rows are (temporal, height, width), as ``get_rope_index`` lays them out.

Known limit: vLLM derives the decode offset from the largest prompt position
(``positions.max() + 1 - L``, after every recompute). That equals the unreduced sequence's offset
whenever text follows the last image (every chat template ends the prompt with text); a prompt that
*ends* in a reduced image decodes from just after its largest kept position instead.

Nothing here imports vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = [
    "CHANNELS", "Media", "grid_cells", "line_cells", "prompt_positions", "encode_shifts", "decode_shifts",
    "recompute_positions",
]

#: Extra embedding columns per kept token: 3 axes x 2 base-256 digits of ``shift + 2**15``. Digits
#: below 256 are exact in bfloat16 (8 significant bits), so the encoding survives any model dtype.
CHANNELS = 6
_OFFSET = 1 << 15
_BASE = 256


@dataclass(frozen=True)
class Media:
    """One image in a request's prompt, as :func:`prompt_positions` needs it.

    Attributes:
        offset: index of its first placeholder token in the (shortened) prompt.
        length: placeholder tokens it has in the prompt (kept tokens; all of them when unreduced).
        cells: ``[3, N]`` long, the position of each of the image's ``N`` unreduced tokens relative
            to the image's start, in sequence order (:func:`line_cells`, :func:`grid_cells`).
    """

    offset: int
    length: int
    cells: torch.Tensor

    @property
    def reduced(self) -> bool:
        return self.length < int(self.cells.shape[1])


def line_cells(n: int) -> torch.Tensor:
    """``[3, n]``: a 1-D RoPE image of ``n`` tokens (LLaVA), ``0 .. n-1`` on three equal rows."""
    return torch.arange(n).expand(3, n).clone()


def grid_cells(t: int, h: int, w: int) -> torch.Tensor:
    """``[3, t*h*w]``: Qwen-VL M-RoPE cells of a ``t x h x w`` merged grid in row-major order, as
    ``get_rope_index`` of transformers lays them out for an image (temporal step 1)."""
    return torch.stack(torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")).reshape(3, -1)


def prompt_positions(num_tokens: int, media: Sequence[Media], *, renumber: bool = False) -> tuple[torch.Tensor, int]:
    """``([3, num_tokens] positions, decode offset)`` of a shortened prompt.

    Text advances all three rows together; an image's tokens sit at ``start + cells`` where
    ``start`` follows the text before it; the text after an image resumes at
    ``start + cells.max() + 1``, as in the unreduced sequence. A reduced image's placeholders get the
    encoded provisional values of the module notes. ``renumber=True`` gives the kept tokens of every
    image consecutive positions instead (``Schedule(positions="renumber")``: nothing to recompute).
    The decode offset is ``end - num_tokens``, where ``end`` is one past the unreduced sequence's
    largest position.
    """
    positions = torch.empty(3, num_tokens, dtype=torch.long)
    cursor = 0      # next prompt index
    start = 0       # next position
    for item in sorted(media, key=lambda m: m.offset):
        if item.offset < cursor or item.offset + item.length > num_tokens:
            raise ValueError(f"image placeholders at {item.offset}..{item.offset + item.length} overlap or overrun "
                             f"a prompt of {num_tokens} tokens")
        text = item.offset - cursor
        positions[:, cursor:item.offset] = torch.arange(start, start + text)
        start += text
        if renumber or not item.reduced:
            cells = line_cells(item.length) if renumber else item.cells
            positions[:, item.offset:item.offset + item.length] = start + cells
            start += int(cells.max()) + 1 if item.length else 0
        else:
            positions[:, item.offset:item.offset + item.length] = -1 - (start + item.cells[:, :item.length])
            start += int(item.cells.max()) + 1
        cursor = item.offset + item.length
    positions[:, cursor:] = torch.arange(start, start + num_tokens - cursor)
    end = start + num_tokens - cursor
    return positions, end - num_tokens


def encode_shifts(shifts: torch.Tensor, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``[k, CHANNELS]`` columns carrying ``shifts`` ``[k, 3]`` (long, each in ``-2**15 .. 2**15-1``)."""
    if shifts.numel() and (int(shifts.min()) < -_OFFSET or int(shifts.max()) >= _OFFSET):
        raise ValueError(f"position shifts outside +-{_OFFSET} cannot be encoded")
    value = shifts.long() + _OFFSET
    digits = torch.stack([value // _BASE, value % _BASE], dim=-1).reshape(shifts.shape[0], CHANNELS)
    return digits.to(device=device, dtype=dtype)


def decode_shifts(columns: torch.Tensor) -> torch.Tensor:
    """The ``[k, 3]`` long shifts of :func:`encode_shifts`'s ``[k, CHANNELS]`` columns."""
    digits = columns.float().round().long().reshape(columns.shape[0], 3, 2)
    return digits[..., 0] * _BASE + digits[..., 1] - _OFFSET


def recompute_positions(input_ids: torch.Tensor | Sequence[int], embeddings: Sequence[torch.Tensor],
                        positions: torch.Tensor, num_computed_tokens: int,
                        placeholder_ids: Sequence[int]) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    """``recompute_mrope_positions`` for embeddings that carry :data:`CHANNELS` shift columns.

    Args:
        input_ids: the request's ``L`` prompt tokens.
        embeddings: the media embeddings of this step's chunk, in prompt order, each ``[m_i, D + CHANNELS]``;
            they fill the first ``sum(m_i)`` placeholders at or after ``num_computed_tokens``.
        positions: ``[3, L]`` the request's prompt positions (:func:`prompt_positions`, partly final).
        num_computed_tokens: prompt tokens computed before this chunk.
        placeholder_ids: the token ids that hold media embeddings.

    Returns:
        ``(embeddings without the shift columns, updated positions, decode offset)``.
    """
    stripped = [e[:, :-CHANNELS] for e in embeddings]
    positions = positions.clone()
    length = positions.shape[1]
    total = sum(int(e.shape[0]) for e in embeddings)
    if total:
        ids = torch.as_tensor(input_ids, device=positions.device).long()
        is_media = torch.isin(ids, torch.tensor(list(placeholder_ids), device=ids.device))
        is_media[:num_computed_tokens] = False
        where = torch.nonzero(is_media).flatten()[:total]
        if where.numel() != total:
            raise RuntimeError(
                f"tokred: {total} media embeddings but only {where.numel()} placeholders after token "
                f"{num_computed_tokens}; vLLM's recompute_mrope_positions contract changed"
            )
        shifts = decode_shifts(torch.cat([e[:, -CHANNELS:] for e in embeddings])).to(positions.device)   # [total, 3]
        current = positions[:, where]                                                               # [3, total]
        provisional = current < 0
        positions[:, where] = torch.where(provisional, -1 - current + shifts.T, current)
    end = int(positions.max()) + 1 if length else 0
    return stripped, positions, end - length
