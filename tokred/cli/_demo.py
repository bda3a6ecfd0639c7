"""``tokred demo``: every registered method on a tiny offline model, against the unreduced model.

By default the model is the trained SYNTHETIC PROXY (:mod:`tokred.eval.proxy`): each row also shows
the answer to one held-out question and the accuracy on a few held-out items, next to the token
accounting and prefill speed-up. ``--family`` picks a random-weight tiny model instead (answers
meaningless). The proxy's figures rank methods on its synthetic task only, not the papers'
benchmarks. On the proxy, a layer option whose default is an absolute layer chosen for LLaVA-1.5's
32 layers runs at the same depth fraction (FastV's layer 2 as ``"2/32"``:
:mod:`tokred.eval.proxy._depth`), and the output says which."""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ._common import DEMO_PROMPT, CommandError, ListAction, add_command, number, positive_int
from ._loading import layer_options_at_depth, layer_options_line, preset_layer_options, prompt_inputs

if TYPE_CHECKING:
    from ..method import Method
    from ..registry import Registry
    from ..runtime import RunReport
    from ._output import Output

__all__ = ["add_parser", "handle"]

_NEW_TOKENS = 8
#: The ``--family`` of the trained synthetic proxy (the default).
PROXY = "proxy"
#: Held-out proxy items each row's accuracy is measured on by default (8 per question type): enough
#: to separate a method that finds the asked object from one that does not, fast enough for CI.
_DEMO_ITEMS = 32


def add_parser(commands: Any) -> None:
    p = add_command(
        commands, "demo", help="compare every method on a tiny offline model (no download)",
        description=(
            "Load a tiny offline model (nothing is downloaded) and compare the unreduced model with\n"
            "every registered method matching --methods, each created with keep_ratio=--keep-ratio\n"
            "(a method that rejects keep_ratio runs with its defaults, and the table says so). For\n"
            "each: visual tokens in, entering the language model, at its last layer, the\n"
            "layer-averaged equivalent, the prefill speed-up over the unreduced model (median of the\n"
            "per-repeat speed-ups, runs interleaved so machine noise hits all alike), and the first\n"
            "tokens of a greedy generation. The default model is the trained SYNTHETIC PROXY\n"
            "(tokred.eval.proxy): the answer is to a held-out question about a generated scene, and\n"
            "each row adds the accuracy on --items held-out items; it ranks methods on that synthetic\n"
            "task only, not on the papers' benchmarks. On the proxy, a method whose layer option\n"
            "defaults to an absolute layer chosen for LLaVA-1.5's 32 layers runs at the same depth\n"
            "fraction (FastV's layer 2 as '2/32'), and a line says which. Any other --family is a\n"
            "random-weight tiny model, whose text is meaningless. Timings on a tiny model only\n"
            "indicate the overhead."
        ),
        epilog=(
            "examples:\n  tokred demo\n  tokred demo --methods 'fast*' --keep-ratio 0.25 --repeats 9\n"
            "  tokred demo --methods random,todre --family llava_next\n  tokred demo --items 128 --json"
        ),
    )
    p.add_argument("--family", default=PROXY, metavar="FAMILY",
                   help="proxy (the trained synthetic proxy, default) or a random-weight tiny model family, one of "
                        "tokred.testing.FAMILIES")
    p.add_argument("--items", type=positive_int, default=_DEMO_ITEMS, metavar="N",
                   help=f"held-out proxy items the accuracy column is measured on (proxy only; default: {_DEMO_ITEMS})")
    p.add_argument("--keep-ratio", type=number, default=0.1, metavar="R",
                   help="per-image budget every method is created with (default: 0.1)")
    p.add_argument("--methods", action=ListAction, default=["*"], metavar="NAME",
                   help="methods to compare: names or fnmatch patterns, separated by spaces or commas "
                        "(default: all)")
    p.add_argument("--repeats", type=positive_int, default=5, metavar="N",
                   help="timed prefills per method; the table shows medians (default: 5)")
    p.add_argument("--attn-implementation", choices=("sdpa", "eager"), default="sdpa",
                   help="transformers attention implementation (default: sdpa)")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.set_defaults(handler=handle)


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
    accuracy: float | None = None
    agreement: float | None = None
    error: str | None = None
    seconds: list[float] = field(default_factory=list)
    speedups: list[float] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        from ..bench import Spread

        return {
            "method": self.name, "budget": self.budget, "visual_tokens_in": self.visual_in,
            "entering_llm": self.layer0, "last_layer": self.last_layer,
            "equivalent_visual_tokens": self.equivalent,
            "prefill_speedup": Spread.of(self.speedups).to_dict() if self.speedups else None,
            "generated_text": self.text, "accuracy": self.accuracy, "agreement": self.agreement, "error": self.error,
        }


