"""LLaVA-1.5 in vLLM with a tokred Selector before the language model.

Positions: vLLM numbers a 1-D RoPE model's tokens contiguously from their place in the (already
shortened) token sequence, and offers no hook for a non-M-RoPE model to set its own, so the kept
tokens get positions ``offset .. offset + k - 1`` and the text after them is shifted down by
``N - k``. tokred's transformers runtime keeps *original* positions by default; the transformers
equivalent of this path is the renumbered-positions schedule.
"""

from __future__ import annotations

import re

from vllm.model_executor.models.llava import (
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
    _build_llava_or_pixtral_hf_info,
    _build_llava_or_pixtral_hf_processor,
)
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY

from ._config import engine_choice
from ._processing import TokredInfoMixin, TokredProcessorMixin, keep_counts
from ._stage1 import select_image
from .checkpoints import CLIP_TOWER_PARTS

__all__ = ["TokredLlavaForConditionalGeneration"]


class TokredLlavaProcessingInfo(TokredInfoMixin, LlavaProcessingInfo):
    pass


class TokredLlavaMultiModalProcessor(TokredProcessorMixin, LlavaMultiModalProcessor):
    def _tokred_num_tokens(self, processed):  # type: ignore[no-untyped-def]
        pixel_values = processed.get("pixel_values")
        if pixel_values is None:
            return None
        height, width = pixel_values.shape[-2:]
        n = self.info.get_num_image_tokens(image_width=int(width), image_height=int(height))
        return [n] * len(pixel_values)


def _info(ctx):  # type: ignore[no-untyped-def]
    info = _build_llava_or_pixtral_hf_info(ctx)
    return TokredLlavaProcessingInfo(ctx) if type(info) is LlavaProcessingInfo else info


def _processor(info, dummy_inputs, **kwargs):  # type: ignore[no-untyped-def]
    if isinstance(info, TokredLlavaProcessingInfo):
        return TokredLlavaMultiModalProcessor(info, dummy_inputs, **kwargs)
    return _build_llava_or_pixtral_hf_processor(info, dummy_inputs, **kwargs)


# A CLIP/SigLIP tower saved flat by transformers 5.x (vision_tower.embeddings.*) loads like a released
# checkpoint's (vision_tower.vision_model.*); names that already have vision_model. are untouched.
_FLAT_TOWER = WeightsMapper(orig_to_new_regex={
    re.compile(r"(^|\.)vision_tower\.(?=(" + "|".join(re.escape(p) for p in CLIP_TOWER_PARTS) + "))"):
        r"\1vision_tower.vision_model.",
})


@MULTIMODAL_REGISTRY.register_processor(_processor, info=_info, dummy_inputs=LlavaDummyInputsBuilder)
class TokredLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA with stage I of the tokred method chosen in ``hf_overrides["tokred"]``; the stock
    model where none is chosen."""

    hf_to_vllm_mapper = _FLAT_TOWER | LlavaForConditionalGeneration.hf_to_vllm_mapper

    def __init__(self, *, vllm_config, prefix: str = "") -> None:  # type: ignore[no-untyped-def]
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.tokred_choice = engine_choice(self.config)
        vision = self.config.vision_config
        self.tokred_grid = vision.image_size // vision.patch_size
        self.tokred_leading_extra = int(self.config.vision_feature_select_strategy == "full")

    def embed_multimodal(self, **kwargs: object):  # type: ignore[no-untyped-def]
        import tokred

        keep = keep_counts(kwargs)
        embeddings = super().embed_multimodal(**kwargs)
        if keep is None or self.tokred_choice is None or len(embeddings) == 0:
            return embeddings
        stage = self.tokred_choice.stage()
        layout = tokred.ImageLayout.grid(self.tokred_grid, self.tokred_grid, leading_extra=self.tokred_leading_extra)
        return [select_image(stage, image, layout, k)[1] for image, k in zip(embeddings, keep, strict=True)]
