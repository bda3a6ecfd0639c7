"""What ToDRE's stage-I selector costs, against the prefill time it saves (CPU).

For each number of visual tokens ``N`` the script times the two greedy functions of
``tokred_todre`` (``max_sum_diversity`` and ``k_center``) on random ``[N, D]`` float32 features with
``k = keep_ratio * N``, and measures the prefill of a random-weight Llama-style language model on
``N + text`` tokens and on ``k + text`` tokens. It reports ``selector time / (prefill(N + text) -
prefill(k + text))``: the share of the saved prefill time that the selection spends again.

The language model has SmolLM-135M's shape (hidden 576, 30 layers, 9 heads, 3 KV heads,
intermediate 1536, vocabulary 49152; 135M parameters), random weights, float32, ``sdpa``, and
computes the logits of the last position only, as ``generate`` does. Its layers are identical, so
by default a ``--prefill-layers``-layer slice is timed and scaled to the full depth; the script also
times the full model on the smallest unreduced input (``scaling check``) so the scaling can be
judged. Costs paid once per forward (embeddings, masks, the last position's logits) get scaled too,
which inflates both prefills a little at short lengths, but they cancel in the saved time.
``--prefill-layers 30`` measures the full model everywhere (slow: minutes at N = 10,000).

Every figure is a median of up to ``--repeats`` rounds (after one warm-up of each code path; no new
round after ``--max-seconds`` per row, so the largest N may get a single round); each round runs the
two selectors and the two prefills once, interleaved, in this one process. Report the ratios, not
the bare times (DESIGN.md section 7). The figures in ``docs/benchmarks.md`` come from this script.
Run from the repository root::

    python benchmarks/todre_selector.py                 # N = 576, 2880, 10000; D = 4096; k = 10%
    python benchmarks/todre_selector.py --dim 576 --json
    python benchmarks/todre_selector.py --threads 1     # steadier on a busy shared machine
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable

import torch
import transformers

from tokred_todre import k_center, max_sum_diversity

#: SmolLM-135M's shape (HuggingFaceTB/SmolLM-135M config); weights are random.
LM_SHAPE: dict[str, Any] = {
    "vocab_size": 49152,
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
    "tie_word_embeddings": True,
}


def interleaved_medians(fns: dict[str, Callable[[], object]], repeats: int,
                        max_seconds: float = float("inf")) -> tuple[dict[str, float], int]:
    """Median wall time of each function over up to ``repeats`` rounds, and the number of rounds.

    Each round runs every function once, so background load on a shared machine hits all of them
    alike. No round starts once ``max_seconds`` have passed (the first always runs).
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    begin = time.perf_counter()
    rounds = 0
    while rounds < repeats and (rounds == 0 or time.perf_counter() - begin < max_seconds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
        rounds += 1
    return {name: statistics.median(values) for name, values in times.items()}, rounds


def build_language_model(layers: int, max_positions: int) -> transformers.PreTrainedModel:
    """The SmolLM-135M-shaped Llama with ``layers`` decoder layers and random (seeded) weights."""
    config = transformers.LlamaConfig(**{**LM_SHAPE, "num_hidden_layers": layers}, max_position_embeddings=max_positions)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return model.eval()


def prefill(model: transformers.PreTrainedModel, length: int) -> Callable[[], None]:
    """One prefill of ``length`` tokens (last-position logits only, as ``generate`` computes them)."""
    input_ids = torch.randint(0, LM_SHAPE["vocab_size"], (1, length), generator=torch.Generator().manual_seed(length))

    def run() -> None:
        with torch.no_grad():
            model(input_ids=input_ids, logits_to_keep=1)

    return run


def load_average() -> float | None:
    """The 1-minute load average (how busy the shared machine was), where the OS reports one."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def measure(args: argparse.Namespace) -> dict[str, Any]:
    load_before = load_average()
    full_depth = LM_SHAPE["num_hidden_layers"]
    scale = full_depth / args.prefill_layers
    model = build_language_model(args.prefill_layers, max(args.sizes) + args.text_tokens)
    warm = torch.randn(64, args.dim)                                            # one untimed warm-up of each code path
    max_sum_diversity(warm, 8, 0), k_center(warm, 8, 0), prefill(model, 64)()
    rows = []
    for n in args.sizes:
        k = max(1, int(args.keep_ratio * n + 0.5))                               # tokred's rounding
        features = torch.randn(n, args.dim, generator=torch.Generator().manual_seed(n))
        features += torch.randn(1, args.dim, generator=torch.Generator().manual_seed(n + 1))  # off-centre, like real tokens
        t, rounds = interleaved_medians({
            "max_sum": lambda features=features, k=k: max_sum_diversity(features, k, 0),
            "k_center": lambda features=features, k=k: k_center(features, k, 0),
            "full": prefill(model, n + args.text_tokens),
            "reduced": prefill(model, k + args.text_tokens),
        }, args.repeats, args.max_seconds)
        full, reduced = t["full"] * scale, t["reduced"] * scale
        saved = full - reduced
        rows.append({
            "N": n, "k": k, "rounds": rounds, "max_sum_s": t["max_sum"], "k_center_s": t["k_center"],
            "prefill_full_s": full, "prefill_reduced_s": reduced, "prefill_saved_s": saved,
            "max_sum_over_saved": t["max_sum"] / saved, "k_center_over_saved": t["k_center"] / saved,
        })
        print(f"  N={n}: done", file=sys.stderr, flush=True)
    check = None
    if args.prefill_layers != full_depth:
        length = min(args.sizes) + args.text_tokens
        whole = build_language_model(full_depth, length)
        prefill(whole, 64)()
        t, _ = interleaved_medians({"whole": prefill(whole, length), "slice": prefill(model, length)}, args.repeats)
        check = {"tokens": length, "measured_full_model_s": t["whole"], "scaled_from_slice_s": t["slice"] * scale}
    return {
        "machine": {
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "load_average_1min": [load_before, load_average()],
        },
        "settings": {
            "dim": args.dim, "keep_ratio": args.keep_ratio, "text_tokens": args.text_tokens,
            "repeats": args.repeats, "max_seconds": args.max_seconds,
            "prefill_layers_timed": args.prefill_layers, "prefill_layers_model": full_depth,
            "language_model": "Llama, SmolLM-135M shape, random weights, float32, sdpa",
        },
        "rows": rows,
        "scaling_check": check,
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| N | k | runs | max-sum (s) | k-center (s) | prefill N+text (s) | prefill k+text (s) | saved (s) "
        "| max-sum / saved | k-center / saved |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['N']} | {r['k']} | {r['rounds']} | {r['max_sum_s']:.3f} | {r['k_center_s']:.3f} | {r['prefill_full_s']:.2f} "
            f"| {r['prefill_reduced_s']:.2f} | {r['prefill_saved_s']:.2f} | {r['max_sum_over_saved']:.3f} "
            f"| {r['k_center_over_saved']:.3f} |"
        )
    m, s = result["machine"], result["settings"]
    lines.append("")
    lines.append(
        f"D = {s['dim']}, keep_ratio = {s['keep_ratio']}, {s['text_tokens']} text tokens; median of the runs "
        f"(up to {s['repeats']}, none started after {s['max_seconds']:g} s per row); "
        f"{m['cpus']} CPUs, torch threads: {m['torch_threads']}, torch {m['torch']}, transformers {m['transformers']}, "
        f"Python {m['python']}."
    )
    if None not in m["load_average_1min"]:
        lines.append("1-minute load average before / after: " + " / ".join(f"{x:.1f}" for x in m["load_average_1min"]) + ".")
    check = result["scaling_check"]
    if check is not None:
        lines.append(
            f"Prefill timed on {s['prefill_layers_timed']} of {s['prefill_layers_model']} layers and scaled; "
            f"scaling check at {check['tokens']} tokens: full model {check['measured_full_model_s']:.3f} s, "
            f"scaled slice {check['scaled_from_slice_s']:.3f} s."
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[576, 2880, 10000], metavar="N",
                        help="visual tokens per image (default: 576 2880 10000)")
    parser.add_argument("--dim", type=int, default=4096, help="feature width D (default 4096, LLaVA-7B's LLM width)")
    parser.add_argument("--keep-ratio", type=float, default=0.1, help="k = keep_ratio * N, rounded half up (default 0.1)")
    parser.add_argument("--text-tokens", type=int, default=64, help="text tokens around the image (default 64)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds per row at most, median reported (default 3)")
    parser.add_argument("--max-seconds", type=float, default=30.0,
                        help="start no further round of a row after this many seconds (default 30; the first always runs)")
    parser.add_argument("--prefill-layers", type=int, default=3,
                        help=f"decoder layers actually timed, scaled to {LM_SHAPE['num_hidden_layers']} (default 3)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's own choice). On a loaded shared machine, "
                        "--threads 1 avoids OpenMP threads waiting on each other and gives steadier ratios")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    args = parser.parse_args(argv)
    if not 1 <= args.prefill_layers <= LM_SHAPE["num_hidden_layers"]:
        parser.error(f"--prefill-layers must lie in 1..{LM_SHAPE['num_hidden_layers']}")
    if not 0 < args.keep_ratio < 1:
        parser.error("--keep-ratio must lie strictly between 0 and 1 (nothing is saved at 1)")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be positive")
    if args.repeats < 1 or args.dim < 1 or args.text_tokens < 0 or min(args.sizes) < 1:
        parser.error("--repeats, --dim and --sizes must be positive and --text-tokens non-negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = measure(args)
    print(json.dumps(result, indent=2) if args.json else markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
