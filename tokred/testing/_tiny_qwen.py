"""Tiny, offline, random-weight Qwen2-VL, Qwen2.5-VL and Qwen3-VL models and processors.

Same recipe as :mod:`tokred.testing._tiny`: the real ``transformers`` model classes and image
processor, every width and depth shrunk, a byte-level BPE tokenizer trained in-process on a few
sentences (with Qwen's special tokens), random weights. Nothing is downloaded.

Images and videos. The processors are the real ``Qwen2VLProcessor``, ``Qwen2_5_VLProcessor`` and
``Qwen3VLProcessor``; their video processor is :class:`~tokred.testing._video.TinyQwenVideoProcessor`
(every ``transformers`` video processor needs torchvision), which computes the same tensors for
already sampled frames, so ``processor(text=..., videos=[frames])`` works as with a real checkpoint.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from tokenizers import Tokenizer

from ._bpe import train_byte_level_bpe
from ._common import TINY_LANGUAGE_MODEL, chatml_template
from ._video import TinyQwenVideoProcessor, with_tiny_video_processor

__all__ = ["QWEN_BUILDERS", "QWEN_CORPUS"]

# Qwen's own spellings; "<|endoftext|>" doubles as padding, as in the released tokenizers.
_QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
)
#: Sentences the Qwen-style tokenizers (Qwen-VL, InternVL) are trained on.
QWEN_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "What is shown in this image? Describe the picture in detail.",
    "A red circle, a green square and a blue triangle on a gradient background.",
    "system user assistant You are a helpful assistant.",
    "There are two cats sitting on a wooden table next to a window.",
    "Please answer the question with a single word or a short phrase.",
)

# The released Qwen2-VL / Qwen2.5-VL template's layout of images and videos, plus plain-string
# content so text-only chats are easy to write in tests. Qwen3-VL's has no default system message;
# otherwise the same layout (its processor writes each frame's timestamp and markers in place of
# <|video_pad|>).
_QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
_QWEN_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
_QWEN2_CHAT_TEMPLATE = chatml_template(_QWEN_IMAGE, default_system=True, video=_QWEN_VIDEO)
_QWEN3_CHAT_TEMPLATE = chatml_template(_QWEN_IMAGE, default_system=False, video=_QWEN_VIDEO)

# Shared tiny dimensions. Images are resized to at most 336 x 336 pixels: 24 x 24 patches of 14 px
# merged 2 x 2 into a 12 x 12 grid of 144 visual tokens (Qwen3-VL: 16 px patches, 320 px after
# rounding to its 32 px merge unit, a 10 x 10 grid of 100 tokens). The language model is
# TINY_LANGUAGE_MODEL: head_dim 16 -> 8 rotary frequencies split over (temporal, height, width).
_COMMON: dict[str, Any] = {
    "max_image_pixels": 336 * 336,
    # A video frame is at most 112 x 112 px: a 4 x 4 grid of merged tokens per temporal patch
    # (two frames), so that a 4-frame clip is 32 visual tokens.
    "max_video_pixels": 112 * 112,
    "vision_hidden_size": 32,
    "vision_depth": 2,
    "vision_num_heads": 4,
    "vision_intermediate_size": 64,
    **TINY_LANGUAGE_MODEL,
    "max_position_embeddings": 4096,
    "mrope_section": (2, 3, 3),
}
_QWEN2_VL_DEFAULTS: dict[str, Any] = {**_COMMON, "patch_size": 14}
_QWEN2_5_VL_DEFAULTS: dict[str, Any] = {
    **_COMMON,
    "patch_size": 14,
    # 112 px windows = 4 x 4 merged tokens; the last block attends globally, as in the real model.
    "vision_window_size": 112,
    "vision_fullatt_block_indexes": (1,),
}
_QWEN3_VL_DEFAULTS: dict[str, Any] = {
    **_COMMON,
    "patch_size": 16,
    # Three deepstack levels, like the released checkpoints (vision layers 8, 16, 24 of 27): their
    # features are added after decoder layers 0, 1 and 2, so FastV's default gate (layer 2) sits
    # inside them. Hence three vision layers here instead of two.
    "vision_depth": 3,
    "vision_deepstack_indexes": (0, 1, 2),
    "vision_num_position_embeddings": 576,  # a 24 x 24 learned grid, interpolated per image
}


def _tokenizer_json() -> str:
    """The Qwen tokenizer: no unknown token and no BOS, like Qwen's own."""
    return train_byte_level_bpe(QWEN_CORPUS, _QWEN_SPECIAL_TOKENS)


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    """Qwen-style tokenizer: no BOS, ``<|im_end|>`` ends a turn, ``<|endoftext|>`` pads."""
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_start_token": "<|vision_start|>",
            "vision_end_token": "<|vision_end|>",
        },
        padding_side="left",
    )


