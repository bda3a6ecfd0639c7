"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, "anyres"): a thumbnail plus a grid of tiles.

How the model lays out one image, measured on ``transformers`` 5.23 (``pack_image_features``):

* The processor resizes the image to the best of ``config.image_grid_pinpoints`` and cuts it into
  ``nph x npw`` tiles of the vision tower's size, plus a thumbnail of the whole image. The CLIP
  tower encodes every one (encoder rows: thumbnail first, then the tiles row-major), ``s x s``
  patches each (``s = 24`` for 336 px tiles of 14 px).
* The language model receives the thumbnail's ``s * s`` tokens first, then the tiles merged into
  one ``(nph * s) x (npw * s)`` grid, cropped ("unpadded") to the image's aspect ratio, with a
  learned **newline token** appended after every row of that grid: ``H' * (W' + 1)`` tokens.

tokred's layout: tile 0 is the thumbnail (``thumbnail_tile=0``), tiles ``1 .. nph * npw`` are the
tiles in encoder order, and ``row``/``col`` are a token's cell inside its tile's ``s x s`` grid (cells
cropped away by unpadding are absent).

Newline tokens (option ``newline_tokens``):

* ``"keep"`` (default, ours): they are not candidates. They always stay, are not counted in an
  image's ``N`` (so budgets count patches only) and are not visual tokens in the run report. The
  language model still sees where every row of the tile grid ends, which is the format the model
  was trained on; a fully pruned row leaves its newline behind.
