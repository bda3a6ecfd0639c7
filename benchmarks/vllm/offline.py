"""Offline inference with a tokred method inside vLLM: the example of docs/serving-vllm.md.

    python benchmarks/vllm/offline.py llava-hf/llava-1.5-7b-hf path/to/image.jpg

tests/vllm runs it on a tiny checkpoint.
"""

from __future__ import annotations

import sys
from typing import Any

from vllm import LLM, SamplingParams
from vllm.platforms import current_platform

from tokred.integrations.vllm import CPU_WORKER


def main(model: str, image: Any, **engine: Any) -> tuple[list[Any], LLM]:
    """Three requests on one LLaVA engine: the engine's method, a request's budget, a request's method.
    Returns the outputs and the engine."""
    llm = LLM(
        model=model,
        hf_overrides={
            "tokred": {"method": "todre", "keep": 64, "stage2": False},  # ToDRE stage I, 64 tokens per image
            "mrope_section": [1, 1, 1],  # LLaVA: per-request positions, so kept tokens keep their original ones
        },
        video_pruning_rate=0.5,  # vLLM's switch for recompute_mrope_positions (tokred refuses videos)
        worker_cls=CPU_WORKER if current_platform.is_cpu() else "auto",  # CPU only: see tokred...vllm.workers
        **engine,
    )
    prompt = "USER: <image>\nWhat is shown in this image? ASSISTANT:"
    requests = [
        {"prompt": prompt, "multi_modal_data": {"image": image}},
        {"prompt": prompt, "multi_modal_data": {"image": image},
         "mm_processor_kwargs": {"tokred": {"keep": 32}}},                      # this request: 32 tokens
        {"prompt": prompt, "multi_modal_data": {"image": image},
         "mm_processor_kwargs": {"tokred": {"method": "random", "keep": 16}}},  # this request: another method
    ]
    outputs = llm.generate(requests, SamplingParams(temperature=0, max_tokens=32))
    for output in outputs:
        print(len(output.prompt_token_ids), "prompt tokens:", output.outputs[0].text)
    return outputs, llm


if __name__ == "__main__":
    from PIL import Image

    main(sys.argv[1], Image.open(sys.argv[2]).convert("RGB"))
