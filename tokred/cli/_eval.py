"""``tokred eval``: accuracy, retention and agreement of methods x budgets on a task, next to their
prefill speed-up, measured on the same prompts, batches and scoring (:func:`tokred.eval.evaluate`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._common import CommandError, ListAction, add_command, number, parse_option, positive_int
from ._loading import (add_model_source, check_options, check_output_file, layer_options_at_depth, layer_options_line,
                       open_source, preset_layer_options)

if TYPE_CHECKING:
    from ..eval import Task
    from ..method import Method
    from ..registry import Registry
    from ._output import Output

__all__ = ["add_parser", "handle"]


def add_parser(commands: Any) -> None:
    p = add_command(
        commands, "eval", help="accuracy of methods and budgets on a task, next to their speed-up",
        description=(
            "Answer every item of a task (a JSONL file: docs/evaluation.md) with the unreduced model\n"
            "and with every method at every budget, on the same prompts, batches and scoring, and\n"
            "report accuracy, retention (share of the unreduced accuracy), agreement with the\n"
            "unreduced answers, visual tokens kept and the prefill speed-up. Multiple-choice items\n"
            "are scored by the log-likelihood of each choice, or by generation. With --output, every\n"
            "prediction is appended to a JSONL file as its batch finishes, and a second run with the\n"
            "same file resumes where the first stopped. --preset proxy (the trained SYNTHETIC PROXY)\n"
            "brings its own task, so --task may be left out; its figures rank methods on that\n"
            "synthetic task only, not on the papers' benchmarks. On the proxy, a method whose layer\n"
            "option defaults to an absolute layer chosen for LLaVA-1.5's 32 layers runs at the same\n"
            "depth fraction (FastV's layer 2 as '2/32') unless --option gives it."
        ),
        epilog=(
            "examples:\n"
            "  tokred eval --model llava-hf/llava-1.5-7b-hf --task my_task.jsonl --methods todre,fastv \\\n"
            "      --keep-ratio 0.25,0.1 --output predictions.jsonl --plot accuracy.png\n"
            "  tokred eval --preset proxy --methods '*' --keep-ratio 0.25 0.1 0.05\n"
            "  tokred eval --preset tiny --task my_task.jsonl --methods random --keep 64 --timing-rounds 0 --json"
        ),
    )
    add_model_source(p, required=True)
    p.add_argument("--task", type=Path, metavar="FILE",
                   help="the task: a JSONL file, one item per line (required except with --preset proxy, "
                        "which brings its own)")
    p.add_argument("--items", type=positive_int, metavar="N",
                   help="only the first N items of the task (default: all; --preset proxy's task has 256)")
    p.add_argument("--methods", action=ListAction, default=["*"], metavar="NAME",
                   help="methods: names or fnmatch patterns, spaces or commas (default: every registered method)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep", action=ListAction, element=positive_int, metavar="K",
                        help="budgets, visual tokens kept per image (default: each method's own default)")
    budget.add_argument("--keep-ratio", action=ListAction, element=number, metavar="R",
                        help="budgets as fractions of each image's visual tokens")
    p.add_argument("--option", action="append", default=[], type=parse_option, metavar="KEY=VALUE",
                   help="an option given to every method; repeatable")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N", help="items per batch (default: 8)")
    p.add_argument("--multiple-choice", choices=("loglikelihood", "generate"), default="loglikelihood",
                   help="how items with choices are scored (default: loglikelihood)")
    p.add_argument("--max-new-tokens", type=positive_int, default=16, metavar="N",
                   help="generation length of generated answers (default: 16)")
    p.add_argument("--timing-rounds", type=int, default=3, metavar="N",
                   help="interleaved rounds of timed prefills per setting; 0 skips timing (default: 3)")
    p.add_argument("--output", type=Path, metavar="FILE",
                   help="append every prediction to this JSONL file; predictions already in it are reused")
    p.add_argument("--plot", type=Path, metavar="FILE", help="also draw accuracy against visual-token work to this PNG")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--json-file", type=Path, metavar="FILE", help="also write the JSON result to this file")
    p.set_defaults(handler=handle)


def _task(args: argparse.Namespace) -> Task:
    """``--task``, or the preset's own task when ``--task`` is not given."""
    from ..eval import load_task

    if args.task is not None:
        return load_task(args.task)
    preset = None
    if args.preset:
        from ..bench._presets import PRESETS

        preset = PRESETS.get(args.preset)
    task = preset.build_task() if preset is not None else None
    if task is None:
        raise CommandError("--task FILE is required (only --preset proxy brings its own task); the task format is on "
                           "docs/evaluation.md")
    return task


