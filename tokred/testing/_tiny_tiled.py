"""Tiny, offline, random-weight tiled-image models: LLaVA-NeXT (anyres) and InternVL.

Same recipe as :mod:`tokred.testing._tiny`: the real ``transformers`` model classes and image
processors, every width and depth shrunk, a tokenizer trained in-process, random weights.

Both split an image into tiles plus a global thumbnail, so the number of visual tokens depends on
the image's size and aspect ratio. Tiles are smaller than the released checkpoints' (LLaVA-NeXT
168 px instead of 336 px, InternVL 224 px instead of 448 px) so that a 2x2-tiled image stays a few
hundred tokens on CPU; the layout rules (thumbnail first or last, unpadding, newline tokens,
2x2 pixel shuffle) are the real ones.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from tokenizers import Tokenizer

from ._bpe import train_byte_level_bpe
from ._common import LLAVA_CHAT_TEMPLATE, TINY_LANGUAGE_MODEL, chatml_template
from ._tiny_qwen import QWEN_CORPUS
from ._video import TinyFramesVideoProcessor, with_tiny_video_processor

__all__ = ["TILED_BUILDERS"]

# ------------------------------------------------------------------ LLaVA-NeXT

# 168 px tiles of 14 px patches: 12 x 12 = 144 tokens per tile. The grid pinpoints are the released
# llava-v1.6 ones scaled by 168/336 (1x2, 2x1, 2x2, 3x1 and 1x3 tiles), so a square image is cut
# 2 x 2 (144 thumbnail + 24 rows x (24 + 1 newline) = 744 tokens) and a 480 x 640 image 2 x 2 with
# the top and bottom unpadded away (144 + 18 x 25 = 594).
_LLAVA_NEXT_DEFAULTS: dict[str, Any] = {
    "image_size": 168,
    "patch_size": 14,
    "image_grid_pinpoints": ((168, 336), (336, 168), (336, 336), (504, 168), (168, 504)),
    "vision_hidden_size": 32,
    "vision_num_hidden_layers": 2,
    "vision_num_attention_heads": 4,
    "vision_intermediate_size": 64,
    **TINY_LANGUAGE_MODEL,
    "max_position_embeddings": 8192,
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
}


def clip_llama_configs(p: dict[str, Any], tokenizer: Any) -> tuple[transformers.CLIPVisionConfig, transformers.LlamaConfig]:
    """The CLIP tower and Llama language model of the tiny LLaVA-NeXT and LLaVA-NeXT-Video, from the
    family's parameters ``p`` and its tokenizer (vocabulary size and special-token ids)."""
    vision = transformers.CLIPVisionConfig(
        image_size=p["image_size"], patch_size=p["patch_size"], hidden_size=p["vision_hidden_size"],
        num_hidden_layers=p["vision_num_hidden_layers"], num_attention_heads=p["vision_num_attention_heads"],
        intermediate_size=p["vision_intermediate_size"], initializer_range=p["initializer_range"],
    )
    text = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=p["hidden_size"], num_hidden_layers=p["num_hidden_layers"],
        num_attention_heads=p["num_attention_heads"], num_key_value_heads=p["num_key_value_heads"],
        intermediate_size=p["intermediate_size"], max_position_embeddings=p["max_position_embeddings"],
        initializer_range=p["initializer_range"], bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    return vision, text

def _build_llava_next(
    tokenizer: transformers.PreTrainedTokenizerFast, attn_implementation: str, p: dict[str, Any]
) -> tuple[transformers.PreTrainedModel, transformers.ProcessorMixin]:
    """LLaVA-NeXT: CLIP tower on the thumbnail and every tile -> MLP projector -> unpadded tile grid
    with a learned newline token after each row -> Llama. Uses the LLaVA tokenizer ``tiny_model``
    passes (llava-v1.6-vicuna shares LLaVA-1.5's)."""
    vision, text = clip_llama_configs(p, tokenizer)
    pinpoints = [list(pair) for pair in p["image_grid_pinpoints"]]
    strategy = p["vision_feature_select_strategy"]
    config = transformers.LlavaNextConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id,
        image_grid_pinpoints=pinpoints, vision_feature_layer=p["vision_feature_layer"],
        vision_feature_select_strategy=strategy,
        image_seq_length=(p["image_size"] // p["patch_size"]) ** 2,
    )
    model = transformers.LlavaNextForConditionalGeneration._from_config(
        config, attn_implementation=attn_implementation, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.suppress_tokens = [tokenizer.image_token_id]
    image_processor = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": p["image_size"]},
        crop_size={"height": p["image_size"], "width": p["image_size"]},
        image_grid_pinpoints=pinpoints,
    )
    processor = transformers.LlavaNextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=p["patch_size"],
        vision_feature_select_strategy=strategy, num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, processor


