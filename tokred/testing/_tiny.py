"""Tiny, offline, random-weight vision-language models for tests and demos.

The models use the *real* transformers classes and processors, so code paths
(attention dispatch, image-token scattering, processor expansion, ``generate``)
are the ones used by full-size checkpoints, while every dimension is shrunk so
that a model builds in milliseconds and runs on CPU. Nothing is downloaded: the
tokenizer is trained in-process on a few sentences and weights are random.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch
import transformers
from PIL import Image, ImageDraw
from tokenizers import Tokenizer

from ._bpe import train_byte_level_bpe
from ._common import LLAVA_CHAT_TEMPLATE, LLAVA_CORPUS, TINY_LANGUAGE_MODEL

from ._tiny_qwen import QWEN_BUILDERS
from ._tiny_tiled import TILED_BUILDERS
from ._tiny_video import VIDEO_MODEL_BUILDERS

__all__ = ["FAMILIES", "make_image", "tiny_model"]

_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
_CORPUS = LLAVA_CORPUS

# Tiny LLaVA-1.5 dimensions. The vision grid is kept at full size (336 / 14 -> 24x24 = 576
# visual tokens) because token-reduction code cares about the real token count and grid
# shape; only the widths and depths shrink. The language model is TINY_LANGUAGE_MODEL.
_LLAVA_DEFAULTS: dict[str, Any] = {
    "image_size": 336,
    "patch_size": 14,
    "vision_hidden_size": 32,
    "vision_num_hidden_layers": 2,  # enough for vision_feature_layer=-2 to be a real layer
    "vision_num_attention_heads": 4,
    "vision_intermediate_size": 64,
    **TINY_LANGUAGE_MODEL,
    "max_position_embeddings": 4096,  # room for several 576-token images plus text
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "default",
}


def _tokenizer_json() -> str:
    """The LLaVA tokenizer: Llama-style, BOS prepended as the real LLaVA-1.5 tokenizer does."""
    return train_byte_level_bpe(_CORPUS, _SPECIAL_TOKENS, unk_token="<unk>", bos_token="<s>")


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A fresh tokenizer built from the cached JSON, so callers may mutate it freely."""
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        # Makes `tokenizer.image_token` / `.image_token_id` exist, which LlavaProcessor reads.
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",  # batched generation needs left padding
    )


def _build_llava(
    tokenizer: transformers.PreTrainedTokenizerFast, attn_implementation: str, p: dict[str, Any]
) -> tuple[transformers.PreTrainedModel, transformers.ProcessorMixin]:
    """LLaVA-1.5 layout: CLIP vision tower -> 2-layer MLP projector -> Llama."""
    vision_config = transformers.CLIPVisionConfig(
        image_size=p["image_size"],
        patch_size=p["patch_size"],
        hidden_size=p["vision_hidden_size"],
        num_hidden_layers=p["vision_num_hidden_layers"],
        num_attention_heads=p["vision_num_attention_heads"],
        intermediate_size=p["vision_intermediate_size"],
        initializer_range=p["initializer_range"],
    )
    text_config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=p["hidden_size"],
        num_hidden_layers=p["num_hidden_layers"],
        num_attention_heads=p["num_attention_heads"],
        num_key_value_heads=p["num_key_value_heads"],
        intermediate_size=p["intermediate_size"],
        max_position_embeddings=p["max_position_embeddings"],
        initializer_range=p["initializer_range"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    strategy = p["vision_feature_select_strategy"]
    # "default" drops CLIP's CLS token, "full" keeps it.
    num_image_tokens = (p["image_size"] // p["patch_size"]) ** 2 + (strategy == "full")
    config = transformers.LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.image_token_id,
        image_seq_length=num_image_tokens,
        vision_feature_layer=p["vision_feature_layer"],
        vision_feature_select_strategy=strategy,
    )
    model = transformers.LlavaForConditionalGeneration._from_config(
        config, attn_implementation=attn_implementation, dtype=torch.float32
    )
    image_processor = transformers.CLIPImageProcessorPil(
        size={"shortest_edge": p["image_size"]},
        crop_size={"height": p["image_size"], "width": p["image_size"]},
    )
    processor = transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=p["patch_size"],
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,  # CLIP's CLS token
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, processor


_Builder = Callable[
    [transformers.PreTrainedTokenizerFast, str, dict[str, Any]],
    tuple[transformers.PreTrainedModel, transformers.ProcessorMixin],
]

# family -> (builder, default dimensions). Adding a family means adding one entry here.
_BUILDERS: dict[str, tuple[_Builder, dict[str, Any]]] = {
    "llava": (_build_llava, _LLAVA_DEFAULTS),
    "llava_next": TILED_BUILDERS["llava_next"],
    **QWEN_BUILDERS,
    "internvl": TILED_BUILDERS["internvl"],
    **VIDEO_MODEL_BUILDERS,
}

#: The families :func:`tiny_model` can build: ``llava``, ``llava_next``, ``qwen2_vl``, ``qwen2_5_vl``,
#: ``qwen3_vl``, ``internvl`` (one per registered adapter of the core).
FAMILIES: tuple[str, ...] = tuple(_BUILDERS)

#: The families whose tiny processors also take ``videos=`` (a torch-only video processor in place
#: of the torchvision-bound one; see :mod:`tokred.testing._video`).
VIDEO_FAMILIES: tuple[str, ...] = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "llava_next_video", "internvl")