* ``"prune"``: they are candidates like any visual token (``layout.extra`` marks them; their
  ``row``/``col`` are -1 and their tile is that of the row's last cell). They carry no [CLS]
  attention (0) and no pre-projector features or vision keys, so those inputs are not offered in
  this mode.

[CLS] attention is computed per encoder row (thumbnail and each tile attend within themselves, at
the feature layer the projector reads) and gathered onto the tokens: each token gets the attention
its own tile's [CLS] paid it. Values of different tiles are therefore not normalised together, which
matters little to ToDRE's pivot: it is taken from the thumbnail's tokens only.

Under ``generate`` the vision tower runs before the model's forward and ``image_sizes`` is dropped;
the layout is then recovered from the packed features that ``generate`` hands over (newline rows
are the model's ``image_newline`` vector, so they give ``H'`` and ``W'``) and the grid shape from
the pinpoints that fit, disambiguated by the number of encoder rows. Where that leaves more than
one answer, tokred raises instead of guessing.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import TYPE_CHECKING, Any, Literal, Mapping

from .. import compat
from ..compat import Keyword
from ..errors import OptionsError, RuntimeStateError
from ..tokens import ImageLayout
from .base import ImageSpan, VisionProbes, split_image_tokens
from .llava import LlavaAdapter

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

__all__ = ["LlavaNextAdapter", "anyres_layout"]

NewlineTokens = Literal["keep", "prune"]


def anyres_layout(tiles_high: int, tiles_wide: int, side: int, image_size: tuple[int, int] | None,
                  unpadded: tuple[int, int] | None = None, *,
                  modeling: str = "llava_next.modeling_llava_next") -> tuple[ImageLayout, torch.Tensor]:
    """The layout of one LLaVA-NeXT image *including* its newline tokens, in sequence order.

    Args:
        tiles_high, tiles_wide: the tile grid (``nph x npw``).
        side: tokens per tile side (``s``).
        image_size: ``(height, width)`` of the original image, which decides the unpadding; or
            ``None`` with ``unpadded`` given.
        unpadded: ``(H', W')`` of the cropped grid when the image size is unknown; the crop is
            centred, as ``unpad_image`` does.
        modeling: the modeling module whose ``unpad_image`` decides the crop (LLaVA-NeXT-Video has
            its own copy).

    Returns:
        ``(layout, probe_cells)``: the layout (``extra`` marks newline tokens) and ``[N]`` long,
        each token's cell in the image's encoder rows (``row * s * s + cell``; -1 for newlines).
    """
    import torch

    unpad_image = compat.modeling_function(modeling, "unpad_image")

    height, width = tiles_high * side, tiles_wide * side
    if image_size is not None:
        # The model's own crop rule applied to a map of cell numbers: whatever it keeps is the layout.
        cells = unpad_image(torch.arange(height * width).view(1, height, width), list(image_size))[0]
    else:
        assert unpadded is not None
        rows, cols = unpadded
        top, left = (height - rows) // 2, (width - cols) // 2
        cells = torch.arange(height * width).view(height, width)[top:top + rows, left:left + cols]
    big_row, big_col = cells // width, cells % width                            # [H', W'] each
    tile = 1 + (big_row // side) * tiles_wide + big_col // side
    row, col = big_row % side, big_col % side
    newline = torch.ones(cells.shape[0], 1, dtype=torch.bool)
    pad = lambda grid, fill: torch.cat([grid, fill], dim=1).flatten()  # noqa: E731 - a newline after each row

    grid_tile = pad(tile, tile[:, -1:])
    grid_row = pad(row, torch.full_like(row[:, :1], -1))
    grid_col = pad(col, torch.full_like(col[:, :1], -1))
    grid_extra = pad(torch.zeros_like(cells, dtype=torch.bool), newline)
    grid_cells = pad(tile * side * side + row * side + col, torch.full_like(row[:, :1], -1))

    thumb = torch.arange(side * side)
    layout = ImageLayout(
        tile=torch.cat([torch.zeros(side * side, dtype=torch.long), grid_tile]),
        row=torch.cat([thumb // side, grid_row]),
        col=torch.cat([thumb % side, grid_col]),
        grids=((side, side),) * (1 + tiles_high * tiles_wide),
        thumbnail_tile=0,
        extra=torch.cat([torch.zeros(side * side, dtype=torch.bool), grid_extra]),
    )
    return layout, torch.cat([thumb, grid_cells])


class LlavaNextAdapter(LlavaAdapter):
    """Adapter for LLaVA-NeXT (anyres tiles + thumbnail, newline tokens).

    Args:
        model: a ``LlavaNextForConditionalGeneration``.
        newline_tokens: ``"keep"`` (default: never pruned, not counted in budgets) or ``"prune"``
            (candidates like any visual token). See the module documentation.
    """

    model_classes = ("LlavaNextForConditionalGeneration",)
    #: The ``transformers.models`` module whose layout functions the model uses.
    modeling_module: str = "llava_next.modeling_llava_next"

    def __init__(self, model: nn.Module, family: str | None = None, *, newline_tokens: NewlineTokens = "keep") -> None:
        super().__init__(model, family)
        if newline_tokens not in ("keep", "prune"):
            raise OptionsError(f"newline_tokens must be 'keep' or 'prune', got {newline_tokens!r}")
        self.newline_tokens = newline_tokens

    def visual_tokens_per_image(self) -> None:
        """Varies with each image's size and aspect ratio."""
        return None

    def check_model_state(self) -> None:
        super().check_model_state()
        if self._keeps_cls():
            raise RuntimeStateError(
                "LLaVA-NeXT with vision_feature_select_strategy='full' is not supported (transformers' own "
                "packing assumes the [CLS] token was dropped)"
            )

    def available_inputs(self) -> frozenset[str]:
        inputs = super().available_inputs()
        # Newline tokens have no vision-side features or keys; zeros would be made-up data.
        return inputs - {"pre_projector", "vision_keys"} if self.newline_tokens == "prune" else inputs

    # ------------------------------------------------------------------ layout

    def _tile_shapes(self) -> list[tuple[int, int]]:
        """Every ``(nph, npw)`` the pinpoints allow, in pinpoint order, without repeats."""
        tile_px = int(self.model.config.vision_config.image_size)  # type: ignore[union-attr]
        shapes = [(int(h) // tile_px, int(w) // tile_px) for h, w in self.model.config.image_grid_pinpoints]  # type: ignore[union-attr]
        return list(dict.fromkeys(shapes))

    def _layouts(self, inputs: Mapping[str, Any]) -> list[tuple[ImageLayout, torch.Tensor, int]]:
        """``(layout with newlines, probe cells, encoder rows)`` of every image in encoder order."""
        get_anyres_image_grid_shape = compat.modeling_function(self.modeling_module, "get_anyres_image_grid_shape")

        side = self._grid_side()
        sizes = inputs.get(Keyword.IMAGE_SIZES)
        if sizes is not None:
            tile_px = int(self.model.config.vision_config.image_size)  # type: ignore[union-attr]
            result = []
            for size in sizes.tolist():
                high, wide = get_anyres_image_grid_shape(size, self.model.config.image_grid_pinpoints, tile_px)  # type: ignore[union-attr]
                layout, cells = anyres_layout(high, wide, side, tuple(size), modeling=self.modeling_module)
                result.append((layout, cells, 1 + high * wide))
            return result
        return self._layouts_from_features(inputs)

    def _layouts_from_features(self, inputs: Mapping[str, Any]) -> list[tuple[ImageLayout, torch.Tensor, int]]:
        encoded = (inputs.get(Keyword.ENCODER_OUTPUTS) or {}).get(Keyword.ENCODER_OUTPUTS_IMAGE)
        packed = getattr(encoded, "pooler_output", None)
        if not isinstance(packed, (list, tuple)):
            raise RuntimeStateError(
                "cannot tell the LLaVA-NeXT image layout: the call carries neither image_sizes nor the packed image "
                "features generate() computes; pass the processor's image_sizes"
            )
        side = self._grid_side()
        newline_vector = self.multimodal_model().image_newline
        grids: list[tuple[int, int]] = []
        for index, features in enumerate(packed):
            body = features[side * side:]
            is_newline = (body == newline_vector.to(body)).all(dim=-1)
            rows = int(is_newline.sum())
            if rows == 0 or body.shape[0] % rows or not bool(is_newline.view(rows, -1)[:, -1].all()):
                raise RuntimeStateError(f"image {index}: the packed LLaVA-NeXT features do not end each row with a newline")
            grids.append((rows, body.shape[0] // rows - 1))
        candidates = [[shape for shape in self._tile_shapes() if _fits(shape, grid, side)] for grid in grids]
        encoder_rows = getattr(encoded, "last_hidden_state", None)
        total = None if encoder_rows is None else int(encoder_rows.shape[0])
        # generate() with beams (or several return sequences) repeats every prompt's packed features
        # after the tower ran once: then the rows the tiles need are a whole multiple of those it saw.
        choices = [combo for combo in itertools.product(*candidates)
                   if total is None or _whole_repeat(sum(1 + h * w for h, w in combo), total, len(combo))]
        if len(choices) != 1:
            raise RuntimeStateError(
                f"cannot tell how the images were tiled from their packed features ({len(choices)} tile grids fit "
                f"{grids}); call the model's forward with image_sizes instead of generate()'s precomputed features"
            )
        result = []
        for (high, wide), grid in zip(choices[0], grids):
            layout, cells = anyres_layout(high, wide, side, None, unpadded=grid, modeling=self.modeling_module)
            result.append((layout, cells, 1 + high * wide))
        return result

    def image_spans(self, input_ids: torch.Tensor, probes: VisionProbes, inputs: Mapping[str, Any]) -> list[ImageSpan]:
        return self._image_spans(input_ids, inputs)[0]

    def _image_spans(self, input_ids: torch.Tensor, inputs: Mapping[str, Any]) -> tuple[list[ImageSpan], int]:
        """The images' spans and the number of encoder rows (thumbnails and tiles) they take."""
        import torch

        if not bool((input_ids == self.image_token_id()).any()):
            return [], 0
        layouts = self._layouts(inputs)
        chunks = split_image_tokens(input_ids, self.image_token_id(), [layout.num_tokens for layout, _, _ in layouts])
        spans: list[ImageSpan] = []
        per_row: dict[int, int] = {}
        first_row = 0
        cells_per_row = self._grid_side() ** 2
        for encoder_index, ((row, positions), (layout, cells, encoder_rows)) in enumerate(zip(chunks, layouts)):
            probe_rows = torch.where(cells >= 0, cells + first_row * cells_per_row, -1)
            first_row += encoder_rows
            if self.newline_tokens == "keep":
                patches = torch.nonzero(~layout.extra).flatten()  # type: ignore[operator]
                positions, probe_rows = positions[patches], probe_rows[patches]
                layout = dataclasses.replace(layout.subset(patches), extra=None)
            image = per_row.get(row, 0)
            per_row[row] = image + 1
            spans.append(ImageSpan(row, image, positions, layout, encoder_index, probe_rows))
        return spans, first_row


def _whole_repeat(needed: int, seen: int, images: int) -> bool:
    """Whether ``images`` images needing ``needed`` encoder rows can be ``seen`` rows repeated a whole
    number of times, each repeat holding a whole number of images."""
    return needed % seen == 0 and images % (needed // seen) == 0


def _fits(shape: tuple[int, int], grid: tuple[int, int], side: int) -> bool:
    """Whether a ``shape`` tile grid unpadded (centred, even margins) can give ``grid`` ``(H', W')``."""
    height, width = shape[0] * side, shape[1] * side
    rows, cols = grid
    if rows == height:
        return cols <= width and (width - cols) % 2 == 0
    return cols == width and rows <= height and (height - rows) % 2 == 0
