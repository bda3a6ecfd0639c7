"""The ``tokred`` command line: ``tokred list``, ``run``, ``demo``, ``bench`` and ``show``.

* ``list`` shows every registered method, adapter, selector and gate with the plugin and
  distribution that provided it, and the plugins that failed to load.
* ``run`` answers one prompt about one or more images with a reduced model and prints the answer
  and the run report.
* ``demo`` needs no download: it builds a tiny random-weight model and compares every registered
  method with the unreduced model (visual tokens per layer, relative prefill time, a few generated
  tokens).
* ``bench`` measures methods and budgets on a model or a random-weight size preset: speed-up over
  the unreduced model and overhead over the ideal, FLOPs, KV-cache bytes, peak memory
  (:mod:`tokred.bench`); ``bench --scaling`` times Selectors alone against ``N`` and ``k``.
* ``show`` draws the image with the visual tokens a method kept (:mod:`tokred.show`).
* ``doctor`` checks the installation: versions, the transformers internals tokred depends on
  (:mod:`tokred.compat`), the plugins.

:func:`main` returns an exit status instead of exiting, so it can be called in-process; every
function takes the :class:`~tokred.Registry` to use, so tests and embedding code can pass their own.
Errors a user can cause print one ``tokred: error: ...`` line on stderr and return 2.
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import importlib.util
import inspect
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Sequence, TextIO

import torch
from PIL import Image, UnidentifiedImageError

from . import __version__, compat
from .bench import (
    PRESETS,
    Bench,
    Contender,
    build_preset,
    format_markdown,
    format_table,
    machine_info,
    plot_speedups,
    selector_scaling,
    timed,
)
from .errors import OptionsError, TokredError
from .method import Method
from .registry import Entry, Kind, Registry, default_registry
from .runtime import RunReport, apply
from .show import show

__all__ = ["main", "build_parser", "CommandError"]

_DEMO_PROMPT = "What is shown in this image?"
_DEMO_NEW_TOKENS = 8
_DTYPES = ("auto", "float32", "bfloat16", "float16")

# (section title, registry kind, how to describe one entry in a line)
_SECTIONS: tuple[tuple[str, Kind, Callable[[Entry], str]], ...] = (
    ("methods", "method", lambda e: e.obj.describe()),  # type: ignore[attr-defined]
    ("adapters", "adapter", lambda e: ", ".join(e.obj.model_classes)),  # type: ignore[attr-defined]
    ("selectors", "selector", lambda e: _doc_summary(e.obj)),
    ("gates", "gate", lambda e: _doc_summary(e.obj)),
)


class CommandError(Exception):
    """A problem with the command's inputs that is not a tokred library error (an unreadable image,
    a model that cannot be loaded, a device that is not there); reported like a :class:`TokredError`."""


# ---------------------------------------------------------------------------- entry point


def main(argv: Sequence[str] | None = None, *, registry: Registry | None = None) -> int:
    """Run the ``tokred`` command line and return its exit status.

    Args:
        argv: the arguments after the program name; default: ``sys.argv[1:]``.
        registry: the registry to list and create methods from; default:
            :func:`tokred.default_registry` (the installed plugins).

    Returns:
        0 on success; 2 for usage errors and for errors the user can fix (unknown method or option,
        impossible budget, unreadable input); 1 when ``demo`` had a method fail.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help and usage errors: an in-process caller gets a status, not an exit
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    try:
        return args.handler(args, registry if registry is not None else default_registry())
    except (TokredError, CommandError) as exc:
        print(f"tokred: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tokred: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader left early (`tokred list --json | head`); send the rest of stdout, including
        # the interpreter's final flush, to devnull instead of failing again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``tokred`` command and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="tokred",
        description="Training-free visual-token reduction for vision-language models on transformers.",
        epilog="Run 'tokred COMMAND --help' for the options of a command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,  # keeps --version's lines
    )
    parser.add_argument("--version", action="version", version=_version_text(),
                        help="print the versions of tokred, torch and transformers, and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_list(commands)
    _add_run(commands)
    _add_demo(commands)
    _add_bench(commands)
    _add_show(commands)
    _add_doctor(commands)
    return parser


def _version_text() -> str:
    """tokred's, torch's and transformers' versions, read from package metadata (nothing imported)."""
    transformers = compat.transformers_version()
    tested = "within" if compat.in_tested_range(transformers) else "OUTSIDE"
    low, high = compat.TESTED_TRANSFORMERS
    return (f"tokred {__version__}\ntorch {compat.torch_version()}\n"
            f"transformers {transformers} ({tested} the tested range {low} to {high})")


def _subparser(commands: Any, name: str, help: str, description: str, epilog: str) -> argparse.ArgumentParser:
    return commands.add_parser(
        name, help=help, description=description, epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


# ---------------------------------------------------------------------------- list


def _add_list(commands: Any) -> None:
    p = _subparser(
        commands, "list", help="list registered methods, adapters, selectors and gates",
        description=(
            "List what the installed plugins registered: methods (what 'tokred run --method' takes),\n"
            "adapters (the supported model families), and the selectors (stage I) and gates\n"
            "(stage II) that methods are built from. Each row names the plugin and the distribution\n"
            "that provided it. Plugins that failed to load are listed at the end; the others still work."
        ),
        epilog="examples:\n  tokred list\n  tokred list --pattern 'fast*'\n  tokred list --json",
    )
    p.add_argument("--pattern", default="*", metavar="GLOB",
                   help="show only names matching this fnmatch pattern (default: all)")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of tables")
    p.set_defaults(handler=_cmd_list)


def _cmd_list(args: argparse.Namespace, registry: Registry) -> int:
    sections = {
        title: [_entry_record(e, describe) for e in registry.entries(kind)
                if fnmatch.fnmatchcase(e.name, args.pattern)]
        for title, kind, describe in _SECTIONS
    }
    failures = registry.errors
    if args.json:
        data: dict[str, Any] = dict(sections)
        data["plugin_errors"] = [
            {"plugin": f.plugin, "distribution": f.distribution, "hook": f.hook,
             "error": f"{type(f.error).__name__}: {f.error}", "message": str(f)}
            for f in failures
        ]
        print(json.dumps(data, indent=2, default=str))
        return 0
    blocks = []
    for title, records in sections.items():
        if records:
            rows = [[_name_with_aliases(r), _provider(r), r["description"]] for r in records]
            body = _indent(_table(["name", "provided by", "description"], rows))
        else:
            body = "  (none" + (f" matching {args.pattern!r})" if args.pattern != "*" else ")")
        blocks.append(f"{title}\n{body}")
    if failures:
        blocks.append("plugins that failed to load\n" + "\n".join(f"  {f}" for f in failures))
    print("\n\n".join(blocks))
    return 0


def _entry_record(entry: Entry, describe: Callable[[Entry], str]) -> dict[str, Any]:
    record: dict[str, Any] = {
        "name": entry.name, "aliases": list(entry.aliases), "plugin": entry.plugin,
        "distribution": entry.distribution, "description": describe(entry),
    }
    fields = getattr(entry.obj, "model_fields", None)
    if fields is not None:  # options are what 'tokred run --option' accepts; adapters have none
        record["options"] = {
            n: {"required": f.is_required(), "default": None if f.is_required() else f.default,
                "description": f.description}
            for n, f in fields.items()
        }
    return record


def _name_with_aliases(record: dict[str, Any]) -> str:
    aliases = record["aliases"]
    return record["name"] + (f" (alias: {', '.join(aliases)})" if aliases else "")


def _provider(record: dict[str, Any]) -> str:
    # Plugins passed in-process (Registry(plugins=...)) have no distribution.
    dist = record["distribution"]
    return f"{record['plugin']} ({dist})" if dist else f"{record['plugin']} (in-process)"


def _doc_summary(obj: type) -> str:
    """The first paragraph of the class docstring on one line: summaries often wrap over lines."""
    return " ".join(inspect.cleandoc(obj.__doc__ or "").split("\n\n")[0].split())


# ---------------------------------------------------------------------------- run


def _add_run(commands: Any) -> None:
    p = _subparser(
        commands, "run", help="answer a prompt about images with a reduced model",
        description=(
            "Load a vision-language model with transformers (AutoProcessor and\n"
            "AutoModelForImageTextToText), apply a tokred method, answer one prompt about the given\n"
            "images with greedy decoding, and print the answer and the run report (visual tokens\n"
            "per decoder layer, time spent selecting). Method options are checked before the model\n"
            "is loaded. Budgets are per image: --keep 64 on two images keeps 64 of each."
        ),
        epilog=(
            "examples:\n"
            "  tokred run --model llava-hf/llava-1.5-7b-hf --method fastv --keep-ratio 0.25 \\\n"
            "      --image cat.png --prompt 'What is the cat doing?'\n"
            "  tokred run --model ./my-model --method random --keep 64 --option seed=3 \\\n"
            "      --image a.png --image b.png --prompt 'Compare the two pictures.' --json\n\n"
            "'tokred list' shows the methods; 'tokred list --json' also shows their options."
        ),
    )
    p.add_argument("--model", required=True, metavar="PATH_OR_HUB_ID",
                   help="a local directory or a Hugging Face Hub id, passed to from_pretrained")
    p.add_argument("--method", required=True, metavar="NAME", help="a registered method (see 'tokred list')")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=int, metavar="K", help="visual tokens to keep per image")
    budget.add_argument("--keep-ratio", type=float, metavar="R",
                        help="fraction of each image's visual tokens to keep, in (0, 1]")
    p.add_argument("--option", action="append", default=[], type=_parse_option, metavar="KEY=VALUE",
                   help="a method option; the value is read as JSON when it parses (tau=0.1, layer=2, "
                        "flag=true), otherwise as a string (objective=k_center, layer=7/8). Repeatable.")
    p.add_argument("--image", action="append", required=True, type=Path, metavar="FILE",
                   help="an image file; repeat for several images (placed before the prompt, in order)")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the question or instruction")
    p.add_argument("--max-new-tokens", type=_positive_int, default=32, metavar="N",
                   help="maximum number of tokens to generate (default: 32)")
    p.add_argument("--dtype", choices=_DTYPES, default="auto",
                   help="weights dtype (default: auto, the checkpoint's own)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                   help="where to run (default: auto, cuda when available)")
    p.add_argument("--attn-implementation", choices=("sdpa", "eager"), default="sdpa",
                   help="transformers attention implementation (default: sdpa)")
    p.add_argument("--json", action="store_true", help="print a JSON object with the answer and the full report")
    p.set_defaults(handler=_cmd_run)


def _parse_option(text: str) -> tuple[str, Any]:
    """``"tau=0.1"`` -> ``("tau", 0.1)``; values that are not JSON stay strings."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value


def _method_options(args: argparse.Namespace) -> dict[str, Any]:
    options: dict[str, Any] = {}
    for key, value in args.option:
        if key in options:
            raise CommandError(f"option {key!r} is given twice")
        options[key] = value
    for key, value in (("keep", args.keep), ("keep_ratio", args.keep_ratio)):
        if value is not None:
            if key in options:
                raise CommandError(f"{key} is given both as --{key.replace('_', '-')} and as --option {key}=...")
            options[key] = value
    return options


def _cmd_run(args: argparse.Namespace, registry: Registry) -> int:
    # Everything checkable without the model comes first, so a typo does not cost a model load.
    method = registry.create(args.method, **_method_options(args))
    images = [_open_image(path) for path in args.image]
    device = _resolve_device(args.device)
    _note(f"loading {args.model} (dtype {args.dtype}, attention {args.attn_implementation}, device {device}) ...")
    model, processor = _from_pretrained(args.model, args.dtype, args.attn_implementation, device)
    model = model.eval()

    prompt = _chat_prompt(processor, len(images), args.prompt)
    inputs = processor(images=images, text=prompt, return_tensors="pt").to(device=device, dtype=model.dtype)
    prompt_length = inputs["input_ids"].shape[1]

    _note(f"generating up to {args.max_new_tokens} new tokens with {args.method} ...")
    started = time.perf_counter()
    with apply(model, method, registry=registry) as run:
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    _note(f"generated {output.shape[1] - prompt_length} tokens in {time.perf_counter() - started:.1f} s")

    answer = processor.batch_decode(output[:, prompt_length:], skip_special_tokens=True)[0].strip()
    if args.json:
        print(json.dumps({
            "model": args.model, "method": args.method, "options": method.model_dump(mode="json"),
            "prompt": args.prompt, "images": [str(p) for p in args.image], "answer": answer,
            "report": run.report.to_dict(),
        }, indent=2))
    else:
        print(f"{answer}\n\n{run.report.summary()}")
    return 0


def _open_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise CommandError(f"cannot read image {str(path)!r}: {exc}") from None


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda was requested but torch sees no CUDA device")
    return torch.device(name)


def _chat_prompt(processor: Any, num_images: int, text: str) -> str:
    """The user turn (images first, then the text) rendered by the processor's own chat template."""
    content: list[dict[str, str]] = [{"type": "image"} for _ in range(num_images)]
    content.append({"type": "text", "text": text})
    try:
        return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    except ValueError as exc:  # typically: the processor ships no chat template
        raise CommandError(f"cannot build the prompt with the processor's chat template: {exc}") from None


# ---------------------------------------------------------------------------- demo


def _add_demo(commands: Any) -> None:
    p = _subparser(
        commands, "demo", help="compare every method on a tiny offline model (no download)",
        description=(
            "Build a tiny random-weight model of a supported family (nothing is downloaded) and\n"
            "compare the unreduced model with every registered method matching --methods, each\n"
            "created with keep_ratio=--keep-ratio (a method that rejects keep_ratio runs with its\n"
            "defaults, and the table says so). For each: visual tokens in, entering the language\n"
            "model, at its last layer, the layer-averaged equivalent, the median prefill time\n"
            "relative to the unreduced model (runs interleaved so machine noise hits all alike),\n"
            "and the first tokens of a greedy generation. The weights are random, so the text is\n"
            "meaningless; timings on a tiny model only indicate the overhead."
        ),
        epilog=(
            "examples:\n  tokred demo\n  tokred demo --methods 'fast*' --keep-ratio 0.25 --repeats 9\n"
            "  tokred demo --json"
        ),
    )
    p.add_argument("--family", default="llava", metavar="FAMILY",
                   help="tiny model family, one of tokred.testing.FAMILIES (default: llava)")
    p.add_argument("--keep-ratio", type=float, default=0.1, metavar="R",
                   help="per-image budget every method is created with (default: 0.1)")
    p.add_argument("--methods", default="*", metavar="GLOB", help="methods to compare, fnmatch pattern (default: all)")
    p.add_argument("--repeats", type=_positive_int, default=5, metavar="N",
                   help="timed prefills per method; the table shows medians (default: 5)")
    p.add_argument("--attn-implementation", choices=("sdpa", "eager"), default="sdpa",
                   help="transformers attention implementation (default: sdpa)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(handler=_cmd_demo)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


@dataclass
class _Contender:
    """One row of the demo: the unreduced model (``method is None``) or a registered method."""

    name: str
    method: Method | None
    budget: str
    visual_in: int | None = None
    layer0: int | None = None
    last_layer: int | None = None
    equivalent: float | None = None
    text: str | None = None
    error: str | None = None
    seconds: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {
            "method": self.name, "budget": self.budget, "visual_tokens_in": self.visual_in,
            "entering_llm": self.layer0, "last_layer": self.last_layer,
            "equivalent_visual_tokens": self.equivalent,
            "prefill_time_ratio": statistics.median(self.ratios) if self.ratios else None,
            "generated_text": self.text, "error": self.error,
        }


def _cmd_demo(args: argparse.Namespace, registry: Registry) -> int:
    from .testing import FAMILIES, make_image, tiny_model  # imports transformers: only when a command needs it

    if args.family not in FAMILIES:
        raise CommandError(f"unknown family {args.family!r}; tiny models exist for: {', '.join(FAMILIES)}")
    names = registry.list_methods(args.methods)
    if not names:
        raise CommandError(
            f"no registered method matches {args.methods!r}; registered: {', '.join(registry.list_methods()) or 'none'}"
        )
    model, processor = tiny_model(args.family, attn_implementation=args.attn_implementation)
    inputs = processor(images=[make_image()], text=_chat_prompt(processor, 1, _DEMO_PROMPT), return_tensors="pt")
    num_visual = registry.adapter_for(model).count_visual_tokens(inputs)

    contenders = [_Contender("unreduced", None, "all", num_visual, num_visual, num_visual, float(num_visual))]
    contenders += [_create_contender(registry, name, args.keep_ratio) for name in names]
    progress = _Progress(len(contenders) * (1 + args.repeats), sys.stderr)

    # The generation doubles as warm-up, so the first timed prefill is not an outlier.
    for c in contenders:
        progress.step(f"{c.name} generate")
        if c.error is None:
            _generate(model, processor, inputs, c, registry)
    timed = [c for c in contenders if c.error is None]
    for repeat in range(1, args.repeats + 1):  # interleaved: drift over time hits every row alike
        for c in timed:
            progress.step(f"{c.name} repeat {repeat}/{args.repeats}")
            c.seconds.append(_time_prefill(model, inputs, c.method, registry))
        for c in timed:
            c.ratios.append(c.seconds[-1] / contenders[0].seconds[-1])
    progress.close()

    note = ("The weights are random, so the generated text is meaningless; timings on a tiny model only "
            "indicate the overhead, not the speed-up on a full-size model.")
    if args.json:
        print(json.dumps({
            "family": args.family, "keep_ratio": args.keep_ratio, "repeats": args.repeats,
            "num_layers": model.config.get_text_config().num_hidden_layers, "note": note,
            "rows": [c.row() for c in contenders],
        }, indent=2))
    else:
        print(f"tiny random-weight {args.family} model, {model.config.get_text_config().num_hidden_layers} "
              f"decoder layers, {num_visual} visual tokens; keep_ratio={args.keep_ratio:g}; prefill time is the "
              f"median over {args.repeats} interleaved repeat(s) of the ratio to the unreduced model\n")
        print(_table(
            ["method", "budget", "visual tokens in", "entering the LLM (layer 0)", "at the last layer",
             "equivalent tokens", "prefill time", f"first {_DEMO_NEW_TOKENS} generated tokens"],
            [_demo_cells(c) for c in contenders],
            right={2, 3, 4, 5, 6},
        ))
        print(f"\n{note}")
    return 1 if any(c.error for c in contenders) else 0


def _create_contender(registry: Registry, name: str, keep_ratio: float) -> _Contender:
    try:
        return _Contender(name, registry.create(name, keep_ratio=keep_ratio), f"keep_ratio={keep_ratio:g}")
    except OptionsError:
        pass  # the method has no keep_ratio (or rejects it): show it with its own defaults
    try:
        return _Contender(name, registry.create(name), "defaults (rejects keep_ratio)")
    except TokredError as exc:
        return _Contender(name, None, "-", error=str(exc))


def _generate(model: Any, processor: Any, inputs: Any, c: _Contender, registry: Registry) -> None:
    """Greedy-generate a few tokens for ``c``, filling its text and token counts (or its error)."""
    with torch.no_grad():
        if c.method is None:
            output = model.generate(**inputs, max_new_tokens=_DEMO_NEW_TOKENS, do_sample=False)
        else:
            try:
                with apply(model, c.method, registry=registry) as run:
                    output = model.generate(**inputs, max_new_tokens=_DEMO_NEW_TOKENS, do_sample=False)
            except Exception as exc:  # one broken plugin must not hide the results of the others
                c.error = f"{type(exc).__name__}: {exc}"
                return
            _fill_counts(c, run.report)
    c.text = processor.batch_decode(output[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]


def _fill_counts(c: _Contender, report: RunReport) -> None:
    c.visual_in = report.visual_tokens_input[0]
    c.layer0 = report.visual_tokens_per_layer[0][0]
    c.last_layer = report.visual_tokens_per_layer[-1][0]
    c.equivalent = report.equivalent_visual_tokens[0]


def _time_prefill(model: Any, inputs: Any, method: Method | None, registry: Registry) -> float:
    """Seconds of one plain forward pass over the prompt; installing the hooks is not timed."""
    scope = contextlib.nullcontext() if method is None else apply(model, method, registry=registry)
    with torch.no_grad(), scope:
        return timed(lambda: model(**inputs), model.device)


def _demo_cells(c: _Contender) -> list[str]:
    if c.error is not None:
        return [c.name, c.budget, "", "", "", "", "", f"failed: {' '.join(c.error.split())}"]
    ratio = statistics.median(c.ratios)
    return [c.name, c.budget, str(c.visual_in), str(c.layer0), str(c.last_layer), f"{c.equivalent:.1f}",
            f"{ratio:.2f}x", repr(c.text)]


class _Progress:
    """``[3/15] fastv repeat 2/5`` on stderr; one line rewritten in place on a terminal."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.total = total
        self.done = 0
        self.stream = stream
        self.inplace = stream.isatty()

    def step(self, label: str) -> None:
        self.done += 1
        text = f"[{self.done}/{self.total}] {label}"
        self.stream.write(f"\r\x1b[K{text}" if self.inplace else f"{text}\n")
        self.stream.flush()

    def close(self) -> None:
        if self.inplace:
            self.stream.write("\n")
            self.stream.flush()


# ---------------------------------------------------------------------------- bench and show: shared


def _add_model_source(p: argparse.ArgumentParser, *, required: bool) -> None:
    """``--model`` or ``--preset``, and how to load it (``--dtype``, ``--device``, ``--attn-implementation``)."""
    source = p.add_mutually_exclusive_group(required=required)
    source.add_argument("--model", metavar="PATH_OR_HUB_ID",
                        help="a local directory or a Hugging Face Hub id, passed to from_pretrained")
    source.add_argument("--preset", choices=tuple(PRESETS), metavar="NAME",
                        help="a random-weight model built offline, no download: "
                             + "; ".join(f"'{x.name}': {x.description}" for x in PRESETS.values()))
    p.add_argument("--dtype", choices=_DTYPES, default="auto",
                   help="weights dtype (default: auto: the checkpoint's own; presets: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                   help="where to run (default: auto, cuda when available)")
    p.add_argument("--attn-implementation", choices=("sdpa", "eager", "flash_attention_2"), default="sdpa",
                   help="transformers attention implementation (default: sdpa; flash_attention_2 needs the "
                        "flash-attn package and a CUDA device)")


def _from_pretrained(model_id: str, dtype: str, attn_implementation: str, device: torch.device) -> tuple[Any, Any]:
    """``(model, processor)`` of a hub id or local path, through the transformers Auto classes."""
    import transformers

    started = time.perf_counter()
    try:
        processor = transformers.AutoProcessor.from_pretrained(model_id)
        model = transformers.AutoModelForImageTextToText.from_pretrained(
            model_id, dtype="auto" if dtype == "auto" else getattr(torch, dtype),
            attn_implementation=attn_implementation)
    except OSError as exc:  # transformers' way of saying "not found / not a model directory"
        raise CommandError(f"could not load {model_id!r}: {exc}") from None
    model = model.to(device)
    _note(f"loaded {type(model).__name__} in {time.perf_counter() - started:.1f} s")
    return model, processor


def _load_model_source(args: argparse.Namespace) -> tuple[Any, Any, torch.device, str]:
    """``(model, processor, device, name)`` for ``--model`` / ``--preset``, in eval mode on its device."""
    device = _resolve_device(args.device)
    attn = args.attn_implementation
    if attn == "flash_attention_2":
        if device.type != "cuda":
            raise CommandError("flash_attention_2 runs on CUDA only; use --device cuda or another attention")
        if importlib.util.find_spec("flash_attn") is None:
            raise CommandError("flash_attention_2 needs the flash-attn package (pip install 'tokred[flash]')")
    name = args.preset or args.model
    _note(f"loading {name} (dtype {args.dtype}, attention {attn}, device {device}) ...")
    started = time.perf_counter()
    if args.preset:
        model, processor = build_preset(args.preset)
        if args.dtype != "auto":
            dtype = getattr(torch, args.dtype)
        else:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model = model.to(device=device, dtype=dtype)
        if attn != "sdpa":  # flash_attention_2 can only be chosen once the weights are on the GPU in half precision
            model.set_attn_implementation(attn)
        _note(f"loaded {type(model).__name__} in {time.perf_counter() - started:.1f} s")
    else:
        model, processor = _from_pretrained(args.model, args.dtype, attn, device)
    return model.eval(), processor, device, name


def _images_or_synthetic(paths: list[Path] | None) -> list[Image.Image]:
    """The images at ``paths``, or one synthetic test image (:func:`tokred.testing.make_image`)."""
    from .testing import make_image

    return [_open_image(path) for path in paths] if paths else [make_image()]


def _prompt_inputs(processor: Any, model: Any, device: torch.device, images: list[Image.Image], prompt: str) -> Any:
    text = _chat_prompt(processor, len(images), prompt)
    return processor(images=images, text=text, return_tensors="pt").to(device=device, dtype=model.dtype)


def _video_preset(args: argparse.Namespace) -> Any:
    """The ``--preset`` if it is a video preset (its prompt holds a synthetic clip), else ``None``."""
    preset = PRESETS.get(args.preset) if args.preset else None
    return preset if preset is not None and preset.video_frames is not None else None


def _images_for(args: argparse.Namespace) -> list[Image.Image]:
    """``--image`` files or the synthetic image; a video preset takes none."""
    preset = _video_preset(args)
    if preset is not None and args.image:
        raise CommandError(f"preset {preset.name!r} prompts with its own synthetic {preset.video_frames}-frame clip; "
                           "--image does not apply to it")
    return _images_or_synthetic(args.image)


def _preset_or_prompt_inputs(args: argparse.Namespace, processor: Any, model: Any, device: torch.device,
                             images: list[Image.Image]) -> tuple[Any, list[Any]]:
    """``(inputs, pictures)``: a video preset's prompt with its synthetic clip (pictures: the clip's
    frames), else the prompt with ``images``."""
    preset = _video_preset(args)
    if preset is None:
        return _prompt_inputs(processor, model, device, images, args.prompt), list(images)
    inputs, clip = preset.video_prompt(processor, args.prompt)
    return inputs.to(device=device, dtype=model.dtype), [clip]


def _matching(names: Callable[[str], list[str]], patterns: Sequence[str], what: str) -> list[str]:
    """Registered names matching ``patterns`` (names or fnmatch globs), in the order given."""
    found: list[str] = []
    for pattern in patterns:
        matched = names(pattern)
        if not matched:
            raise CommandError(f"no registered {what} matches {pattern!r}; registered: {', '.join(names('*')) or 'none'}")
        found += [n for n in matched if n not in found]
    return found


# ---------------------------------------------------------------------------- bench


def _add_bench(commands: Any) -> None:
    p = _subparser(
        commands, "bench", help="measure speed-ups, FLOPs and memory of methods on a model",
        description=(
            "Measure methods and budgets on one prompt, in one process, interleaved: prefill and\n"
            "end-to-end generate time relative to the unreduced model (speed-up) and, for methods\n"
            "that only select before the language model, relative to the ideal (the same model fed\n"
            "only the kept tokens from the start); selection and gating time as a share of the\n"
            "prefill time saved; analytic prefill FLOPs; KV-cache bytes; peak memory. Ratios are\n"
            "medians of per-round ratios over --repeats rounds, with their interquartile range.\n"
            "Progress goes to stderr, the table (or --json, --markdown) to stdout.\n\n"
            "--scaling times the registered Selectors alone on random tokens, for every N in\n"
            "--sizes and k in --keep, and fits the exponents b, c of t ~ N^b k^c."
        ),
        epilog=(
            "examples:\n"
            "  tokred bench --preset llava-135m --methods random --keep 64\n"
            "  tokred bench --preset llava-135m --methods random todre --keep 32 64 144 --plot bench.png\n"
            "  tokred bench --model llava-hf/llava-1.5-7b-hf --device cuda --dtype bfloat16 --json > bench.json\n"
            "  tokred bench --scaling --selectors 'todre.*' --sizes 576 2304 10000 20000 --keep 16 64 256"
        ),
    )
    _add_model_source(p, required=False)
    p.add_argument("--methods", nargs="+", default=["*"], metavar="NAME",
                   help="methods: names or fnmatch patterns (default: every registered method)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=_positive_int, nargs="+", metavar="K",
                        help="budgets, visual tokens kept per image (default: 64); with --scaling the k values "
                             "(default: 16 64 256)")
    budget.add_argument("--keep-ratio", type=float, nargs="+", metavar="R",
                        help="budgets as fractions of each image's visual tokens")
    p.add_argument("--option", action="append", default=[], type=_parse_option, metavar="KEY=VALUE",
                   help="an option given to every method (with --scaling: every selector); repeatable")
    p.add_argument("--image", action="append", type=Path, metavar="FILE",
                   help="an image file; repeatable (default: one synthetic test image)")
    p.add_argument("--prompt", default=_DEMO_PROMPT, metavar="TEXT", help=f"the question (default: {_DEMO_PROMPT!r})")
    p.add_argument("--new-tokens", type=_positive_int, default=8, metavar="N",
                   help="tokens every generate call produces, exactly (default: 8)")
    p.add_argument("--repeats", type=_positive_int, default=5, metavar="N", help="timed rounds (default: 5)")
    p.add_argument("--no-memory", action="store_true", help="skip the untimed peak-memory calls")
    p.add_argument("--threads", type=_positive_int, metavar="N",
                   help="torch CPU threads for this process (default: torch's own choice); on a machine shared "
                        "with other jobs, fewer threads than cores gives steadier timings")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the result as JSON (fields: docs/benchmarks.md)")
    output.add_argument("--markdown", action="store_true", help="print a Markdown table with the machine and notes")
    p.add_argument("--plot", type=Path, metavar="FILE", help="also draw prefill speed-up against budget to this PNG")
    p.add_argument("--json-file", type=Path, metavar="FILE", help="also write the JSON result to this file")
    scaling = p.add_argument_group("selector scaling")
    scaling.add_argument("--scaling", action="store_true", help="time Selectors alone against N and k (no model)")
    scaling.add_argument("--selectors", nargs="+", default=["*"], metavar="NAME",
                         help="selectors: names or fnmatch patterns (default: every registered selector)")
    scaling.add_argument("--sizes", type=_positive_int, nargs="+", default=[576, 2304, 5184, 10000, 20000],
                         metavar="N", help="visual tokens per image (default: 576 2304 5184 10000 20000)")
    scaling.add_argument("--dim", type=_positive_int, default=1024, metavar="D", help="feature width (default: 1024)")
    scaling.add_argument("--max-seconds", type=float, default=10.0, metavar="S",
                         help="skip cells larger than one whose call took longer than this (default: 10)")
    p.set_defaults(handler=_cmd_bench)


def _cmd_bench(args: argparse.Namespace, registry: Registry) -> int:
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.scaling:
        return _cmd_bench_scaling(args, registry)
    if not (args.model or args.preset):
        raise CommandError("give --model or --preset (or --scaling to time selectors alone)")
    # Every method and budget is created before the model loads, so a typo costs nothing.
    options = _method_options(argparse.Namespace(option=args.option, keep=None, keep_ratio=None))
    if {"keep", "keep_ratio"} & set(options):
        raise CommandError("give the budgets with --keep or --keep-ratio, not as --option")
    budgets: list[tuple[str, float]] = ([("keep_ratio", r) for r in args.keep_ratio] if args.keep_ratio
                                        else [("keep", k) for k in (args.keep or [64])])
    contenders = [
        Contender(name, f"{kind}={value:g}", registry.create(name, **{**options, kind: value}), budget_value=value)
        for name in _matching(registry.list_methods, args.methods, "method") for kind, value in budgets
    ]
    images = _images_for(args)
    model, processor, device, name = _load_model_source(args)
    inputs, _ = _preset_or_prompt_inputs(args, processor, model, device, images)
    bench = Bench(model, inputs, contenders, registry=registry, new_tokens=args.new_tokens, repeats=args.repeats,
                  memory=not args.no_memory, model_name=name)
    progress = _Progress(bench.total_steps, sys.stderr)
    result = bench.run(progress.step)
    progress.close()
    if args.plot is not None:
        plot_speedups(result, args.plot)
        _note(f"wrote {args.plot}")
    if args.json_file is not None:
        args.json_file.write_text(json.dumps(result, indent=2) + "\n")
        _note(f"wrote {args.json_file}")
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.markdown:
        print(format_markdown(result))
    else:
        print(format_table(result, _table))
    return 1 if any(row["error"] for row in result["rows"]) else 0


def _cmd_bench_scaling(args: argparse.Namespace, registry: Registry) -> int:
    if args.keep_ratio:
        raise CommandError("--scaling takes absolute budgets (--keep K ...), not --keep-ratio")
    options = _method_options(argparse.Namespace(option=args.option, keep=None, keep_ratio=None))
    selectors = {name: registry.selector(name, **options) for name in _matching(registry.list_selectors, args.selectors, "selector")}
    keeps = args.keep or [16, 64, 256]
    device = _resolve_device(args.device)
    dtype = torch.float32 if args.dtype == "auto" else getattr(torch, args.dtype)
    cells = sum(1 for n in args.sizes for k in keeps if k <= n)
    progress = _Progress(cells * len(selectors), sys.stderr)
    rows = []
    for name, selector in selectors.items():
        measured = selector_scaling(selector, args.sizes, keeps, dim=args.dim, repeats=args.repeats,
                                    max_seconds=args.max_seconds, device=device, dtype=dtype,
                                    step=lambda label, name=name: progress.step(f"{name} {label}"))
        rows.append({"selector": name, "options": selector.model_dump(mode="json"), **measured})
    progress.close()
    result = {
        "schema": "tokred-bench-scaling/1", "machine": machine_info(device),
        "settings": {"dim": args.dim, "dtype": str(dtype).removeprefix("torch."), "device": str(device),
                     "repeats": args.repeats, "max_seconds": args.max_seconds},
        "selectors": rows,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    markdown = args.markdown
    blocks = []
    for row in rows:
        exponents = ", ".join(f"{var}^{value:.2f}" for var, value in row["exponents"].items() if value is not None)
        cells_text = [[str(c["N"]), str(c["k"]),
                       "skipped" if c["seconds"] is None else f"{c['seconds']['median'] * 1e3:.2f}",
                       "" if c["seconds"] is None else f"{c['seconds']['q1'] * 1e3:.2f}-{c['seconds']['q3'] * 1e3:.2f}"]
                      for c in row["cells"]]
        headers = ["N", "k", "ms (median)", "interquartile ms"]
        title = f"{row['selector']}: time ~ {exponents or 'n/a'} (least-squares fit)"
        blocks.append(f"**{title}**\n\n" + _markdown_table(headers, cells_text) if markdown
                      else f"{title}\n" + _indent(_table(headers, cells_text, right={0, 1, 2, 3})))
    mach = result["machine"]
    where = mach["gpu"] or f"{mach['cpu']}, {mach['cpus']} CPUs, torch threads: {mach['torch_threads']}"
    blocks.append(f"D = {args.dim}, {result['settings']['dtype']}, {device}; median of {args.repeats} calls per cell "
                  f"after a warm-up; {where}; torch {mach['torch']}.")
    print("\n\n".join(blocks))
    return 0


def _markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


# ---------------------------------------------------------------------------- show


def _add_show(commands: Any) -> None:
    p = _subparser(
        commands, "show", help="draw the image with the visual tokens a method kept",
        description=(
            "Run one prefill of the prompt with the method and draw each image as the model saw it\n"
            "(resized and cropped by the processor; one panel per tile for tiled models): tokens\n"
            "that enter the language model keep their pixels and a yellow outline, dropped tokens\n"
            "are darkened. For methods with gates, a strip shows the tokens alive from each gate\n"
            "layer on. Works on the presets (no download) and on real checkpoints."
        ),
        epilog=(
            "examples:\n"
            "  tokred show --preset tiny --method todre --keep 64 -o kept.png\n"
            "  tokred show --model llava-hf/llava-1.5-7b-hf --method todre --keep 64 --image cat.jpg \\\n"
            "      --prompt 'What is the cat doing?' -o kept.png"
        ),
    )
    _add_model_source(p, required=True)
    p.add_argument("--method", required=True, metavar="NAME", help="a registered method (see 'tokred list')")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=int, metavar="K", help="visual tokens to keep per image")
    budget.add_argument("--keep-ratio", type=float, metavar="R",
                        help="fraction of each image's visual tokens to keep, in (0, 1]")
    p.add_argument("--option", action="append", default=[], type=_parse_option, metavar="KEY=VALUE",
                   help="a method option (as in 'tokred run'); repeatable")
    p.add_argument("--image", action="append", type=Path, metavar="FILE",
                   help="an image file; repeatable (default: one synthetic test image)")
    p.add_argument("--prompt", default=_DEMO_PROMPT, metavar="TEXT",
                   help=f"the question; attention-guided methods depend on it (default: {_DEMO_PROMPT!r})")
    p.add_argument("-o", "--output", required=True, type=Path, metavar="FILE", help="the PNG file to write")
    p.add_argument("--json", action="store_true", help="print the kept indices and the panels as JSON")
    p.set_defaults(handler=_cmd_show)


def _cmd_show(args: argparse.Namespace, registry: Registry) -> int:
    method = registry.create(args.method, **_method_options(args))
    images = _images_for(args)
    model, processor, device, name = _load_model_source(args)
    inputs, images = _preset_or_prompt_inputs(args, processor, model, device, images)
    budget = next((f"{k}={v:g}" for k, v in (("keep", args.keep), ("keep_ratio", args.keep_ratio)) if v is not None),
                  "default budget")
    figure = show(model, processor, inputs, method, images, title=f"{args.method} ({budget}) on {name}", registry=registry)
    try:
        figure.image.save(args.output, format="PNG")
    except OSError as exc:
        raise CommandError(f"cannot write {str(args.output)!r}: {exc}") from None
    _note(f"wrote {args.output} ({figure.image.width} x {figure.image.height})")
    if args.json:
        print(json.dumps({
            "output": str(args.output), "size": list(figure.image.size), "method": args.method,
            "options": method.model_dump(mode="json"),
            "panels": [{"image": p.image, "tile": p.tile, "stage": p.stage, "box": list(p.box), "grid": list(p.grid),
                        "kept": p.kept} for p in figure.panels],
        }, indent=2))
    else:
        for p in figure.panels:
            print(f"image {p.image + 1}, tile {p.tile}, {p.stage}: {p.kept} of {p.grid[0] * p.grid[1]} grid cells kept")
    return 0


# ---------------------------------------------------------------------------- helpers


# ---------------------------------------------------------------------------- doctor


def _add_doctor(commands: Any) -> None:
    p = _subparser(
        commands, "doctor", help="check the installation: versions, transformers internals, plugins",
        description=(
            "Print the versions of tokred, Python, torch and transformers, whether that transformers\n"
            "release lies in the range tokred is tested with, every transformers-internal name tokred\n"
            "depends on (tokred.compat) and whether the installed release has it, and the plugins that\n"
            "loaded or failed. Exits with 1 when a name is missing or a plugin failed."
        ),
        epilog="examples:\n  tokred doctor\n  tokred doctor --json",
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(handler=_cmd_doctor)


def _cmd_doctor(args: argparse.Namespace, registry: Registry) -> int:
    import platform

    checks = [{"name": r.name, "ok": problem is None, "problem": problem} for r, problem in compat.check_transformers()]
    failures = registry.errors
    plugins = sorted({e.plugin for kind, _ in (("method", 0), ("adapter", 0), ("selector", 0), ("gate", 0))
                      for e in registry.entries(kind)})  # type: ignore[arg-type]
    report = {
        "tokred": __version__, "python": platform.python_version(), "torch": compat.torch_version(),
        "cuda": torch.cuda.is_available(), "transformers": compat.transformers_version(),
        "transformers_tested_range": list(compat.TESTED_TRANSFORMERS),
        "transformers_in_tested_range": compat.in_tested_range(),
        "transformers_names": checks, "plugins": plugins, "plugin_errors": [str(f) for f in failures],
    }
    healthy = all(c["ok"] for c in checks) and not failures
    if args.json:
        print(json.dumps(report, indent=2))
        return 0 if healthy else 1
    low, high = compat.TESTED_TRANSFORMERS
    rows = [
        ["tokred", __version__], ["python", report["python"]],
        ["torch", f"{report['torch']} (CUDA {'available' if report['cuda'] else 'not available'})"],
        ["transformers", f"{report['transformers']} ("
                         f"{'within' if report['transformers_in_tested_range'] else 'OUTSIDE'} the tested range {low} to {high})"],
    ]
    print(_table(["package", "version"], rows))
    print(f"\ntransformers internals tokred depends on ({sum(c['ok'] for c in checks)} of {len(checks)} found)")
    for check in checks:
        print(f"  {'ok     ' if check['ok'] else 'MISSING'}  {check['name']}" + ("" if check["ok"] else f": {check['problem']}"))
    print(f"\nplugins: {', '.join(plugins) or 'none'}")
    for failure in failures:
        print(f"  FAILED  {failure}")
    if not report["transformers_in_tested_range"]:
        print(f"\nnote: transformers {report['transformers']} is not a release tokred was tested with; "
              f"`pip install 'transformers>={low},<={high}'` gives one that is")
    return 0 if healthy else 1


def _note(message: str) -> None:
    """Progress of a long step, on stderr so stdout stays the result."""
    print(message, file=sys.stderr, flush=True)


def _table(headers: list[str], rows: list[list[str]], right: Collection[int] = ()) -> str:
    """A plain-text table: columns separated by two spaces, ``right`` columns right-aligned."""
    widths = [max(len(cell) for cell in column) for column in zip(headers, *rows)]

    def line(cells: list[str]) -> str:
        parts = [cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())


if __name__ == "__main__":
    sys.exit(main())
