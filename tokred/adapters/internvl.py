"""InternVL (``InternVLForConditionalGeneration``, the transformers-native InternVL3-hf models).

How the model lays out one image, measured on ``transformers`` 5.23:

* The processor (``crop_to_patches``) cuts the image into up to ``max_patches`` tiles of the vision
  tower's size on the grid whose aspect ratio is closest to the image's, and, when there is more than
  one tile, appends a **thumbnail** of the whole image as the *last* tile (``use_thumbnail``).
* InternViT encodes each tile (one encoder row each) with a [CLS] token; the [CLS] is dropped, the
  ``s x s`` patch grid (``s = 32`` for 448 px tiles of 14 px) is pixel-shuffled 2x2 into
  ``(s/2) x (s/2)`` merged tokens (256) whose features concatenate the four patches', and projected.
* The sequence holds ``<img>``, then ``256 x tiles`` context tokens (tile by tile, row-major
  within a tile), then ``</img>``. The tile grid's arrangement is not recorded anywhere the model
  sees; the layout therefore numbers tiles in encoder order, and only which tile is the thumbnail
  matters to methods.

**Videos** are frames written as one-tile images: ``InternVLProcessor`` replaces ``<video>`` with
``Frame1: <img>...</img>\nFrame2: <img>...</img>...`` (256 tokens per frame at 448 px, 8,192 for
32 frames) and puts the frames' pixels among the images' in ``pixel_values``. The model cannot tell a
video's frames from images, and neither can an adapter. With ``frames_as_video=True``
(``tokred.apply(..., adapter_options={"frames_as_video": True})``) every run of two or more
consecutive one-tile images of a row (no image of more tiles between them) is one video whose frames
are those images (:meth:`ImageLayout.video`): budgets count over the video, ToDRE's pivot is taken
over all frames. The default (``False``) keeps every frame an image of its own, budgets per frame.
A one-tile image next to a video would be taken for one more frame: give such prompts images of
more than one tile, or leave the option off.

[CLS] attention (ToDRE's pivot): each tile's [CLS] row at the vision feature layer, averaged over
heads, ``[s * s]``; the attention of the four patches that pixel shuffle merges into one token is
**summed** onto that token (the merged token's share of the [CLS] attention; the mean would rank the
same). The grouping is computed by running the model's own ``pixel_shuffle`` on the attention map,
so it follows the model's patch order exactly. Pre-projector features are the pixel-shuffled features
``[256, 4 * D_v]`` that enter the projector (:meth:`InternVLAdapter.projector` maps such rows), and
the vision keys (the feature layer's key states, head mean) are pixel-shuffled alike, ``[256, 4 * d]``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..errors import OptionsError, RuntimeStateError
from ..tokens import ImageLayout
from .base import (
    Adapter, ImageSpan, VisionProbes, capture_projector_inputs, cls_attention_rows, encoder_layer_of, key_rows, order_spans,
    split_image_tokens,
)

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

__all__ = ["InternVLAdapter", "tiles_layout"]


def tiles_layout(tiles: int, side: int, thumbnail_last: bool) -> ImageLayout:
    """Layout of an image of ``tiles`` tiles of ``side x side`` tokens each, tile by tile, row-major.
    With more than one tile and ``thumbnail_last``, the last tile is the thumbnail; a single tile is
    the whole image."""
    import torch

    cells = torch.arange(tiles * side * side)
    within = cells % (side * side)
    return ImageLayout(
        tile=cells // (side * side),
        row=within // side,
        col=within % side,
        grids=((side, side),) * tiles,
        thumbnail_tile=(tiles - 1 if thumbnail_last else None) if tiles > 1 else 0,
    )


class InternVLAdapter(Adapter):
    """Adapter for InternVL (tiles + thumbnail last, 2x2 pixel shuffle).

    Args:
        model: an ``InternVLForConditionalGeneration``.
        use_thumbnail: whether the processor appended a thumbnail to multi-tile images (the released
            processors' default, ``True``). The model cannot tell; with ``False`` tiled images have no
            thumbnail and methods that look for one use every tile instead.
        frames_as_video: whether runs of two or more consecutive one-tile images are the frames of
            a video (how the processor writes a video; see the module documentation). Default
            ``False``: every one-tile image is an image.
    """

    model_classes = ("InternVLForConditionalGeneration",)

    def __init__(self, model: nn.Module, family: str | None = None, *, use_thumbnail: bool = True,
                 frames_as_video: bool = False) -> None:
        super().__init__(model, family)
        self.use_thumbnail = bool(use_thumbnail)
        if not isinstance(frames_as_video, bool):
            raise OptionsError(f"frames_as_video must be True or False, got {frames_as_video!r}")
        self.frames_as_video = frames_as_video

    # ----------------------------------------------------------------- geometry

    def _patch_side(self) -> int:
        vision = self.model.config.vision_config  # type: ignore[union-attr]
        size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
        patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
        return int(size) // int(patch)

    def _token_side(self) -> int:
        return int(self._patch_side() * float(self.model.config.downsample_ratio))  # type: ignore[union-attr]

    def tokens_per_tile(self) -> int:
        return self._token_side() ** 2

    def check_model_state(self) -> None:
        super().check_model_state()
        if self.model.config.vision_feature_select_strategy != "default":  # type: ignore[union-attr]
            raise RuntimeStateError("InternVL with vision_feature_select_strategy other than 'default' is not supported")

    # ------------------------------------------------------------------- images

    def image_spans(self, input_ids: torch.Tensor, probes: VisionProbes, inputs: Mapping[str, Any]) -> list[ImageSpan]:
        """Every image's tokens, row-major over the batch: each image is one run of context tokens
        between ``<img>`` and ``</img>``, a whole number of tiles long. With ``frames_as_video``,
        runs of two or more consecutive one-tile images of a row are one video each."""
        import torch

        side, per_tile = self._token_side(), self.tokens_per_tile()
        chunks = split_image_tokens(input_ids, self.image_token_id(), None)
        for row, positions in chunks:
            if positions.numel() % per_tile:
                raise RuntimeStateError(
                    f"row {row} has an image of {positions.numel()} tokens, not a multiple of {per_tile} per tile"
                )
        spans: list[ImageSpan] = []
        first_tile = 0
        for encoder_index, group in enumerate(self._groups(chunks, per_tile)):
            row = group[0][0]
            positions = torch.cat([p for _, p in group])
            probe_rows = torch.arange(positions.numel()) + first_tile * per_tile
            tiles = positions.numel() // per_tile
            first_tile += tiles
            layout = ImageLayout.video(len(group), side, side) if len(group) > 1 else tiles_layout(tiles, side, self.use_thumbnail)
            spans.append(ImageSpan(row, 0, positions, layout, encoder_index, probe_rows))
        return order_spans(spans)

    def _groups(self, chunks: list[tuple[int, torch.Tensor]], per_tile: int) -> list[list[tuple[int, torch.Tensor]]]:
        """The runs of ``chunks`` (``(row, positions)`` in order) that form one visual item each: every
        image alone, or with ``frames_as_video`` a video of consecutive one-tile images of a row."""
        groups: list[list[tuple[int, torch.Tensor]]] = []
        for chunk in chunks:
            one_tile = chunk[1].numel() == per_tile
            previous = groups[-1] if groups else None
            if (self.frames_as_video and one_tile and previous is not None and previous[-1][0] == chunk[0]
                    and previous[-1][1].numel() == per_tile):
                previous.append(chunk)
            else:
                groups.append([chunk])
        return groups

    # ------------------------------------------------------------ vision probes

    def _vision_layers(self) -> nn.ModuleList:
        return self.multimodal_model().vision_tower.encoder.layer  # type: ignore[no-any-return]

    def _feature_layer_index(self) -> int | None:
        """The encoder layer whose output is used (:func:`encoder_layer_of`; -1 is the last hidden state)."""
        return encoder_layer_of(self.model.config.vision_feature_layer, len(self._vision_layers()))  # type: ignore[union-attr]

    def has_cls_token(self) -> bool:
        return True

    def available_inputs(self) -> frozenset[str]:
        """Pre-projector features always; the [CLS] attention and the vision keys when the feature
        layer is an encoder layer."""
        if self._feature_layer_index() is None:
            return frozenset({"pre_projector"})
        return frozenset({"pre_projector", "cls_attention", "vision_keys"})

    def projector(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The ``multi_modal_projector`` on pixel-shuffled rows: ``[n, 4 * D_v] -> [n, D]``."""
        return self.multimodal_model().multi_modal_projector  # type: ignore[no-any-return]

    def _shuffle_merged(self, patch_values: torch.Tensor) -> torch.Tensor:
        """``[R, s * s, c]`` per-patch values -> ``[R, (s/2)^2, 4 c]`` per merged token, by the
        model's own pixel shuffle: each token's row concatenates its patches' values in the order
        its features concatenate them."""
        side = self._patch_side()
        grid = patch_values.reshape(patch_values.shape[0], side, side, patch_values.shape[-1])
        shuffled = self.multimodal_model().pixel_shuffle(grid, scale_factor=float(self.model.config.downsample_ratio))  # type: ignore[union-attr,operator]
        return shuffled.reshape(patch_values.shape[0], -1, shuffled.shape[-1])

    def _pool_merged(self, patch_values: torch.Tensor) -> torch.Tensor:
        """``[R, s * s]`` per-patch values -> ``[R, (s/2)^2]`` per merged token: the model's own pixel
        shuffle groups each token's patches into its channels, which are then summed."""
        return self._shuffle_merged(patch_values[..., None]).sum(dim=-1)

    def install_vision_probes(self, probes: VisionProbes, wanted: frozenset[str]) -> list[Callable[[], None]]:
        from ..runtime._attention import observe_attention

        removers: list[Callable[[], None]] = []
        mm = self.multimodal_model()
        if "pre_projector" in wanted:
            removers.append(capture_projector_inputs(mm.multi_modal_projector, probes))
        layer_index = self._feature_layer_index()
        attention_inputs = wanted & {"cls_attention", "vision_keys"} & self.available_inputs()
        if attention_inputs and layer_index is not None:
            # One observer of the feature layer's attention serves both inputs.
            def on_attention(query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
                if not probes.capturing:
                    return
                if "cls_attention" in attention_inputs:
                    cls_to_patches = cls_attention_rows(query, key, scaling)[:, 1:]  # [tiles, s * s]
                    probes.cls_attention.extend(self._pool_merged(cls_to_patches).unbind(0))
                if "vision_keys" in attention_inputs:
                    patch_keys = key_rows(key)[:, 1:]                                 # [tiles, s * s, d]
                    probes.vision_keys.extend(self._shuffle_merged(patch_keys).unbind(0))   # [tiles, (s/2)^2, 4 d]

            removers.append(observe_attention(self._vision_layers()[layer_index].attention, on_attention))
        return removers
