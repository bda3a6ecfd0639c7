"""Applying a Schedule to a model: the scoped, reversible run.

``tokred.apply(model, method)`` returns a :class:`Run`; entering it installs forward (pre-)hooks on
the top-level model, the multimodal model, its language model and each decoder layer (plus
attention observers where a gate or selector needs attention), and leaving it removes every one of
them, also on exceptions. The hooks share one :class:`~._state.RunState` and hand each phase to the
module that holds it:

=========================================  =====================================================
hook                                       phase module
=========================================  =====================================================
top-level model (pre and post)             :mod:`._labels`: labels scored on the survivors
multimodal model (pre)                     :mod:`._calls`: prefill, decoding step or passthrough
language model (pre), prefill              :mod:`._prefill`: stage I, the packed sequence
language model (pre), decoding step        :mod:`._decode`: key masks and positions
decoder layer (pre), prefill               :mod:`._prefill` and :mod:`._gating`: gates, layer inputs
decoder layer (pre), decoding step         :mod:`._decode`: the layer group's 4-D mask
language model (post)                      :mod:`._calls`: the cache filled, the output layout
=========================================  =====================================================

What to keep is decided by the engine-neutral :mod:`tokred.decisions`; :mod:`._frozen` records the
decisions of the latest prefill and replays them while the run is frozen.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from ..adapters.base import Adapter, VisionProbes
from ..decisions import Describe, check_image_budgets
from ..errors import RuntimeStateError, ScheduleError
from ..method import Method
from ..report import RunReport
from ..schedule import Schedule
from ._attention import observe_attention
from ._calls import classify_call, finish_call
from ._decode import decode_inputs, decode_layer_inputs
from ._gating import observed_layers, stash_for
from ._labels import score_labels, take_labels
from ._prefill import pack_prefill, prefill_layer
from ._state import RunState

__all__ = ["Run", "apply"]

_active_runs: "weakref.WeakKeyDictionary[nn.Module, Run]" = weakref.WeakKeyDictionary()


def apply(model: nn.Module, method: Method | Schedule, *, registry: Any = None,
          adapter_options: Mapping[str, Any] | None = None) -> Run:
    """Prepare a scoped application of ``method`` to ``model``; use it as a context manager.

    Everything that can be checked without data is checked here, before any forward pass: the
    model class has an adapter, its attention implementation is supported, gate layers exist, the
    selector's required inputs are available, and budgets fit the model's fixed number of visual
    tokens per image (when its config fixes one).

    Args:
        model: a ``transformers`` vision-language model handled by a registered adapter.
        method: a :class:`~tokred.Method` (``tokred.create(...)``) or a hand-built
            :class:`~tokred.Schedule`.
        registry: the registry to find the adapter in; default: :func:`tokred.default_registry`.
        adapter_options: options of the model's adapter, e.g. ``{"newline_tokens": "prune"}`` for
            LLaVA-NeXT (see the adapter's documentation); unknown ones raise ``OptionsError``.

    Returns:
        A :class:`Run`. ``with apply(model, method) as run:`` installs the hooks; leaving the block
        removes them. ``run.report`` describes the latest prefill.

    Warns:
        UntestedReleaseWarning: once per process, where the installed ``transformers`` lies outside
            :data:`tokred.compat.TESTED_TRANSFORMERS` (installed on purpose: pip never resolves one).
    """
    from ..compat import warn_if_untested
    from ..registry import default_registry

    warn_if_untested(stacklevel=2)  # once per process, naming the release and the tested range
    registry = registry or default_registry()
    if isinstance(method, Method):
        schedule, name = method.schedule(), _method_name(registry, method)
    elif isinstance(method, Schedule):
        schedule, name = method, "schedule"
    else:
        raise TypeError(f"apply() takes a tokred Method or Schedule, got {type(method).__name__}")
    adapter = registry.adapter_for(model, adapter_options)
    return Run(model, adapter, schedule, name, describe=_describer(registry))


def _method_name(registry: Any, method: Method) -> str:
    try:
        return registry.name_of(method)
    except Exception:  # an unregistered Method subclass still runs; it just has no registry name
        return type(method).__name__


def _describer(registry: Any) -> Describe:
    """How a run names components in error messages: the registry's description (registered name,
    plugin, distribution) where it has one, else the class name."""
    describe = getattr(registry, "describe", None)
    if describe is None:
        return lambda component: type(component).__name__
    return describe  # type: ignore[no-any-return]


class Run:
    """A Schedule applied to one model; a context manager. Create it with :func:`tokred.apply`.

    Attributes:
        model: the model.
        adapter: the adapter serving it.
        schedule: the schedule being applied.
        method_name: the registered method name (``"schedule"`` for hand-built schedules).
        gate_layers: the gates' resolved decoder layers.
    """

    def __init__(self, model: nn.Module, adapter: Adapter, schedule: Schedule, method_name: str, *,
                 describe: Describe | None = None) -> None:
        self.model = model
        self.adapter = adapter
        self.schedule = schedule
        self.method_name = method_name
        self.gate_layers: list[int] = schedule.gate_layers(adapter.num_layers)
        self._check_static()
        self._removers: list[Callable[[], None]] = []
        self._describe: Describe = describe or (lambda component: type(component).__name__)
        # One RunState per thread: the hooks fire in the thread that called the model, so two
        # threads generating on one applied model each see only their own forward's state.
        self._threads = threading.local()
        self._states_lock = threading.Lock()
        self._states: list[weakref.ref[RunState]] = []
        self._latest: RunState | None = None
        self._probes = _ThreadProbes(self)

    @property
    def _state(self) -> RunState:
        """The calling thread's state, created on its first call into this run."""
        state: RunState | None = getattr(self._threads, "state", None)
        if state is None:
            state = RunState(self.adapter, self.schedule, self.gate_layers, self.method_name, self._describe,
                             RunReport(self.adapter.family, self.method_name, self.adapter.num_layers))
            self._threads.state = state
            with self._states_lock:
                self._states = [ref for ref in self._states if ref() is not None] + [weakref.ref(state)]
        return state

    def _reporting_state(self) -> RunState:
        """Whose prefill ``report``, ``output_positions`` and ``frozen`` describe: the calling
        thread's latest, else the latest of any thread (``generate`` run in a worker thread, as a
        streamer does, and read from the main thread)."""
        own: RunState | None = getattr(self._threads, "state", None)
        if own is not None and own.report.prefills:
            return own
        latest = self._latest
        return latest if latest is not None else self._state

    # ------------------------------------------------------------------ public

    @property
    def report(self) -> RunReport:
        """Measurements of the latest prefill (see :class:`~tokred.report.RunReport`): the calling
        thread's, or, in a thread that has not called the model inside this run, the latest of any
        thread."""
        return self._reporting_state().report

    @property
    def active(self) -> bool:
        """Whether the hooks are installed."""
        return bool(self._removers)

    @property
    def output_positions(self) -> torch.Tensor | None:
        """``[B, L']`` long, for the latest prefill: the input position (column of ``input_ids``)
        that each position of the language model's output (logits, hidden states) holds; ``-1``
        for padding. The output is shorter than the input when visual tokens were dropped, and
        left-packed: text after the images keeps its order and ends every row. ``None`` before the
        first prefill.

        This is how reduced logits are read: the logits of input position ``p`` of row ``b`` are
        ``logits[b, j]`` where ``output_positions[b, j] == p`` (text positions are never dropped).
        A forward with ``labels`` uses the same mapping to score the loss on the survivors.
        Per thread, as :attr:`report`."""
        return self._reporting_state().output_positions

    @contextlib.contextmanager
    def frozen(self, rows: Sequence[int] | None = None) -> Iterator[Run]:
        """Within this block, prefills reuse the decisions of the latest prefill instead of deciding
        again: the same images keep the same tokens and the same gates keep the same visual tokens.

        This makes a cache-free recomputation (``generate(use_cache=False)``) see exactly the reduced
        sequence the cached run saw, and lets text be scored after a decision made without it:
        decide on a prompt, then score several continuations of it (log-likelihood of answer
        choices) under the prompt's decisions. Decisions name visual tokens by image and index, not
        by position, so the frozen prefills may be longer or padded differently.

        Args:
            rows: for each row of the frozen prefills, the row of the deciding prefill whose
                decisions it replays (e.g. ``[0, 0, 0, 1, 1, 1]`` scores three continuations of
                each of two prompts); default: the same rows. Each replayed row must hold the same
                images (same token counts) as its source row.

        Freezing is per thread: it replays the calling thread's latest prefill (in a thread that has
        not called the model inside this run: the latest prefill of any thread) and affects only the
        calls of that thread.
        """
        state, source = self._state, self._reporting_state()
        if source.report.prefills == 0:
            raise RuntimeStateError("nothing to freeze: run a prefill inside this run first")
        if source is not state:
            state.decisions = source.decisions  # read only while frozen; a later decision replaces it
        if rows is not None and (isinstance(rows, (str, bytes)) or any(isinstance(r, bool) or int(r) != r or r < 0 for r in rows)):
            raise RuntimeStateError(f"rows must be row indices of the deciding prefill (non-negative ints), got {rows!r}")
        state.frozen = True
        state.frozen_rows = None if rows is None else [int(r) for r in rows]
        try:
            yield self
        finally:
            state.frozen = False
            state.frozen_rows = None

    def __enter__(self) -> Run:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def install(self) -> None:
        """Install every hook. Prefer ``with tokred.apply(...)``, which also removes them."""
        if self.model in _active_runs:
            raise RuntimeStateError(
                f"{type(self.model).__name__} already has an active tokred run; leave it before applying another"
            )
        _active_runs[self.model] = self
        try:
            self._install()
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        """Remove every hook this run installed (idempotent)."""
        while self._removers:
            self._removers.pop()()
        if _active_runs.get(self.model) is self:
            del _active_runs[self.model]
        with self._states_lock:
            states = [state for state in (ref() for ref in self._states) if state is not None]
        for state in states:
            state.prefill = None
            state.probes.clear()
            state.consumed_probes = None
            state.mode = "idle"

    # ------------------------------------------------------------- validation

    def _check_static(self) -> None:
        self.adapter.check_model_state()
        self.adapter.validate(self.gate_layers, schedule=self.schedule)
        for layer, stage in zip(self.gate_layers, self.schedule.gates):
            if stage.gate.attention_layer not in ("previous", "own"):
                raise ScheduleError(f"{type(stage.gate).__name__} at layer {layer}: attention_layer must be 'previous' or "
                                    f"'own', got {stage.gate.attention_layer!r}")
        stage = self.schedule.selector
        if stage is not None:
            missing = sorted(stage.selector.required_inputs() - self.adapter.available_inputs())
            if missing:
                raise ScheduleError(
                    f"{type(stage.selector).__name__} needs {', '.join(missing)}, which the {self.adapter.family} adapter "
                    f"cannot provide (it provides {sorted(self.adapter.available_inputs()) or 'none'})"
                )
        fixed = self.adapter.visual_tokens_per_image()
        if fixed is not None:
            check_image_budgets(self.schedule, self.gate_layers, fixed, f"this model has {fixed} visual tokens per image")

    # ----------------------------------------------------------------- install

    def _install(self) -> None:
        # Every hook looks the calling thread's state up when it fires (``self._state``), never a
        # state captured at install time: concurrent calls from several threads stay apart.
        adapter = self.adapter
        mm, lm, layers = adapter.multimodal_model(), adapter.language_model(), adapter.decoder_layers()
        if self.model is not mm:
            self._hook(self.model.register_forward_pre_hook(lambda m, a, k: take_labels(self._state, a, k),
                                                            with_kwargs=True))
            self._hook(self.model.register_forward_hook(lambda m, a, k, out: score_labels(self._state, self.model, out),
                                                        with_kwargs=True))
        self._hook(mm.register_forward_pre_hook(lambda m, a, k: classify_call(self._state, m, a, k), with_kwargs=True))
        self._hook(lm.register_forward_pre_hook(self._on_language_model, with_kwargs=True, prepend=True))
        self._hook(lm.register_forward_hook(self._after_language_model, with_kwargs=True))
        for index, layer in enumerate(layers):
            self._hook(layer.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True, prepend=True))
        sources = [stage.gate.attention_layer for stage in self.schedule.gates]
        for observed, served in observed_layers(self.gate_layers, sources).items():
            self._removers.append(observe_attention(adapter.self_attention(layers[observed]),
                                                    stash_for(lambda: self._state, served)))
        wanted = self.schedule.selector.selector.inputs if self.schedule.selector else frozenset()
        self._removers.extend(adapter.install_vision_probes(self._probes, wanted))  # type: ignore[arg-type]

    def _hook(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        self._removers.append(handle.remove)

    def _on_language_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = self._state
        if state.mode == "decode":
            assert state.cache is not None
            return decode_inputs(state.cache, self.adapter, state.caller_positions, args, kwargs)
        if state.mode != "prefill":
            return None
        return pack_prefill(state, args, kwargs)

    def _after_language_model(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        state = self._state
        started = state.mode in ("prefill", "passthrough")
        finish_call(state, output)
        if started:
            self._latest = state

    def _layer_hook(self, index: int) -> Callable[[nn.Module, tuple, dict], tuple[tuple, dict] | None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            state = self._state
            if state.mode == "prefill" and state.prefill is not None:
                return prefill_layer(state, index, args, kwargs)
            if state.mode == "decode":
                return decode_layer_inputs(state.cache, index, args, kwargs)
            return None

        return hook


class _ThreadProbes:
    """What the adapter's vision-probe hooks write into: forwards every attribute to the calling
    thread's :class:`~tokred.adapters.base.VisionProbes` (the hooks are installed once per run,
    but each thread's prefill captures its own images)."""

    def __init__(self, run: Run) -> None:
        self._run = run

    def __getattr__(self, name: str) -> Any:
        probes: VisionProbes = self._run._state.probes
        return getattr(probes, name)
