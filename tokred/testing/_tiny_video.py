"""Tiny, offline, random-weight video models: LLaVA-OneVision and LLaVA-NeXT-Video.

Same recipe as :mod:`tokred.testing._tiny`: the real ``transformers`` model classes, image
processors and processors, every width and depth shrunk, a tokenizer trained in-process, random
weights. Their video processor is :class:`~tokred.testing._video.TinyFramesVideoProcessor` (every
``transformers`` video processor needs torchvision), which returns the same
``pixel_values_videos`` ``[videos, frames, 3, size, size]`` for sampled frames.

* **LLaVA-OneVision** (``LlavaOnevisionForConditionalGeneration``, llava-onevision-qwen2-*-ov-hf):
  a SigLIP tower without [CLS] token on 112 px inputs in 14 px patches (8 x 8 = 64 tokens; the
  released models: 384 px, 27 x 27 = 729), a Qwen2 language model. Images: the base view, then the
  anyres tiles merged and unpadded, with a newline token after each row (a square image: 64 + 16 x
  17 = 336 tokens); several images in one prompt take the base view and one newline each. Videos:
  every frame's grid pooled 2 x 2 (bilinear, rounding up: 4 x 4 = 16 tokens per frame; released:
  14 x 14 = 196), frame after frame, then one newline token.
* **LLaVA-NeXT-Video** (``LlavaNextVideoForConditionalGeneration``, LLaVA-NeXT-Video-*-hf):
  LLaVA-NeXT's images (168 px tiles here, see :mod:`._tiny_tiled`) and, for videos, every frame's
  12 x 12 CLIP grid average-pooled with stride 2 (6 x 6 = 36 tokens per frame; released: 24 x 24
  pooled to 12 x 12 = 144), frame after frame, no newline.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from tokenizers import Tokenizer

from ._bpe import train_byte_level_bpe
from ._common import LLAVA_CORPUS, TINY_LANGUAGE_MODEL, chatml_template
from ._tiny_qwen import QWEN_CORPUS
from ._tiny_tiled import clip_llama_configs
from ._video import TinyFramesVideoProcessor, with_tiny_video_processor

__all__ = ["VIDEO_MODEL_BUILDERS", "LLAVA_VIDEO_CHAT_TEMPLATE"]

#: llava-hf's LLaVA-NeXT-Video template layout (images and videos first, then the text; ``USER:`` /
#: ``ASSISTANT:``), plus plain-string content.
LLAVA_VIDEO_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<image>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% endif %}"
    "{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# ------------------------------------------------------------------ LLaVA-OneVision

# The released pinpoints are every (i x 384, j x 384) for i, j in 1..6 ("anyres_max_9" then
# downsamples grids of more than 9 base views' worth of tokens); here (i x 112, j x 112) for i, j in
# 1..2 and 1 x 3, 3 x 1, so a square 336 px test image is cut 2 x 2: 64 base tokens + 16 rows of
# 16 + 1 newline = 336 tokens.
_ONEVISION_DEFAULTS: dict[str, Any] = {
    "image_size": 112,
    "patch_size": 14,
    "image_grid_pinpoints": ((112, 112), (112, 224), (224, 112), (224, 224), (112, 336), (336, 112)),
    "vision_aspect_ratio": "anyres_max_9",
    "vision_hidden_size": 32,
    "vision_num_hidden_layers": 2,
    "vision_num_attention_heads": 4,
    "vision_intermediate_size": 64,
    **TINY_LANGUAGE_MODEL,
    "max_position_embeddings": 8192,
}

_ONEVISION_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>")

# llava-onevision-qwen2-*-ov-hf: Qwen2's ChatML with <image> / <video> and a newline after each.
_ONEVISION_CHAT_TEMPLATE = chatml_template("<image>\n", default_system=True, video="<video>\n")


def _onevision_tokenizer() -> transformers.PreTrainedTokenizerFast:
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(train_byte_level_bpe(QWEN_CORPUS, _ONEVISION_SPECIAL_TOKENS)),
        eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        padding_side="left",
    )


def _build_llava_onevision(
    _shared_tokenizer: Any, attn_implementation: str, p: dict[str, Any]
) -> tuple[transformers.PreTrainedModel, transformers.ProcessorMixin]:
    """LLaVA-OneVision: SigLIP (no [CLS]) on the base view and the anyres tiles -> MLP projector ->
    unpadded (and, past ``vision_aspect_ratio``, downsampled) tile grid with newlines -> Qwen2;
    video frames pooled 2 x 2."""
    tokenizer = _onevision_tokenizer()
    vision = transformers.SiglipVisionConfig(
        hidden_size=p["vision_hidden_size"], intermediate_size=p["vision_intermediate_size"],
        num_hidden_layers=p["vision_num_hidden_layers"], num_attention_heads=p["vision_num_attention_heads"],
        image_size=p["image_size"], patch_size=p["patch_size"], vision_use_head=False,
    )
    text = transformers.Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=p["hidden_size"], num_hidden_layers=p["num_hidden_layers"],
        num_attention_heads=p["num_attention_heads"], num_key_value_heads=p["num_key_value_heads"],
        intermediate_size=p["intermediate_size"], max_position_embeddings=p["max_position_embeddings"],
        initializer_range=p["initializer_range"], pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
    )
    pinpoints = [list(pair) for pair in p["image_grid_pinpoints"]]
    config = transformers.LlavaOnevisionConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"), image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full", vision_feature_layer=-1, vision_aspect_ratio=p["vision_aspect_ratio"],
    )
    model = transformers.LlavaOnevisionForConditionalGeneration._from_config(
        config, attn_implementation=attn_implementation, dtype=torch.float32)
    # The random tower's weights are drawn from the vision config's default scale; the language
    # model's larger one keeps greedy decoding of a random model varied (TINY_LANGUAGE_MODEL).
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.suppress_tokens = [config.image_token_id, config.video_token_id]
    image_processor = transformers.LlavaOnevisionImageProcessorPil(
        size={"height": p["image_size"], "width": p["image_size"]}, image_grid_pinpoints=pinpoints,
    )
    videos = TinyFramesVideoProcessor(size=p["image_size"], image_mean=image_processor.image_mean,
                                      image_std=image_processor.image_std)
    processor = with_tiny_video_processor(transformers.LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=videos,
        num_image_tokens=(p["image_size"] // p["patch_size"]) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio=p["vision_aspect_ratio"], chat_template=_ONEVISION_CHAT_TEMPLATE,
    )
    return model, processor


# ------------------------------------------------------------------ LLaVA-NeXT-Video

_NEXT_VIDEO_DEFAULTS: dict[str, Any] = {
    "image_size": 168,
    "patch_size": 14,
    "image_grid_pinpoints": ((168, 336), (336, 168), (336, 336), (504, 168), (168, 504)),
    "spatial_pool_stride": 2,
    "spatial_pool_mode": "average",
    "vision_hidden_size": 32,
    "vision_num_hidden_layers": 2,
    "vision_num_attention_heads": 4,
    "vision_intermediate_size": 64,
    **TINY_LANGUAGE_MODEL,
    "max_position_embeddings": 8192,
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
}

_LLAVA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>", "<video>")


def _next_video_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """LLaVA-NeXT-Video-*-hf's tokenizer (Vicuna's, BOS prepended) with ``<image>`` and ``<video>``."""
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(train_byte_level_bpe(LLAVA_CORPUS, _LLAVA_SPECIAL_TOKENS,
                                                                 unk_token="<unk>", bos_token="<s>")),
        bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        padding_side="left",
    )


def _build_llava_next_video(
    _shared_tokenizer: Any, attn_implementation: str, p: dict[str, Any]
) -> tuple[transformers.PreTrainedModel, transformers.ProcessorMixin]:
    """LLaVA-NeXT-Video: LLaVA-NeXT for images (CLIP with [CLS] on thumbnail and tiles, unpadded
    tile grid with newlines) and, for videos, each frame's CLIP grid pooled by the vision resampler
    -> MLP projector -> Llama."""
    tokenizer = _next_video_tokenizer()
    vision, text = clip_llama_configs(p, tokenizer)
    pinpoints = [list(pair) for pair in p["image_grid_pinpoints"]]
    side = p["image_size"] // p["patch_size"]
    per_frame = (side // p["spatial_pool_stride"]) ** 2
    config = transformers.LlavaNextVideoConfig(
        vision_config=vision, text_config=text, image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_index=tokenizer.convert_tokens_to_ids("<video>"), image_grid_pinpoints=pinpoints,
        vision_feature_layer=p["vision_feature_layer"], vision_feature_select_strategy=p["vision_feature_select_strategy"],
        spatial_pool_mode=p["spatial_pool_mode"], spatial_pool_stride=p["spatial_pool_stride"],
        image_seq_length=side * side, video_seq_length=per_frame,
    )
    model = transformers.LlavaNextVideoForConditionalGeneration._from_config(
        config, attn_implementation=attn_implementation, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.suppress_tokens = [config.image_token_id, config.video_token_id]
    image_processor = transformers.LlavaNextImageProcessorPil(
        size={"shortest_edge": p["image_size"]}, crop_size={"height": p["image_size"], "width": p["image_size"]},
        image_grid_pinpoints=pinpoints,
    )
    videos = TinyFramesVideoProcessor(size=p["image_size"], image_mean=image_processor.image_mean,
                                      image_std=image_processor.image_std)
    processor = with_tiny_video_processor(transformers.LlavaNextVideoProcessor)(
        video_processor=videos, image_processor=image_processor, tokenizer=tokenizer, patch_size=p["patch_size"],
        vision_feature_select_strategy=p["vision_feature_select_strategy"], num_additional_image_tokens=1,
        chat_template=LLAVA_VIDEO_CHAT_TEMPLATE,
    )
    return model, processor


#: family -> (builder, default dimensions), merged into ``_tiny._BUILDERS``.
VIDEO_MODEL_BUILDERS: dict[str, tuple[Any, dict[str, Any]]] = {
    "llava_onevision": (_build_llava_onevision, _ONEVISION_DEFAULTS),
    "llava_next_video": (_build_llava_next_video, _NEXT_VIDEO_DEFAULTS),
}
