"""``tokred bench``: speed-ups, FLOPs and memory of methods on a model (:mod:`tokred.bench`), and
``tokred bench --scaling``: Selectors alone against the number of tokens and the budget."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from ._common import DEMO_PROMPT, CommandError, ListAction, add_command, number, parse_option, positive_int
from ._loading import (
    add_images,
    add_model_source,
    check_options,
    check_output_file,
    load_images,
    method_options,
    open_source,
    preset_or_prompt_inputs,
    video_preset,
    visual_token_counts,
)

if TYPE_CHECKING:
    from ..registry import Registry
    from ._output import Output

__all__ = ["add_parser", "handle"]


def add_parser(commands: Any) -> None:
    p = add_command(
        commands, "bench", help="measure speed-ups, FLOPs and memory of methods on a model",
        description=(
            "Measure methods and budgets on one prompt, in one process, interleaved: prefill and\n"
            "end-to-end generate time relative to the unreduced model (speed-up) and, for methods\n"
            "that only select before the language model, relative to the ideal (the same model fed\n"
            "only the kept tokens from the start); selection and gating time as a share of the\n"
            "prefill time saved; analytic prefill FLOPs; KV-cache bytes; peak memory. Ratios are\n"
            "medians of per-round ratios over --repeats rounds, with their interquartile range.\n"
            "Progress goes to stderr (a bar with the time left on a terminal), the table (or --json,\n"
            "--markdown) to stdout. Lists (--methods, --keep, --keep-ratio, --selectors, --sizes)\n"
            "take values separated by spaces or commas. --plot and --json-file are checked before\n"
            "anything runs.\n\n"
            "--scaling times the registered Selectors alone on random tokens, for every N in\n"
            "--sizes and k in --keep, and fits the exponents b, c of t ~ N^b k^c."
        ),
        epilog=(
            "examples:\n"
            "  tokred bench --preset llava-135m --methods random --keep 64\n"
            "  tokred bench --preset llava-135m --methods random,todre --keep 32,64,144 --plot bench.png\n"
            "  tokred bench --model llava-hf/llava-1.5-7b-hf --device cuda --dtype bfloat16 --json > bench.json\n"
            "  tokred bench --scaling --selectors 'todre.*' --sizes 576 2304 10000 20000 --keep 16 64 256"
        ),
    )
    add_model_source(p, required=False)
    p.add_argument("--methods", action=ListAction, default=["*"], metavar="NAME",
                   help="methods: names or fnmatch patterns (default: every registered method)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep", action=ListAction, element=positive_int, metavar="K",
                        help="budgets, visual tokens kept per image (default: 64); with --scaling the k values "
                             "(default: 16 64 256)")
    budget.add_argument("--keep-ratio", action=ListAction, element=number, metavar="R",
                        help="budgets as fractions of each image's visual tokens")
    p.add_argument("--option", action="append", default=[], type=parse_option, metavar="KEY=VALUE",
                   help="an option given to every method (with --scaling: every selector); repeatable")
    add_images(p, "image files")
    p.add_argument("--prompt", default=DEMO_PROMPT, metavar="TEXT", help=f"the question (default: {DEMO_PROMPT!r})")
    p.add_argument("--new-tokens", type=positive_int, default=8, metavar="N",
                   help="tokens every generate call produces, exactly (default: 8)")
    p.add_argument("--repeats", type=positive_int, default=5, metavar="N", help="timed rounds (default: 5)")
    p.add_argument("--no-memory", action="store_true", help="skip the untimed peak-memory calls")
    p.add_argument("--threads", type=positive_int, metavar="N",
                   help="torch CPU threads for this process (default: torch's own choice); on a machine shared "
                        "with other jobs, fewer threads than cores gives steadier timings")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the result as JSON (fields: docs/benchmarks.md)")
    output.add_argument("--markdown", action="store_true", help="print a Markdown table with the machine and notes")
    p.add_argument("--plot", type=Path, metavar="FILE", help="also draw prefill speed-up against budget to this PNG")
    p.add_argument("--json-file", type=Path, metavar="FILE", help="also write the JSON result to this file")
    scaling = p.add_argument_group("selector scaling")
    scaling.add_argument("--scaling", action="store_true", help="time Selectors alone against N and k (no model)")
    scaling.add_argument("--selectors", action=ListAction, default=["*"], metavar="NAME",
                         help="selectors: names or fnmatch patterns (default: every registered selector)")
    scaling.add_argument("--sizes", action=ListAction, element=positive_int, default=[576, 2304, 5184, 10000, 20000],
                         metavar="N", help="visual tokens per image (default: 576 2304 5184 10000 20000)")
    scaling.add_argument("--dim", type=positive_int, default=1024, metavar="D", help="feature width (default: 1024)")
    scaling.add_argument("--max-seconds", type=number, default=10.0, metavar="S",
                         help="skip cells larger than one whose call took longer than this (default: 10)")
    p.set_defaults(handler=handle)


def _matching(names: Callable[[str], list[str]], patterns: Sequence[str], what: str) -> list[str]:
    """Registered names matching ``patterns`` (names or fnmatch globs), in the order given."""
    found: list[str] = []
    for pattern in patterns:
        matched = names(pattern)
        if not matched:
            raise CommandError(f"no registered {what} matches {pattern!r}; registered: {', '.join(names('*')) or 'none'}")
        found += [n for n in matched if n not in found]
    return found


def _shared_options(args: argparse.Namespace) -> dict[str, Any]:
    options = method_options(argparse.Namespace(option=args.option))
    if {"keep", "keep_ratio"} & set(options):
        raise CommandError("give the budgets with --keep or --keep-ratio, not as --option")
    return options


def handle(args: argparse.Namespace, registry: Registry, output: Output) -> int:
    # Output files first: a typo in a path must not cost the whole benchmark.
    check_output_file(args.plot, "--plot")
    check_output_file(args.json_file, "--json-file")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if args.scaling:
        return _scaling(args, registry, output)
    if not (args.model or args.preset):
        raise CommandError("give --model or --preset (or --scaling to time selectors alone)")
    from ..bench import Bench, Contender, format_markdown, format_table, plot_speedups

    # Every method and budget is created before the model loads, so a typo costs nothing.
    options = _shared_options(args)
    budgets: list[tuple[str, float]] = ([("keep_ratio", r) for r in args.keep_ratio] if args.keep_ratio
                                        else [("keep", k) for k in (args.keep or [64])])
    names = _matching(registry.list_methods, args.methods, "method")
    for name in names:
        check_options(registry, "method", name, options)
    contenders = [
        Contender(name, f"{kind}={value:g}", registry.create(name, **{**options, kind: value}), budget_value=value)
        for name in names for kind, value in budgets
    ]
    video_preset(args)  # before any file is read: a video preset takes no --image
    images, _ = load_images(args.image, output)
    source = open_source(args, registry, output)
    inputs, _ = preset_or_prompt_inputs(args, source.processor, images, args.prompt)
    counts = visual_token_counts(inputs, source.image_token_id, len(images))
    too_large = [value for kind, value in budgets if kind == "keep" and counts and value > min(counts)]
    if too_large:  # measured anyway: the other budgets are worth the run, and the rows say why these failed
        output.warn(f"keep={', '.join(f'{v:g}' for v in too_large)} is more than the {min(counts)} visual tokens "
                    "of an image; those rows will fail")
    model = source.load_model()
    inputs = inputs.to(device=source.device, dtype=model.dtype)
    bench = Bench(model, inputs, contenders, registry=registry, new_tokens=args.new_tokens, repeats=args.repeats,
                  memory=not args.no_memory, model_name=source.name)
    with output.progress(bench.total_steps) as progress:
        result = bench.run(progress.step)
    if args.plot is not None:
        plot_speedups(result, args.plot)
        output.note(f"wrote {args.plot}")
    if args.json_file is not None:
        args.json_file.write_text(json.dumps(result, indent=2) + "\n")
        output.note(f"wrote {args.json_file}")
    if args.json:
        output.json(result)
    elif args.markdown:
        output.print(format_markdown(result))
    else:
        output.print(format_table(result, lambda headers, rows, right: output.table(headers, rows, right=right)))
    return 1 if any(row["error"] for row in result["rows"]) else 0


def _scaling(args: argparse.Namespace, registry: Registry, output: Output) -> int:
    import torch

    from ..bench import machine_info, selector_scaling
    from ._loading import resolve_device

    if args.keep_ratio:
        raise CommandError("--scaling takes absolute budgets (--keep K ...), not --keep-ratio")
    options = method_options(argparse.Namespace(option=args.option))
    names = _matching(registry.list_selectors, args.selectors, "selector")
    for name in names:
        check_options(registry, "selector", name, options)
    selectors = {name: registry.selector(name, **options) for name in names}
    keeps = args.keep or [16, 64, 256]
    device = resolve_device(args.device)
    dtype = torch.float32 if args.dtype == "auto" else getattr(torch, args.dtype)
    cells = sum(1 for n in args.sizes for k in keeps if k <= n)
    rows = []
    with output.progress(cells * len(selectors)) as progress:
        for name, selector in selectors.items():
            measured = selector_scaling(selector, args.sizes, keeps, dim=args.dim, repeats=args.repeats,
                                        max_seconds=args.max_seconds, device=device, dtype=dtype,
                                        step=lambda label, name=name: progress.step(f"{name} {label}"))
            rows.append({"selector": name, "options": selector.model_dump(mode="json"), **measured})
    result = {
        "schema": "tokred-bench-scaling/1", "machine": machine_info(device),
        "settings": {"dim": args.dim, "dtype": str(dtype).removeprefix("torch."), "device": str(device),
                     "repeats": args.repeats, "max_seconds": args.max_seconds},
        "selectors": rows,
    }
    if args.json_file is not None:
        args.json_file.write_text(json.dumps(result, indent=2) + "\n")
        output.note(f"wrote {args.json_file}")
    if args.json:
        output.json(result)
        return 0
    blocks = []
    for row in rows:
        exponents = ", ".join(f"{var}^{value:.2f}" for var, value in row["exponents"].items() if value is not None)
        cells_text = [[str(c["N"]), str(c["k"]),
                       "skipped" if c["seconds"] is None else f"{c['seconds']['median'] * 1e3:.2f}",
                       "" if c["seconds"] is None else f"{c['seconds']['q1'] * 1e3:.2f}-{c['seconds']['q3'] * 1e3:.2f}"]
                      for c in row["cells"]]
        headers = ["N", "k", "ms (median)", "interquartile ms"]
        title = f"{row['selector']}: time ~ {exponents or 'n/a'} (least-squares fit)"
        blocks.append(f"**{title}**\n\n" + _markdown_table(headers, cells_text) if args.markdown
                      else f"{output.heading(title)}\n" + output.table(headers, cells_text, right={0, 1, 2, 3}, indent=2))
    mach = result["machine"]
    where = mach["gpu"] or f"{mach['cpu']}, {mach['cpus']} CPUs, torch threads: {mach['torch_threads']}"
    blocks.append(f"D = {args.dim}, {result['settings']['dtype']}, {device}; median of {args.repeats} calls per cell "
                  f"after a warm-up; {where}; torch {mach['torch']}.")
    output.print("\n\n".join(blocks))
    return 0


def _markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])
