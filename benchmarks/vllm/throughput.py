"""Requests per second and prefill tokens of vLLM unreduced vs vLLM + tokred, on a batch of requests.

Two engines on the same tiny checkpoint live side by side (vLLM's default multiprocessing: each
engine core in its own process): the stock model and the model with a tokred method engine-wide.
Every repeat sends the same number of single-image requests to each, in alternating order, with
images no engine has seen (no encoder or prefix cache hits); the script reports the median
requests/s of each and the median of the per-repeat ratios. Times are wall-clock of
``LLM.generate`` on the whole batch; shared machines are noisy, so read the ratio, not the times.

    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/vllm/throughput.py --family llava --keep 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

ARCHITECTURES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
                 "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default="llava", choices=sorted(ARCHITECTURES))
    parser.add_argument("--method", default="random")
    parser.add_argument("--keep", type=int, default=64)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--compiled", action="store_true", help="torch.compile the language model (slow start)")
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # two engines side by side

    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    from tokred.integrations.vllm import engine_args
    from tokred.integrations.vllm.testing import prompt_for, tiny_checkpoint
    from tokred.testing import make_image

    path = tiny_checkpoint(args.family, Path(tempfile.mkdtemp(prefix="tokred-vllm-bench-")) / args.family)
    common = dict(model=str(path), dtype="float32", max_model_len=4096, seed=0, enforce_eager=not args.compiled,
                  kv_cache_memory_bytes=1 << 30, limit_mm_per_prompt={"image": 1}, enable_prefix_caching=False)
    config = {"method": args.method, "keep": args.keep}
    if args.method in ("todre", "star"):
        config["stage2"] = False
    load: dict[str, float] = {}
    engines: dict[str, LLM] = {}
    for name, extra in (("unreduced", {}), ("tokred", engine_args(ARCHITECTURES[args.family],
                                                                   cpu=current_platform.is_cpu(), **config))):
        start = time.perf_counter()
        engines[name] = LLM(**common, **extra)
        load[name] = time.perf_counter() - start
    sampling = SamplingParams(temperature=0, max_tokens=args.max_tokens, min_tokens=args.max_tokens, ignore_eos=True)
    prompt = prompt_for(args.family)

    def batch(seed: int) -> list[dict]:
        return [{"prompt": prompt, "multi_modal_data": {"image": make_image(seed=seed * 1000 + i)}} for i in range(args.requests)]

    for i, llm in enumerate(engines.values()):  # warm-up: first-call costs out of the measurement
        llm.generate(batch(900 + i)[:4], sampling, use_tqdm=False)
    runs: dict[str, list[dict]] = {name: [] for name in engines}
    for repeat in range(args.repeats):
        order = list(engines) if repeat % 2 == 0 else list(engines)[::-1]
        for name in order:
            requests = batch(repeat * 10 + (name == "tokred"))
            start = time.perf_counter()
            outputs = engines[name].generate(requests, sampling, use_tqdm=False)
            seconds = time.perf_counter() - start
            runs[name].append({"seconds": seconds, "requests_per_s": len(requests) / seconds,
                               "prefill_tokens": sum(len(o.prompt_token_ids) for o in outputs),
                               "output_tokens": sum(len(o.outputs[0].token_ids) for o in outputs)})
    ratios = [t["requests_per_s"] / u["requests_per_s"] for u, t in zip(runs["unreduced"], runs["tokred"])]
    result = {
        "family": args.family, "config": config, "requests": args.requests, "repeats": args.repeats,
        "max_tokens": args.max_tokens, "compiled": args.compiled, "load_seconds": {k: round(v, 1) for k, v in load.items()},
        "median_requests_per_s": {k: round(statistics.median(r["requests_per_s"] for r in v), 2) for k, v in runs.items()},
        "prefill_tokens_per_batch": {k: v[0]["prefill_tokens"] for k, v in runs.items()},
        "median_ratio_tokred_over_unreduced": round(statistics.median(ratios), 2),
        "ratios": [round(r, 2) for r in ratios],
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
