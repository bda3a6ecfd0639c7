"""``tokred bench``: every method measured the same way against the unreduced model and the ideal.

For one prompt and each (method, budget), in one process, interleaved (see :mod:`._timing`):

* prefill time (one forward pass as ``generate`` starts it: KV cache filled, last position's logits)
  and end-to-end ``generate`` time for a fixed number of new tokens, each relative to the unreduced
  model (speed-up, ``t_unreduced / t``) and, for stage-I-only methods, to the ideal
  (``t / t_ideal``, see :mod:`._ideal`), formed per round and summarised by median and quartiles;
* the time the run report says the selector and the gates took, as a share of the prefill time saved;
* analytic prefill FLOPs and KV-cache bytes (:mod:`._flops`) from the report's tokens per layer,
  and the KV-cache bytes actually held after the prefill;
* peak tensor memory of one prefill and one ``generate`` (:mod:`._memory`), in separate untimed calls.

Installing the hooks (``tokred.apply``) is not timed: it happens once per model, not per request.
The result is a JSON-ready dict; its fields are documented in ``docs/benchmarks.md``.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import torch.nn as nn

from .. import compat
from ..method import Method
from ..registry import Registry
from ..runtime import RunReport, apply
from ._flops import cache_bytes, kv_cache_bytes, prefill_flops, tokens_per_layer
from ._ideal import Ideal, unsupported_reason
from ._memory import peak_bytes
from ._timing import Spread, rounds, timed

__all__ = ["Contender", "Bench", "SCHEMA", "MEMORY_NOTE", "machine_info", "format_table", "format_markdown"]

#: Identifies the layout of the JSON document; bumped when a field changes meaning.
SCHEMA = "tokred-bench/1"

MEMORY_NOTE = {
    "cuda": "peak of torch.cuda.max_memory_allocated during the call, minus the memory allocated before it",
    "cpu": "peak total size of the tensors allocated during the call and alive at once (tracked per operator; "
           "kernel-internal scratch buffers not seen, so a lower bound)",
}


@dataclass
class Contender:
    """One row: the unreduced model (``method is None``) or a created method at one budget.

    Attributes:
        name: the registered method name, or ``"unreduced"``.
        budget: how the budget was given (``"keep=64"``); ``"all"`` for the unreduced model.
        method: the created method, or ``None`` for the unreduced model.
        error: why the row could not be measured (creation or the first run failed), else ``None``.
        budget_value: the budget as a number (64 for ``keep=64``, 0.1 for ``keep_ratio=0.1``), the
            x axis of the plot; ``None`` when the method runs with its defaults.
    """

    name: str
    budget: str
    method: Method | None = None
    error: str | None = None
    budget_value: float | None = None

    @property
    def label(self) -> str:
        return self.name if self.method is None else f"{self.name} {self.budget}"

    @property
    def stage1_only(self) -> bool:
        """A Selector and no Gates: the runs that have an ideal."""
        if self.method is None:
            return False
        schedule = self.method.schedule()
        return schedule.selector is not None and not schedule.gates


@dataclass
class _Measured:
    """What the rounds and the untimed calls collected for one contender."""

    prefill: list[float] = field(default_factory=list)
    generate: list[float] = field(default_factory=list)
    selection: list[float] = field(default_factory=list)       # per timed prefill, from the run report
    gating: list[float] = field(default_factory=list)
    ideal_prefill: list[float] = field(default_factory=list)
    ideal_generate: list[float] = field(default_factory=list)
    report: RunReport | None = None
    ideal: Ideal | None = None
    ideal_note: str | None = None
    ideal_logits_diff: float | None = None
    ideal_same_tokens: bool | None = None
    kv_measured: int | None = None
    peak_prefill: int | None = None
    peak_generate: int | None = None


class Bench:
    """A benchmark of ``contenders`` on one prompt. Build it, read :attr:`total_steps` (for a
    progress display), then :meth:`run` it.

    Args:
        model: the vision-language model, in eval mode, on its device.
        inputs: the processor's outputs for one prompt (batch size 1), on the model's device, pixel
            values in the model's dtype.
        contenders: the methods and budgets to measure; the unreduced model is always added first.
        registry: where the methods and the model's adapter are registered.
        new_tokens: tokens every ``generate`` produces (``min_new_tokens = max_new_tokens``, so
            an early end-of-sequence cannot make a run shorter).
        repeats: timed rounds.
        memory: whether to measure peak memory (two extra untimed calls per contender).
        model_name: how to name the model in the result (a preset, a path, a hub id).
    """

    def __init__(self, model: nn.Module, inputs: Mapping[str, Any], contenders: list[Contender], *,
                 registry: Registry, new_tokens: int = 8, repeats: int = 5, memory: bool = True,
                 model_name: str | None = None) -> None:
        if inputs["input_ids"].shape[0] != 1:
            raise ValueError("the benchmark measures one prompt at a time (batch size 1)")
        self.model = model
        self.inputs = dict(inputs)
        self.registry = registry
        self.adapter = registry.adapter_for(model)
        self.new_tokens = new_tokens
        self.repeats = repeats
        self.memory = memory
        self.model_name = model_name or type(model).__name__
        self.device = next(model.parameters()).device
        self.contenders = [Contender("unreduced", "all"), *contenders]
        labels = [c.label for c in self.contenders]
        if len(set(labels)) != len(labels):
            raise ValueError(f"every method and budget must appear once; got {labels}")
        self.measured = {c.label: _Measured() for c in self.contenders}
        self._no_ideal = unsupported_reason(self.adapter)

    @property
    def total_steps(self) -> int:
        """Steps :meth:`run` reports when nothing fails: a warm-up per contender, the timed calls,
        the memory calls."""
        live = [c for c in self.contenders if c.error is None]
        per_round = sum(2 + (2 if c.stage1_only and self._no_ideal is None else 0) for c in live)
        return len(live) + self.repeats * per_round + (2 * len(live) if self.memory else 0)

    # ---------------------------------------------------------------- calls

    def _generate(self) -> torch.Tensor:
        return self.model.generate(**self.inputs, max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens,
                                   do_sample=False)

    def _prefill(self) -> Any:
        return self.model(**self.inputs, logits_to_keep=1, use_cache=True)

    def _timed_prefill(self, c: Contender) -> float:
        m = self.measured[c.label]
        if c.method is None:
            return timed(self._prefill, self.device)
        with apply(self.model, c.method, registry=self.registry) as run:
            seconds = timed(self._prefill, self.device)
        m.selection.append(run.report.selection_seconds)
        m.gating.append(run.report.gating_seconds)
        return seconds

    def _timed_generate(self, c: Contender) -> float:
        if c.method is None:
            return timed(self._generate, self.device)
        with apply(self.model, c.method, registry=self.registry):
            return timed(self._generate, self.device)

    # ---------------------------------------------------------------- phases

    def _warm_up(self, c: Contender) -> None:
        """Untimed first calls: warm caches and kernels, collect the report and the checks."""
        m = self.measured[c.label]
        if c.method is None:
            self._generate()
            m.kv_measured = cache_bytes(compat.output_cache(self._prefill()))
            return
        try:
            with apply(self.model, c.method, registry=self.registry) as run:
                tokens = self._generate()[:, self.inputs["input_ids"].shape[1]:]
                output = self._prefill()
        except Exception as exc:  # one failing method must not hide the others' results
            c.error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
            return
        m.report = run.report
        m.kv_measured = cache_bytes(compat.output_cache(output))
        if not c.stage1_only:
            m.ideal_note = "has gates: no plain model call expresses tokens leaving inside the decoder"
            return
        if self._no_ideal is not None:
            m.ideal_note = self._no_ideal
            return
        ideal = Ideal(self.model, self.adapter, self.inputs, run.report)
        ideal_output = ideal.prefill()
        m.ideal_logits_diff = float((ideal_output.logits.float() - output.logits.float()).abs().max())
        m.ideal_same_tokens = bool(torch.equal(ideal.generate(self.new_tokens), tokens))
        m.ideal = ideal

    def _tasks(self) -> dict[str, tuple[_Measured, str, Callable[[], float]]]:
        """Progress label -> (where the times go, which list, the timed call)."""
        tasks: dict[str, tuple[_Measured, str, Callable[[], float]]] = {}
        for c in self.contenders:
            if c.error is not None:
                continue
            m = self.measured[c.label]
            tasks[f"{c.label}: prefill"] = (m, "prefill", lambda c=c: self._timed_prefill(c))
            tasks[f"{c.label}: generate"] = (m, "generate", lambda c=c: self._timed_generate(c))
            if m.ideal is not None:
                ideal = m.ideal
                tasks[f"{c.label}: ideal prefill"] = (m, "ideal_prefill", lambda i=ideal: timed(i.prefill, self.device))
                tasks[f"{c.label}: ideal generate"] = (
                    m, "ideal_generate", lambda i=ideal: timed(lambda: i.generate(self.new_tokens), self.device))
        return tasks

    def _measure_memory(self, c: Contender, step: Callable[[str], None]) -> None:
        m = self.measured[c.label]
        for what, call in (("prefill", self._prefill), ("generate", self._generate)):
            step(f"{c.label}: peak memory of {what}")
            if c.method is None:
                value = peak_bytes(call, self.device)
            else:
                with apply(self.model, c.method, registry=self.registry):
                    value = peak_bytes(call, self.device)
            if what == "prefill":
                m.peak_prefill = value
            else:
                m.peak_generate = value

    def run(self, step: Callable[[str], None] = lambda label: None) -> dict[str, Any]:
        """Measure every contender; ``step(label)`` is called before each step (progress)."""
        with torch.no_grad():
            for c in self.contenders:
                if c.error is None:
                    step(f"{c.label}: warm-up and checks")
                    self._warm_up(c)
            # Prefills and generates are timed in separate sets of rounds: the prefills that are
            # compared sit seconds apart instead of being separated by several generate calls.
            for kind in ("prefill", "generate"):
                tasks = {label: task for label, task in self._tasks().items() if task[1].endswith(kind)}
                measured = rounds({label: call for label, (_, _, call) in tasks.items()}, self.repeats, step)
                for label, (m, attribute, _) in tasks.items():
                    setattr(m, attribute, measured[label])
            if self.memory:
                for c in self.contenders:
                    if c.error is None:
                        self._measure_memory(c, step)
        return self._result()

    # ---------------------------------------------------------------- result

    def _result(self) -> dict[str, Any]:
        text_config = self.model.config.get_text_config()
        input_ids = self.inputs["input_ids"]
        mask = self.inputs.get("attention_mask")
        real_tokens = int(mask.sum()) if mask is not None else int(input_ids.shape[1])
        visual_tokens = self.adapter.count_visual_tokens(self.inputs)  # positions that always stay count as text
        text_tokens = real_tokens - visual_tokens
        num_layers = self.adapter.num_layers
        kv_dtype = next(self.adapter.decoder_layers()[0].parameters()).dtype
        base = self.measured["unreduced"]
        full_tokens = [real_tokens] * num_layers
        base_flops = prefill_flops(text_config, full_tokens)

        rows = []
        for c in self.contenders:
            m = self.measured[c.label]
            row: dict[str, Any] = {
                "method": c.name, "budget": c.budget, "budget_value": c.budget_value,
                "options": None if c.method is None else c.method.model_dump(mode="json"),
                "stage1_only": c.stage1_only, "error": c.error,
            }
            if c.error is not None:
                rows.append(row)
                continue
            layer_tokens = full_tokens if m.report is None else tokens_per_layer(m.report, text_tokens)
            per_layer = [t - text_tokens for t in layer_tokens]
            flops = prefill_flops(text_config, layer_tokens)
            saved = [b - t for b, t in zip(base.prefill, m.prefill)]
            shares = [(sel + gate) / s for sel, gate, s in zip(m.selection, m.gating, saved) if s > 0]
            row.update({
                "visual_tokens_input": visual_tokens,
                "visual_tokens_per_layer": per_layer,
                "equivalent_visual_tokens": sum(per_layer) / len(per_layer),
                "prefill_seconds": _spread(m.prefill),
                "generate_seconds": _spread(m.generate),
                "prefill_speedup": _spread([b / t for b, t in zip(base.prefill, m.prefill)]),
                "generate_speedup": _spread([b / t for b, t in zip(base.generate, m.generate)]),
                "ideal_prefill_seconds": _spread(m.ideal_prefill),
                "ideal_generate_seconds": _spread(m.ideal_generate),
                "ideal_prefill_speedup": _spread([b / t for b, t in zip(base.prefill, m.ideal_prefill)]),
                "prefill_vs_ideal": _spread([t / i for t, i in zip(m.prefill, m.ideal_prefill)]),
                "generate_vs_ideal": _spread([t / i for t, i in zip(m.generate, m.ideal_generate)]),
                "ideal_logits_max_abs_diff": m.ideal_logits_diff,
                "ideal_same_tokens": m.ideal_same_tokens,
                "ideal_note": m.ideal_note if c.method is not None else "the unreduced model is its own ideal",
                "selection_seconds": _spread(m.selection),
                "gating_seconds": _spread(m.gating),
                "overhead_share_of_saved": _spread(shares),
                "prefill_flops": flops,
                "prefill_flops_ratio": flops / base_flops,
                "kv_cache_bytes": kv_cache_bytes(text_config, layer_tokens, kv_dtype),
                "kv_cache_bytes_measured": m.kv_measured,
                "peak_prefill_bytes": m.peak_prefill,
                "peak_generate_bytes": m.peak_generate,
            })
            rows.append(row)
        return {
            "schema": SCHEMA,
            "machine": machine_info(self.device),
            "model": {
                "name": self.model_name, "class": type(self.model).__name__, "family": self.adapter.family,
                "num_layers": num_layers,
                "language_model_parameters": sum(p.numel() for p in self.adapter.language_model().parameters()),
                "dtype": str(kv_dtype).removeprefix("torch."),
                "attn_implementation": getattr(text_config, compat.ATTENTION_IMPLEMENTATION, None),
                "device": str(self.device),
            },
            "settings": {
                "repeats": self.repeats, "new_tokens": self.new_tokens, "prompt_tokens": real_tokens,
                "text_tokens": text_tokens, "visual_tokens": visual_tokens,
                "memory": MEMORY_NOTE["cuda" if self.device.type == "cuda" else "cpu"] if self.memory else None,
            },
            "rows": rows,
        }


def _spread(values: list[float]) -> dict[str, Any] | None:
    return Spread.of(values).to_dict() if values else None


def machine_info(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "cpu": _cpu_name(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__,
        "transformers": importlib.metadata.version("transformers"),
        "platform": platform.platform(terse=True), "gpu": None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------- text output


def _ratio(value: dict[str, Any] | None, suffix: str = "x") -> str:
    return "-" if value is None else Spread(**value).format(".2f", suffix)


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _cells(row: dict[str, Any]) -> list[str]:
    per_layer = row["visual_tokens_per_layer"]
    share = row["overhead_share_of_saved"]
    return [
        row["method"], row["budget"],
        f"{row['visual_tokens_input']}/{per_layer[0]}/{per_layer[-1]}",
        f"{row['prefill_seconds']['median']:.3f}",
        _ratio(row["prefill_speedup"]), _ratio(row["prefill_vs_ideal"]),
        _ratio(row["generate_speedup"]), _ratio(row["generate_vs_ideal"]),
        "-" if share is None else f"{100 * share['median']:.2g}%",
        f"{row['prefill_flops'] / 1e9:.1f}", _mib(row["kv_cache_bytes"]),
        _mib(row["peak_prefill_bytes"]), _mib(row["peak_generate_bytes"]),
    ]


_HEADERS = ["method", "budget", "visual in/LLM/last", "prefill s", "prefill speed-up", "prefill vs ideal",
            "generate speed-up", "generate vs ideal", "overhead/saved", "prefill GFLOPs", "KV MiB",
            "peak MiB prefill", "peak MiB generate"]


def _notes(result: dict[str, Any]) -> list[str]:
    s, m = result["settings"], result["model"]
    notes = [
        f"{m['name']}: {m['class']} ({m['num_layers']} decoder layers, {m['language_model_parameters'] / 1e6:.1f}M language-model "
        f"parameters), {m['dtype']}, {m['attn_implementation']}, {m['device']}; {s['visual_tokens']} visual + "
        f"{s['text_tokens']} text tokens; generate = {s['new_tokens']} new tokens; interleaved rounds: {s['repeats']}.",
        "Ratios: median [interquartile range] of per-round ratios. speed-up = t(unreduced) / t; "
        "vs ideal = t / t(ideal), the same model fed only the kept tokens (stage-I-only methods).",
        "overhead/saved: selection + gating time as a share of the prefill time saved.",
    ]
    if s["memory"]:
        notes.append(f"peak memory: {s['memory']}.")
    notes += [f"failed: {row['method']} {row['budget']}: {row['error']}" for row in result["rows"] if row["error"]]
    for row in result["rows"]:
        if row.get("ideal_same_tokens") is False or (row.get("ideal_logits_max_abs_diff") or 0) > 1e-3:
            notes.append(f"check: {row['method']} {row['budget']} differs from its ideal (logits max abs diff "
                         f"{row['ideal_logits_max_abs_diff']:.3g}, same tokens: {row['ideal_same_tokens']}).")
    return notes


def format_table(result: dict[str, Any], table: Callable[[list[str], list[list[str]], set[int]], str]) -> str:
    """The terminal table of the measured rows, drawn by ``table(headers, rows, right_aligned_columns)``,
    and its notes (failed rows among them)."""
    body = table(_HEADERS, [_cells(r) for r in result["rows"] if r["error"] is None], set(range(2, len(_HEADERS))))
    return body + "\n\n" + "\n".join(_notes(result))


def format_markdown(result: dict[str, Any]) -> str:
    """A Markdown table and its notes, for the documentation."""
    lines = ["| " + " | ".join(_HEADERS) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(_HEADERS) - 2)) + "|"]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in result["rows"] if row["error"] is None]
    mach = result["machine"]
    where = mach["gpu"] or f"{mach['cpu']}, {mach['cpus']} CPUs, torch threads: {mach['torch_threads']}"
    lines += ["", f"Machine: {where}; Python {mach['python']}, torch {mach['torch']}, "
                  f"transformers {mach['transformers']}.", ""]
    lines += [f"- {note}" for note in _notes(result)]
    return "\n".join(lines)
