"""``tokred.eval.evaluate``: accuracy and speed of methods x budgets on one model and one task.

Every setting (the unreduced model first, then each method at each budget) answers every item of
the task with the same prompts, the same batches and the same scoring, so the figures differ only
by the reduction:

* **accuracy**: share of items answered right (:mod:`tokred.eval._scoring`);
* **retention**: accuracy as a share of the unreduced model's on the same items (the field's "% of
  the unpruned score");
* **agreement**: share of items where the setting's answer equals the unreduced model's, right or
  wrong (a method can keep accuracy while changing many answers);
* **visual tokens**: per item, the visual tokens the model produced, those entering the language
  model, and the layer-averaged equivalent (``RunReport.equivalent_visual_tokens``);
* **prefill speed-up**: the unreduced prefill time over the setting's, measured on the same batch
  in interleaved rounds in this process, median and interquartile range (``tokred.bench``'s
  method: ratios within a round, never a bare time).

Predictions are appended to ``output`` (JSONL) as each batch finishes; a run given the same
``output`` again skips what is already there, so a long evaluation can be interrupted and resumed.
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from ..adapters.base import VisionProbes
from ..bench._timing import Spread, rounds, timed
from ..errors import OptionsError, TokredError
from ..method import Method
from ..registry import Registry, default_registry
from ..runtime import Run, apply
from ._inputs import chat_prompt, encode
from ._scoring import normalise, score_continuations
from ._task import Task, TaskItem

__all__ = ["Setting", "Prediction", "SettingResult", "EvalResult", "evaluate", "settings_for", "Progress"]

#: ``progress(done, total, what)`` is called as work completes (``total`` counts items x settings,
#: plus one step per timed prefill).
Progress = Callable[[int, int, str], None]

_SCORINGS = ("loglikelihood", "generate")


@dataclass(frozen=True)
class Setting:
    """One row of an evaluation: the unreduced model (``method is None``) or a method with options.

    Attributes:
        label: what tables show, e.g. ``"todre keep_ratio=0.1"``.
        method_name: the registered name, or ``"unreduced"``.
        budget: ``"keep_ratio=0.1"``, ``"keep=64"``, ``"method defaults"`` or ``"all"``.
        method: the created method, or ``None`` for the unreduced model.
    """

    label: str
    method_name: str
    budget: str
    method: Method | None = field(default=None, compare=False)

    @property
    def key(self) -> str:
        """Identifies the setting in a predictions file: its name and every option."""
        options = {} if self.method is None else self.method.model_dump(mode="json")
        return f"{self.method_name}:{json.dumps(options, sort_keys=True)}"


def _budget_text(budget: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in budget.items()) or "method defaults"


def settings_for(methods: Sequence[str | Method], budgets: Sequence[Mapping[str, Any]], *,
                 registry: Registry | None = None) -> list[Setting]:
    """The unreduced setting, then every method at every budget (``{"keep_ratio": 0.1}``,
    ``{"keep": 64}``; ``{}`` for the method's defaults).

    A method that takes no ``keep`` / ``keep_ratio`` (a budget-less gate) runs once with its
    defaults, labelled ``"method defaults"``. Options are validated here, before any model call."""
    registry = registry or default_registry()
    settings = [Setting("unreduced", "unreduced", "all")]
    seen: set[str] = set()
    for method in methods:
        if isinstance(method, Method):
            name = _registered_name(registry, method)
            setting = Setting(f"{name} ({_options_text(method)})", name, _options_text(method), method)
            if setting.key not in seen:
                seen.add(setting.key)
                settings.append(setting)
            continue
        fields = registry.entry("method", method).obj.model_fields
        for budget in budgets or [{}]:
            if any(key not in fields for key in budget):
                budget = {}  # this method has no such budget option: its own defaults, once
            created = registry.create(method, **budget)
            setting = Setting(f"{method} {_budget_text(budget)}" if budget else f"{method} (method defaults)",
                              method, _budget_text(budget), created)
            if setting.key not in seen:
                seen.add(setting.key)
                settings.append(setting)
    return settings


def _registered_name(registry: Registry, method: Method) -> str:
    try:
        return registry.name_of(method)
    except OptionsError:
        return type(method).__name__


def _options_text(method: Method) -> str:
    changed = method.model_dump(exclude_defaults=True)
    return ", ".join(f"{k}={v}" for k, v in changed.items()) or "defaults"


@dataclass
class Prediction:
    """One item answered in one setting (a line of the predictions file)."""

    setting: str
    item: str
    kind: str
    prediction: str
    correct: bool
    valid: bool
    visual_tokens: int
    entering: int
    equivalent: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class SettingResult:
    """The figures of one setting over the task's items.

    Attributes:
        setting: the setting.
        n: items answered.
        accuracy: share answered right.
        accuracy_by_kind: the same per item kind.
        retention: ``accuracy`` over the unreduced model's accuracy (``None`` when that is 0).
        agreement: share of items answered as the unreduced model answered them.
        invalid: share of multiple-choice items answered by generation with text matching no choice.
        visual_tokens: mean visual tokens per item the model produced.
        entering: mean visual tokens per item entering the language model (after stage I).
        equivalent: mean layer-averaged visual tokens per item.
        prefill_speedup: unreduced prefill time over this setting's, per round, or ``None``.
        seconds_per_item: wall time of the accuracy pass over the items, per item.
        error: why the setting could not run, else ``None``.
    """

    setting: Setting
    n: int = 0
    accuracy: float = math.nan
    accuracy_by_kind: dict[str, float] = field(default_factory=dict)
    retention: float | None = None
    agreement: float = math.nan
    invalid: float = 0.0
    visual_tokens: float = math.nan
    entering: float = math.nan
    equivalent: float = math.nan
    prefill_speedup: Spread | None = None
    seconds_per_item: float = math.nan
    error: str | None = None

    @property
    def kept_share(self) -> float:
        """``equivalent / visual_tokens``: the share of the visual-token work left."""
        return self.equivalent / self.visual_tokens if self.visual_tokens else math.nan

    def to_dict(self) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if k not in ("setting", "prefill_speedup")}
        data.update(label=self.setting.label, method=self.setting.method_name, budget=self.setting.budget,
                    kept_share=self.kept_share,
                    prefill_speedup=None if self.prefill_speedup is None else self.prefill_speedup.to_dict())
        return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in data.items()}


@dataclass
class EvalResult:
    """What :func:`evaluate` measured: one :class:`SettingResult` per setting, the unreduced first."""

    task: str
    task_description: str
    model: str
    scoring: str
    batch_size: int
    results: list[SettingResult]
    predictions: list[Prediction]

    @property
    def reference(self) -> SettingResult:
        return self.results[0]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": "tokred.eval/1", "task": self.task, "task_description": self.task_description,
            "model": self.model, "multiple_choice_scoring": self.scoring, "batch_size": self.batch_size,
            "items": self.reference.n, "results": [r.to_dict() for r in self.results],
        }

    def rows(self) -> list[list[str]]:
        """Table cells: setting, accuracy, retention, agreement, visual tokens in / entering /
        equivalent, prefill speed-up."""
        cells = []
        for r in self.results:
            if r.error is not None:
                cells.append([r.setting.label, "error", "", "", "", "", "", r.error[:60]])
                continue
            cells.append([
                r.setting.label, f"{100 * r.accuracy:.1f}%",
                "" if r.retention is None else f"{100 * r.retention:.1f}%",
                f"{100 * r.agreement:.1f}%", f"{r.visual_tokens:.0f}", f"{r.entering:.0f}", f"{r.equivalent:.1f}",
                "1.00x" if r is self.reference else ("" if r.prefill_speedup is None else r.prefill_speedup.format(".2f", "x")),
            ])
        return cells

    HEADERS = ["setting", "accuracy", "retention", "agreement", "visual tokens", "entering the LLM", "equivalent",
               "prefill speed-up"]


# ------------------------------------------------------------------------------------ prompts


def _prompt(processor: Any, item: TaskItem) -> str:
    return chat_prompt(processor, item.question, len(item.images))


def _choice_text(prompt: str, choice: str, delimiter: str | None) -> str:
    if delimiter is not None:
        return delimiter + choice
    return choice if not prompt or prompt[-1].isspace() else " " + choice


# ------------------------------------------------------------------------------- the runner


@dataclass
class _Context:
    model: nn.Module
    processor: Any
    registry: Registry
    adapter_options: Mapping[str, Any] | None
    scoring: str
    max_new_tokens: int
    choice_delimiter: str | None

    @contextlib.contextmanager
    def run(self, setting: Setting) -> Iterator[Run | None]:
        if setting.method is None:
            yield None
            return
        with apply(self.model, setting.method, registry=self.registry, adapter_options=self.adapter_options) as run:
            yield run


def _visual_counts(context: _Context, inputs: Mapping[str, torch.Tensor], run: Run | None) -> list[tuple[int, int, float]]:
    """Per row: visual tokens produced, entering the language model, layer-averaged equivalent."""
    if run is not None:
        report = run.report
        entering = report.visual_tokens_per_layer[0] if report.visual_tokens_per_layer else report.visual_tokens_input
        return [(n, e, q) for n, e, q in zip(report.visual_tokens_input, entering, report.equivalent_visual_tokens)]
    adapter = context.registry.adapter_for(context.model, context.adapter_options)
    counts = [0] * inputs["input_ids"].shape[0]
    for span in adapter.image_spans(inputs["input_ids"], VisionProbes(), inputs):
        counts[span.sample] += int(span.positions.numel())
    return [(n, n, float(n)) for n in counts]


def _answer_by_generation(context: _Context, setting: Setting, items: Sequence[TaskItem]) -> list[tuple[str, tuple[int, int, float]]]:
    prompts = [_prompt(context.processor, item) for item in items]
    inputs = encode(context.processor, context.model, prompts, [im for item in items for im in item.open_images()])
    with context.run(setting) as run, torch.no_grad():
        generated = context.model.generate(**inputs, max_new_tokens=context.max_new_tokens, do_sample=False)
        counts = _visual_counts(context, inputs, run)
    texts = context.processor.batch_decode(generated[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return list(zip(texts, counts))


def _answer_by_likelihood(context: _Context, setting: Setting, items: Sequence[TaskItem]) -> list[tuple[str, tuple[int, int, float]]]:
    """The highest-scoring choice of every item (:func:`score_continuations`: decided on the prompt)."""
    prompts = [_prompt(context.processor, item) for item in items]
    images = [item.open_images() for item in items]
    continuations = [[_choice_text(p, c, context.choice_delimiter) for c in item.choices or ()] for p, item in zip(prompts, items)]
    with context.run(setting) as run:
        scores = score_continuations(context.model, context.processor, prompts, images, continuations, run)
        if run is not None:  # the frozen rows replay their prompt's decisions: the first row of each tells its counts
            first_rows = [sum(len(c) for c in continuations[:i]) for i in range(len(items))]
            all_counts = _visual_counts(context, {}, run)
            # One-token choices are scored from the prompts' prefill alone (one row per item; every
            # item has at least two choices, so the two cases cannot be confused).
            counts = all_counts if len(all_counts) == len(items) else [all_counts[row] for row in first_rows]
        else:
            counts = _visual_counts(context, encode(context.processor, context.model, prompts,
                                                    [im for ims in images for im in ims]), None)
    answers: list[tuple[str, tuple[int, int, float]]] = []
    for item, mine, count in zip(items, scores, counts):
        assert item.choices is not None
        best = max(range(len(mine)), key=lambda j: (mine[j].logprob, -j))      # ties: the earlier choice
        answers.append((item.choices[best], count))
    return answers


def _judge(item: TaskItem, text: str, scoring: str) -> tuple[str, bool, bool]:
    """``(prediction, correct, valid)`` of an answer text."""
    prediction = normalise(text)
    if item.choices is None:
        return prediction, prediction == normalise(item.answer), True
    if scoring == "loglikelihood":
        return text, text == item.answer, True
    by_normal = {normalise(c): c for c in item.choices}
    chosen = by_normal.get(prediction)
    return (chosen if chosen is not None else prediction), chosen == item.answer, chosen is not None


def _batches(items: Sequence[TaskItem], size: int, scoring: str) -> Iterator[tuple[str, list[TaskItem]]]:
    """The items grouped by how they are answered (likelihood or generation) and whether they have
    images, in task order within a group, at most ``size`` per batch."""
    groups: dict[tuple[str, bool], list[TaskItem]] = {}
    for item in items:
        mode = "loglikelihood" if item.choices is not None and scoring == "loglikelihood" else "generate"
        groups.setdefault((mode, bool(item.images)), []).append(item)
    for (mode, _), members in groups.items():
        for start in range(0, len(members), size):
            yield mode, members[start:start + size]


def _read_done(output: Path | None, settings: Sequence[Setting], task: Task) -> dict[tuple[str, str], Prediction]:
    if output is None or not output.exists():
        return {}
    keys = {s.key for s in settings}
    ids = {item.id for item in task.items}
    done: dict[tuple[str, str], Prediction] = {}
    for number, line in enumerate(output.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            prediction = Prediction(**{k: v for k, v in record.items() if k != "setting_key"})
            key = record["setting_key"]
        except (json.JSONDecodeError, TypeError, KeyError) as exc:
            raise OptionsError(f"{output}:{number}: not a tokred eval prediction ({exc}); use another --output") from None
        if key in keys and prediction.item in ids:
            done[(key, prediction.item)] = prediction
    return done


def _summarise(setting: Setting, predictions: list[Prediction], task: Task, reference: dict[str, Prediction] | None,
               seconds: float) -> SettingResult:
    n = len(predictions)
    result = SettingResult(setting, n=n, seconds_per_item=seconds / n if n else math.nan)
    if not n:
        return result
    result.accuracy = sum(p.correct for p in predictions) / n
    for kind in task.kinds:
        mine = [p for p in predictions if p.kind == kind]
        if mine and kind:
            result.accuracy_by_kind[kind] = sum(p.correct for p in mine) / len(mine)
    result.invalid = sum(not p.valid for p in predictions) / n
    result.visual_tokens = statistics.fmean(p.visual_tokens for p in predictions)
    result.entering = statistics.fmean(p.entering for p in predictions)
    result.equivalent = statistics.fmean(p.equivalent for p in predictions)
    if reference is not None:
        result.agreement = sum(p.prediction == reference[p.item].prediction for p in predictions) / n
    else:
        result.agreement = 1.0
    return result


def evaluate(
    model: nn.Module,
    processor: Any,
    task: Task,
    methods: Sequence[str | Method] = (),
    budgets: Sequence[Mapping[str, Any]] = ({},),
    *,
    registry: Registry | None = None,
    batch_size: int = 8,
    multiple_choice: str = "loglikelihood",
    max_new_tokens: int = 16,
    timing_rounds: int = 3,
    choice_delimiter: str | None = None,
    output: str | Path | None = None,
    progress: Progress | None = None,
    model_name: str = "",
    adapter_options: Mapping[str, Any] | None = None,
) -> EvalResult:
    """Answer every item of ``task`` unreduced and with every method at every budget.

    Args:
        model: a ``transformers`` vision-language model handled by a registered adapter.
        processor: its processor (chat template, image processor, tokenizer); batches are
            left-padded whatever its padding side.
        task: the items (:func:`tokred.eval.load_task`, or the synthetic proxy's
            :func:`tokred.eval.proxy.proxy_task`).
        methods: registered names (each created at every budget) or created methods.
        budgets: e.g. ``[{"keep_ratio": 0.25}, {"keep_ratio": 0.1}]``; ``{}`` for defaults.
        batch_size: items per batch (multiple-choice items scored by likelihood add one row per
            choice). Results do not depend on it (tested).
        multiple_choice: ``"loglikelihood"`` (score each choice's tokens, lm-eval's ``acc``) or
            ``"generate"`` (generate and match the text to a choice).
        max_new_tokens: generation length for answers that are generated.
        timing_rounds: interleaved rounds of timed prefills (on the first batch) per setting; 0
            skips timing.
        choice_delimiter: text between prompt and choice when scoring by likelihood; default: a
            space unless the prompt ends with whitespace.
        output: a JSONL file that receives every prediction as its batch finishes; predictions
            already in it (same setting and item) are reused, not recomputed.
        progress: ``progress(done, total, what)`` after every batch and timed prefill.
        model_name: shown in reports.
        adapter_options: passed to :func:`tokred.apply`.

    Returns:
        An :class:`EvalResult`, the unreduced setting first.
    """
    if multiple_choice not in _SCORINGS:
        raise OptionsError(f"multiple_choice must be one of {_SCORINGS}, got {multiple_choice!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise OptionsError(f"batch_size must be a positive integer, got {batch_size!r}")
    registry = registry or default_registry()
    settings = settings_for(methods, budgets, registry=registry)
    for setting in settings[1:]:  # every budget against the model before the first item: fail fast
        apply(model, setting.method, registry=registry, adapter_options=adapter_options)  # type: ignore[arg-type]
    context = _Context(model, processor, registry, adapter_options, multiple_choice, max_new_tokens, choice_delimiter)
    output_path = Path(output) if output is not None else None
    done = _read_done(output_path, settings, task)
    timed_steps = len(settings) * timing_rounds if timing_rounds else 0
    total = len(settings) * len(task) + timed_steps
    completed = 0
    report = progress or (lambda done, total, what: None)

    sink = output_path.open("a", encoding="utf-8") if output_path is not None else None
    results: list[SettingResult] = []
    all_predictions: list[Prediction] = []
    reference: dict[str, Prediction] | None = None
    try:
        for setting in settings:
            predictions: list[Prediction] = []
            start, completed_before = time.perf_counter(), completed
            error = None
            for scoring, batch in _batches(task.items, batch_size, multiple_choice):
                cached = [done.get((setting.key, item.id)) for item in batch]
                if all(p is not None for p in cached):
                    predictions.extend(p for p in cached if p is not None)
                else:
                    try:
                        answer = _answer_by_likelihood if scoring == "loglikelihood" else _answer_by_generation
                        answers = answer(context, setting, batch)
                    except TokredError as exc:  # one failing setting must not hide the others
                        error = f"{type(exc).__name__}: {' '.join(str(exc).split())}"
                        break
                    for item, (text, (visual, entering, equivalent)) in zip(batch, answers):
                        shown, correct, valid = _judge(item, text, multiple_choice)
                        prediction = Prediction(setting.label, item.id, item.kind, shown, correct, valid,
                                                visual, entering, equivalent)
                        predictions.append(prediction)
                        if sink is not None:
                            sink.write(json.dumps({"setting_key": setting.key, **prediction.to_dict()}) + "\n")
                    if sink is not None:
                        sink.flush()
                completed += len(batch)
                report(completed, total, setting.label)
            seconds = time.perf_counter() - start
            if error is not None:
                if setting.method is None:
                    raise TokredError(f"the unreduced model failed on this task: {error}")
                results.append(SettingResult(setting, error=error))
                completed = completed_before + len(task)
                report(completed, total, setting.label)
                continue
            result = _summarise(setting, predictions, task, reference, seconds)
            if reference is None:
                reference = {p.item: p for p in predictions}
            results.append(result)
            all_predictions.extend(predictions)
    finally:
        if sink is not None:
            sink.close()

    base = results[0].accuracy
    for result in results:
        if result.error is None:
            result.retention = result.accuracy / base if base else None
    if timing_rounds:
        timed_done = [completed]

        def timed_step(what: str) -> None:
            timed_done[0] += 1
            report(min(timed_done[0], total), total, f"timing {what}")

        _time_prefills(context, task, [r for r in results if r.error is None], batch_size, timing_rounds, timed_step)
    return EvalResult(task.name, task.description, model_name or type(model).__name__, multiple_choice, batch_size,
                      results, all_predictions)


def _time_prefills(context: _Context, task: Task, results: list[SettingResult], batch_size: int, repeats: int,
                   step: Callable[[str], None]) -> None:
    """Prefill of the first batch's prompts per setting, interleaved rounds; speed-up per round."""
    items = list(task.items[:batch_size])
    inputs = encode(context.processor, context.model, [_prompt(context.processor, i) for i in items],
                    [im for item in items for im in item.open_images()])
    device = next(context.model.parameters()).device

    def prefill(setting: Setting) -> Callable[[], float]:
        def call() -> float:
            with context.run(setting), torch.no_grad():
                return timed(lambda: context.model(**inputs, logits_to_keep=1), device)
        return call

    with torch.no_grad():
        for result in results:  # untimed warm-up
            prefill(result.setting)()
    times = rounds({r.setting.label: prefill(r.setting) for r in results}, repeats, step)
    reference = times[results[0].setting.label]
    for result in results[1:]:
        result.prefill_speedup = Spread.of([ref / mine for ref, mine in zip(reference, times[result.setting.label])])