# -------------------------------------------------------------------- InternVL

# 224 px tiles of 14 px patches: 16 x 16 patches, pixel-shuffled 2 x 2 into 8 x 8 = 64 tokens per
# tile. Up to 6 tiles plus the thumbnail (the released processor allows 12): a square image is cut
# 2 x 2 (5 tiles, 320 tokens) and a 480 x 640 image 2 x 3 (7 tiles, 448 tokens).
_INTERNVL_DEFAULTS: dict[str, Any] = {
    "image_size": 224,
    "patch_size": 14,
    "max_tiles": 6,
    "vision_hidden_size": 32,
    "vision_num_hidden_layers": 2,
    "vision_num_attention_heads": 4,
    "vision_intermediate_size": 64,
    **TINY_LANGUAGE_MODEL,
    "max_position_embeddings": 8192,
    "vision_feature_layer": -1,
}

_INTERNVL_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>",
)

# OpenGVLab/InternVL3-*-hf style (Qwen2.5 chat format, one <IMG_CONTEXT> per image, which the
# processor expands to <img> + 256 x tiles context tokens + </img>).
_INTERNVL_CHAT_TEMPLATE = chatml_template("<IMG_CONTEXT>\n", default_system=True, video="<video>\n")


def _internvl_tokenizer() -> transformers.PreTrainedTokenizerFast:
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(train_byte_level_bpe(QWEN_CORPUS, _INTERNVL_SPECIAL_TOKENS)),
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={
            "start_image_token": "<img>", "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>",
        },
        padding_side="left",
    )


def _build_internvl(
    _shared_tokenizer: Any, attn_implementation: str, p: dict[str, Any]
) -> tuple[transformers.PreTrainedModel, transformers.ProcessorMixin]:
    """InternVL (transformers-native, InternVL3-hf style): InternViT with a [CLS] token on every tile
    and the thumbnail -> 2x2 pixel shuffle -> MLP projector -> Qwen2."""
    tokenizer = _internvl_tokenizer()
    vision = transformers.InternVLVisionConfig(
        hidden_size=p["vision_hidden_size"], num_hidden_layers=p["vision_num_hidden_layers"],
        num_attention_heads=p["vision_num_attention_heads"], intermediate_size=p["vision_intermediate_size"],
        image_size=(p["image_size"], p["image_size"]), patch_size=(p["patch_size"], p["patch_size"]),
        initializer_range=p["initializer_range"],
    )
    text = transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=p["hidden_size"], num_hidden_layers=p["num_hidden_layers"],
        num_attention_heads=p["num_attention_heads"], num_key_value_heads=p["num_key_value_heads"],
        intermediate_size=p["intermediate_size"], max_position_embeddings=p["max_position_embeddings"],
        initializer_range=p["initializer_range"], pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    tokens_per_tile = (p["image_size"] // p["patch_size"] // 2) ** 2
    config = transformers.InternVLConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.context_image_token_id,
        image_seq_length=tokens_per_tile, downsample_ratio=0.5, vision_feature_layer=p["vision_feature_layer"],
        vision_feature_select_strategy="default",
    )
    model = transformers.InternVLForConditionalGeneration._from_config(
        config, attn_implementation=attn_implementation, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.suppress_tokens = [
        tokenizer.context_image_token_id, tokenizer.start_image_token_id, tokenizer.end_image_token_id,
    ]
    image_processor = transformers.GotOcr2ImageProcessorPil(
        size={"height": p["image_size"], "width": p["image_size"]},
        crop_to_patches=True, min_patches=1, max_patches=p["max_tiles"],
    )
    videos = TinyFramesVideoProcessor(size=p["image_size"], image_mean=image_processor.image_mean,
                                      image_std=image_processor.image_std)
    processor = with_tiny_video_processor(transformers.InternVLProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=videos,
        image_seq_length=tokens_per_tile, chat_template=_INTERNVL_CHAT_TEMPLATE,
    )
    return model, processor


#: family -> (builder, default dimensions), merged into ``_tiny._BUILDERS``.
TILED_BUILDERS: dict[str, tuple[Any, dict[str, Any]]] = {
    "llava_next": (_build_llava_next, _LLAVA_NEXT_DEFAULTS),
    "internvl": (_build_internvl, _INTERNVL_DEFAULTS),
}
