"""Tiny checkpoints for vLLM and the transformers reference they are compared with.

Used by the vLLM integration's tests (``tests/vllm``), its benchmark (``benchmarks/vllm``) and the
serving page's example. Imports no vLLM.

vLLM's CPU attention kernels have no ``head_dim`` 16 variant, so the tiny language models are 128
wide (4 heads of 32) instead of tokred.testing's 64; Qwen's M-RoPE sections are scaled to match
(``4 + 6 + 6 = 16`` rotary pairs per head).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .checkpoints import save_tiny_checkpoint

__all__ = ["TINY_OVERRIDES", "PROMPTS", "FOLLOW_UPS", "tiny_checkpoint", "load_processor", "prompt_for", "conversation_for",
           "transformers_reference"]

#: ``tokred.testing.tiny_model`` overrides that make a tiny model vLLM's CPU backend can run.
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "llava": {"hidden_size": 128},
    "llava_next": {"hidden_size": 128},
    "qwen2_vl": {"hidden_size": 128, "mrope_section": (4, 6, 6)},
    "qwen2_5_vl": {"hidden_size": 128, "mrope_section": (4, 6, 6)},
}

#: One single-image prompt per family, written the way each checkpoint's chat template writes it.
PROMPTS = {
    "llava": "USER: <image>\n{question} ASSISTANT:",
    "llava_next": "USER: <image>\n{question} ASSISTANT:",
    "qwen2_vl": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n",
    "qwen2_5_vl": "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n",
}


#: How each family's chat template continues a conversation: the assistant's answer, then the next
#: user turn, then the assistant's prompt again.
FOLLOW_UPS = {
    "llava": "{answer}</s>USER: {question} ASSISTANT:",
    "llava_next": "{answer}</s>USER: {question} ASSISTANT:",
    "qwen2_vl": "{answer}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
    "qwen2_5_vl": "{answer}<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n",
}


def tiny_checkpoint(family: str, path: str | Path, *, seed: int = 0) -> Path:
    """Save ``tokred.testing.tiny_model(family)`` with :data:`TINY_OVERRIDES` to ``path`` (skipped
    if a checkpoint is there already); returns the path."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    return save_tiny_checkpoint(family, path, seed=seed, **TINY_OVERRIDES[family])


def prompt_for(family: str, question: str = "What is shown in this image?") -> str:
    return PROMPTS[family].format(question=question)


def conversation_for(family: str, turns: Sequence[tuple[str, str]], question: str = "What is shown in this image?") -> str:
    """The prompt of a conversation about one image: the first ``question`` (with the image), then
    for each ``(answer, follow-up question)`` of ``turns`` the assistant's answer and the next user
    turn, ending where the assistant answers next. With no turns it is :func:`prompt_for`."""
    prompt = prompt_for(family, question)
    for answer, follow_up in turns:
        prompt += FOLLOW_UPS[family].format(answer=answer, question=follow_up)
    return prompt


def load_processor(path: str | Path) -> Any:
    """The checkpoint's HF processor; Qwen-VL's image-only subclass where torchvision is missing
    (the one tokred's vLLM models use, :func:`._compat.image_only`)."""
    import transformers

    from ._compat import image_only

    model_type = transformers.AutoConfig.from_pretrained(path).model_type
    qwen = {"qwen2_vl": transformers.Qwen2VLProcessor, "qwen2_5_vl": transformers.Qwen2_5_VLProcessor}
    if model_type in qwen:
        return image_only(qwen[model_type]).from_pretrained(path)
    return transformers.AutoProcessor.from_pretrained(path)


def transformers_reference(path: str | Path, prompt: str, images: Sequence[Any], config: dict[str, Any] | None, *,
                           max_new_tokens: int = 16, add_special_tokens: bool = True) -> dict[str, Any]:
    """Greedy decoding with tokred's transformers runtime on the checkpoint at ``path``.

    Args:
        path: a checkpoint written by :func:`tiny_checkpoint`.
        prompt: the prompt text with its image placeholders; images: its images.
        config: the tokred config as vLLM takes it (``{"method": ..., ...}``), or ``None`` for the
            unmodified model.
        max_new_tokens: tokens to generate (exactly that many: EOS does not stop it).
        add_special_tokens: whether the tokenizer adds its special tokens (BOS) to ``prompt``; vLLM's
            chat endpoint tokenizes a templated chat without them.

    Returns:
        ``{"tokens": generated ids, "prompt_tokens": the unreduced prompt length, "kept": kept
        indices per image, "num_tokens": candidate tokens per image}``.
    """
    import torch
    import transformers

    import tokred

    from ._config import TokredConfig

    processor = load_processor(path)
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    inputs = processor(text=[prompt], images=list(images), return_tensors="pt", add_special_tokens=add_special_tokens)
    generate = dict(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False)
    kept: list[list[int]] = []
    num_tokens: list[int] = []
    with torch.no_grad():
        if config is None:
            out = model.generate(**inputs, **generate)
        else:
            with tokred.apply(model, TokredConfig.parse(config, where="reference").schedule()) as run:
                out = model.generate(**inputs, **generate)
            kept = [image.kept_stage1 for image in run.report.images]
            num_tokens = [image.num_tokens for image in run.report.images]
    length = int(inputs["input_ids"].shape[1])
    return {"tokens": out[0, length:].tolist(), "prompt_tokens": length, "kept": kept, "num_tokens": num_tokens}
