"""tokred inside vLLM: stage I (a Selector) of any registered tokred method, in the serving engine.

A ``vllm.general_plugins`` entry point (``tokred = "tokred.integrations.vllm:register"``) calls
:func:`register` in every vLLM process. It replaces vLLM's model classes of the supported
architectures (:data:`ARCHITECTURES`) with subclasses that

* shorten each image's placeholder run to the kept count in the multimodal processor (vLLM fixes
  the count before the encoder runs; a tokred budget depends only on the image's token count);
* run the method's Selector on each image's embeddings in ``embed_multimodal``, through
  :func:`tokred.decisions.select_image_tokens`, the engine-neutral stage-I function that tokred's
  transformers runtime calls, and hand the kept embeddings to the language model in spatial order;
* give the kept tokens their original positions (:mod:`._positions`), or contiguous ones with
  ``"positions": "renumber"`` (LLaVA only, as in the transformers runtime).

Without ``hf_overrides={"tokred": {...}}`` the subclasses are vLLM's own models. The configuration
(engine-wide and per request) is described in :mod:`._config` and in ``docs/serving-vllm.md``.
Stage-II gates are refused: they act inside the language model's attention, which vLLM runs in
paged-attention kernels that return no attention probabilities and keep no per-layer way to drop a
sequence's tokens from the KV cache.
"""

from __future__ import annotations

from typing import Any

from ._config import CONFIG_KEY, TokredConfig, TokredRequestError
from ._model import CPU_WORKER

__all__ = ["ARCHITECTURES", "CONFIG_KEY", "CPU_WORKER", "TokredConfig", "TokredRequestError", "engine_args", "register"]

#: vLLM architecture -> the tokred subclass that replaces vLLM's class for it.
ARCHITECTURES = {
    "LlavaForConditionalGeneration": "tokred.integrations.vllm.llava:TokredLlavaForConditionalGeneration",
    "LlavaNextForConditionalGeneration": "tokred.integrations.vllm.llava_next:TokredLlavaNextForConditionalGeneration",
    "Qwen2VLForConditionalGeneration": "tokred.integrations.vllm.qwen_vl:TokredQwen2VLForConditionalGeneration",
    "Qwen2_5_VLForConditionalGeneration": "tokred.integrations.vllm.qwen_vl:TokredQwen2_5_VLForConditionalGeneration",
}

#: Architectures whose language model uses M-RoPE natively (the rest are 1-D RoPE models).
_NATIVE_MROPE = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")


def register() -> None:
    """The ``vllm.general_plugins`` entry point: runs in every vLLM process, imports no model code
    (vLLM imports a subclass only when an engine uses its architecture)."""
    from ._compat import ModelRegistry, alias_torchvision_free_processors

    alias_torchvision_free_processors()
    for architecture, target in ARCHITECTURES.items():
        ModelRegistry.register_model(architecture, target)


def engine_args(architecture: str, *, cpu: bool, **tokred: Any) -> dict[str, Any]:
    """The engine arguments (``LLM(model, **engine_args(...))``) that run ``tokred`` on a model.

    Args:
        architecture: the checkpoint's architecture (``config.json``'s ``architectures[0]``).
        cpu: whether the engine runs on vLLM's CPU backend (then original positions need tokred's
            CPU worker, :data:`CPU_WORKER`).
        **tokred: the tokred config: ``method=`` (or ``selector=``), its options, ``positions=``.

    Returns:
        ``hf_overrides`` (``{"tokred": ...}``, plus ``"mrope_section"`` for a 1-D RoPE model with
        original positions) and, for original positions, ``video_pruning_rate`` and on CPU
        ``worker_cls``. The same keys are ``vllm serve`` flags (``--hf-overrides``,
        ``--video-pruning-rate``, ``--worker-cls``).
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"tokred in vLLM supports {sorted(ARCHITECTURES)}, not {architecture!r}")
    config = TokredConfig.parse(tokred, where="engine_args")
    config.schedule()
    overrides: dict[str, Any] = {CONFIG_KEY: dict(tokred)}
    args: dict[str, Any] = {"hf_overrides": overrides}
    if config.positions == "original":
        if architecture not in _NATIVE_MROPE:
            overrides["mrope_section"] = [1, 1, 1]
        args["video_pruning_rate"] = 0.5
        if cpu:
            args["worker_cls"] = CPU_WORKER
    return args