def _methods(registry: Registry, patterns: list[str]) -> list[str]:
    names: list[str] = []
    for pattern in patterns:
        matched = registry.list_methods(pattern)
        if not matched:
            raise CommandError(
                f"no registered method matches {pattern!r}; registered: {', '.join(registry.list_methods()) or 'none'}")
        names += [n for n in matched if n not in names]
    return names


def handle(args: argparse.Namespace, registry: Registry, output: Output) -> int:
    from ..testing import FAMILIES, make_image, tiny_model  # imports transformers: only when a command needs it

    if args.family != PROXY and args.family not in FAMILIES:
        raise CommandError(f"unknown family {args.family!r}; the trained synthetic proxy is {PROXY!r} and tiny "
                           f"random-weight models exist for: {', '.join(FAMILIES)}")
    names = _methods(registry, args.methods)
    task = None
    if args.family == PROXY:
        from ..eval.proxy import load_proxy, proxy_task

        model, processor = load_proxy(attn_implementation=args.attn_implementation)
        task = proxy_task("test", args.items)
        first = task.items[0]
        inputs = prompt_inputs(processor, first.open_images(), first.question)
    else:
        model, processor = tiny_model(args.family, attn_implementation=args.attn_implementation)
        inputs = prompt_inputs(processor, [make_image()], DEMO_PROMPT)
    num_visual = registry.adapter_for(model).count_visual_tokens(inputs)
    layers = model.config.get_text_config().num_hidden_layers
    # On the proxy: LLaVA-1.5's absolute layer defaults at the same depth fractions (the proxy preset's layer_options).
    layered = preset_layer_options(PROXY if task is not None else None, registry, names,
                                   {"keep_ratio": args.keep_ratio})
    depth_matched = layer_options_at_depth(layered, layers)

    contenders = [_Contender("unreduced", None, "all", num_visual, num_visual, num_visual, float(num_visual))]
    contenders += [_create_contender(registry, name, args.keep_ratio, depth_matched.get(name, {})) for name in names]
    with output.progress(len(contenders) * (1 + args.repeats)) as progress:
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
            for c in timed:  # speed-up within the repeat: unreduced time over this row's
                c.speedups.append(contenders[0].seconds[-1] / c.seconds[-1])
    near_chance: dict[str, Any] | None = None
    if task is not None:
        _measure_accuracy(model, processor, task, contenders, registry, output)
        near_chance = _near_chance(model, processor, task, contenders, registry)

    if task is None:
        note = ("The weights are random, so the generated text is meaningless; timings on a tiny model only "
                "indicate the overhead, not the speed-up on a full-size model.")
    else:
        note = ("SYNTHETIC PROXY: accuracy and answers rank methods on this synthetic task only, not the papers' "
                "benchmarks (tokred eval --preset proxy measures it on more items; docs/evaluation.md); timings on "
                "a tiny model only indicate the overhead, not the speed-up on a full-size model.")
    data: dict[str, Any] = {"family": args.family, "keep_ratio": args.keep_ratio, "repeats": args.repeats,
                            "num_layers": layers, "depth_matched": depth_matched, "note": note}
    if near_chance is not None:
        data["near_chance"] = near_chance
    if task is not None:
        first = task.items[0]
        data.update(question=first.question, answer=first.answer, items=len(task))
    if args.json:
        output.json({**data, "rows": [c.row() for c in contenders]})
    else:
        if task is None:
            output.print(f"tiny random-weight {args.family} model, {layers} decoder layers, {num_visual} visual tokens; "
                         f"keep_ratio={args.keep_ratio:g}; prefill speed-up = t(unreduced) / t per interleaved repeat, "
                         f"median [interquartile range] over {args.repeats}\n")
        else:
            output.print(f"trained SYNTHETIC PROXY (tokred.eval.proxy), {layers} decoder layers, {num_visual} visual "
                         f"tokens; keep_ratio={args.keep_ratio:g}; the answer is to {first.question!r} about held-out "
                         f"scene {first.id} (right answer: {first.answer}); accuracy and agreement with the unreduced "
                         f"answers on {len(task)} held-out items; prefill speed-up = t(unreduced) / t per interleaved "
                         f"repeat, median [interquartile range] over {args.repeats}")
            if layered:
                output.print(layer_options_line(layered, layers))
            output.print("")
        headers = ["method", "budget", "visual tokens in", "entering the LLM (layer 0)", "at the last layer",
                   "equivalent tokens", "prefill speed-up"]
        headers += ["answer", "accuracy", "agreement"] if task is not None else [f"first {_NEW_TOKENS} generated tokens"]
        output.print(output.table(headers, [_cells(c, task is not None) for c in contenders],
                                  right={2, 3, 4, 5, 6, 8, 9}))
        line = "" if near_chance is None else _near_chance_line(near_chance, args.keep_ratio)
        if line:
            output.print(line)
        output.print(f"\n{note}")
    return 1 if any(c.error for c in contenders) else 0


