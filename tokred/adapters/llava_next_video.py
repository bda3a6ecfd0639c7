"""LLaVA-NeXT-Video (``LlavaNextVideoForConditionalGeneration``, LLaVA-NeXT-Video-*-hf).

Images are LLaVA-NeXT's (:mod:`tokred.adapters.llava_next`: anyres tiles and a thumbnail, newline
tokens). Videos, measured on ``transformers`` 5.24 (and 5.17): ``pixel_values_videos``
``[videos, F, 3, H, W]``; every frame goes through the CLIP tower at its size (24 x 24 patches at
336 px), the [CLS] token is dropped, the vision resampler pools the grid (``spatial_pool_mode``
average, max or a strided convolution, ``spatial_pool_stride`` 2: 12 x 12 = 144 tokens per frame),
the projector maps it, and the frames follow each other where the processor expanded ``<video>``,
with no newline: ``F * q * q`` tokens (32 frames: 4,608). tokred's layout: one video, one frame per
sampled frame (:meth:`ImageLayout.video`); ``q`` comes from running the model's own resampler on a
probe.

Selector inputs, for video frames as for images:

* ``cls_attention``: each frame's [CLS] row at the feature layer, ``[s * s]``, summed over every
  ``stride x stride`` block the resampler pools into one token (ours: the pooled token's share of
  the attention, whatever the pooling mode; the mean would rank the same).
* ``pre_projector``: the projector's input, which for videos is already pooled: ``[q * q, D_v]`` per
  frame.

The vision tower runs on the images before the videos (the model's forward and ``generate`` both),
so the captured rows are every image's encoder rows, then every video frame.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..errors import RuntimeStateError
from ..tokens import ImageLayout
from .base import ImageSpan, VisionProbes, order_spans, split_image_tokens, stacked_video_frames
from .llava_next import LlavaNextAdapter

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

__all__ = ["LlavaNextVideoAdapter", "pool_cls_attention"]


def pool_cls_attention(rows: torch.Tensor, side: int, stride: int) -> torch.Tensor:
    """``[R, side * side]`` per-patch [CLS] attention of ``R`` frames -> ``[R, q * q]`` per pooled
    token, ``q = side // stride``: the sum over each ``stride x stride`` block (the resampler's
    kernel and stride; cells left over at the border are dropped, as its floor-mode pooling does)."""
    import torch

    grid = rows.reshape(rows.shape[0], 1, side, side).float()
    return (torch.nn.functional.avg_pool2d(grid, kernel_size=stride, stride=stride) * stride * stride).flatten(1)


class LlavaNextVideoAdapter(LlavaNextAdapter):
    """Adapter for LLaVA-NeXT-Video: LLaVA-NeXT's images plus videos of pooled frames.

    Args:
        model: a ``LlavaNextVideoForConditionalGeneration``.
        newline_tokens: the images' newline tokens, as for LLaVA-NeXT (videos have none).
    """

    model_classes = ("LlavaNextVideoForConditionalGeneration",)
    modeling_module = "llava_next_video.modeling_llava_next_video"
    _pooled: int | None = None

    # ----------------------------------------------------------------- geometry

    def _stride(self) -> int:
        return int(self.model.config.spatial_pool_stride)  # type: ignore[union-attr]

    def _pooled_side(self) -> int:
        """Tokens per side of a pooled frame: the model's own resampler on a probe frame of zeros
        (its ``forward``, which bypasses hooks: the [CLS] probe below must not see this call)."""
        import torch

        if self._pooled is not None:
            return self._pooled
        side, width = self._grid_side(), int(self.model.config.vision_config.hidden_size)  # type: ignore[union-attr]
        resampler = self.multimodal_model().vision_resampler
        parameter = next(resampler.parameters(), None)
        probe = torch.zeros(1, side * side, width, dtype=parameter.dtype if parameter is not None else torch.float32,
                            device=parameter.device if parameter is not None else None)
        with torch.no_grad():
            cells = int(resampler.forward(probe).shape[1])
        q = int(round(cells ** 0.5))
        if q * q != cells or q != side // self._stride():
            raise RuntimeStateError(
                f"LLaVA-NeXT-Video: the vision resampler pools a {side} x {side} grid into {cells} tokens, not the "
                f"({side} // {self._stride()})^2 that spatial_pool_stride implies"
            )
        self._pooled = q
        return q

    # ------------------------------------------------------------------- spans

    def image_spans(self, input_ids: torch.Tensor, probes: VisionProbes, inputs: Mapping[str, Any]) -> list[ImageSpan]:
        """Images as LLaVA-NeXT's, then every video (``<video>`` tokens cut into ``F * q * q`` per
        video), all numbered in sequence order within a row. A video's probe cells follow every
        image's encoder rows: ``image cells + (frame before it) * q * q + cell``."""
        import torch

        spans, image_rows = self._image_spans(input_ids, inputs)
        video_token = self.video_token_id()
        q = self._pooled_side()
        frames = stacked_video_frames(inputs, q * q)
        if frames is not None and video_token is not None:
            first_cell = image_rows * self._grid_side() ** 2
            chunks = split_image_tokens(input_ids, video_token, [f * q * q for f in frames])
            for encoder_index, ((row, positions), count) in enumerate(zip(chunks, frames)):
                cells = torch.arange(count * q * q) + first_cell
                first_cell += count * q * q
                spans.append(ImageSpan(row, 0, positions, ImageLayout.video(count, q, q), encoder_index, cells))
        return order_spans(spans)

    # ------------------------------------------------------------ vision probes

    def install_vision_probes(self, probes: VisionProbes, wanted: frozenset[str]) -> list[Callable[[], None]]:
        """LLaVA-NeXT's probes (a [CLS] row per encoder row, the projector's input per row), and a
        pre-hook on the vision resampler, which runs for video frames only: the [CLS] rows the tower
        just captured for those frames are pooled as the resampler pools the patches."""
        import torch

        removers = super().install_vision_probes(probes, wanted)
        if "cls_attention" in wanted and "cls_attention" in self.available_inputs():
            side, stride = self._grid_side(), self._stride()

            def on_resampler(module: nn.Module, args: tuple) -> None:
                frames = int(args[0].shape[0])
                if len(probes.cls_attention) < frames:
                    raise RuntimeStateError(
                        f"LLaVA-NeXT-Video: the vision resampler pools {frames} frames but only "
                        f"{len(probes.cls_attention)} [CLS] rows were captured"
                    )
                captured = torch.stack(probes.cls_attention[-frames:])
                del probes.cls_attention[-frames:]
                probes.cls_attention.extend(pool_cls_attention(captured, side, stride).unbind(0))

            removers.append(self.multimodal_model().vision_resampler.register_forward_pre_hook(on_resampler).remove)
        return removers