def _image_processor(p: dict[str, Any]) -> Any:
    return transformers.Qwen2VLImageProcessorPil(
        size={"shortest_edge": 56 * 56, "longest_edge": p["max_image_pixels"]},
        patch_size=p["patch_size"],
        temporal_patch_size=2,
        merge_size=2,
    )


def _video_processor(p: dict[str, Any], image_processor: Any) -> TinyQwenVideoProcessor:
    """Frames up to ``max_video_pixels`` each (the released video processors cap a frame far lower
    than an image too), normalised as the images are."""
    return TinyQwenVideoProcessor(patch_size=p["patch_size"], temporal_patch_size=2, merge_size=2,
                                  image_mean=image_processor.image_mean, image_std=image_processor.image_std,
                                  min_pixels=(2 * p["patch_size"]) ** 2, max_pixels=p["max_video_pixels"])


def _processor(cls: type, p: dict[str, Any], tokenizer: Any, template: str) -> Any:
    images = _image_processor(p)
    return with_tiny_video_processor(cls)(image_processor=images, tokenizer=tokenizer, video_processor=_video_processor(p, images),
               chat_template=template)


def _text_kwargs(tokenizer: transformers.PreTrainedTokenizerFast, p: dict[str, Any]) -> dict[str, Any]:
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": p["hidden_size"],
        "num_hidden_layers": p["num_hidden_layers"],
        "num_attention_heads": p["num_attention_heads"],
        "num_key_value_heads": p["num_key_value_heads"],
        "intermediate_size": p["intermediate_size"],
        "max_position_embeddings": p["max_position_embeddings"],
        "initializer_range": p["initializer_range"],
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "bos_token_id": None,  # Qwen prepends no BOS
    }


def _special_ids(tokenizer: transformers.PreTrainedTokenizerFast) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def _finish(model_class: type, config: Any, attn_implementation: str) -> transformers.PreTrainedModel:
    model = model_class._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    model.generation_config.pad_token_id = config.get_text_config().pad_token_id
    # A random model would now and then emit an <|image_pad|>; fed back (generate without cache), the
    # model itself rejects it for want of image features. Trained checkpoints never emit them.
    model.generation_config.suppress_tokens = [
        config.image_token_id, config.video_token_id, config.vision_start_token_id, config.vision_end_token_id,
    ]
    return model


def _build_qwen2_vl(
    _shared_tokenizer: Any, attn_implementation: str, p: dict[str, Any]
) -> tuple[transformers.PreTrainedModel, transformers.ProcessorMixin]:
    """Qwen2-VL: ViT with 2-D rotary embeddings -> 2x2 patch merger -> Qwen2 LLM with M-RoPE."""
    tokenizer = _tokenizer()
    vision = transformers.Qwen2VLVisionConfig(
        depth=p["vision_depth"], embed_dim=p["vision_hidden_size"], hidden_size=p["hidden_size"],
        mlp_ratio=p["vision_intermediate_size"] // p["vision_hidden_size"], num_heads=p["vision_num_heads"],
        patch_size=p["patch_size"], spatial_merge_size=2, temporal_patch_size=2,
        initializer_range=p["initializer_range"],
    )
    text = transformers.Qwen2VLTextConfig(
        **_text_kwargs(tokenizer, p),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(p["mrope_section"])},
    )
    config = transformers.Qwen2VLConfig(vision_config=vision, text_config=text, **_special_ids(tokenizer))
    model = _finish(transformers.Qwen2VLForConditionalGeneration, config, attn_implementation)
    processor = _processor(transformers.Qwen2VLProcessor, p, tokenizer, _QWEN2_CHAT_TEMPLATE)
    return model, processor


