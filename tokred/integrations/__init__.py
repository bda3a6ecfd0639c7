"""Bridges from tokred to other tools: evaluation harnesses and serving engines.

Each integration lives in its own module and imports its tool only when that module is imported,
so ``import tokred`` never needs them:

* :mod:`tokred.integrations.lmms_eval`: an `lmms-eval <https://github.com/EvolvingLMMs-Lab/lmms-eval>`_
  model named ``tokred``, registered through lmms-eval's ``lmms_eval.models`` entry-point group, so
  that ``lmms-eval --model tokred --model_args pretrained=...,method=todre,keep_ratio=0.1 --tasks pope``
  evaluates any registered tokred method on any supported model family
  (``pip install "tokred[eval]"``).
* :mod:`tokred.integrations.vllm`: tokred's selectors inside a `vLLM <https://docs.vllm.ai>`_ engine
  (LLaVA-1.5, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL), configured per engine through ``hf_overrides`` and
  per request through ``mm_processor_kwargs`` (``docs/serving-vllm.md``).
"""
