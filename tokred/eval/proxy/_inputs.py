"""Model inputs of the SYNTHETIC PROXY built by hand, with any subset of the visual tokens.

The proxy's prompt is ``<s> user : <image> <question words> assistant :``; the processor expands
``<image>`` into 256 image tokens. Here the 256 projected visual tokens are computed once
(:func:`visual_embeddings`) and a sequence keeps only the chosen ones, at their *original*
positions (as if the full sequence had been numbered first), with an explicit attention mask
(non-contiguous positions without a mask are read as packed sequences by transformers).
Batches are padded on the right, so causal attention never reaches the padding.

Nothing here uses ``tokred.apply``: these are the "ideal" reduced inputs that a runtime should
reproduce, used to train the proxy with random token dropping and to measure selections.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import transformers
from PIL import Image

from ._scenes import GRID

__all__ = [
    "NUM_VISUAL", "Prompt", "pixel_values", "encode_prompts", "visual_features", "project",
    "visual_embeddings", "Batch", "assemble", "language_forward", "answer_logits",
]

NUM_VISUAL = GRID * GRID  # 256

# OpenAI CLIP normalisation, the defaults of CLIPImageProcessorPil.
_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


@dataclass(frozen=True)
class Prompt:
    """Token ids around the image: ``prefix`` (``<s> user :``) and ``suffix`` (question and
    ``assistant :``); the image's tokens go between them."""

    prefix: list[int]
    suffix: list[int]


def pixel_values(images: Sequence[Image.Image]) -> torch.Tensor:
    """``[B, 3, 224, 224]`` float32, what the proxy's ``CLIPImageProcessorPil`` returns for 224 x 224
    RGB images (its resize and centre crop are identities at that size), computed without PIL
    round trips: rescale by 1/255, then CLIP's mean and std."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) for im in images])  # [B, H, W, 3]
    # The same float32 operations in the same order as the processor: bit-identical values.
    arr = (arr / 255.0 - _MEAN) / _STD
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(0, 3, 1, 2)))


def encode_prompts(processor: transformers.LlavaProcessor, questions: Sequence[str]) -> list[Prompt]:
    """Each question through the processor's chat template (one image, then the text), tokenised
    with the image placeholder unexpanded and split around it."""
    tokenizer = processor.tokenizer
    image_id = tokenizer.image_token_id
    prompts = []
    for q in questions:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        text = processor.apply_chat_template(messages, add_generation_prompt=True)
        ids = tokenizer(text)["input_ids"]
        if ids.count(image_id) != 1:
            raise ValueError(f"expected one image token in the prompt {text!r}")
        cut = ids.index(image_id)
        prompts.append(Prompt(ids[:cut], ids[cut + 1:]))
    return prompts


def visual_features(model: transformers.LlavaForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
    """``[B, 256, D_v]``: the vision tower's patch features the projector reads (the configured
    ``vision_feature_layer``, [CLS] dropped as the "default" strategy does)."""
    config = model.config
    if config.vision_feature_select_strategy != "default" or not isinstance(config.vision_feature_layer, int):
        raise ValueError("the proxy pipeline expects one int vision_feature_layer and the 'default' strategy")
    out = model.model.vision_tower(pixels, output_hidden_states=True)
    return out.hidden_states[config.vision_feature_layer][:, 1:]


def project(model: transformers.LlavaForConditionalGeneration, features: torch.Tensor) -> torch.Tensor:
    """``[B, 256, D_v] -> [B, 256, D]``: LLaVA's multimodal projector."""
    return model.model.multi_modal_projector(features)


