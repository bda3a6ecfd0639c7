"""LLaVA-1.5 (``LlavaForConditionalGeneration``): a CLIP tower, an MLP projector, a Llama-style LLM.

Each image becomes ``(image_size / patch_size)^2`` visual tokens (576 for 336 px / 14 px patches),
plus the [CLS] token when ``vision_feature_select_strategy == "full"``, placed where the processor
expanded the ``<image>`` token, in row-major patch order.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Mapping

from ..tokens import ImageLayout
from .base import (
    Adapter, ImageSpan, VisionProbes, capture_projector_inputs, cls_attention_rows, encoder_layer_of, key_rows, split_runs,
)

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

__all__ = ["LlavaAdapter"]


class LlavaAdapter(Adapter):
    """Adapter for LLaVA-1.5 style models (single 2-D grid per image)."""

    model_classes = ("LlavaForConditionalGeneration",)

    def _grid_side(self) -> int:
        vision = self.model.config.vision_config  # type: ignore[union-attr]
        return int(vision.image_size) // int(vision.patch_size)

    def _keeps_cls(self) -> bool:
        return self.model.config.vision_feature_select_strategy == "full"  # type: ignore[union-attr]

    def visual_tokens_per_image(self) -> int:
        return self._grid_side() ** 2 + int(self._keeps_cls())

    def image_spans(self, input_ids: torch.Tensor, probes: VisionProbes, inputs: Mapping[str, Any]) -> list[ImageSpan]:
        side = self._grid_side()
        layout = ImageLayout.grid(side, side, leading_extra=int(self._keeps_cls()))
        spans: list[ImageSpan] = []
        per_row: dict[int, int] = {}
        for encoder_index, (row, positions) in enumerate(
            split_runs(input_ids, self.image_token_id(), self.visual_tokens_per_image())
        ):
            image = per_row.get(row, 0)
            per_row[row] = image + 1
            spans.append(ImageSpan(row, image, positions, layout, encoder_index))
        return spans

    # ------------------------------------------------------------ vision probes

    def _vision_layers(self) -> nn.ModuleList | None:
        tower = self.multimodal_model().vision_tower
        body = getattr(tower, "vision_model", tower)  # transformers 5.x flattened CLIPVisionModel at some point
        return getattr(getattr(body, "encoder", None), "layers", None)

    def _feature_layer_index(self) -> int | None:
        """The encoder layer whose output the projector reads (:func:`encoder_layer_of`)."""
        layers = self._vision_layers()
        if layers is None:
            return None
        return encoder_layer_of(self.model.config.vision_feature_layer, len(layers))  # type: ignore[union-attr]

    def has_cls_token(self) -> bool:
        tower = self.multimodal_model().vision_tower
        return "CLIP" in type(tower).__name__

    def available_inputs(self) -> frozenset[str]:
        """Pre-projector features always; with a CLIP tower ([CLS] token) whose feature layer is an
        encoder layer, also the [CLS] attention and the key states of that layer."""
        cls = self.has_cls_token() and self._feature_layer_index() is not None
        return frozenset({"pre_projector", "cls_attention", "vision_keys"} if cls else {"pre_projector"})

    def projector(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The ``multi_modal_projector`` (a per-token MLP): ``[n, D_v] -> [n, D]``."""
        return self.multimodal_model().multi_modal_projector  # type: ignore[no-any-return]

    def install_vision_probes(self, probes: VisionProbes, wanted: frozenset[str]) -> list[Callable[[], None]]:
        from ..runtime._attention import observe_attention

        removers: list[Callable[[], None]] = []
        mm = self.multimodal_model()
        if "pre_projector" in wanted:
            removers.append(capture_projector_inputs(mm.multi_modal_projector, probes))
        layer_index = self._feature_layer_index()
        attention_inputs = wanted & {"cls_attention", "vision_keys"} & self.available_inputs()
        if attention_inputs:
            first = 0 if self._keeps_cls() else 1  # the [CLS] row is a visual token only with "full"

            # One observer of the feature layer's attention serves both inputs.
            def on_attention(query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
                if not probes.capturing:
                    return
                if "cls_attention" in attention_inputs:
                    cls_to_tokens = cls_attention_rows(query, key, scaling)     # [images, 1 + patches]
                    probes.cls_attention.extend(cls_to_tokens[:, first:].unbind(0))
                if "vision_keys" in attention_inputs:
                    probes.vision_keys.extend(key_rows(key)[:, first:].unbind(0))   # [images, patches, d]

            layers = self._vision_layers()
            assert layers is not None and layer_index is not None
            removers.append(observe_attention(layers[layer_index].self_attn, on_attention))
        return removers
