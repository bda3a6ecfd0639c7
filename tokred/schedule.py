"""Schedules: where visual tokens are dropped, and how many.

A :class:`Schedule` is a declarative, validated, serialisable value: at most one stage-I Selector
with its budget, and Gates at decoder layers. Layers are ints (negative counts from the end) or depth
fractions such as ``"7/8"`` that are resolved per model (``floor(7/8 * num_layers)``).

A gate at layer ``l`` decides from the attention computed in layer ``l - 1`` and its survivors are
all that layers ``l, l+1, ...`` see (FastV's convention: Chen et al. 2024, section 4). So layer 0
cannot hold a gate; reduction before the first layer is a Selector's job. A gate may instead read
layer ``l``'s own attention on its input (``Gate.attention_layer = "own"``, PyramidDrop's score),
which the runtime computes with one extra call of that layer's attention module.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .options import LayerSpec
from .budget import Budget
from .components import Gate, Selector
from .errors import BudgetError, ScheduleError

if TYPE_CHECKING:
    from .registry import Registry

__all__ = ["SelectorStage", "GateStage", "Schedule", "resolve_layer"]


def resolve_layer(layer: int | str, num_layers: int) -> int:
    """Turn a layer spec into a 0-based decoder layer index for a model with ``num_layers`` layers.

    ``int``: used as is, negatives count from the end. ``"p/q"`` or ``"0.875"``: depth fraction,
    rounded down. Raises :class:`ScheduleError` unless ``1 <= layer < num_layers``.
    """
    if isinstance(layer, str):
        try:
            fraction = Fraction(layer.strip())
        except (ValueError, ZeroDivisionError) as exc:
            raise ScheduleError(f"layer {layer!r} is neither an int nor a depth fraction like '7/8'") from exc
        if not 0 < fraction < 1:
            raise ScheduleError(f"depth fraction {layer!r} must lie strictly between 0 and 1")
        index = math.floor(fraction * num_layers)
    else:
        index = layer + num_layers if layer < 0 else layer
    if not 1 <= index < num_layers:
        raise ScheduleError(
            f"gate layer {layer!r} resolves to {index}, outside 1..{num_layers - 1} for this {num_layers}-layer "
            "decoder (layer 0 has no earlier attention to decide from; use a Selector to reduce before the LLM)"
        )
    return index


class SelectorStage(BaseModel):
    """Stage I: a Selector and the per-image budget it keeps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    selector: Selector = Field(description="The Selector that chooses visual tokens before the LLM.")
    budget: Budget = Field(description="Visual tokens kept per image.")


class GateStage(BaseModel):
    """Stage II: a Gate acting at one decoder layer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    layer: LayerSpec = Field(description="Decoder layer (int, negative from the end) or depth fraction such as '7/8'.")
    gate: Gate = Field(description="The Gate that decides which visual tokens stay.")
    budget: Budget | None = Field(None, description="Visual tokens kept per image; None for gates that decide alone.")

    @field_validator("layer")
    @classmethod
    def _check_layer_spec(cls, value: int | str) -> int | str:
        if isinstance(value, str):
            resolve_layer(value, 1 << 20)  # syntax and range of the fraction; the model decides the rest
        elif value == 0:
            raise ScheduleError("a gate cannot act at layer 0; use a Selector to reduce before the LLM")
        return value

    @model_validator(mode="after")
    def _budget_matches_gate(self) -> GateStage:
        if type(self.gate).requires_budget and self.budget is None:
            raise BudgetError(f"gate {type(self.gate).__name__} needs a budget (keep or keep_ratio)")
        if not type(self.gate).requires_budget and self.budget is not None:
            raise BudgetError(f"gate {type(self.gate).__name__} decides alone and takes no budget")
        return self


class Schedule(BaseModel):
    """Where and how much: an optional stage-I Selector and any number of stage-II Gates."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    selector: SelectorStage | None = Field(None, description="Stage I, before the language model.")
    gates: tuple[GateStage, ...] = Field((), description="Stage II gates, at distinct decoder layers.")
    positions: Literal["original", "renumber"] = Field(
        "original",
        description="'original': surviving tokens keep the position ids of the full sequence; "
        "'renumber': positions are made contiguous after each reduction.",
    )

    @model_validator(mode="after")
    def _budgets_shrink(self) -> Schedule:
        previous = self.selector.budget if self.selector else None
        for stage in self.gates:
            if stage.budget is None:
                continue
            if previous is not None and previous.keep is not None and stage.budget.keep is not None:
                if stage.budget.keep > previous.keep:
                    raise BudgetError(
                        f"gate at layer {stage.layer!r} keeps {stage.budget.keep} per image but an earlier stage "
                        f"keeps only {previous.keep}"
                    )
            previous = stage.budget
        return self

    def gate_layers(self, num_layers: int) -> list[int]:
        """The gates' resolved layers for a ``num_layers``-layer decoder; strictly increasing."""
        layers = [resolve_layer(stage.layer, num_layers) for stage in self.gates]
        if any(b <= a for a, b in zip(layers, layers[1:])):
            raise ScheduleError(f"gate layers must be distinct and in increasing order, got {layers}")
        return layers

    def to_dict(self, registry: Registry | None = None) -> dict[str, Any]:
        """A JSON-ready description naming components by their registered names."""
        from .registry import default_registry

        registry = registry or default_registry()

        def component(obj: Selector | Gate) -> dict[str, Any]:
            return {"name": registry.name_of(obj), "options": obj.model_dump(mode="json")}

        def budget(b: Budget | None) -> dict[str, Any] | None:
            return None if b is None else b.model_dump(exclude_defaults=True)

        return {
            "selector": None
            if self.selector is None
            else {**component(self.selector.selector), "budget": budget(self.selector.budget)},
            "gates": [
                {"layer": g.layer, **component(g.gate), "budget": budget(g.budget)} for g in self.gates
            ],
            "positions": self.positions,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], registry: Registry | None = None) -> Schedule:
        """Inverse of :meth:`to_dict`."""
        from .registry import default_registry

        registry = registry or default_registry()
        selector = data.get("selector")
        return cls(
            selector=None
            if selector is None
            else SelectorStage(
                selector=registry.selector(selector["name"], **selector.get("options", {})),
                budget=Budget(**selector["budget"]),
            ),
            gates=tuple(
                GateStage(
                    layer=g["layer"],
                    gate=registry.gate(g["name"], **g.get("options", {})),
                    budget=None if g.get("budget") is None else Budget(**g["budget"]),
                )
                for g in data.get("gates", ())
            ),
            positions=data.get("positions", "original"),
        )