#: A row is "near chance" when its accuracy is within this of the questions' prior.
_NEAR_CHANCE = 0.10
#: Items the near-chance explanation looks at (one prefill each per such method).
_EXPLAIN_ITEMS = 16


def _near_chance(model: Any, processor: Any, task: Any, contenders: list[_Contender], registry: Registry
                 ) -> dict[str, Any]:
    """Why a row lands near chance: the questions' prior (the mean of one over each item's number of
    choices) and, for every method within :data:`_NEAR_CHANCE` of it, the share of the visual tokens
    the answers depend on (each item's ``target_tokens``) that survived every stage of the method,
    over the first :data:`_EXPLAIN_ITEMS` items that have such tokens."""
    import torch

    from ..runtime import apply

    prior = sum(1 / len(item.choices) for item in task.items) / len(task)
    explained: dict[str, Any] = {}
    items = [item for item in task.items if item.meta.get("target_tokens")][:_EXPLAIN_ITEMS]
    for c in contenders[1:]:
        if c.method is None or c.error is not None or c.accuracy is None or c.accuracy > prior + _NEAR_CHANCE:
            continue
        kept = wanted = 0
        for item in items:
            inputs = prompt_inputs(processor, item.open_images(), item.question)
            with torch.no_grad(), apply(model, c.method, registry=registry) as run:
                model(**inputs)
            survivors = set(run.report.kept_indices[0])
            target = set(item.meta["target_tokens"])
            kept += len(survivors & target)
            wanted += len(target)
        explained[c.name] = {"accuracy": c.accuracy, "answer_tokens_kept": kept / wanted if wanted else None,
                             "items": len(items)}
    return {"prior": prior, "threshold": _NEAR_CHANCE, "methods": explained}


def _near_chance_line(near: dict[str, Any], keep_ratio: float) -> str:
    """One line under the table: which rows are near chance, the share of the answers' tokens each
    kept, and what that says (fewer than a uniform choice keeps: the selection misses what the
    questions ask about; more: the tokens are there, the loss is in how the model uses them).
    Empty when no near-chance row could be explained."""
    rows = {name: row["answer_tokens_kept"] for name, row in near["methods"].items()
            if row["answer_tokens_kept"] is not None}
    if not rows:
        return ""
    missed = [name for name, share in rows.items() if share < keep_ratio]
    kept = [name for name in rows if name not in missed]
    reasons = []
    if missed:
        reasons.append(f"{' and '.join(missed)} {'misses' if len(missed) == 1 else 'miss'} what the questions ask about")
    if kept:
        reasons.append(f"{' and '.join(kept)} {'keeps' if len(kept) == 1 else 'keep'} them, so the loss is in how the "
                       "model uses what is left")
    items = next(iter(near["methods"].values()))["items"]
    shares = ", ".join(f"{name} kept {100 * share:.0f}%" for name, share in rows.items())
    return (f"Near chance ({100 * near['prior']:.0f}%, one over each question's number of choices): of the visual "
            f"tokens the answers depend on, {shares} (a uniform choice keeps about {100 * keep_ratio:.0f}%; first "
            f"{items} items): {'; '.join(reasons)}.")


