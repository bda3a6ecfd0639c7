"""What a run knows between hook calls: one mutable record shared by the phase modules.

The hooks of a :class:`~tokred.runtime.Run` fire in a fixed order per forward (top-level model,
multimodal model, language model, each decoder layer, language-model output, top-level output); each
phase module reads and updates this record, so the state of a forward is in one place and the
modules say what they do with it:

* :mod:`._calls`: which phase a call is (prefill, decoding step, text-only passthrough);
* :mod:`._prefill`: packing a prefill (stage I, the reduced sequence, per-layer inputs);
* :mod:`._gating`: gates at decoder layers (state, attention slice, decision, replay);
* :mod:`._decode`: decoding on the cache a prefill filled (key masks per layer group, positions);
* :mod:`._frozen`: the decisions of the latest prefill, replayed while frozen;
* :mod:`._labels`: labels scored on the reduced sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..adapters.base import Adapter, VisionProbes
from ..decisions import Describe
from ..report import RunReport
from ..schedule import Schedule
from ._frozen import Decisions

if TYPE_CHECKING:
    import weakref

    import torch

    from ._decode import CacheState
    from ._prefill import Prefill

__all__ = ["RunState", "Mode"]

#: ``idle`` between forwards; ``prefill`` a call that starts sequences with images; ``passthrough``
#: one without images (nothing to reduce); ``decode`` a step on the cache a prefill filled.
Mode = Literal["idle", "prefill", "passthrough", "decode"]


@dataclass
class RunState:
    """The record the hooks of one run share (see the module documentation)."""

    adapter: Adapter
    schedule: Schedule
    gate_layers: list[int]
    method_name: str
    describe: Describe
    report: RunReport
    mode: Mode = "idle"
    probes: VisionProbes = field(default_factory=VisionProbes)
    #: The encoder outputs the latest prefill consumed and its probes: generate(use_cache=False)
    #: passes the same outputs to every step, which may then reuse the probes.
    consumed_probes: tuple[weakref.ref, VisionProbes] | None = None
    input_ids: torch.Tensor | None = None
    multimodal_inputs: dict[str, Any] = field(default_factory=dict)
    caller_positions: bool = False
    prefill: Prefill | None = None
    cache: CacheState | None = None
    decisions: Decisions = field(default_factory=Decisions)
    frozen: bool = False
    frozen_rows: list[int] | None = None
    #: ``labels`` taken from the latest top-level call, scored on the reduced sequence.
    labels: torch.Tensor | None = None
    output_positions: torch.Tensor | None = None