def handle(args: argparse.Namespace, registry: Registry, output: Output) -> int:
    from ..eval import evaluate, plot_accuracy
    from ._bench import _matching, _shared_options

    for path, flag in ((args.output, "--output"), (args.plot, "--plot"), (args.json_file, "--json-file")):
        check_output_file(path, flag)
    if args.timing_rounds < 0:
        raise CommandError("--timing-rounds must be 0 or more")
    options = _shared_options(args)
    names = _matching(registry.list_methods, args.methods, "method")
    for name in names:
        check_options(registry, "method", name, options)
    budgets: list[dict[str, Any]] = ([{"keep_ratio": r} for r in args.keep_ratio] if args.keep_ratio
                                     else [{"keep": k} for k in args.keep] if args.keep else [{}])
    # The preset's layer options (the proxy's: LLaVA-1.5's layers at the same depth fractions), under the user's.
    layered = preset_layer_options(args.preset, registry, names, options)

    def create(layers: dict[str, dict[str, Any]]) -> list[Method]:
        return [registry.create(name, **{**layers.get(name, {}), **options, **budget})
                for name in names for budget in budgets]

    methods = create(layered)
    task = _task(args).head(args.items)  # every item and image is checked before the model loads
    source = open_source(args, registry, output)
    depth_matched: dict[str, dict[str, Any]] = {}
    if layered:  # a depth fraction that rounds down to layer 0 on this model becomes layer 1
        num_layers = source.config.get_text_config().num_hidden_layers
        depth_matched = layer_options_at_depth(layered, num_layers)
        if depth_matched != layered:
            methods = create(depth_matched)
    model = source.load_model()
    with output.progress(1) as progress:
        result = evaluate(model, source.processor, task, methods, registry=registry, batch_size=args.batch_size,
                          multiple_choice=args.multiple_choice, max_new_tokens=args.max_new_tokens,
                          timing_rounds=args.timing_rounds, output=args.output, model_name=source.name,
                          progress=lambda done, total, what: progress.update(done, total, what))
    data = {**result.to_dict(), "depth_matched": depth_matched}
    if args.plot is not None:
        plot_accuracy(result, args.plot)
        output.note(f"wrote {args.plot}")
    if args.json_file is not None:
        args.json_file.write_text(json.dumps(data, indent=2) + "\n")
        output.note(f"wrote {args.json_file}")
    if args.json:
        output.json(data)
    else:
        output.print(f"task {result.task} ({data['items']} items), model {result.model}, multiple choice by "
                     f"{result.scoring}, batch size {result.batch_size}")
        if result.task_description:
            output.print(result.task_description)
        if layered:
            output.print(layer_options_line(layered, num_layers))
        output.print("")
        output.print(output.table(result.HEADERS, result.rows(), right=set(range(1, len(result.HEADERS)))))
        failed = [r for r in result.results if r.error is not None]
        output.print("\nretention: accuracy over the unreduced model's on the same items; agreement: share of "
                     "items answered as the unreduced model answered them"
                     + "".join(f"\n{r.setting.label} failed: {r.error}" for r in failed))
    return 1 if any(r.error is not None for r in result.results) else 0