def _measure_accuracy(model: Any, processor: Any, task: Any, contenders: list[_Contender], registry: Registry,
                      output: Output) -> None:
    """Fill each working contender's accuracy and agreement on ``task`` (:func:`tokred.eval.evaluate`,
    multiple choice by log-likelihood, the same batches for every row)."""
    from ..eval import evaluate

    working = [c for c in contenders[1:] if c.error is None and c.method is not None]
    output.note(f"measuring accuracy on {len(task)} held-out proxy items ...")
    result = evaluate(model, processor, task, [c.method for c in working], registry=registry, timing_rounds=0)
    reference = result.results[0]
    contenders[0].accuracy, contenders[0].agreement = reference.accuracy, reference.agreement
    # One setting per working contender, in order: each has its own name, so none is merged away.
    assert len(result.results) == 1 + len(working)
    for c, measured in zip(working, result.results[1:]):
        if measured.error is not None:
            c.error = measured.error
            continue
        c.accuracy, c.agreement = measured.accuracy, measured.agreement


def _create_contender(registry: Registry, name: str, keep_ratio: float, layers: dict[str, Any]) -> _Contender:
    """The row of method ``name`` with ``keep_ratio`` and the depth-matched ``layers`` options."""
    from ..errors import OptionsError, TokredError

    try:
        return _Contender(name, registry.create(name, **layers, keep_ratio=keep_ratio), f"keep_ratio={keep_ratio:g}")
    except OptionsError:
        pass  # the method has no keep_ratio (or rejects it): show it with its own defaults
    try:
        return _Contender(name, registry.create(name, **layers), "defaults (rejects keep_ratio)")
    except TokredError as exc:
        return _Contender(name, None, "-", error=str(exc))


def _generate(model: Any, processor: Any, inputs: Any, c: _Contender, registry: Registry) -> None:
    """Greedy-generate a few tokens for ``c``, filling its text and token counts (or its error)."""
    import torch

    from ..runtime import apply

    with torch.no_grad():
        if c.method is None:
            output = model.generate(**inputs, max_new_tokens=_NEW_TOKENS, do_sample=False)
        else:
            try:
                with apply(model, c.method, registry=registry) as run:
                    output = model.generate(**inputs, max_new_tokens=_NEW_TOKENS, do_sample=False)
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
    import torch

    from ..bench import timed
    from ..runtime import apply

    scope = contextlib.nullcontext() if method is None else apply(model, method, registry=registry)
    with torch.no_grad(), scope:
        return timed(lambda: model(**inputs), model.device)


def _cells(c: _Contender, proxy: bool) -> list[str]:
    if c.error is not None:
        return [c.name, c.budget, "", "", "", "", "", f"failed: {' '.join(c.error.split())}"] + (["", ""] if proxy else [])
    from ..bench import Spread

    # As tokred bench and eval: median [interquartile range] of the per-repeat speed-ups; the unreduced row is 1.00x.
    speedup = "1.00x" if c.method is None else Spread.of(c.speedups).format(".2f", "x")
    cells = [c.name, c.budget, str(c.visual_in), str(c.layer0), str(c.last_layer), f"{c.equivalent:.1f}",
             speedup, repr(c.text)]
    if proxy:
        cells += ["" if c.accuracy is None else f"{100 * c.accuracy:.1f}%",
                  "" if c.agreement is None else f"{100 * c.agreement:.1f}%"]
    return cells
