"""Packing a prefill: the full sequence's tags, stage I, the reduced sequence and its layer inputs.

At the language model's pre-hook (:func:`pack_prefill`) the adapter locates every image's tokens;
the selector runs on each image (:func:`tokred.decisions.select_image_tokens`, or the frozen
decision) and the kept tokens are packed into a shorter, left-padded sequence with the position ids
they had in the full sequence (or renumbered, a Schedule option) and an explicit attention mask.
At each decoder layer (:func:`prefill_layer`) a gate may shrink the layout again
(:mod:`._gating`); every later layer gets position embeddings, position ids and a 4-D mask sliced
to the survivors, computed once per layout. Inputs the language model injects between layers
(Qwen3-VL's deepstack features) are reduced by the adapter at stage I and at each gate.

Conventions: an ``origin`` ``[B, L']`` gives, for each position of a reduced sequence, the position
it had in the language model's full input (``-1``: padding); ``entry_index`` ``[B, L']`` its
position in the sequence that entered the language model.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..compat import Keyword
from ..decisions import check_image_budgets, image_record, select_image_tokens
from ..errors import RuntimeStateError
from ..report import ImageRecord, RunReport
from ..tokens import Selection, VisualTokens
from ._calls import check_left_padded
from ._decode import CacheState, next_position
from ._frozen import Decisions, source_row
from ._gating import probe_own_attention, run_gate
from ._sequence import causal_key_mask, format_mask, gather_positions, gather_rows, left_pack

if TYPE_CHECKING:
    from ..adapters.base import ImageSpan
    from ._state import RunState

__all__ = ["Layout", "Prefill", "pack_prefill", "prefill_layer", "check_span_budgets"]


def sync(device: torch.device) -> None:
    """Wait for queued kernels on CUDA, so that timings are honest."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Layout:
    """The (reduced) sequence as a range of layers sees it during prefill (see the module
    documentation for ``origin`` and ``entry_index``)."""

    origin: torch.Tensor
    entry_index: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        return self.origin >= 0

    def select(self, local: torch.Tensor) -> Layout:
        """The layout made of the local positions ``local`` ``[B, L'']`` (-1: padding)."""
        pad = local < 0
        idx = local.clamp(min=0)
        return Layout(
            self.origin.gather(1, idx).masked_fill(pad, -1),
            self.entry_index.gather(1, idx).masked_fill(pad, 0),
        )


@dataclass
class Prefill:
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
    entry: Layout
    current: Layout
    gate_layers: dict[int, int]
    stash: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    model_mask_is_none: bool = False
    held: dict[str, Any] = field(default_factory=dict)
    counted: tuple[Layout, list[int], list[int]] | None = None
    layer_inputs: tuple[tuple[int, ...], dict[str, Any]] | None = None
    #: The gate layer whose own attention is being computed (:func:`._gating.probe_own_attention`).
    probing: int | None = None

    def reduced_layer_inputs(self, kwargs: dict, hidden: torch.Tensor) -> dict[str, Any]:
        """Position embeddings, position ids and mask of the current layout. The language model
        passes every layer the same full-length ones, so they are reduced once per layout (and per
        incoming tensors) and reused by the following layers."""
        current = self.current
        key = (id(current), id(kwargs[Keyword.POSITION_EMBEDDINGS]), id(kwargs.get(Keyword.POSITION_IDS)),
               id(kwargs.get(Keyword.ATTENTION_MASK)))
        if self.layer_inputs is not None and self.layer_inputs[0] == key:
            return self.layer_inputs[1]
        cos, sin = kwargs[Keyword.POSITION_EMBEDDINGS]
        reduced: dict[str, Any] = {Keyword.POSITION_EMBEDDINGS: (gather_rows(cos, current.entry_index, seq_dim=-2),
                                                               gather_rows(sin, current.entry_index, seq_dim=-2))}
        if kwargs.get(Keyword.POSITION_IDS) is not None:
            reduced[Keyword.POSITION_IDS] = gather_positions(kwargs[Keyword.POSITION_IDS], current.entry_index)
        valid = current.valid.to(hidden.device)
        if self.model_mask_is_none and bool(valid.all()):
            reduced[Keyword.ATTENTION_MASK] = None  # keeps sdpa on its is_causal fast path
        else:
            reduced[Keyword.ATTENTION_MASK] = format_mask(causal_key_mask(valid, valid.shape[1]),
                                                          kwargs.get(Keyword.ATTENTION_MASK), hidden.dtype)
        self.layer_inputs = (key, reduced)
        return reduced

    def record_layer(self, report: RunReport) -> None:
        """Visual tokens each sample and image has at this layer; counted once per layout."""
        if self.counted is None or self.counted[0] is not self.current:
            origin = self.current.origin
            visual_alive = self.visual.gather(1, origin.clamp(min=0)) & (origin >= 0)
            per_image = [int((visual_alive[r.sample] & (self.image_of[r.sample].gather(0, origin[r.sample].clamp(min=0)) == r.image)).sum())
                         for r in report.images]
            self.counted = (self.current, [int(n) for n in visual_alive.sum(1)], per_image)
        _, per_sample, per_image = self.counted
        report.visual_tokens_per_layer.append(list(per_sample))
        for record, count in zip(report.images, per_image):
            record.kept_per_layer.append(count)


