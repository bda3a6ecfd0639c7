"""The SYNTHETIC PROXY model: a stock ``LlavaForConditionalGeneration``, tiny, with a word-level
tokenizer, the LLaVA-1.5 chat template and a ``LlavaProcessor`` on the PIL CLIP image processor.

Layout (see :data:`PROXY_DIMENSIONS`): CLIP vision tower (224 px, 14 px patches, 64 wide, 2 layers)
-> LLaVA's 2-layer MLP projector -> Llama (128 wide, 4 layers). ``vision_feature_layer=-1`` (the
tower's last layer; with two layers, LLaVA's usual ``-2`` would leave one of them unused) and
``vision_feature_select_strategy="default"`` (the [CLS] token is dropped): 256 visual tokens per
image, in row-major patch order.

Its figures rank token-reduction methods on the synthetic task of :mod:`._scenes` only; they are
not the papers' benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from ...testing._common import LLAVA_CHAT_TEMPLATE
from ._scenes import COLOURS, IMAGE_SIZE, PATCH_SIZE, SHAPES

__all__ = [
    "PROXY_DIMENSIONS", "WEIGHTS_DIR", "build_tokenizer", "build_processor", "build_model", "save_proxy",
    "load_proxy",
]

#: Where the shipped weights, config, tokenizer and processor files live (package data).
WEIGHTS_DIR = Path(__file__).with_name("weights")

_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
# Every word the chat template and the questions use (lower case; the tokenizer lower-cases input).
_WORDS = (
    "user", "assistant", ":", "?", "what", "colour", "is", "the", "there", "a", "where", "or",
    "left", "right", "top", "bottom", "yes", "no", *COLOURS, *SHAPES,
)

#: The proxy's dimensions. About 0.78M parameters, 3.1 MB in float32. Four decoder layers, so that every
#: registered method applies: PyramidDrop's stages at 1/4, 1/2 and 3/4 of the depth need layers 1, 2, 3.
PROXY_DIMENSIONS: dict[str, Any] = {
    "vision_hidden_size": 64,
    "vision_num_hidden_layers": 2,
    "vision_num_attention_heads": 4,
    "vision_intermediate_size": 256,
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
    "max_position_embeddings": 320,
    "rope_theta": 10000.0,
    "initializer_range": 0.02,
    "tie_word_embeddings": False,
}


def build_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the task's words: lower-cases, splits on whitespace and
    punctuation, prepends ``<s>`` as LLaVA-1.5's Llama tokenizer does, pads on the left."""
    vocab = {tok: i for i, tok in enumerate((*_SPECIAL_TOKENS, *_WORDS))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.add_special_tokens(list(_SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )


def _image_processor() -> transformers.CLIPImageProcessorPil:
    return transformers.CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )


def build_processor(tokenizer: transformers.PreTrainedTokenizerFast,
                    image_processor: transformers.CLIPImageProcessorPil | None = None) -> transformers.LlavaProcessor:
    """``LlavaProcessor`` with the PIL CLIP image processor (224 px) and LLaVA-1.5's chat template."""
    return transformers.LlavaProcessor(
        image_processor=image_processor if image_processor is not None else _image_processor(),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's [CLS], dropped by the "default" strategy
        chat_template=LLAVA_CHAT_TEMPLATE,
    )


def build_model(tokenizer: transformers.PreTrainedTokenizerFast, *, seed: int = 0,
                attn_implementation: str = "sdpa", **overrides: Any) -> transformers.LlavaForConditionalGeneration:
    """A freshly initialised proxy (float32, train mode); ``overrides`` replace
    :data:`PROXY_DIMENSIONS` entries. Equal seeds give equal weights."""
    unknown = sorted(set(overrides) - set(PROXY_DIMENSIONS))
    if unknown:
        raise TypeError(f"unknown dimension(s) {', '.join(unknown)}; valid: {', '.join(PROXY_DIMENSIONS)}")
    p = {**PROXY_DIMENSIONS, **overrides}
    vision_config = transformers.CLIPVisionConfig(
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        hidden_size=p["vision_hidden_size"],
        num_hidden_layers=p["vision_num_hidden_layers"],
        num_attention_heads=p["vision_num_attention_heads"],
        intermediate_size=p["vision_intermediate_size"],
    )
    text_config = transformers.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=p["hidden_size"],
        num_hidden_layers=p["num_hidden_layers"],
        num_attention_heads=p["num_attention_heads"],
        num_key_value_heads=p["num_key_value_heads"],
        intermediate_size=p["intermediate_size"],
        max_position_embeddings=p["max_position_embeddings"],
        rope_parameters={"rope_type": "default", "rope_theta": float(p["rope_theta"])},
        initializer_range=p["initializer_range"],
        tie_word_embeddings=bool(p["tie_word_embeddings"]),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    config = transformers.LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=tokenizer.image_token_id,
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=bool(p["tie_word_embeddings"]),
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.LlavaForConditionalGeneration._from_config(
            config, attn_implementation=attn_implementation, dtype=torch.float32
        )
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    return model


def save_proxy(model: transformers.LlavaForConditionalGeneration, processor: transformers.LlavaProcessor,
               out_dir: str | Path, *, metadata: dict[str, Any] | None = None) -> Path:
    """Write the model (safetensors + config), tokenizer and processor files to ``out_dir``;
    ``metadata`` (e.g. the training recipe and its figures) goes to ``training.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    if metadata is not None:
        (out / "training.json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    return out


def load_proxy(attn_implementation: str = "sdpa", path: str | Path | None = None
               ) -> tuple[transformers.LlavaForConditionalGeneration, transformers.LlavaProcessor]:
    """Load the shipped SYNTHETIC PROXY (or the one saved at ``path``) offline.

    Classes are explicit (``LlavaForConditionalGeneration``, ``PreTrainedTokenizerFast``,
    ``CLIPImageProcessorPil``, ``LlavaProcessor``): no ``Auto*`` class can pick a torchvision-based
    image processor. Returns ``(model, processor)``, the model float32 and in eval mode.
    """
    where = Path(path) if path is not None else WEIGHTS_DIR
    if not (where / "model.safetensors").is_file():
        raise FileNotFoundError(f"no proxy weights at {where} (expected model.safetensors there)")
    model = transformers.LlavaForConditionalGeneration.from_pretrained(
        where, attn_implementation=attn_implementation, dtype=torch.float32, local_files_only=True
    )
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(where, local_files_only=True)
    image_processor = transformers.CLIPImageProcessorPil.from_pretrained(where, local_files_only=True)
    return model.eval(), build_processor(tokenizer, image_processor)
