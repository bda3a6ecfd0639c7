"""Model inputs for evaluation: chat prompts and left-padded processor batches."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

__all__ = ["chat_prompt", "encode", "left_padding"]


@contextlib.contextmanager
def left_padding(processor: Any) -> Iterator[None]:
    """Pad on the left while the block runs (tokred's reduced sequences end with real tokens, as
    ``generate`` needs), whatever the processor's own padding side."""
    tokenizer = getattr(processor, "tokenizer", processor)
    side = getattr(tokenizer, "padding_side", "left")
    tokenizer.padding_side = "left"
    try:
        yield
    finally:
        tokenizer.padding_side = side


def chat_prompt(processor: Any, question: str, num_images: int) -> str:
    """One user turn (``num_images`` images, then ``question``) rendered by the processor's chat
    template, ending with the generation prompt."""
    content: list[dict[str, str]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": question})
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def encode(processor: Any, model: nn.Module, texts: Sequence[str], images: Sequence[Any]) -> dict[str, torch.Tensor]:
    """A left-padded batch of ``texts`` with ``images`` (flat, in prompt order), on the model's
    device, floating tensors in the model's dtype."""
    kwargs: dict[str, Any] = {"text": list(texts), "return_tensors": "pt", "padding": True}
    if images:
        kwargs["images"] = list(images)
    with left_padding(processor):
        encoded = processor(**kwargs)
    parameter = next(model.parameters())
    return {k: (v.to(device=parameter.device, dtype=parameter.dtype) if v.is_floating_point() else v.to(parameter.device))
            for k, v in encoded.items() if isinstance(v, torch.Tensor)}