def _build_qwen2_5_vl(
    _shared_tokenizer: Any, attn_implementation: str, p: dict[str, Any]
) -> tuple[transformers.PreTrainedModel, transformers.ProcessorMixin]:
    """Qwen2.5-VL: window-attention ViT (SwiGLU, RMSNorm) -> 2x2 merger -> Qwen2 LLM with M-RoPE."""
    tokenizer = _tokenizer()
    vision = transformers.Qwen2_5_VLVisionConfig(
        depth=p["vision_depth"], hidden_size=p["vision_hidden_size"], intermediate_size=p["vision_intermediate_size"],
        num_heads=p["vision_num_heads"], out_hidden_size=p["hidden_size"], patch_size=p["patch_size"],
        spatial_merge_size=2, temporal_patch_size=2, window_size=p["vision_window_size"],
        fullatt_block_indexes=list(p["vision_fullatt_block_indexes"]), initializer_range=p["initializer_range"],
    )
    text = transformers.Qwen2_5_VLTextConfig(
        **_text_kwargs(tokenizer, p),
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(p["mrope_section"])},
    )
    config = transformers.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **_special_ids(tokenizer))
    model = _finish(transformers.Qwen2_5_VLForConditionalGeneration, config, attn_implementation)
    processor = _processor(transformers.Qwen2_5_VLProcessor, p, tokenizer, _QWEN2_CHAT_TEMPLATE)
    return model, processor


def _build_qwen3_vl(
    _shared_tokenizer: Any, attn_implementation: str, p: dict[str, Any]
) -> tuple[transformers.PreTrainedModel, transformers.ProcessorMixin]:
    """Qwen3-VL: ViT with learned + rotary positions and deepstack mergers -> Qwen3 LLM with
    interleaved M-RoPE; deepstack features are added to the visual positions of early layers."""
    tokenizer = _tokenizer()
    vision = transformers.Qwen3VLVisionConfig(
        depth=p["vision_depth"], hidden_size=p["vision_hidden_size"], intermediate_size=p["vision_intermediate_size"],
        num_heads=p["vision_num_heads"], out_hidden_size=p["hidden_size"], patch_size=p["patch_size"],
        spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=p["vision_num_position_embeddings"],
        deepstack_visual_indexes=list(p["vision_deepstack_indexes"]), initializer_range=p["initializer_range"],
    )
    text = transformers.Qwen3VLTextConfig(
        **_text_kwargs(tokenizer, p),
        head_dim=p["hidden_size"] // p["num_attention_heads"],
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": list(p["mrope_section"]),
                         "mrope_interleaved": True},
    )
    config = transformers.Qwen3VLConfig(vision_config=vision, text_config=text, **_special_ids(tokenizer))
    model = _finish(transformers.Qwen3VLForConditionalGeneration, config, attn_implementation)
    processor = _processor(transformers.Qwen3VLProcessor, p, tokenizer, _QWEN3_CHAT_TEMPLATE)
    return model, processor


#: family -> (builder, default dimensions), merged into ``_tiny._BUILDERS``. Builders ignore the
#: tokenizer ``tiny_model`` passes (LLaVA's) and build their own with Qwen's special tokens.
QWEN_BUILDERS: dict[str, tuple[Any, dict[str, Any]]] = {
    "qwen2_vl": (_build_qwen2_vl, _QWEN2_VL_DEFAULTS),
    "qwen2_5_vl": (_build_qwen2_5_vl, _QWEN2_5_VL_DEFAULTS),
    "qwen3_vl": (_build_qwen3_vl, _QWEN3_VL_DEFAULTS),
}
