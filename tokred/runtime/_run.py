"""Applying a Schedule to a model: the scoped, reversible run.

``tokred.apply(model, method)`` returns a :class:`Run`; entering it installs forward (pre-)hooks on
the multimodal model, its language model and each decoder layer (plus attention observers where a
gate or selector needs attention), and leaving it removes every one of them, also on exceptions.

What the hooks do, per forward call:

* **prefill** (no cache, or an empty one): the selector runs on every image's tokens right before
  the language model; the kept tokens are packed into a shorter, left-padded sequence with the
  position ids they had in the full sequence (or renumbered, a Schedule option) and an explicit
  attention mask. At each gate layer the gate decides from the previous layer's attention; the
  hidden states are packed again and every later layer gets position embeddings, position ids and
  a 4-D mask sliced to the survivors. Inputs the language model injects between layers (Qwen3-VL's
  deepstack features) are reduced by the adapter at stage I and at each gate.
* **decode** (the cache this run filled): each group of layers between gates keeps a key-padding
  mask of what its cache holds; new tokens are appended to it and layers whose cache differs from
  layer 0's get their own 4-D mask. Position ids continue from the full sequence: the caller's
  (checked against where the prefill ended), or the adapter's when the caller gave none.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn

from .. import compat
from ..adapters.base import Adapter, ImageSpan, VisionProbes
from ..budget import Budget, split_proportionally
from ..compat import Keyword
from ..components import Gate, Selector
from ..errors import BudgetError, MethodContractError, RuntimeStateError, ScheduleError
from ..method import Method
from ..schedule import Schedule
from ..tokens import GateState, Selection, VisualTokens
from ._attention import observe_attention
from ._sequence import causal_key_mask, format_mask, gather_positions, gather_rows, left_pack
from .report import ImageRecord, RunReport

__all__ = ["Run", "apply"]

_active_runs: "weakref.WeakKeyDictionary[nn.Module, Run]" = weakref.WeakKeyDictionary()


def apply(model: nn.Module, method: Method | Schedule, *, registry: Any = None,
          adapter_options: Mapping[str, Any] | None = None) -> Run:
    """Prepare a scoped application of ``method`` to ``model``; use it as a context manager.

    Everything that can be checked without data is checked here, before any forward pass: the
    model class has an adapter, its attention implementation is supported, gate layers exist, and
    budgets fit the model's fixed number of visual tokens per image (when its config fixes one).

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
    """
    from ..registry import default_registry

    registry = registry or default_registry()
    if isinstance(method, Method):
        schedule, name = method.schedule(), _method_name(registry, method)
    elif isinstance(method, Schedule):
        schedule, name = method, "schedule"
    else:
        raise TypeError(f"apply() takes a tokred Method or Schedule, got {type(method).__name__}")
    adapter = registry.adapter_for(model, adapter_options)
    return Run(model, adapter, schedule, name)


def _method_name(registry: Any, method: Method) -> str:
    try:
        return registry.name_of(method)
    except Exception:  # an unregistered Method subclass still runs; it just has no registry name
        return type(method).__name__


def _sync(device: torch.device) -> None:
    if device.type == "cuda":  # honest timings: wait for queued kernels
        torch.cuda.synchronize(device)


@dataclass
class _Layout:
    """The (reduced) sequence as a range of layers sees it during prefill.

    ``origin`` ``[B, L']``: position in the full language-model input (-1: padding).
    ``entry_index`` ``[B, L']``: position in the sequence that entered the language model.
    """

    origin: torch.Tensor
    entry_index: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        return self.origin >= 0

    def select(self, local: torch.Tensor) -> _Layout:
        """The layout made of the local positions ``local`` ``[B, L'']`` (-1: padding)."""
        pad = local < 0
        idx = local.clamp(min=0)
        return _Layout(
            self.origin.gather(1, idx).masked_fill(pad, -1),
            self.entry_index.gather(1, idx).masked_fill(pad, 0),
        )


@dataclass
class _Prefill:
    """Everything one prefill needs to know about the full sequence (``[B, L]`` tags)."""

    spans: list[ImageSpan]
    visual: torch.Tensor
    image_of: torch.Tensor
    token_of: torch.Tensor
    tile_of: torch.Tensor
    instruction: torch.Tensor
    system: torch.Tensor
    image_sizes: list[list[int]]
    tile_counts: list[list[int]]
    entry: _Layout
    current: _Layout
    gate_layers: dict[int, int]
    stash: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    model_mask_is_none: bool = False
    held: dict[str, Any] = field(default_factory=dict)
    counted: tuple[_Layout, list[int], list[int]] | None = None
    layer_inputs: tuple[tuple[int, ...], dict[str, Any]] | None = None


@dataclass
class _CacheState:
    """What decoding on a cache filled by this run needs: per layer group, which cached keys are real."""

    cache: Callable[[], Any]
    group_of_layer: list[int]
    key_valid: list[torch.Tensor]
    logical_length: int
    position_shift: torch.Tensor | None
    next_position: torch.Tensor | None = None
    passthrough: bool = False


@dataclass
class _Decisions:
    """Decisions of a prefill, replayed while the run is frozen. Both are positions-free, so they
    replay onto the same images in a sequence of another length or padding:

    ``stage1[(sample, image)]``: ``(N, Selection)``; ``gates[(layer, sample)]``: ``[k]`` codes
    ``image * _CODE + token`` of the visual tokens the gate kept."""

    stage1: dict[tuple[int, int], tuple[int, Selection]] = field(default_factory=dict)
    gates: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)


#: ``image * _CODE + token`` identifies a visual token of a sample independently of its position.
_CODE = 1 << 32


class Run:
    """A Schedule applied to one model; a context manager. Create it with :func:`tokred.apply`.

    Attributes:
        model: the model.
        adapter: the adapter serving it.
        schedule: the schedule being applied.
        method_name: the registered method name (``"schedule"`` for hand-built schedules).
    """

    def __init__(self, model: nn.Module, adapter: Adapter, schedule: Schedule, method_name: str) -> None:
        self.model = model
        self.adapter = adapter
        self.schedule = schedule
        self.method_name = method_name
        self.gate_layers: list[int] = schedule.gate_layers(adapter.num_layers)
        self._check_static()
        self._removers: list[Callable[[], None]] = []
        self._probes = VisionProbes()
        self._mode: str = "idle"
        self._input_ids: torch.Tensor | None = None
        self._multimodal_inputs: dict[str, Any] = {}
        #: The encoder outputs the latest prefill consumed and its probes: generate(use_cache=False)
        #: passes the same outputs to every step, which may then reuse the probes.
        self._consumed_probes: tuple[weakref.ref, VisionProbes] | None = None
        self._caller_positions = False
        #: ``labels`` taken from the latest top-level call, to score on the reduced sequence.
        self._labels: torch.Tensor | None = None
        self._output_positions: torch.Tensor | None = None
        self._prefill: _Prefill | None = None
        self._cache_state: _CacheState | None = None
        self._frozen = False
        self._frozen_rows: list[int] | None = None
        self._decisions = _Decisions()
        self._report = RunReport(adapter.family, method_name, adapter.num_layers)

    # ------------------------------------------------------------------ public

    @property
    def report(self) -> RunReport:
        """Measurements of the latest prefill (see :class:`~tokred.runtime.report.RunReport`)."""
        return self._report

    @property
    def active(self) -> bool:
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
        A forward with ``labels`` uses the same mapping to score the loss on the survivors."""
        return self._output_positions

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
        """
        if self._report.prefills == 0:
            raise RuntimeStateError("nothing to freeze: run a prefill inside this run first")
        if rows is not None and (isinstance(rows, (str, bytes)) or any(isinstance(r, bool) or int(r) != r or r < 0 for r in rows)):
            raise RuntimeStateError(f"rows must be row indices of the deciding prefill (non-negative ints), got {rows!r}")
        self._frozen = True
        self._frozen_rows = None if rows is None else [int(r) for r in rows]
        try:
            yield self
        finally:
            self._frozen = False
            self._frozen_rows = None

    def _source_row(self, sample: int) -> int:
        """The row of the deciding prefill whose decisions row ``sample`` replays while frozen."""
        if self._frozen_rows is None:
            return sample
        if sample >= len(self._frozen_rows):
            raise RuntimeStateError(
                f"frozen(rows=...) names {len(self._frozen_rows)} rows, but this prefill has row {sample}"
            )
        return self._frozen_rows[sample]

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
        self._prefill = None
        self._probes.clear()
        self._consumed_probes = None
        self._mode = "idle"

    # ------------------------------------------------------------- validation

    def _check_static(self) -> None:
        self.adapter.check_model_state()
        self.adapter.validate(self.gate_layers, schedule=self.schedule)
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
            self._check_image_budgets(fixed, f"this model has {fixed} visual tokens per image")

    def _check_image_budgets(self, num_tokens: int, what: str) -> None:
        """Every stage's budget for an image of ``num_tokens`` candidates, each within what the stage
        before keeps, and the selector's options (:meth:`Selector.validate`): raises before any
        decoder layer runs, at ``apply`` where the model fixes the count, else when images are seen."""
        stages: list[tuple[str, Budget | None]] = []
        if self.schedule.selector is not None:
            stages.append(("selector", self.schedule.selector.budget))
            self._validate_selector(num_tokens)
        stages += [(f"gate at layer {layer}", g.budget) for layer, g in zip(self.gate_layers, self.schedule.gates)]
        alive = num_tokens
        for stage, budget in stages:
            if budget is None:
                continue
            k = budget.tokens_for(num_tokens, what=f"image ({stage}; {what})")
            if k > alive:
                raise BudgetError(
                    f"the {stage} keeps {k} visual tokens per image but only {alive} survive the stage before ({what})"
                )
            alive = k

    def _check_span_budgets(self, span: ImageSpan) -> None:
        """:meth:`_check_image_budgets` for one image the prefill holds, and, with a selector budget
        spread over tiles, the selector's options on each of its tiles."""
        n = span.positions.numel()
        self._check_image_budgets(n, f"image {span.image} of sample {span.sample} has {n} visual tokens")
        stage = self.schedule.selector
        if stage is not None and stage.budget.spread == "tiles":
            for tile in range(span.layout.num_tiles):
                stage.selector.validate(int((span.layout.tile == tile).sum()))

    def _validate_selector(self, num_tokens: int) -> None:
        stage = self.schedule.selector
        assert stage is not None
        if stage.budget.spread == "tiles":
            return  # tiles are validated one by one when the image's layout is known
        stage.selector.validate(num_tokens)

    # ----------------------------------------------------------------- install

    def _install(self) -> None:
        adapter = self.adapter
        mm, lm, layers = adapter.multimodal_model(), adapter.language_model(), adapter.decoder_layers()
        top = self.model
        if top is not mm:
            self._hook(top.register_forward_pre_hook(self._take_labels, with_kwargs=True))
            self._hook(top.register_forward_hook(self._score_labels, with_kwargs=True))
        self._hook(mm.register_forward_pre_hook(self._on_multimodal, with_kwargs=True))
        self._hook(lm.register_forward_pre_hook(self._on_language_model, with_kwargs=True, prepend=True))
        self._hook(lm.register_forward_hook(self._after_language_model, with_kwargs=True))
        for index, layer in enumerate(layers):
            self._hook(layer.register_forward_pre_hook(self._layer_hook(index), with_kwargs=True, prepend=True))
        for layer in self.gate_layers:
            self._removers.append(observe_attention(adapter.self_attention(layers[layer - 1]), self._stash_for(layer)))
        wanted = self.schedule.selector.selector.inputs if self.schedule.selector else frozenset()
        self._removers.extend(adapter.install_vision_probes(self._probes, wanted))

    def _hook(self, handle: torch.utils.hooks.RemovableHandle) -> None:
        self._removers.append(handle.remove)

    # ------------------------------------------------------------------- labels

    def _take_labels(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Labels ``[B, L]`` describe the full input; the logits of a reduced prefill are shorter.
        They are taken out of the call here and scored on the survivors in :meth:`_score_labels`."""
        self._labels = None
        if kwargs.get(Keyword.LABELS) is None:
            return None
        new_kwargs = dict(kwargs)
        self._labels = new_kwargs.pop(Keyword.LABELS)
        return args, new_kwargs

    def _score_labels(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        labels, self._labels = self._labels, None
        if labels is None:
            return None
        positions = self._output_positions
        logits = getattr(output, "logits", None)
        if positions is None or logits is None or logits.shape[:2] != positions.shape or labels.shape[0] != positions.shape[0]:
            raise RuntimeStateError(
                "tokred scores labels on the reduced sequence of a prefill; this call's logits "
                f"{None if logits is None else tuple(logits.shape[:2])} do not match its reduced layout "
                f"{None if positions is None else tuple(positions.shape)} (logits_to_keep and labels on decoding "
                "steps are not supported under tokred)"
            )
        index = positions.to(labels.device)
        survivors = labels.gather(1, index.clamp(min=0)).masked_fill(index < 0, -100)     # [B, L']
        output.loss = compat.causal_lm_loss(self.model, logits, survivors, self.adapter.text_config.vocab_size)
        return output

    # ---------------------------------------------------- multimodal model hook

    def _on_multimodal(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        input_ids = kwargs.get(Keyword.INPUT_IDS, args[0] if args else None)
        cache = compat.find_cache(kwargs, call=f"{type(module).__name__}.forward")
        past = compat.cache_length(cache) if cache is not None else 0
        state = self._cache_state
        if past == 0:
            if cache is not None and state is not None and state.cache() is cache:
                raise compat.interface_error("the KV cache this run filled at its prefill to hold its tokens",
                                             "the cache reads as empty on the next call")
            self._check_starts_a_sequence(kwargs, input_ids)
            self._mode = "prefill"
            self._check_cache(cache)
            encoded = _encoded_images(kwargs)
            if kwargs.get(Keyword.PIXEL_VALUES) is not None:
                # The vision tower runs inside this call: what it captures now is this prefill's.
                self._probes.clear()
            elif encoded is not None and self._consumed_probes is not None and self._consumed_probes[0]() is encoded:
                # generate(use_cache=False) feeds the same encoder outputs to every step without
                # running the tower again: the probes of its first step still describe these images.
                self._probes.restore(self._consumed_probes[1])
            self._input_ids = input_ids
            self._multimodal_inputs = kwargs
            return
        if state is None or state.cache() is not cache:
            raise RuntimeStateError(
                "this KV cache was not filled by the active tokred run; tokred can only continue decoding "
                "on a cache whose prefill it reduced"
            )
        if kwargs.get(Keyword.PIXEL_VALUES) is not None:
            raise RuntimeStateError("new images on a continued cache are not supported; start a new prefill")
        # Position ids the caller did not give are the adapter's to compute: a model that derives
        # them itself before its language model (Qwen's M-RoPE) reads the pruned cache's length.
        self._caller_positions = kwargs.get(Keyword.POSITION_IDS) is not None
        self._mode = "decode"

    def _check_starts_a_sequence(self, kwargs: dict, input_ids: torch.Tensor | None) -> None:
        """A call without a (non-empty) cache must start its sequences: the first real token of every
        row sits at position 0. A call whose positions start later continues a sequence whose cache
        tokred did not see, which happens when transformers passes the cache under a name tokred does
        not know; taking it for a prefill would reduce nothing and report zero visual tokens."""
        positions = kwargs.get(Keyword.POSITION_IDS)
        if positions is None or input_ids is None or positions.shape[-1] == 0:
            return
        index = self.adapter.position_index(positions).cpu()                    # [B or 1, L]
        mask = kwargs.get(Keyword.ATTENTION_MASK)
        if mask is not None and mask.dim() == 2 and mask.shape[-1] == index.shape[-1]:
            real = mask.bool().cpu()
            if index.shape[0] == 1 and real.shape[0] > 1:
                index = index.expand(real.shape[0], -1)
            first = torch.where(real.any(dim=1), real.long().argmax(dim=1), 0)
            starts = index.gather(1, first[:, None])[:, 0]
        else:
            starts = index[:, 0]
        if bool((starts != 0).any()):
            raise compat.interface_error(
                "a call without a KV cache to start its sequences at position 0",
                f"its position ids start at {starts.tolist()}, so it continues a sequence whose cache tokred "
                f"did not find under {list(compat.CACHE_KEYWORDS)}",
            )

    @staticmethod
    def _check_cache(cache: Any) -> None:
        if cache is not None and compat.is_static_cache(cache):
            raise RuntimeStateError(
                f"{type(cache).__name__} is not supported: pruned layers keep shorter caches, which needs a "
                "DynamicCache (do not pass cache_implementation='static')"
            )

    # ----------------------------------------------------- language model hook

    def _on_language_model(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        if self._mode == "decode":
            return self._decode_inputs(args, kwargs)
        if self._mode != "prefill":
            return None
        embeds = kwargs.get(Keyword.INPUTS_EMBEDS)
        if embeds is None or self._input_ids is None:
            raise RuntimeStateError(
                "tokred needs input_ids to locate image tokens; call the model with input_ids, not inputs_embeds"
            )
        mask = kwargs.get(Keyword.ATTENTION_MASK)
        if mask is not None and mask.dim() != 2:
            raise RuntimeStateError("tokred needs a 2-D attention mask (or none); got a precomputed 4-D mask")
        return self._prefill_inputs(args, kwargs, embeds, mask)

    def _after_language_model(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        cache = compat.output_cache(output)
        if self._mode in ("prefill", "passthrough") and self._cache_state is not None and cache is not None:
            self._cache_state.cache = weakref.ref(cache)
        if self._mode == "prefill" and self._prefill is not None:
            self._output_positions = self._prefill.current.origin.clone()
        elif self._mode == "passthrough" and self._input_ids is not None:
            batch, length = self._input_ids.shape
            self._output_positions = torch.arange(length).expand(batch, -1).clone()
        encoded = _encoded_images(self._multimodal_inputs)
        if self._mode == "prefill" and encoded is not None:
            self._consumed_probes = (weakref.ref(encoded), self._probes.snapshot())
        elif self._mode == "prefill":
            self._consumed_probes = None
        self._prefill = None
        self._multimodal_inputs = {}
        self._probes.clear()  # consumed by this prefill; never let them reach another one
        self._mode = "idle"

    def _prefill_inputs(self, args: tuple, kwargs: dict, embeds: torch.Tensor,
                        mask: torch.Tensor | None) -> tuple[tuple, dict] | None:
        input_ids = self._input_ids
        assert input_ids is not None
        batch, length = input_ids.shape
        device = embeds.device
        mask2d = mask if mask is not None else torch.ones(batch, length, dtype=torch.long, device=device)
        real = mask2d.bool()
        spans = self.adapter.image_spans(input_ids, self._probes, self._multimodal_inputs)
        report = RunReport(self.adapter.family, self.method_name, self.adapter.num_layers,
                           prefills=self._report.prefills + 1)
        self._report = report
        self._cache_state = None
        if not self._frozen:  # decisions of an earlier prefill must never leak into this one
            self._decisions = _Decisions()
        if not spans:  # text only: nothing to reduce, leave every input as it is
            report.visual_tokens_input = [0] * batch
            report.visual_tokens_per_layer = [[0] * batch for _ in range(self.adapter.num_layers)]
            self._cache_state = _CacheState(lambda: None, [], [], length, None, passthrough=True)
            self._mode = "passthrough"
            return None
        _check_left_padded(real)
        for span in spans:
            self._check_span_budgets(span)

        visual = torch.zeros(batch, length, dtype=torch.bool)
        image_of = torch.full((batch, length), -1, dtype=torch.long)
        token_of = torch.full((batch, length), -1, dtype=torch.long)
        tile_of = torch.full((batch, length), -1, dtype=torch.long)
        image_sizes: list[list[int]] = [[] for _ in range(batch)]
        tile_counts: list[list[int]] = [[] for _ in range(batch)]
        for span in spans:
            visual[span.sample, span.positions] = True
            image_of[span.sample, span.positions] = span.image
            token_of[span.sample, span.positions] = torch.arange(span.positions.numel())
            tile_of[span.sample, span.positions] = span.layout.tile
            image_sizes[span.sample].append(span.positions.numel())
            tile_counts[span.sample].append(span.layout.num_tiles)
        instruction, system = self.adapter.text_roles(input_ids.cpu(), mask2d.cpu(), visual)
        full_positions = self.adapter.full_position_ids(kwargs.get(Keyword.POSITION_IDS), input_ids, mask, past_length=0)
        report.visual_tokens_input = [int(n) for n in visual.sum(1)]

        keep = real.cpu().clone()
        new_embeds = embeds
        records: dict[tuple[int, int], ImageRecord] = {}
        if self.schedule.selector is not None:
            new_embeds = embeds.clone()
            start = time.perf_counter()
            _sync(device)
            for span in spans:
                selection = self._select(span, embeds, instruction[span.sample])
                positions = span.positions
                dropped = torch.ones(positions.numel(), dtype=torch.bool)
                dropped[selection.indices] = False
                keep[span.sample, positions[dropped]] = False
                if selection.features is not None:
                    new_embeds[span.sample, positions[selection.indices].to(device)] = selection.features.to(embeds.dtype)
                records[(span.sample, span.image)] = _record(span, selection.indices)
            _sync(device)
            report.selection_seconds += time.perf_counter() - start
        else:
            for span in spans:
                records[(span.sample, span.image)] = _record(span, torch.arange(span.positions.numel()))
        report.images = [records[(s.sample, s.image)] for s in spans]

        if self.schedule.selector is not None:
            origin = left_pack(keep)
        else:  # gates only: the language model input is untouched, layout as given (padding in place)
            origin = torch.where(real.cpu(), torch.arange(length).expand(batch, -1), -1)
        entry_local = torch.arange(origin.shape[1]).expand(batch, -1).clone()
        entry = _Layout(origin, entry_local.masked_fill(origin < 0, 0))
        self._prefill = _Prefill(
            spans=spans, visual=visual, image_of=image_of, token_of=token_of, tile_of=tile_of,
            instruction=instruction, system=system, image_sizes=image_sizes, tile_counts=tile_counts, entry=entry, current=entry,
            gate_layers={layer: i for i, layer in enumerate(self.gate_layers)},
        )
        shift = self._renumber_shift(real.cpu(), keep)
        self._cache_state = _CacheState(lambda: None, [0] * self.adapter.num_layers, [entry.valid], length,
                                        None if shift is None else shift[:, -1].to(device),
                                        _next_position(self.adapter.position_index(full_positions), real))
        held = self.adapter.reduce_language_model_kwargs(kwargs, origin)
        self._prefill.held = held
        if self.schedule.selector is None:
            return (args, {**kwargs, **held}) if held else None

        new_kwargs = dict(kwargs)
        new_kwargs[Keyword.INPUTS_EMBEDS] = gather_rows(new_embeds, origin, seq_dim=1)
        new_kwargs[Keyword.ATTENTION_MASK] = entry.valid.to(device=device, dtype=mask2d.dtype)
        positions = gather_positions(full_positions, origin)
        if shift is not None:
            positions = positions - gather_rows(shift, origin, seq_dim=1).to(positions.device).masked_fill(origin.to(positions.device) < 0, 0)
        new_kwargs[Keyword.POSITION_IDS] = positions
        new_kwargs.update(held)
        return args, new_kwargs

    def _renumber_shift(self, real: torch.Tensor, keep: torch.Tensor) -> torch.Tensor | None:
        """``[B, L]``: real tokens dropped at or before each position (renumbering mode only)."""
        if self.schedule.positions != "renumber":
            return None
        return torch.cumsum((real & ~keep).long(), dim=1)

    def _select(self, span: ImageSpan, embeds: torch.Tensor, instruction: torch.Tensor) -> Selection:
        """Stage I for one image; ``instruction`` ``[L]`` bool marks its sample's instruction text."""
        stage = self.schedule.selector
        assert stage is not None
        key = (span.sample, span.image)
        n = span.positions.numel()
        if self._frozen:
            source = (self._source_row(span.sample), span.image)
            if source not in self._decisions.stage1:
                raise RuntimeStateError(f"frozen run has no stage-I decision for sample {source[0]} image {span.image}")
            decided_n, decided = self._decisions.stage1[source]
            if decided_n != n:
                raise RuntimeStateError(
                    f"frozen run: image {span.image} of row {span.sample} has {n} visual tokens, but the decision it "
                    f"replays (row {source[0]}) was made on {decided_n}; replay a row onto the same images"
                )
            return decided
        tokens = VisualTokens(
            features=embeds[span.sample, span.positions.to(embeds.device)],
            layout=span.layout,
            pre_projector=self._probe("pre_projector", span),
            cls_attention=self._probe("cls_attention", span),
            sample_index=span.sample,
            image_index=span.image,
            instruction_embeddings=embeds[span.sample, instruction.to(embeds.device)],
        )
        k = stage.budget.tokens_for(n)
        if stage.budget.spread == "tiles" and span.layout.num_tiles > 1:
            selection = self._select_per_tile(stage.selector, tokens, k)
        else:
            selection = _check_selection(stage.selector, stage.selector.select(tokens, k), n, k, embeds.shape[-1])
        self._decisions.stage1[key] = (n, selection)
        return selection

    @staticmethod
    def _select_per_tile(selector: Selector, tokens: VisualTokens, k: int) -> Selection:
        """``Budget(spread="tiles")``: ``k`` split over the tiles in proportion to their token counts,
        and the selector run on every tile as if it were an image of its own."""
        layout = tokens.layout
        views = [layout.tile_view(tile) for tile in range(layout.num_tiles)]
        shares = split_proportionally(k, [index.numel() for index, _ in views])
        kept: list[torch.Tensor] = []
        features: list[torch.Tensor] = []
        merged = False
        for (index, tile_layout), share in zip(views, shares):
            if share == 0:
                continue
            device_index = index.to(tokens.features.device)
            part = VisualTokens(
                features=tokens.features[device_index],
                layout=tile_layout,
                pre_projector=None if tokens.pre_projector is None else tokens.pre_projector[index.to(tokens.pre_projector.device)],
                cls_attention=None if tokens.cls_attention is None else tokens.cls_attention[index.to(tokens.cls_attention.device)],
                sample_index=tokens.sample_index,
                image_index=tokens.image_index,
                instruction_embeddings=tokens.instruction_embeddings,
            )
            chosen = _check_selection(selector, selector.select(part, share), index.numel(), share, tokens.features.shape[-1])
            kept.append(index[chosen.indices])
            merged |= chosen.features is not None
            features.append(chosen.features if chosen.features is not None else part.features[chosen.indices.to(device_index.device)])
        indices = torch.cat(kept)
        order = torch.argsort(indices)
        return Selection(indices[order], torch.cat(features)[order.to(tokens.features.device)] if merged else None)

    def _probe(self, name: str, span: ImageSpan) -> torch.Tensor | None:
        """What the vision probes captured for one image, or None where the selector did not ask
        for it or the model cannot provide it (the adapter raises when it promised and failed)."""
        if name not in self.schedule.selector.selector.inputs or name not in self.adapter.available_inputs():  # type: ignore[union-attr]
            return None
        return self.adapter.probe_values(self._probes, name, span)

    # ------------------------------------------------------------ decode steps

    def _decode_inputs(self, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        state = self._cache_state
        assert state is not None
        embeds = kwargs.get(Keyword.INPUTS_EMBEDS)
        num_new = embeds.shape[1]
        mask = kwargs.get(Keyword.ATTENTION_MASK)
        if mask is not None and mask.shape[-1] != state.logical_length + num_new:
            raise RuntimeStateError(
                f"the attention mask covers {mask.shape[-1]} positions but this pruned cache stands for "
                f"{state.logical_length} tokens plus {num_new} new ones. Continuing a conversation on a cache "
                "that tokred pruned is not supported through generate(), which re-feeds tokens it believes are "
                "missing from the cache; run the whole conversation again instead"
            )
        if state.passthrough:
            state.logical_length += num_new
            return None
        device = embeds.device
        positions = kwargs.get(Keyword.POSITION_IDS) if self._caller_positions else None
        if positions is None:
            positions = self.adapter.decode_position_ids(embeds.shape[0], num_new, state.logical_length, device,
                                                         attention_mask=mask)
        elif state.next_position is not None:
            first = self.adapter.position_index(positions)[:, 0]
            if not torch.equal(first.cpu(), state.next_position):
                raise RuntimeStateError(
                    f"decoding resumes at position {first.tolist()} but this pruned cache ends before position "
                    f"{state.next_position.tolist()}. Continuing a conversation on a cache that tokred pruned is not "
                    "supported through generate(), which re-feeds tokens it believes are missing from the shorter "
                    "cache; run the whole conversation again instead"
                )
        state.next_position = self.adapter.position_index(positions)[:, -1].cpu() + 1
        new_valid = mask[:, -num_new:].bool() if mask is not None else torch.ones(embeds.shape[0], num_new, dtype=torch.bool, device=device)
        state.key_valid = [torch.cat([kv.to(device), new_valid], dim=1) for kv in state.key_valid]
        if state.position_shift is not None:
            positions = positions - state.position_shift.to(positions.device)[:, None]
        state.logical_length += num_new
        new_kwargs = dict(kwargs)
        new_kwargs[Keyword.ATTENTION_MASK] = state.key_valid[0].to(dtype=mask.dtype if mask is not None else torch.long)
        new_kwargs[Keyword.POSITION_IDS] = positions
        return args, new_kwargs

    # ------------------------------------------------------------ layer hooks

    def _layer_hook(self, index: int) -> Callable[[nn.Module, tuple, dict], tuple[tuple, dict] | None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if self._mode == "prefill" and self._prefill is not None:
                return self._prefill_layer(index, args, kwargs)
            if self._mode == "decode":
                return self._decode_layer(index, kwargs, args)
            return None

        return hook

    def _prefill_layer(self, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        prefill = self._prefill
        assert prefill is not None
        hidden = args[0] if args else kwargs[Keyword.HIDDEN_STATES]
        if index == 0:
            prefill.model_mask_is_none = kwargs.get(Keyword.ATTENTION_MASK) is None
        if index in prefill.gate_layers:
            start = time.perf_counter()
            _sync(hidden.device)
            local = self._gate(index, prefill, hidden)
            prefill.current = prefill.current.select(local)
            hidden = gather_rows(hidden, local, seq_dim=1)
            if prefill.held:
                self.adapter.follow_reduction(prefill.held, local)
            _sync(hidden.device)
            self._report.gating_seconds += time.perf_counter() - start
            state = self._cache_state
            assert state is not None
            state.key_valid.append(prefill.current.valid)
            group = len(state.key_valid) - 1
            state.group_of_layer[index:] = [group] * (len(state.group_of_layer) - index)
        self._record_layer(prefill)
        if prefill.current is prefill.entry:
            return None
        new_kwargs = dict(kwargs)
        new_kwargs.update(self._reduced_layer_inputs(prefill, kwargs, hidden))
        new_kwargs.update(self.adapter.reduce_layer_kwargs(kwargs, prefill.current.entry_index))
        if args:
            return (hidden, *args[1:]), new_kwargs
        new_kwargs[Keyword.HIDDEN_STATES] = hidden
        return args, new_kwargs

    def _reduced_layer_inputs(self, prefill: _Prefill, kwargs: dict, hidden: torch.Tensor) -> dict[str, Any]:
        """Position embeddings, position ids and mask of the current layout. The language model
        passes every layer the same full-length ones, so they are reduced once per layout (and per
        incoming tensors) and reused by the following layers."""
        current = prefill.current
        key = (id(current), id(kwargs[Keyword.POSITION_EMBEDDINGS]), id(kwargs.get(Keyword.POSITION_IDS)), id(kwargs.get(Keyword.ATTENTION_MASK)))
        if prefill.layer_inputs is not None and prefill.layer_inputs[0] == key:
            return prefill.layer_inputs[1]
        cos, sin = kwargs[Keyword.POSITION_EMBEDDINGS]
        reduced: dict[str, Any] = {Keyword.POSITION_EMBEDDINGS: (gather_rows(cos, current.entry_index, seq_dim=-2),
                                                           gather_rows(sin, current.entry_index, seq_dim=-2))}
        if kwargs.get(Keyword.POSITION_IDS) is not None:
            reduced[Keyword.POSITION_IDS] = gather_positions(kwargs[Keyword.POSITION_IDS], current.entry_index)
        valid = current.valid.to(hidden.device)
        if prefill.model_mask_is_none and bool(valid.all()):
            reduced[Keyword.ATTENTION_MASK] = None  # keeps sdpa on its is_causal fast path
        else:
            reduced[Keyword.ATTENTION_MASK] = format_mask(causal_key_mask(valid, valid.shape[1]), kwargs.get(Keyword.ATTENTION_MASK), hidden.dtype)
        prefill.layer_inputs = (key, reduced)
        return reduced

    def _record_layer(self, prefill: _Prefill) -> None:
        """Visual tokens each sample and image has at this layer; counted once per layout."""
        if prefill.counted is None or prefill.counted[0] is not prefill.current:
            origin = prefill.current.origin
            visual_alive = prefill.visual.gather(1, origin.clamp(min=0)) & (origin >= 0)
            per_image = [int((visual_alive[r.sample] & (prefill.image_of[r.sample].gather(0, origin[r.sample].clamp(min=0)) == r.image)).sum())
                         for r in self._report.images]
            prefill.counted = (prefill.current, [int(n) for n in visual_alive.sum(1)], per_image)
        _, per_sample, per_image = prefill.counted
        self._report.visual_tokens_per_layer.append(list(per_sample))
        for record, count in zip(self._report.images, per_image):
            record.kept_per_layer.append(count)

    def _decode_layer(self, index: int, kwargs: dict, args: tuple) -> tuple[tuple, dict] | None:
        state = self._cache_state
        if state is None or state.passthrough or not state.group_of_layer or state.group_of_layer[index] == 0:
            return None
        valid = state.key_valid[state.group_of_layer[index]]
        hidden = args[0] if args else kwargs[Keyword.HIDDEN_STATES]
        new_kwargs = dict(kwargs)
        new_kwargs[Keyword.ATTENTION_MASK] = format_mask(causal_key_mask(valid, hidden.shape[1]), kwargs.get(Keyword.ATTENTION_MASK), hidden.dtype)
        return args, new_kwargs

    # -------------------------------------------------------------------- gates

    def _stash_for(self, gate_layer: int) -> Callable[[torch.Tensor, torch.Tensor, float], None]:
        def stash(query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
            if self._mode == "prefill" and self._prefill is not None and not self._frozen:
                self._prefill.stash[gate_layer] = (query, key, scaling)

        return stash

    def _gate(self, layer: int, prefill: _Prefill, hidden: torch.Tensor) -> torch.Tensor:
        """Run the gate at ``layer`` on every sample; return the packed local indices ``[B, L']``."""
        stage = self.schedule.gates[prefill.gate_layers[layer]]
        current = prefill.current
        origin = current.origin
        valid = current.valid
        keep = valid.clone()
        stash = prefill.stash.pop(layer, None)
        for sample in range(origin.shape[0]):
            row_origin = origin[sample].clamp(min=0)
            visual_local = torch.nonzero(valid[sample] & prefill.visual[sample, row_origin]).flatten()
            if visual_local.numel() == 0:
                continue
            visual_origin = origin[sample, visual_local]
            codes = prefill.image_of[sample, visual_origin] * _CODE + prefill.token_of[sample, visual_origin]   # [V]
            if self._frozen:
                key = (layer, self._source_row(sample))
                if key not in self._decisions.gates:
                    raise RuntimeStateError(f"frozen run has no decision for the gate at layer {layer}, sample {key[1]}")
                kept_local = visual_local[torch.isin(codes, self._decisions.gates[key])]
            else:
                state = self._gate_state(layer, sample, prefill, stage.budget, visual_local, valid[sample], hidden, stash)
                with torch.no_grad():  # decisions only; never build an autograd graph on attention
                    chosen = _check_gate_choice(stage.gate, stage.gate.select(state), state)
                kept_local = visual_local[chosen]
                self._decisions.gates[(layer, sample)] = codes[chosen]
            keep[sample, visual_local] = False
            keep[sample, kept_local] = True
            self._update_final(sample, prefill, origin[sample, kept_local])
        for record in self._report.images:
            record.kept_after_gates.append((layer, list(record.kept_final)))
        return left_pack(keep)

    def _update_final(self, sample: int, prefill: _Prefill, kept_origin: torch.Tensor) -> None:
        for record in self._report.images:
            if record.sample == sample:
                mine = kept_origin[prefill.image_of[sample, kept_origin] == record.image]
                record.kept_final = sorted(int(t) for t in prefill.token_of[sample, mine])
                record.kept_per_tile = torch.bincount(prefill.tile_of[sample, mine], minlength=len(record.tile_sizes)).tolist()

    def _gate_state(self, layer: int, sample: int, prefill: _Prefill, budget: Budget | None,
                    visual_local: torch.Tensor, valid: torch.Tensor, hidden: torch.Tensor,
                    stash: tuple[torch.Tensor, torch.Tensor, float] | None) -> GateState:
        origin = prefill.current.origin[sample].clamp(min=0)
        visual_image = prefill.image_of[sample, origin[visual_local]]
        visual_token = prefill.token_of[sample, origin[visual_local]]
        visual_tile = prefill.tile_of[sample, origin[visual_local]]
        keep_per_image = None
        keep_per_tile = None
        if budget is not None:
            keep_per_image = []
            for image, size in enumerate(prefill.image_sizes[sample]):
                k = budget.tokens_for(size)
                alive = int((visual_image == image).sum())
                if k > alive:
                    raise BudgetError(
                        f"gate at layer {layer} keeps {k} tokens of image {image} (sample {sample}) but only "
                        f"{alive} are alive there after earlier stages"
                    )
                keep_per_image.append(k)
            if budget.spread == "tiles":
                # In proportion to the tokens each tile still has at this layer, so no tile is asked
                # for more than it holds after earlier stages.
                keep_per_tile = [
                    split_proportionally(k, torch.bincount(visual_tile[visual_image == image], minlength=tiles).tolist())
                    for image, (k, tiles) in enumerate(zip(keep_per_image, prefill.tile_counts[sample]))
                ]
        roles = {
            "instruction": torch.nonzero(valid & prefill.instruction[sample, origin]).flatten(),
            "system": torch.nonzero(valid & prefill.system[sample, origin]).flatten(),
            "visual": visual_local,
            "last": torch.nonzero(valid).flatten()[-1:],
        }
        roles["text"] = torch.sort(torch.cat([roles["system"], roles["instruction"]])).values

        def attention(queries: str, keys: str) -> torch.Tensor:
            if stash is None:
                raise RuntimeStateError(f"no attention was captured for the gate at layer {layer}")
            if queries not in roles or keys not in roles:
                raise ValueError(f"attention roles are {sorted(roles)}, got {queries!r} -> {keys!r}")
            return _attention_slice(stash, sample, roles[queries], roles[keys], valid)

        return GateState(
            layer=layer, sample_index=sample, visual_image=visual_image, visual_token=visual_token,
            keep_per_image=keep_per_image, visual_tile=visual_tile, keep_per_tile=keep_per_tile, num_instruction=int(roles["instruction"].numel()),
            num_system=int(roles["system"].numel()), hidden_states=hidden[sample, valid.to(hidden.device)],
            attention_source=attention,
        )


def _check_left_padded(real: torch.Tensor) -> None:
    """Refuse a batch whose attention mask ``[B, L]`` has padding after a real token.

    The reduced sequence is packed to the right (the last position of every row is a real token, as
    ``generate`` needs), so a right-padded prompt would be answered from its padding and decode at
    the wrong positions; the check runs before any decoder layer."""
    later_padding = (~real) & (torch.cumsum(real.long(), dim=1) > 0)
    rows = torch.nonzero(later_padding.any(dim=1)).flatten().tolist()
    if rows:
        raise RuntimeStateError(
            f"the attention mask of rows {rows} has padding after real tokens (right padding); tokred needs left "
            "padding: create the processor with padding_side='left' (or set processor.tokenizer.padding_side = 'left')"
        )


def _encoded_images(kwargs: Mapping[str, Any]) -> Any | None:
    """The vision tower's image outputs a call carries (``mm_encoder_outputs["image"]``, 5.23+), or None."""
    encoded = kwargs.get(Keyword.ENCODER_OUTPUTS)
    return encoded.get(Keyword.ENCODER_OUTPUTS_IMAGE) if isinstance(encoded, Mapping) else None


def _record(span: ImageSpan, kept: torch.Tensor) -> ImageRecord:
    """The report's record of one image after stage I (``kept``: ``[k]`` increasing indices)."""
    tiles = span.layout.tile
    return ImageRecord(
        span.sample, span.image, span.positions.numel(), kept.tolist(), kept.tolist(),
        tile_sizes=torch.bincount(tiles, minlength=span.layout.num_tiles).tolist(),
        thumbnail_tile=span.layout.thumbnail_tile if span.layout.num_tiles > 1 else None,
        kept_per_tile=torch.bincount(tiles[kept], minlength=span.layout.num_tiles).tolist(),
    )


def _next_position(index: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``[B]``: one past the largest position index (``[B, L]``, :meth:`Adapter.position_index`) of
    each row's real tokens, where the unmodified model's next token goes."""
    return index.cpu().masked_fill(~real.cpu(), -1).amax(dim=1) + 1


#: Upper bound on the ``[H, q, L]`` fp32 score block formed at once by :func:`_attention_slice`
#: (64 Mi elements, 256 MiB): visual-to-text attention on a 2,900-token LLaVA-NeXT image with 32 heads
#: would otherwise be a 1 GiB temporary.
_SCORE_BLOCK_ELEMENTS = 1 << 26


def _attention_slice(stash: tuple[torch.Tensor, torch.Tensor, float], sample: int, query_local: torch.Tensor,
                     key_local: torch.Tensor, valid: torch.Tensor,
                     block_elements: int = _SCORE_BLOCK_ELEMENTS) -> torch.Tensor:
    """``[H, Q, K]`` attention probabilities of one sample, normalised over every visible key.

    Queries are processed in blocks so that no intermediate exceeds ``block_elements`` scores
    (``[H, q, L]``) besides the ``[H, Q, K]`` result. Each query's softmax is over its own row, so
    blocks agree with one large product up to float rounding (matmul kernels vary with the shape)."""
    query, key, scaling = stash
    device = query.device
    k = key[sample].float()                                                    # [H_kv, L, d]
    heads = query.shape[1]
    k = k.repeat_interleave(heads // k.shape[0], dim=0)                        # grouped KV heads -> [H, L, d]
    key_pos = torch.arange(k.shape[1], device=device)
    key_index = key_local.to(device)
    valid = valid.to(device)
    query_local = query_local.to(device)
    block = max(1, block_elements // max(1, heads * k.shape[1]))
    parts = []
    for start in range(0, query_local.numel(), block):
        rows = query_local[start:start + block]
        q = query[sample, :, rows].float()                                     # [H, q, d]
        scores = torch.matmul(q, k.transpose(-1, -2)) * scaling                # [H, q, L]
        visible = (key_pos[None, :] <= rows[:, None]) & valid[None, :]
        scores = scores.masked_fill(~visible[None], float("-inf"))
        parts.append(torch.softmax(scores, dim=-1)[:, :, key_index])
    if not parts:
        return torch.zeros(heads, 0, key_index.numel(), device=device)
    return torch.cat(parts, dim=1)


def _check_selection(selector: Selector, result: torch.Tensor | Selection, n: int, k: int, dim: int) -> Selection:
    """Validate a selector's result and sort it into spatial order."""
    name = type(selector).__name__
    selection = result if isinstance(result, Selection) else Selection(result)
    indices = selection.indices
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype not in (torch.long, torch.int32, torch.int64):
        raise MethodContractError(f"{name}.select must return a 1-D integer tensor of indices, got {indices!r:.80}")
    indices = indices.detach().long().cpu()
    if indices.numel() != k:
        raise MethodContractError(f"{name}.select returned {indices.numel()} indices; the budget is exactly {k}")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
        raise MethodContractError(f"{name}.select returned indices outside 0..{n - 1}")
    if torch.unique(indices).numel() != indices.numel():
        raise MethodContractError(f"{name}.select returned duplicate indices")
    order = torch.argsort(indices)
    features = selection.features
    if features is not None:
        if features.shape != (k, dim):
            raise MethodContractError(f"{name}.select returned features of shape {tuple(features.shape)}, expected ({k}, {dim})")
        features = features[order.to(features.device)]
    return Selection(indices[order], features)


def _check_gate_choice(gate: Gate, chosen: torch.Tensor, state: GateState) -> torch.Tensor:
    name = type(gate).__name__
    if not isinstance(chosen, torch.Tensor) or chosen.dim() != 1 or chosen.dtype not in (torch.long, torch.int32, torch.int64):
        raise MethodContractError(f"{name}.select must return a 1-D integer tensor of indices, got {chosen!r:.80}")
    chosen = chosen.detach().long().cpu()
    v = state.num_visual
    if chosen.numel() and (int(chosen.min()) < 0 or int(chosen.max()) >= v):
        raise MethodContractError(f"{name}.select returned indices outside 0..{v - 1}")
    if torch.unique(chosen).numel() != chosen.numel():
        raise MethodContractError(f"{name}.select returned duplicate indices")
    if state.keep_per_image is not None:
        counts = torch.bincount(state.visual_image[chosen], minlength=len(state.keep_per_image)).tolist()
        if counts != list(state.keep_per_image):
            raise MethodContractError(f"{name}.select kept {counts} tokens per image; the budget is exactly {state.keep_per_image}")
    if state.keep_per_tile is not None and state.visual_tile is not None:
        for image, wanted in enumerate(state.keep_per_tile):
            tiles = state.visual_tile[chosen][state.visual_image[chosen] == image]
            counts = torch.bincount(tiles, minlength=len(wanted)).tolist()
            if counts != list(wanted):
                raise MethodContractError(
                    f"{name}.select kept {counts} tokens per tile of image {image}; the budget spread over tiles is "
                    f"exactly {wanted} (a gate that overrides select() must honour state.keep_per_tile)"
                )
    return torch.sort(chosen).values
