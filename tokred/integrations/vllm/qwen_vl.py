"""Qwen2-VL and Qwen2.5-VL in vLLM with a tokred Selector before the language model.

An image is ``t * (h / 2) * (w / 2)`` merged tokens (``image_grid_thw``, ``t = 1``) in row-major
order of the merged grid, between ``<|vision_start|>`` and ``<|vision_end|>``: the layout of
tokred's ``QwenVLAdapter`` (``tokred.adapters.qwen_vl.merged_layout``). The towers have no [CLS]
token: selectors get ``cls_attention=None`` and ``pre_projector=None`` and fall back as they
document, as in the transformers adapter.

Positions (M-RoPE): kept tokens keep their original ``(t, h, w)`` positions and the text after an
image the positions it has in the unreduced sequence (:mod:`._positions`), which needs
``video_pruning_rate > 0`` (and, on CPU, tokred's worker). ``positions="renumber"`` is refused, as
by the transformers adapter. Videos are refused while tokred is on (the transformers adapters do not
reduce videos either); Qwen2.5-VL's EVS video pruning is therefore never mixed with tokred.

Where torchvision is missing (CPU environments, see :mod:`._compat`), the HF processor is an
image-only subclass and the engine offers no video modality.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

from ...adapters.qwen_vl import merged_layout
from ._compat import (  # vLLM's names, through the one module that knows each release's spelling
    MULTIMODAL_REGISTRY,
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
    has_torchvision,
    image_only,
)
from ._config import split_request_kwargs
from ._model import EncodedImage, TokredModelMixin
from ._positions import grid_cells
from ._processing import ImageFields, ImageRun, TokredInfoMixin, TokredProcessorMixin

__all__ = ["TokredQwen2VLForConditionalGeneration", "TokredQwen2_5_VLForConditionalGeneration"]


class _QwenInfoMixin(TokredInfoMixin):
    _processor_class: type = Qwen2VLProcessor

    def get_hf_processor(self, **kwargs: object) -> Any:
        return self.ctx.get_hf_processor(image_only(self._processor_class), **split_request_kwargs(kwargs)[1])  # type: ignore[attr-defined]

    def get_image_processor(self, **kwargs: object) -> Any:
        return super().get_image_processor(**split_request_kwargs(kwargs)[1])  # type: ignore[misc]

    def get_supported_mm_limits(self) -> Any:
        limits = dict(super().get_supported_mm_limits())  # type: ignore[misc]
        if not has_torchvision():  # no video processor: see _compat.image_only
            limits.pop("video", None)
        return limits


class _QwenProcessorMixin(TokredProcessorMixin):
    def _tokred_image_runs(self, processed: Any) -> list[ImageRun]:
        grid_thw = processed.get("image_grid_thw")
        if grid_thw is None:
            return []
        merge = int(self.info.get_hf_config().vision_config.spatial_merge_size)  # type: ignore[attr-defined]
        return [ImageRun(n, n) for n in (int(g.prod()) // merge**2 for g in grid_thw)]


class TokredQwen2VLProcessingInfo(_QwenInfoMixin, Qwen2VLProcessingInfo):
    _processor_class = Qwen2VLProcessor


class TokredQwen2VLMultiModalProcessor(_QwenProcessorMixin, Qwen2VLMultiModalProcessor):
    pass


class TokredQwen2_5_VLProcessingInfo(_QwenInfoMixin, Qwen2_5_VLProcessingInfo):
    _processor_class = Qwen2_5_VLProcessor


class TokredQwen2_5_VLMultiModalProcessor(_QwenProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    pass


class _TokredQwenMixin(TokredModelMixin):
    """What Qwen2-VL and Qwen2.5-VL share."""

    tokred_native_mrope = True

    def _tokred_merged_grid(self, grid_thw: torch.Tensor) -> tuple[int, int, int]:
        merge = int(self.config.vision_config.spatial_merge_size)  # type: ignore[attr-defined]
        t, h, w = (int(v) for v in grid_thw.tolist())
        return t, h // merge, w // merge

    def _tokred_encode(self, kwargs: dict[str, object], wants: frozenset[str]) -> list[EncodedImage]:
        # vLLM 0.32 keys the parsed inputs "images"/"videos" on Qwen2-VL and "image"/"video" on Qwen2.5-VL.
        parsed = self._parse_and_validate_multimodal_inputs(**kwargs)  # type: ignore[attr-defined]
        if any(key.startswith("video") and value is not None for key, value in parsed.items()):
            raise RuntimeError("tokred: a video reached a tokred engine (the processor refuses them)")
        image_input = next((value for key, value in parsed.items() if key.startswith("image")), None)
        if image_input is None:
            return []
        embeddings = self._process_image_input(image_input)  # type: ignore[attr-defined]
        return [EncodedImage(run=run, layout=merged_layout(*self._tokred_merged_grid(grid)))
                for run, grid in zip(embeddings, image_input["image_grid_thw"], strict=True)]

    def _tokred_cells(self, feature: Any) -> torch.Tensor:
        return grid_cells(*self._tokred_merged_grid(feature.data["image_grid_thw"].data))

    def _tokred_run_cells(self, image: EncodedImage, fields: ImageFields) -> torch.Tensor:
        grids = image.layout.grids
        return grid_cells(1, *grids[0])

    def get_encoder_cudagraph_config(self) -> Any:
        """The encoder CUDA graph path runs the vision tower without ``embed_multimodal``, so it
        would skip stage I: tokred turns it off."""
        config = super().get_encoder_cudagraph_config()  # type: ignore[misc]
        if self.tokred_config is None:
            return config
        return dataclasses.replace(config, modalities=[])


@MULTIMODAL_REGISTRY.register_processor(
    TokredQwen2VLMultiModalProcessor, info=TokredQwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class TokredQwen2VLForConditionalGeneration(_TokredQwenMixin, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL with stage I of the tokred config; the stock model where none is chosen."""

    tokred_family = "qwen2_vl"

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._tokred_init(vllm_config, [self.config.image_token_id])


@MULTIMODAL_REGISTRY.register_processor(
    TokredQwen2_5_VLMultiModalProcessor, info=TokredQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class TokredQwen2_5_VLForConditionalGeneration(_TokredQwenMixin, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with stage I of the tokred config; the stock model (EVS included) where none
    is chosen."""

    tokred_family = "qwen2_5_vl"

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._tokred_init(vllm_config, [self.config.image_token_id])
