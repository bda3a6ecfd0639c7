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

Thin images: ``unpad_image`` computes the kept side as ``int(round(side * scale, 7))``, which rounds
down, so a sliver can keep an empty side. A tall one (3 x 2000 px) keeps ``H' x 0`` cells and the
model still appends a newline token to each of those ``H'`` empty rows (``H'`` tokens, all newlines,
whose tile is the one just left of the grid's centre); a wide one (2000 x 3 px) keeps no row, hence no
newline either, and is its thumbnail alone.

Under ``generate`` (transformers 5.23+) the vision tower runs before the model's forward and
``image_sizes`` is dropped; the layout is then recovered from the packed features that ``generate``
hands over (newline rows are the model's ``image_newline`` vector, so they give ``H'`` and ``W'``;
an image without rows is its thumbnail alone) and the grid shape from the pinpoints that fit,
narrowed by the number of encoder rows. Where several grids still give different layouts (a 1 x 1 px
image unpads to 12 x 12 of a 1 x 2 tile grid; a 166 x 171 px one, to 12 x 12 of a 2 x 1 grid, in the
tiny model), the encoder outputs that ``generate`` passes along decide: the feature layer's cells,
put through the model's own projector, show which cells the packed tokens came from, and where each
image's thumbnail sits in the encoder rows (which counts the tiles of images without rows). Where
that still leaves more than one answer (encoder outputs without the feature layer's hidden states),
tokred raises instead of guessing.
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

    Very thin images unpad to an empty grid side: ``unpad_image`` computes the kept side as
    ``int(round(side * scale, 7))``, which rounds *down*, so a 3 x 2000 px image keeps ``H' x 0`` cells
    (``H'`` rows of nothing but their newline token: the model still appends one per row) and a
    2000 x 3 px image ``0 x W'`` (no row, hence no newline token either: the image is its thumbnail).
    The layout is therefore built from the crop's *rows and columns*, not from the cells it keeps,
    which an empty side would lose.
    """
    import torch

    height, width = tiles_high * side, tiles_wide * side
    if image_size is not None:
        unpad_image = compat.modeling_function(modeling, "unpad_image")
        # The model's own crop rule applied to a map of cell numbers: whatever it keeps is the layout.
        kept = unpad_image(torch.arange(height * width).view(1, height, width), list(image_size))[0]
        rows, cols = int(kept.shape[0]), int(kept.shape[1])
    else:
        assert unpadded is not None
        rows, cols = unpadded
        kept = None
    # unpad_image keeps [pad, size - pad) along one side: a centred band with equal margins.
    top, left = (height - rows) // 2, (width - cols) // 2
    row_index = torch.arange(top, top + rows).view(-1, 1)                   # [H', 1] rows of the tile grid
    big_row, big_col = row_index.expand(rows, cols), torch.arange(left, left + cols).view(1, -1).expand(rows, cols)
    if kept is not None and not torch.equal(kept, big_row * width + big_col):
        raise RuntimeStateError(
            f"transformers' {modeling}.unpad_image no longer keeps a centred band of the tile grid (image "
            f"{tuple(image_size)}, grid {height} x {width}); tokred's LLaVA-NeXT layout needs updating for this release"
        )
    tile = 1 + (big_row // side) * tiles_wide + big_col // side
    row, col = big_row % side, big_col % side
    # A row's newline token belongs to the tile of the row's last cell; a row without cells (W' = 0)
    # ends just left of the grid's centre, where its empty band sits.
    last_col = max(left + cols - 1, 0)
    newline_tile = 1 + (row_index // side) * tiles_wide + last_col // side  # [H', 1]
    newline = torch.ones(rows, 1, dtype=torch.bool)
    pad = lambda grid, fill: torch.cat([grid, fill], dim=1).flatten()  # noqa: E731 - a newline after each row

    grid_tile = pad(tile, newline_tile)
    grid_row = pad(row, torch.full((rows, 1), -1))
    grid_col = pad(col, torch.full((rows, 1), -1))
    grid_extra = pad(torch.zeros(rows, cols, dtype=torch.bool), newline)
    grid_cells = pad(tile * side * side + row * side + col, torch.full((rows, 1), -1))

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
        """The layouts under ``generate`` (5.23+), which hands over packed features instead of ``image_sizes``.

        Each image's unpadded grid ``(H', W')`` is read off its newline rows; the tile grids that fit it
        are then narrowed by the encoder rows the tower produced and, where several still give
        different layouts (a 1 x 1 px image and a 166 x 171 px one both unpad to one tile's worth of
        cells, from a 1 x 2 and a 2 x 1 grid), by which encoder cells the packed features were
        projected from and where each image's thumbnail sits (:class:`_EncoderCells`)."""
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
            if body.shape[0] == 0:
                # A wide sliver (e.g. 2000 x 3 px) unpads to no row at all, so no newline either: the
                # thumbnail is the whole image. Any tile grid of even height can crop to that.
                grids.append((0, 0))
                continue
            is_newline = (body == newline_vector.to(body)).all(dim=-1)
            rows = int(is_newline.sum())
            if rows == 0 or body.shape[0] % rows or not bool(is_newline.view(rows, -1)[:, -1].all()):
                raise RuntimeStateError(f"image {index}: the packed LLaVA-NeXT features do not end each row with a newline")
            grids.append((rows, body.shape[0] // rows - 1))
        # generate() with beams (or several return sequences) repeats every prompt's packed features
        # after the tower ran once, as the same tensors ([A, B] -> [A, B, A, B]): the first occurrences
        # are the images the tower saw, in its order.
        slot: dict[int, int] = {}
        seen = [slot.setdefault(id(features), len(slot)) for features in packed]
        first = [seen.index(n) for n in range(len(slot))]
        options = [self._tilings(grids[i]) for i in first]
        encoder_rows = getattr(encoded, "last_hidden_state", None)
        total = None if encoder_rows is None else int(encoder_rows.shape[0])
        cells = self._encoder_cells(encoded, inputs) if any(len(option) > 1 for option in options) else None
        thumbnails: list[torch.Tensor] | None = None
        if cells is not None:
            options = [cells.narrow(option, packed[i]) for option, i in zip(options, first)]
            thumbnails = [cells.thumbnail_rows(packed[i]) for i in first]
        # Repeats that are copies rather than the same tensors: the rows the tiles need are then a
        # whole multiple of those the tower saw.
        choices = [combo for combo in itertools.product(*options)
                   if total is None or (_whole_repeat(sum(tiling.encoder_rows for tiling in combo), total, len(combo))
                                        and _thumbnails_line_up(combo, thumbnails, total))]
        if len(choices) != 1:
            fitting = [[tiling.shape for tiling in option] for option in options]
            raise RuntimeStateError(
                f"cannot tell how generate()'s LLaVA-NeXT images were tiled: their unpadded grids "
                f"{[grids[i] for i in first]} fit the tile grids {fitting} ({len(choices)} combinations match the "
                f"{total} encoder rows), and the encoder outputs it passes do not tell them apart. tokred's layouts "
                "would be a guess; run the prompt through the model's forward (with the processor's image_sizes) or "
                "resize the image"
            )
        return [(choices[0][n].layout, choices[0][n].cells, choices[0][n].encoder_rows) for n in seen]

    def _tilings(self, grid: tuple[int, int]) -> list[_Tiling]:
        """The tile grids (in pinpoint order) that unpad to ``grid``, one per distinct answer: grids
        giving the same tokens the same cells in the same number of encoder rows are one answer (an
        image unpadded to no rows is its thumbnail whichever way its tiles were laid out)."""
        side = self._grid_side()
        found: dict[tuple, _Tiling] = {}
        for shape in self._tile_shapes():
            if _fits(shape, grid, side):
                layout, cells = anyres_layout(*shape, side, None, unpadded=grid, modeling=self.modeling_module)
                tiling = _Tiling(shape, layout, cells, 1 + shape[0] * shape[1])
                found.setdefault((tiling.encoder_rows, tuple(cells.tolist()), tuple(layout.tile.tolist())), tiling)
        return list(found.values())

    def _encoder_cells(self, encoded: Any, inputs: Mapping[str, Any]) -> _EncoderCells | None:
        """The projector's input cells that ``generate``'s encoder outputs hold (:class:`_EncoderCells`),
        or ``None`` where it did not keep the feature layer's hidden states."""
        selected = self._feature_layer_cells(encoded, inputs)
        if selected is None:
            return None
        return _EncoderCells(selected, self.multimodal_model().multi_modal_projector)

    def _feature_layer_cells(self, encoded: Any, inputs: Mapping[str, Any]) -> torch.Tensor | None:
        """``[encoder rows, s * s, D_v]``: the projector's input as ``get_image_features`` builds it
        from the tower's outputs (``hidden_states[vision_feature_layer]``, [CLS] dropped), or ``None``
        where ``generate`` did not keep those hidden states."""
        import torch

        config = self.model.config  # type: ignore[union-attr]
        layer = inputs.get(_FEATURE_LAYER)
        layer = config.vision_feature_layer if layer is None else layer
        strategy = inputs.get(_SELECT_STRATEGY) or config.vision_feature_select_strategy
        hidden = getattr(encoded, "hidden_states", None)
        if hidden is None:
            return None
        try:
            parts = [hidden[index] for index in ([layer] if isinstance(layer, int) else list(layer))]
        except (IndexError, TypeError):
            return None
        if not parts or any(not isinstance(part, torch.Tensor) for part in parts):
            return None
        selected = torch.cat(parts, dim=-1)
        if strategy == "default":
            selected = selected[:, 1:]
        return selected if selected.shape[1] == self._grid_side() ** 2 else None

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


@dataclasses.dataclass(frozen=True)
class _Tiling:
    """One candidate tile grid of a LLaVA-NeXT image under ``generate``: its layout (newlines
    included), probe cells and encoder rows (thumbnail + tiles)."""

    shape: tuple[int, int]
    layout: ImageLayout
    cells: torch.Tensor
    encoder_rows: int


#: Tokens compared per ambiguous image when telling its candidate tilings apart.
_PROBE_TOKENS = 16
#: The largest relative squared error of a re-projected token that still counts as the same token
#: (the model projected all cells in one batch; bf16 kernels on other shapes round differently).
_MATCH_TOLERANCE = 1e-2
#: Keywords of the multimodal model's forward that ``get_image_features`` reads.
_FEATURE_LAYER = "vision_feature_layer"
_SELECT_STRATEGY = "vision_feature_select_strategy"


def _close(error: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Whether squared errors are small against the target's squared norm."""
    return error <= _MATCH_TOLERANCE * (target.float() ** 2).sum().clamp(min=1e-12)


class _EncoderCells:
    """Tells which encoder cells packed LLaVA-NeXT features were projected from.

    ``generate`` (5.23+) passes the tower's outputs along with the packed features. The feature
    layer's cells put through the model's own projector (its ``forward``: past the hooks, so tokred's
    pre-projector probe records nothing) give every encoder cell's token; comparing them with the
    packed tokens locates each image's thumbnail row (its first token) and tells candidate tilings
    apart (a few tokens they take from different cells).

    Args:
        selected: ``[encoder rows, s * s, D_v]``, the projector's input.
        projector: the model's ``multi_modal_projector``.
    """

    def __init__(self, selected: torch.Tensor, projector: nn.Module) -> None:
        self.per_row = int(selected.shape[1])
        self.flat = selected.flatten(0, 1)                                     # [rows * s * s, D_v]
        self.projector = projector
        self.firsts = self.project(selected[:, 0])                             # [rows, D]

    def project(self, values: torch.Tensor) -> torch.Tensor:
        import torch

        parameter = next(self.projector.parameters(), None)
        if parameter is not None:
            values = values.to(parameter.device, parameter.dtype)
        with torch.no_grad():
            return self.projector.forward(values).float()  # type: ignore[no-any-return]

    def thumbnail_rows(self, features: torch.Tensor) -> torch.Tensor:
        """``[rows]`` bool: the encoder rows whose first cell is the image's first token (its
        thumbnail's; several where images repeat)."""
        first = features[0].float().to(self.firsts.device)
        return _close(((self.firsts - first) ** 2).sum(dim=-1), first)

    def narrow(self, option: list[_Tiling], features: torch.Tensor) -> list[_Tiling]:
        """The one tiling of ``option`` whose cells ``features`` were projected from; all of them
        when none matches (or the thumbnail is not found)."""
        import torch

        rows = torch.nonzero(self.thumbnail_rows(features)).flatten()
        cells = torch.stack([tiling.cells for tiling in option])              # [candidates, N]
        differ = torch.nonzero((cells != cells[:1]).any(dim=0)).flatten()
        if len(option) < 2 or rows.numel() == 0 or differ.numel() == 0:
            return option
        pick = differ[torch.linspace(0, differ.numel() - 1, min(differ.numel(), _PROBE_TOKENS)).round().long()]
        source = int(rows[0]) * self.per_row + cells[:, pick]                  # [candidates, k]
        inside = (source < self.flat.shape[0]).all(dim=1)
        got = self.project(self.flat[source.clamp(max=self.flat.shape[0] - 1).flatten()]).view(*source.shape, -1)
        want = features[pick].float().to(got.device)
        error = ((got - want) ** 2).sum(dim=(1, 2)).masked_fill(~inside.to(got.device), float("inf"))
        best = int(error.argmin())
        return [option[best]] if bool(_close(error[best], want)) else option


def _thumbnails_line_up(combo: tuple[_Tiling, ...], thumbnails: list[torch.Tensor] | None, total: int) -> bool:
    """Whether each image's thumbnail sits in an encoder row where the images before it end, when
    ``generate`` did not repeat the features (``None`` thumbnails: nothing to check)."""
    if thumbnails is None or sum(tiling.encoder_rows for tiling in combo) != total:
        return True
    first = 0
    for tiling, rows in zip(combo, thumbnails):
        if not bool(rows[first]):
            return False
        first += tiling.encoder_rows
    return True


def _whole_repeat(needed: int, seen: int, images: int) -> bool:
    """Whether ``images`` images needing ``needed`` encoder rows can be ``seen`` rows repeated a whole
    number of times, each repeat holding a whole number of images."""
    return needed % seen == 0 and images % (needed // seen) == 0


def _fits(shape: tuple[int, int], grid: tuple[int, int], side: int) -> bool:
    """Whether a ``shape`` tile grid unpadded (centred, even margins) can give ``grid`` ``(H', W')``;
    ``(0, 0)`` stands for a grid cropped to no rows (its width left no trace)."""
    height, width = shape[0] * side, shape[1] * side
    rows, cols = grid
    if rows == 0:
        return height % 2 == 0
    if rows == height:
        return cols <= width and (width - cols) % 2 == 0
    return cols == width and rows <= height and (height - rows) % 2 == 0