#: ``adapter_options`` a family's adapter needs to see a video as a video (InternVL's processor writes
#: a video's frames as one-tile images, which the model cannot tell from images).
VIDEO_ADAPTER_OPTIONS: dict[str, dict[str, Any]] = {"internvl": {"frames_as_video": True}}


def tiny_model(
    family: str = "llava", *, attn_implementation: str = "sdpa", seed: int = 0, **overrides: Any
) -> tuple[transformers.PreTrainedModel, transformers.ProcessorMixin]:
    """Build a tiny random-weight vision-language model and its matching processor.

    "llava" defaults: 336px images in 14px patches -> 576 visual tokens per image;
    CLIP tower 32 wide x 2 layers; Llama 64 wide x 8 layers with 4 query / 2 KV heads.
    Every family keeps an 8-layer, 64-wide language model with 4 query / 2 KV heads. Tiled families
    use smaller tiles than the released checkpoints: "llava_next" 168 px tiles (144 tokens each, a
    square image is 720 tokens plus 24 newline tokens), "internvl" 224 px tiles (64 tokens each, a
    square image 2 x 2 tiles plus the thumbnail = 320 tokens).

    Args:
        family: One of :data:`FAMILIES`.
        attn_implementation: Passed through to transformers (e.g. ``"sdpa"``, ``"eager"``).
        seed: Seeds weight initialisation; equal seeds give identical weights.
        **overrides: Replace default dimensions, e.g. ``num_hidden_layers=2`` or
            ``image_size=224``. Text-model keys are unprefixed, vision-tower keys
            start with ``vision_`` (plus ``image_size`` and ``patch_size``).

    Returns:
        ``(model, processor)``; the model is float32 and in eval mode.

    Raises:
        ValueError: ``family`` is not supported.
        TypeError: an override key is not a known dimension for ``family``.
    """
    if family not in _BUILDERS:
        raise ValueError(f"unknown family {family!r}; valid families: {', '.join(FAMILIES)}")
    builder, defaults = _BUILDERS[family]
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        raise TypeError(
            f"unknown override(s) {', '.join(unknown)} for family {family!r}; "
            f"valid: {', '.join(sorted(defaults))}"
        )
    # fork_rng so that seeding here does not reset the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = builder(_tokenizer(), attn_implementation, {**defaults, **overrides})
    return model.eval(), processor


def make_image(width: int = 336, height: int = 336, seed: int = 0) -> Image.Image:
    """A deterministic synthetic RGB image: a colour gradient with a few filled shapes.

    Structure (edges, flat regions, distinct colours) makes it a more useful input
    than noise for eyeballing which visual tokens a reduction method keeps.
    """
    rng = random.Random(seed)
    vertical = Image.linear_gradient("L")  # 256x256, dark at the top, light at the bottom
    horizontal = vertical.transpose(Image.Transpose.TRANSPOSE)
    image = Image.merge(
        "RGB",
        (
            horizontal.resize((width, height)),
            vertical.resize((width, height)),
            Image.new("L", (width, height), 128),
        ),
    )
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        size = rng.randint(max(min(width, height) // 8, 1), max(min(width, height) // 3, 1))
        # Keep shapes fully inside so every seed shows all four.
        x0, y0 = rng.randrange(width - size + 1), rng.randrange(height - size + 1)
        box = (x0, y0, x0 + size - 1, y0 + size - 1)
        fill = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        if rng.random() < 0.5:
            draw.ellipse(box, fill=fill)
        else:
            draw.rectangle(box, fill=fill)
    return image