def check_span_budgets(state: RunState, span: ImageSpan) -> None:
    """Every stage's budget and the selector's options for one image the prefill holds (per tile
    with a selector budget spread over tiles), before any selector or decoder layer runs."""
    n = span.positions.numel()
    kind = "video" if span.layout.is_video else "image"
    check_image_budgets(state.schedule, state.gate_layers, n, f"{kind} {span.image} of sample {span.sample} has {n} visual tokens")
    stage = state.schedule.selector
    if stage is not None and stage.budget.spread == "tiles":
        for tile in range(span.layout.num_tiles):
            stage.selector.validate(int((span.layout.tile == tile).sum()))


def pack_prefill(state: RunState, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """The language model's pre-hook in a prefill: run stage I and pack the reduced sequence."""
    embeds = kwargs.get(Keyword.INPUTS_EMBEDS)
    input_ids = state.input_ids
    if embeds is None or input_ids is None:
        raise RuntimeStateError(
            "tokred needs input_ids to locate image tokens; call the model with input_ids, not inputs_embeds"
        )
    mask = kwargs.get(Keyword.ATTENTION_MASK)
    if mask is not None and mask.dim() != 2:
        raise RuntimeStateError("tokred needs a 2-D attention mask (or none); got a precomputed 4-D mask")
    adapter, schedule = state.adapter, state.schedule
    batch, length = input_ids.shape
    device = embeds.device
    mask2d = mask if mask is not None else torch.ones(batch, length, dtype=torch.long, device=device)
    real = mask2d.bool()
    spans = adapter.image_spans(input_ids, state.probes, state.multimodal_inputs)
    report = RunReport(adapter.family, state.method_name, adapter.num_layers, prefills=state.report.prefills + 1)
    state.report = report
    state.cache = None
    if not state.frozen:  # decisions of an earlier prefill must never leak into this one
        state.decisions = Decisions()
    if not spans:  # text only: nothing to reduce, leave every input as it is
        report.visual_tokens_input = [0] * batch
        report.visual_tokens_per_layer = [[0] * batch for _ in range(adapter.num_layers)]
        state.cache = CacheState(lambda: None, [], [], length, None, passthrough=True)
        state.mode = "passthrough"
        return None
    check_left_padded(real)
    for span in spans:
        check_span_budgets(state, span)

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
    instruction, system = adapter.text_roles(input_ids.cpu(), mask2d.cpu(), visual)
    full_positions = adapter.full_position_ids(kwargs.get(Keyword.POSITION_IDS), input_ids, mask, past_length=0)
    report.visual_tokens_input = [int(n) for n in visual.sum(1)]

    keep = real.cpu().clone()
    new_embeds = embeds
    records: dict[tuple[int, int], ImageRecord] = {}
    if schedule.selector is not None:
        new_embeds = embeds.clone()
        start = time.perf_counter()
        sync(device)
        for span in spans:
            selection = _stage1(state, span, embeds, instruction[span.sample])
            positions = span.positions
            dropped = torch.ones(positions.numel(), dtype=torch.bool)
            dropped[selection.indices] = False
            keep[span.sample, positions[dropped]] = False
            if selection.features is not None:
                new_embeds[span.sample, positions[selection.indices].to(device)] = selection.features.to(embeds.dtype)
            records[(span.sample, span.image)] = image_record(span.sample, span.image, span.layout, selection.indices)
        sync(device)
        report.selection_seconds += time.perf_counter() - start
    else:
        for span in spans:
            records[(span.sample, span.image)] = image_record(span.sample, span.image, span.layout,
                                                              torch.arange(span.positions.numel()))
    report.images = [records[(s.sample, s.image)] for s in spans]

    if schedule.selector is not None:
        origin = left_pack(keep)
    else:  # gates only: the language model input is untouched, layout as given (padding in place)
        origin = torch.where(real.cpu(), torch.arange(length).expand(batch, -1), -1)
    entry_local = torch.arange(origin.shape[1]).expand(batch, -1).clone()
    entry = Layout(origin, entry_local.masked_fill(origin < 0, 0))
    state.prefill = Prefill(
        spans=spans, visual=visual, image_of=image_of, token_of=token_of, tile_of=tile_of,
        instruction=instruction, system=system, image_sizes=image_sizes, tile_counts=tile_counts, entry=entry,
        current=entry, gate_layers={layer: i for i, layer in enumerate(state.gate_layers)},
    )
    # Renumbering mode: real tokens dropped at or before each position, [B, L].
    shift = torch.cumsum((real.cpu() & ~keep).long(), dim=1) if schedule.positions == "renumber" else None
    state.cache = CacheState(lambda: None, [0] * adapter.num_layers, [entry.valid], length,
                             None if shift is None else shift[:, -1].to(device),
                             next_position(adapter.position_index(full_positions), real))
    held = adapter.reduce_language_model_kwargs(kwargs, origin)
    state.prefill.held = held
    if schedule.selector is None:
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


def _stage1(state: RunState, span: ImageSpan, embeds: torch.Tensor, instruction: torch.Tensor) -> Selection:
    """Stage I for one image (``instruction`` ``[L]`` bool marks its sample's instruction text), or
    the frozen decision it replays."""
    stage = state.schedule.selector
    assert stage is not None
    n = span.positions.numel()
    if state.frozen:
        return state.decisions.replay_selection(source_row(state.frozen_rows, span.sample), span.sample, span.image, n)
    pre_projector = _probe(state, "pre_projector", span)
    tokens = VisualTokens(
        features=embeds[span.sample, span.positions.to(embeds.device)],
        layout=span.layout,
        pre_projector=pre_projector,
        cls_attention=_probe(state, "cls_attention", span),
        sample_index=span.sample,
        image_index=span.image,
        instruction_embeddings=embeds[span.sample, instruction.to(embeds.device)],
        vision_keys=_probe(state, "vision_keys", span),
        project=None if pre_projector is None else _projector(state),
    )
    selection = select_image_tokens(stage, tokens, describe=state.describe)
    state.decisions.record_selection(span.sample, span.image, n, selection)
    return selection


def _projector(state: RunState) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The adapter's projector for :attr:`VisualTokens.project`, with the vision probes paused while
    it runs (its input is a selector's merge, not an encoder output to capture)."""
    projector = state.adapter.projector()
    if projector is None:
        return None

    def project(rows: torch.Tensor) -> torch.Tensor:
        with state.probes.paused():
            return projector(rows)

    return project


def _probe(state: RunState, name: str, span: ImageSpan) -> torch.Tensor | None:
    """What the vision probes captured for one image, or None where the selector did not ask
    for it or the model cannot provide it (the adapter raises when it promised and failed)."""
    selector = state.schedule.selector.selector  # type: ignore[union-attr]
    if name not in selector.inputs or name not in state.adapter.available_inputs():
        return None
    return state.adapter.probe_values(state.probes, name, span)


def _current_layer_inputs(state: RunState, kwargs: dict, hidden: torch.Tensor) -> dict[str, Any]:
    """A decoder layer's keyword inputs as the current layout needs them (what the layer itself
    gets when no gate acts at it)."""
    prefill = state.prefill
    assert prefill is not None
    if prefill.current is prefill.entry:
        return kwargs
    return {**kwargs, **prefill.reduced_layer_inputs(kwargs, hidden),
            **state.adapter.reduce_layer_kwargs(kwargs, prefill.current.entry_index)}


def prefill_layer(state: RunState, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Decoder layer ``index``'s pre-hook in a prefill: the gate acting here, if any, then the
    layer's inputs reduced to the current layout."""
    prefill = state.prefill
    assert prefill is not None
    hidden = args[0] if args else kwargs[Keyword.HIDDEN_STATES]
    if index == 0:
        prefill.model_mask_is_none = kwargs.get(Keyword.ATTENTION_MASK) is None
    if index in prefill.gate_layers:
        start = time.perf_counter()
        sync(hidden.device)
        gate = state.schedule.gates[prefill.gate_layers[index]].gate
        if gate.attention_layer == "own" and not state.frozen:
            probe_own_attention(state, index, hidden, _current_layer_inputs(state, kwargs, hidden))
        local = run_gate(state, index, prefill, hidden)
        prefill.current = prefill.current.select(local)
        hidden = gather_rows(hidden, local, seq_dim=1)
        if prefill.held:
            state.adapter.follow_reduction(prefill.held, local)
        sync(hidden.device)
        state.report.gating_seconds += time.perf_counter() - start
        assert state.cache is not None
        state.cache.add_group(index, prefill.current.valid)
    prefill.record_layer(state.report)
    if prefill.current is prefill.entry:
        return None
    new_kwargs = dict(kwargs)
    new_kwargs.update(prefill.reduced_layer_inputs(kwargs, hidden))
    new_kwargs.update(state.adapter.reduce_layer_kwargs(kwargs, prefill.current.entry_index))
    if args:
        return (hidden, *args[1:]), new_kwargs
    new_kwargs[Keyword.HIDDEN_STATES] = hidden
    return args, new_kwargs
