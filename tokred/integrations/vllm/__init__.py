"""tokred inside vLLM: stage I (a Selector) of any registered tokred method.

A ``vllm.general_plugins`` entry point calls :func:`register` in every vLLM process. It replaces the
model classes of the supported architectures with subclasses that

* shrink each image's placeholder run to the kept count ``k`` in the multimodal processor (vLLM fixes
  the placeholder count before the vision encoder runs, so ``k`` depends only on the image's token
  count and the budget: ``keep``, or ``keep_ratio`` rounded as ``max(1, floor(r * N + 0.5))``);
* run the method's Selector on each image's embeddings in ``embed_multimodal`` and return the kept
  ones in spatial order;
* give the survivors positions: M-RoPE models (Qwen2-VL, Qwen2.5-VL) their original ones through
  ``recompute_mrope_positions``; 1-D RoPE models (LLaVA) contiguous ones (see ``llava``).

Without ``hf_overrides={"tokred": {...}}`` the subclasses behave exactly like vLLM's own classes.
Gates (stage II) cannot run: vLLM's paged attention has no per-layer point to drop tokens from the KV
cache. See :mod:`._config` for the configuration.
"""

from __future__ import annotations

__all__ = ["ARCHITECTURES", "register"]

#: vLLM architecture -> the tokred subclass that replaces vLLM's class for it.
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "tokred.integrations.vllm.llava:TokredLlavaForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "tokred.integrations.vllm.qwen_vl:TokredQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "tokred.integrations.vllm.qwen_vl:TokredQwen2_5_VLForConditionalGeneration",
}


def register() -> None:
    """The ``vllm.general_plugins`` entry point: runs in every vLLM process, imports no model code."""
    from vllm import ModelRegistry

    from ._compat import alias_torchvision_free_processors

    alias_torchvision_free_processors()
    for architecture, target in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, target)
