"""LLaVA-1.5 (``LlavaForConditionalGeneration``) in vLLM with a tokred Selector before the language model.

Each image is ``(image_size / patch_size)^2`` tokens (576 for 336 px / 14 px patches), plus the
[CLS] token with ``vision_feature_select_strategy == "full"``, in row-major patch order: the layout
of tokred's ``LlavaAdapter``. Selector inputs: ``pre_projector`` (the projector's input) and, for
CLIP towers, ``cls_attention`` (see :mod:`._probes`); SigLIP towers have no [CLS] token and give
``None``, as in the transformers adapter.

Positions: with ``positions="original"`` (the default) the engine runs this 1-D RoPE model through
vLLM's M-RoPE machinery (``"mrope_section"`` in ``hf_overrides``, see :mod:`._positions`): vLLM
hands :meth:`forward` three equal position rows and the language model reads the first, so kept
tokens and the text after them keep the positions of the unreduced sequence, as in tokred's
transformers runtime. With ``positions="renumber"`` the kept tokens and the text after them are
numbered contiguously (vLLM's own positions), which equals ``Schedule(positions="renumber")``.

Pixtral-based LLaVA checkpoints (``vision_config.model_type == "pixtral"``) are refused.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ...tokens import ImageLayout
from ._compat import (  # vLLM's names, through the one module that knows each release's spelling
    MULTIMODAL_REGISTRY,
    CLIPVisionModel,
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    WeightsMapper,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from ._model import EncodedImage, TokredModelMixin, feature_run
from ._positions import line_cells
from ._probes import Probes, capture
from ._processing import ImageRun, TokredInfoMixin, TokredProcessorMixin
from .checkpoints import CLIP_TOWER_PARTS

__all__ = ["TokredLlavaForConditionalGeneration", "LlavaLineMixin", "FLAT_TOWER", "cls_probe_target"]


class TokredLlavaProcessingInfo(TokredInfoMixin, LlavaProcessingInfo):
    pass


class TokredLlavaMultiModalProcessor(TokredProcessorMixin, LlavaMultiModalProcessor):
    def _tokred_image_runs(self, processed: Any) -> list[ImageRun]:
        pixel_values = processed.get("pixel_values")
        if pixel_values is None:
            return []
        height, width = pixel_values.shape[-2:]
        n = self.info.get_num_image_tokens(image_width=int(width), image_height=int(height))
        return [ImageRun(n, n)] * len(pixel_values)


def _info(ctx: Any) -> Any:
    info = _build_llava_or_pixtral_hf_info(ctx)
    return TokredLlavaProcessingInfo(ctx) if type(info) is LlavaProcessingInfo else info


def _processor(info: Any, dummy_inputs: Any, **kwargs: Any) -> Any:
    if isinstance(info, TokredLlavaProcessingInfo):
        return TokredLlavaMultiModalProcessor(info, dummy_inputs, **kwargs)
    return _build_llava_or_pixtral_hf_processor(info, dummy_inputs, **kwargs)


#: A CLIP/SigLIP tower saved flat by transformers 5.x (``vision_tower.embeddings.*``) loads like a
#: released checkpoint's (``vision_tower.vision_model.*``); names that have ``vision_model.`` stay.
FLAT_TOWER = WeightsMapper(orig_to_new_regex={
    re.compile(r"(^|\.)vision_tower\.(?=(" + "|".join(re.escape(p) for p in CLIP_TOWER_PARTS) + "))"):
        r"\1vision_tower.vision_model.",
})


def cls_probe_target(vision_tower: Any, vision_config: Any) -> tuple[Any, int] | None:
    """``(attention module, total heads)`` of the layer the projector reads, for a CLIP tower
    (vLLM builds it only up to that layer, so it is the last), else ``None`` (no [CLS] token)."""
    if not isinstance(vision_tower, CLIPVisionModel):
        return None
    return vision_tower.vision_model.encoder.layers[-1].self_attn.attn, int(vision_config.num_attention_heads)


class LlavaLineMixin:
    """What tokred's LLaVA-1.5 and LLaVA-NeXT models share: placeholder cells on one line, and a 1-D
    RoPE language model that runs on M-RoPE rows. With ``positions="original"`` the engine gets
    ``mrope_section=[1, 1, 1]`` (:func:`~tokred.integrations.vllm.engine_args`), so vLLM hands the model
    three equal position rows, which carry the kept tokens' original positions; the model reads one."""

    supports_mrope = True  # used only where hf_overrides adds "mrope_section" (positions="original")

    def _tokred_cells(self, feature: Any) -> torch.Tensor:
        return line_cells(feature_run(feature))

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor, intermediate_tensors: Any = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs: object) -> Any:
        if positions.dim() == 2:  # tokred's M-RoPE layout: three equal rows; the 1-D RoPE model reads one
            positions = positions[0]
        return super().forward(input_ids, positions, intermediate_tensors, inputs_embeds, **kwargs)  # type: ignore[misc]


@MULTIMODAL_REGISTRY.register_processor(_processor, info=_info, dummy_inputs=LlavaDummyInputsBuilder)
class TokredLlavaForConditionalGeneration(LlavaLineMixin, TokredModelMixin, LlavaForConditionalGeneration):
    """vLLM's LLaVA with stage I of the tokred config; the stock model where none is chosen."""

    tokred_family = "llava"
    hf_to_vllm_mapper = FLAT_TOWER | LlavaForConditionalGeneration.hf_to_vllm_mapper

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._tokred_init(vllm_config, [self.config.image_token_index])
        if self.tokred_config is not None and self.config.vision_config.model_type == "pixtral":
            raise ValueError("tokred in vLLM does not support Pixtral-based LLaVA checkpoints")

    def _tokred_encode(self, kwargs: dict[str, object], wants: frozenset[str]) -> list[EncodedImage]:
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            raise RuntimeError("tokred: image embeddings reached a tokred engine (refused at start)")
        probes = Probes()
        target = cls_probe_target(self.vision_tower, self.config.vision_config) if "cls_attention" in wants else None
        with capture(probes, attention=target[0] if target else None, total_heads=target[1] if target else 0,
                     projector=self.multi_modal_projector if "pre_projector" in wants else None):
            embeddings = self._process_image_input(image_input)
        embeddings = list(embeddings.unbind(0) if isinstance(embeddings, torch.Tensor) else embeddings)
        vision = self.config.vision_config
        side = int(vision.image_size) // int(vision.patch_size)
        keeps_cls = self.config.vision_feature_select_strategy == "full"
        layout = ImageLayout.grid(side, side, leading_extra=int(keeps_cls))
        pre = torch.cat([p.reshape(-1, p.shape[-1]) for p in probes.pre_projector]) if probes.pre_projector else None
        images, row = [], 0
        for i, run in enumerate(embeddings):
            n = run.shape[0]
            cls = probes.cls_attention[i] if probes.cls_attention else None
            images.append(EncodedImage(
                run=run, layout=layout,
                cls_attention=None if cls is None else (cls if keeps_cls else cls[1:]),
                pre_projector=None if pre is None else pre[row:row + n],
            ))
            row += n
        return images
