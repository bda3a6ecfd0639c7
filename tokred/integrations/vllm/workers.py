"""A CPU worker for tokred's original positions: ``worker_cls="tokred.integrations.vllm.workers.TokredCPUWorker"``.

vLLM calls a model's ``recompute_mrope_positions`` (the hook that gives pruned multimodal tokens
their positions after the encoder ran) only where its model runner's
``is_multimodal_pruning_enabled`` is set. ``GPUModelRunner.load_model`` sets it
(``supports_multimodal_pruning(model)`` and ``video_pruning_rate > 0``); vLLM 0.32's
``CPUModelRunner.load_model`` replaces that method and never does, so on CPU the hook is never
called, for EVS as for tokred. This worker sets the flag after loading, by the GPU runner's own
rule, and changes nothing else. GPU engines do not need it, nor does vLLM 0.34's CPU runner
(``vllm/v1/worker/cpu/model_runner.py``), which calls the hook itself: there the worker is vLLM's own.
"""

from __future__ import annotations

from typing import Any

from ._compat import CPUWorker, supports_multimodal_pruning

__all__ = ["TokredCPUWorker"]


class TokredCPUWorker(CPUWorker):
    """vLLM's CPU worker, with ``recompute_mrope_positions`` enabled as the GPU runner enables it."""

    def load_model(self, *args: Any, **kwargs: Any) -> None:
        super().load_model(*args, **kwargs)
        runner = self.model_runner
        if not hasattr(runner, "is_multimodal_pruning_enabled"):
            return  # vLLM 0.34's CPU runner has no such flag: it calls recompute_mrope_positions itself
        mm_config = runner.model_config.multimodal_config
        runner.is_multimodal_pruning_enabled = bool(
            supports_multimodal_pruning(runner.get_model())
            and mm_config is not None
            and mm_config.is_multimodal_pruning_enabled()
        )