def visual_embeddings(model: transformers.LlavaForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
    """``[B, 256, D]``: the projected visual tokens the language model receives."""
    return project(model, visual_features(model, pixels))


@dataclass
class Batch:
    """A right-padded batch for the language model.

    ``inputs_embeds`` ``[B, L, D]``; ``position_ids`` ``[B, L]`` (original positions);
    ``attention_mask`` ``[B, L]`` (1 = real token); ``last`` ``[B]``: index of each row's last
    prompt token (``assistant :``'s colon); ``visual_slots`` ``[B, k]``: where the kept visual tokens
    sit in each row (every row keeps ``k``); ``labels`` ``[B, L]`` (-100 except where the next token
    is a target) when targets were given.
    """

    inputs_embeds: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor
    last: torch.Tensor
    visual_slots: torch.Tensor
    labels: torch.Tensor | None = None


def assemble(model: transformers.LlavaForConditionalGeneration, prompts: Sequence[Prompt], visual: torch.Tensor,
             keep: torch.Tensor | None = None, targets: Sequence[Sequence[int]] | None = None, *,
             gathered: bool = False) -> Batch:
    """Build the language model's inputs from prompts and projected visual tokens.

    Args:
        prompts: ``B`` prompts.
        visual: ``[B, 256, D]`` projected visual tokens, or ``[B, k, D]`` already gathered at
            ``keep`` when ``gathered``.
        keep: ``[B, k]`` sorted visual-token indices to keep per row (``None``: all 256).
        targets: token ids to append after each prompt (the answer and ``</s>``), for training.
    """
    embed = model.model.language_model.get_input_embeddings()
    batch = len(prompts)
    if keep is None:
        keep = torch.arange(NUM_VISUAL).expand(batch, NUM_VISUAL)
    rows, positions, lasts, slots, labels = [], [], [], [], []
    for b, prompt in enumerate(prompts):
        tail = list(prompt.suffix) + (list(targets[b]) if targets is not None else [])
        pre = torch.tensor(prompt.prefix, dtype=torch.long)
        post = torch.tensor(tail, dtype=torch.long)
        n_pre, k = len(prompt.prefix), keep.shape[1]
        rows.append(torch.cat([embed(pre), visual[b] if gathered else visual[b, keep[b]], embed(post)]))
        positions.append(torch.cat([
            torch.arange(n_pre), n_pre + keep[b], n_pre + NUM_VISUAL + torch.arange(len(tail)),
        ]))
        last = n_pre + k + len(prompt.suffix) - 1
        lasts.append(last)
        slots.append(n_pre + torch.arange(k))
        if targets is not None:
            lab = torch.full((len(rows[-1]),), -100, dtype=torch.long)
            # the logits at position p predict token p + 1: the first target is predicted at `last`
            lab[last:last + len(targets[b])] = torch.tensor(list(targets[b]), dtype=torch.long)
            labels.append(lab)
    length = max(len(r) for r in rows)
    # Padded by concatenation and stacked: in-place writes into one [B, L, D] tensor would make
    # autograd copy the whole gradient once per row.
    inputs = torch.stack([torch.cat([r, r.new_zeros(length - len(r), r.shape[-1])]) for r in rows])
    pos = torch.stack([
        # padding continues the row's positions so that every position id stays valid
        torch.cat([p, p[-1] + 1 + torch.arange(length - len(p))]) for p in positions
    ])
    mask = torch.stack([(torch.arange(length) < len(r)).long() for r in rows])
    lab_t = None
    if targets is not None:
        lab_t = torch.stack([torch.cat([lab, lab.new_full((length - len(lab),), -100)]) for lab in labels])
    return Batch(inputs, pos, mask, torch.tensor(lasts), torch.stack(slots), lab_t)


def language_forward(model: transformers.LlavaForConditionalGeneration, batch: Batch) -> torch.Tensor:
    """``[B, L, V]`` logits of the language model on ``batch``."""
    out = model.model.language_model(
        inputs_embeds=batch.inputs_embeds, position_ids=batch.position_ids,
        attention_mask=batch.attention_mask, use_cache=False,
    )
    return model.lm_head(out.last_hidden_state)


def answer_logits(model: transformers.LlavaForConditionalGeneration, batch: Batch) -> torch.Tensor:
    """``[B, V]``: the logits of the first generated token (greedy decoding takes their argmax)."""
    logits = language_forward(model, batch)
    return logits[torch.arange(logits.shape[0]), batch.last]
