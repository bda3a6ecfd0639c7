"""vLLM + tokred against transformers + tokred on the same tiny checkpoints: one table row per family x method.

For each row, one engine with the method engine-wide serves one single-image request; the row says
whether the kept indices and the greedy tokens equal those of tokred's transformers runtime, and
the prompt length unreduced -> reduced (vLLM's count). The tests (tests/vllm) assert the same
things; this script prints them for the record.

    OMP_NUM_THREADS=1 .venv-vllm/bin/python benchmarks/vllm/parity.py [--out results.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import tempfile
from pathlib import Path

FAMILIES = {"llava": "LlavaForConditionalGeneration", "llava_next": "LlavaNextForConditionalGeneration",
            "qwen2_vl": "Qwen2VLForConditionalGeneration", "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration"}
METHODS = {
    "random": {"method": "random", "keep": 24},
    "todre (stage I)": {"method": "todre", "keep": 24, "stage2": False},
    "star (stage I)": {"method": "star", "keep": 24, "stage2": False},
    "example-norm (plugin)": {"method": "example-norm", "keep": 24},
    "divprune": {"method": "divprune", "keep": 24},
    "pool": {"method": "pool", "keep": 24},
}
IMAGES = {"llava": (336, 336), "llava_next": (420, 300), "qwen2_vl": (448, 224), "qwen2_5_vl": (336, 336)}
NEW_TOKENS = 16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--families", nargs="*", default=list(FAMILIES))
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    from vllm import LLM, SamplingParams
    from vllm.platforms import current_platform

    from tokred.integrations.vllm import engine_args
    from tokred.integrations.vllm.testing import prompt_for, tiny_checkpoint, transformers_reference
    from tokred.testing import make_image

    root = Path(tempfile.mkdtemp(prefix="tokred-vllm-parity-"))
    rows = []
    for family in args.families:
        path = tiny_checkpoint(family, root / family)
        generation = json.loads((path / "generation_config.json").read_text())
        suppressed = set(generation.get("suppress_tokens") or [])
        vocab = json.loads((path / "config.json").read_text())["text_config"]["vocab_size"]
        allowed = [i for i in range(vocab) if i not in suppressed] if suppressed else None
        sampling = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, ignore_eos=True,
                                  allowed_token_ids=allowed)
        image = make_image(*IMAGES[family], seed=3)
        for name, config in METHODS.items():
            ref = transformers_reference(path, prompt_for(family), [image], config, max_new_tokens=NEW_TOKENS)
            llm = LLM(model=str(path), dtype="float32", max_model_len=4096, seed=0, enforce_eager=True,
                      kv_cache_memory_bytes=256 << 20, limit_mm_per_prompt={"image": 1},
                      **engine_args(FAMILIES[family], cpu=current_platform.is_cpu(), **config))
            output = llm.generate({"prompt": prompt_for(family), "multi_modal_data": {"image": image}}, sampling)[0]
            kept = llm.apply_model(lambda model: [r.record.kept_stage1 for r in model.tokred_log])[0]
            llm.llm_engine.engine_core.shutdown()  # now, before the next engine starts in this process
            del llm
            gc.collect()
            rows.append({
                "family": family, "method": name, "kept_equal": kept == ref["kept"],
                "tokens_equal": list(output.outputs[0].token_ids) == ref["tokens"],
                "prompt_tokens": [ref["prompt_tokens"], len(output.prompt_token_ids)],
                "visual_tokens": [ref["num_tokens"][0], len(ref["kept"][0])],
            })
    print("| family | method | kept indices equal | greedy tokens equal | prompt tokens (transformers unreduced -> vLLM) | visual tokens |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        (full, reduced), (n, k) = row["prompt_tokens"], row["visual_tokens"]
        print(f"| {row['family']} | {row['method']} | {row['kept_equal']} | {row['tokens_equal']} | {full} -> {reduced} | {n} -> {k} |")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
