"""LLaVA-OneVision (``LlavaOnevisionForConditionalGeneration``, llava-onevision-qwen2-*-ov-hf): images
with anyres tiles and videos with pooled frames, the model most video-pruning papers evaluate.

How the model lays out its visual tokens, measured on ``transformers`` 5.24 (and 5.17):

* **Images** (``<image>``, ``image_sizes``, ``batch_num_images``). A prompt with one image: the
  SigLIP tower (no [CLS] token) encodes the base view (the whole image at the tower's size) and the
  anyres tiles; the language model receives the base view's ``s x s`` tokens (27 x 27 = 729 at
  384 px), then the tiles merged into one grid, cropped to the image's aspect ratio ("unpadded"),
  bilinearly downsampled when it holds more than ``vision_aspect_ratio`` (``"anyres_max_9"``: nine
  base views' worth of tokens), with a **newline token** after every row. A prompt with several
  images: each is its base view followed by one newline token.
* **Videos** (``<video>``, ``pixel_values_videos`` ``[videos, F, 3, H, W]``). Every frame is
  encoded at the tower's size, projected, and its grid pooled 2 x 2 (bilinear, rounding up: 14 x 14
  = 196 tokens per frame at 384 px); the frames follow each other, then one newline token closes the
  video: ``F * q * q + 1`` tokens (32 frames: 6,273).

tokred's layouts. An image with tiles: tile 0 is the base view (``thumbnail_tile=0``), tile 1 the
unpadded (and downsampled) tile grid as one grid of its own, ``row``/``col`` a token's cell there; the
model's downsampling mixes the tiles' cells, so the tiles themselves are not tokred tiles. A
multi-image prompt's images and a video's frames are one grid each; a video's frames are its tiles
(:meth:`ImageLayout.video`). Both are computed by running the model's own ``pack_image_features``
and ``apply_pooling`` on a small probe tensor, so they follow its rules (aspect-ratio crop,
downsampling, pooled size) exactly.

Newline tokens (option ``newline_tokens``, as for LLaVA-NeXT): ``"keep"`` (default, ours) never
prunes them and leaves them out of every count; ``"prune"`` makes them candidates (``layout.extra``).

Selector inputs: none. SigLIP has no [CLS] token (no [CLS] attention: selectors fall back as they
document, ToDRE to ``max_norm``), and pre-projector features do not map onto the tokens (videos
are pooled and large images downsampled after the projector).

Under ``generate`` the vision tower runs before the model's forward and ``image_sizes`` /
``batch_num_images`` are dropped; the layouts are then read from the packed features ``generate``
hands over: newline rows are the model's ``image_newline`` vector.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal, Mapping

from .. import compat
from ..compat import Keyword
from ..errors import OptionsError, RuntimeStateError
from ..tokens import ImageLayout
from .base import Adapter, ImageSpan, VisionProbes, order_spans, split_image_tokens, stacked_video_frames

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

__all__ = ["LlavaOnevisionAdapter", "onevision_image_layout"]

NewlineTokens = Literal["keep", "prune"]
_MODULE = "llava_onevision.modeling_llava_onevision"


def onevision_image_layout(side: int, grid: tuple[int, int] | None) -> ImageLayout:
    """The layout of one LLaVA-OneVision image *including* its newline tokens, in sequence order.

    Args:
        side: tokens per side of the base view (``s``).
        grid: ``(rows, cols)`` of the unpadded, possibly downsampled tile grid (a newline after each
            row; ``(0, 0)`` for a sliver unpadded to no row, ``(rows, 0)`` to rows of nothing but
            their newline), or ``None`` for an image without tiles (multi-image prompts: one newline
            after the base view).
    """
    import torch

    base = ImageLayout.grid(side, side)
    if grid is None:
        n = side * side
        return ImageLayout(
            tile=torch.zeros(n + 1, dtype=torch.long), row=torch.cat([base.row, torch.tensor([-1])]),
            col=torch.cat([base.col, torch.tensor([-1])]), grids=((side, side),), thumbnail_tile=0,
            extra=torch.cat([torch.zeros(n, dtype=torch.bool), torch.ones(1, dtype=torch.bool)]),
        )
    rows, cols = grid
    cells = torch.arange(rows * (cols + 1))
    row, col = cells // (cols + 1), cells % (cols + 1)
    newline = col == cols
    return ImageLayout(
        tile=torch.cat([torch.zeros(side * side, dtype=torch.long), torch.ones(cells.numel(), dtype=torch.long)]),
        row=torch.cat([base.row, row.masked_fill(newline, -1)]),
        col=torch.cat([base.col, col.masked_fill(newline, -1)]),
        grids=((side, side), (rows, cols)),
        thumbnail_tile=0,
        extra=torch.cat([torch.zeros(side * side, dtype=torch.bool), newline]),
    )


class LlavaOnevisionAdapter(Adapter):
    """Adapter for LLaVA-OneVision (anyres images, pooled video frames, newline tokens).

    Args:
        model: a ``LlavaOnevisionForConditionalGeneration``.
        newline_tokens: ``"keep"`` (default: never pruned, not counted in budgets) or ``"prune"``
            (candidates like any visual token). See the module documentation.
    """

    model_classes = ("LlavaOnevisionForConditionalGeneration",)

    def __init__(self, model: nn.Module, family: str | None = None, *, newline_tokens: NewlineTokens = "keep") -> None:
        super().__init__(model, family)
        if newline_tokens not in ("keep", "prune"):
            raise OptionsError(f"newline_tokens must be 'keep' or 'prune', got {newline_tokens!r}")
        self.newline_tokens = newline_tokens

    def check_model_state(self) -> None:
        super().check_model_state()
        if self.model.config.vision_feature_select_strategy != "full":  # type: ignore[union-attr]
            raise RuntimeStateError(
                "LLaVA-OneVision with vision_feature_select_strategy other than 'full' is not supported (SigLIP has no "
                "[CLS] token to drop; the released models use 'full')"
            )

    # ----------------------------------------------------------------- geometry

    def _side(self) -> int:
        vision = self.model.config.vision_config  # type: ignore[union-attr]
        return int(vision.image_size) // int(vision.patch_size)

    def _pooled_cells(self) -> int:
        """Tokens per video frame: the model's own ``apply_pooling`` on a one-channel probe frame."""
        import torch

        side = self._side()
        return int(self.multimodal_model().apply_pooling(torch.zeros(1, side * side, 1)).shape[1])

    def _aspect_ratio(self, inputs: Mapping[str, Any]) -> str:
        return inputs.get(Keyword.VISION_ASPECT_RATIO) or self.model.config.vision_aspect_ratio  # type: ignore[union-attr]

    def _tile_grid(self, image_size: list[int], aspect_ratio: str) -> tuple[int, int]:
        """``(rows, cols)`` of one image's packed tile grid: the model's ``pack_image_features`` on a
        probe of zeros whose newline vector is 1."""
        import torch

        image_size_to_num_patches = compat.modeling_function(_MODULE, "image_size_to_num_patches")
        config = self.model.config  # type: ignore[union-attr]
        side = self._side()
        patches = image_size_to_num_patches(image_size=image_size, grid_pinpoints=config.image_grid_pinpoints,
                                            patch_size=config.vision_config.image_size)
        packed, _ = self.multimodal_model().pack_image_features(
            [torch.zeros(patches, side * side, 1)], torch.tensor([image_size]), image_newline=torch.ones(1),
            vision_aspect_ratio=aspect_ratio)
        body = packed[0][side * side:, 0]
        rows = int(body.sum())
        # A wide sliver (e.g. 2000 x 3 px) unpads to no row (unpad_image rounds the kept height down):
        # no newline either, the image is its base view. (0, 0) as under generate, where the
        # width leaves no trace.
        return (rows, body.numel() // rows - 1) if rows else (0, 0)

    def _image_layouts(self, inputs: Mapping[str, Any]) -> list[ImageLayout]:
        """Every image's layout (newlines included), in encoder order."""
        side = self._side()
        sizes = inputs.get(Keyword.IMAGE_SIZES)
        if sizes is not None:
            per_sample = inputs.get(Keyword.BATCH_NUM_IMAGES)
            tiled = ([True] * len(sizes) if per_sample is None
                     else [int(n) == 1 for n in per_sample.tolist() for _ in range(int(n))])
            aspect_ratio = self._aspect_ratio(inputs)
            return [onevision_image_layout(side, self._tile_grid(size, aspect_ratio) if tile else None)
                    for size, tile in zip(sizes.tolist(), tiled)]
        encoded = (inputs.get(Keyword.ENCODER_OUTPUTS) or {}).get(Keyword.ENCODER_OUTPUTS_IMAGE)
        packed = getattr(encoded, "pooler_output", None)
        if not isinstance(packed, (list, tuple)):
            raise RuntimeStateError(
                "cannot tell the LLaVA-OneVision image layout: the call carries neither image_sizes nor the packed "
                "image features generate() computes; pass the processor's image_sizes"
            )
        newline = self.multimodal_model().image_newline
        layouts = []
        for index, features in enumerate(packed):
            body = features[side * side:]
            is_newline = (body == newline.to(body)).all(dim=-1)
            rows = int(is_newline.sum())
            if body.shape[0] == 1 and rows == 1:
                layouts.append(onevision_image_layout(side, None))
                continue
            if body.shape[0] == 0:                       # unpadded to no row: the base view alone
                layouts.append(onevision_image_layout(side, (0, 0)))
                continue
            if rows == 0 or body.shape[0] % rows or not bool(is_newline.view(rows, -1)[:, -1].all()):
                raise RuntimeStateError(f"image {index}: the packed LLaVA-OneVision features do not end each row with a newline")
            layouts.append(onevision_image_layout(side, (rows, body.shape[0] // rows - 1)))
        return layouts

    # ------------------------------------------------------------------- spans

    def _candidates(self, layout: ImageLayout, positions: torch.Tensor) -> tuple[ImageLayout, torch.Tensor]:
        """The layout and positions of the candidates: without the newline tokens unless they are pruned too."""
        import torch

        if self.newline_tokens == "prune" or layout.extra is None:
            return layout, positions
        patches = torch.nonzero(~layout.extra).flatten()
        return layout.subset(patches), positions[patches]

    def image_spans(self, input_ids: torch.Tensor, probes: VisionProbes, inputs: Mapping[str, Any]) -> list[ImageSpan]:
        """Every image's and video's tokens, row-major over the batch and in sequence order within a
        row; images are cut by their layouts' token counts, videos by ``F * q * q + 1``."""
        spans: list[ImageSpan] = []
        if bool((input_ids == self.image_token_id()).any()):
            layouts = self._image_layouts(inputs)
            chunks = split_image_tokens(input_ids, self.image_token_id(), [layout.num_tokens for layout in layouts])
            for encoder_index, ((row, positions), layout) in enumerate(zip(chunks, layouts)):
                layout, positions = self._candidates(layout, positions)
                spans.append(ImageSpan(row, 0, positions, layout, encoder_index))
        video_token = self.video_token_id()
        per_frame = self._pooled_cells()
        frames = stacked_video_frames(inputs, per_frame)
        if frames is not None and video_token is not None:
            q = math.isqrt(per_frame)  # the tower's input is square, and so is its pooled grid
            chunks = split_image_tokens(input_ids, video_token, [f * per_frame + 1 for f in frames])
            for encoder_index, ((row, positions), count) in enumerate(zip(chunks, frames)):
                layout, positions = self._candidates(ImageLayout.video(count, q, q, trailing_extra=1), positions)
                spans.append(ImageSpan(row, 0, positions, layout, encoder_index))
        return order_spans(spans)
