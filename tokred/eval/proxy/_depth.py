"""Depth-matched layer options: methods run on the proxy at the depth they were published for.

Several methods' layer options default to an absolute decoder layer chosen for LLaVA-1.5-7B, whose
language model has :data:`REFERENCE_DEPTH` = 32 layers: FastV prunes from layer K = 2, DART gates
at layer 2. Layer 2 of 32 is 1/16 of the depth. The synthetic proxy (:func:`tokred.eval.proxy.load_proxy`)
is much shallower (4 decoder layers shipped; 16 in the version in progress, issue #26): on 16 layers,
layer 2 sits at 1/8 of the depth, twice as deep relative to the model, and a method would be measured
after the model has done twice the share of its work on the full sequence, not at its published
setting.

:func:`reference_depth_options` therefore turns every such default into the depth fraction it
stands for on LLaVA-1.5, ``"K/32"``, which :func:`tokred.schedule.resolve_layer` resolves per model
(``floor(K/32 * num_layers)``): ``"2/32"`` is layer 2 of 32 and layer 1 of 16. It reads the method
class's own option fields, so it maps any registered method, a third party's included, without a
list of names. Options whose defaults are depth fractions already (``"1/4"``, ``"7/8"``) resolve
per model on their own and are left alone; so are negative layers (counted from the end), layer 0
(the same layer at every depth; ``0/32`` is no valid fraction, which must lie strictly between 0
and 1) and layers at or beyond :data:`REFERENCE_DEPTH`.

The shipped methods (defaults at the time of writing)::

    method  option      default               on the proxy   layer of 16   layer of 4
    fastv   layer       2                     "2/32"         1             1 (0 raised to 1: at_depth)
    dart    gate_layer  2                     "2/32"         1             1 (0 raised to 1: at_depth)
    pdrop   layers      ("1/4","1/2","3/4")   unchanged      4, 8, 12      1, 2, 3
    todre   gate_layer  "7/8"                 unchanged      14            3
    star    gate_layer  "1/4"                 unchanged      4             1

The ``proxy`` preset names :func:`reference_depth_options` in its ``layer_options``
(:class:`tokred.bench._presets.Preset`); ``tokred demo`` and ``tokred eval --preset proxy`` create
every method with these options under the user's own (``--option layer=3`` wins) and say which
they depth-matched. The methods' own defaults do not change. On a model shallower than ``32 / K``
layers ``"K/32"`` rounds down to layer 0, where no gate can act; :func:`at_depth` raises such a
layer to 1, the shallowest a gate can act at.
"""

from __future__ import annotations

import math
import numbers
import types
from collections.abc import Mapping, Sequence
from fractions import Fraction
from typing import TYPE_CHECKING, Annotated, Any, Union, get_args, get_origin

from ...options import LayerSpec

if TYPE_CHECKING:
    from ...registry import Registry

__all__ = ["REFERENCE_DEPTH", "reference_depth_options", "at_depth", "describe"]

#: Decoder layers of LLaVA-1.5-7B's language model (Vicuna-7B): the depth the absolute layer
#: defaults of the shipped methods were published for.
REFERENCE_DEPTH = 32

#: The validator that marks an option as a :data:`tokred.options.LayerSpec`.
_LAYER_MARK = get_args(LayerSpec)[1]


def reference_depth_options(registry: Registry, name: str) -> dict[str, str | tuple]:
    """The options that run method ``name`` at LLaVA-1.5's depth fraction of its absolute layer defaults.

    Every option of the method's class annotated :data:`~tokred.options.LayerSpec` (or a tuple or
    list of them, or an optional one) whose default holds an int layer ``K`` with
    ``0 < K < REFERENCE_DEPTH`` is given as ``f"{K}/{REFERENCE_DEPTH}"`` (element by element in a
    tuple, its other elements unchanged); options with nothing to change are left out, so a method
    whose layers are depth fractions already gives ``{}``. See the module's docstring for why.

    Raises:
        OptionsError: ``name`` is not a registered method.
    """
    cls = registry.entry("method", name).obj
    options: dict[str, Any] = {}
    for key, field in getattr(cls, "model_fields", {}).items():
        default = field.get_default(call_default_factory=True)
        if _is_layer_spec(field.metadata):
            mapped = _fraction(default)
        else:
            mapped = _map(field.annotation, default)
        if _changed(mapped, default):
            options[key] = mapped
    return options


def at_depth(options: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    """``options`` (from :func:`reference_depth_options`) for a ``num_layers``-layer decoder: a depth
    fraction that rounds down to layer 0 there (a model shallower than ``REFERENCE_DEPTH / K``
    layers), where no gate can act, becomes layer 1, the shallowest one that can; the rest as given."""
    return {key: _fit(value, num_layers) for key, value in options.items()}


def describe(name: str, options: Mapping[str, Any], num_layers: int) -> str:
    """``"fastv: layer=2/32 (LLaVA-1.5's layer 2 of 32 at this model's depth: layer 1 of 16)"``, for
    the ``options`` of :func:`reference_depth_options` on a ``num_layers``-layer decoder."""
    fitted = at_depth(options, num_layers)
    parts = []
    for key, value in options.items():
        given, used = _elements(value), _elements(fitted[key])
        ks = ", ".join(_text(Fraction(v) * REFERENCE_DEPTH) if isinstance(v, str) else str(v) for v in given)
        layers = ", ".join(str(_resolve(v, num_layers)) for v in used)
        plural = "s" if len(given) > 1 else ""
        note = f"LLaVA-1.5's layer{plural} {ks} of {REFERENCE_DEPTH} at this model's depth"
        if fitted[key] != value:
            note += (f", raised to layer{plural} {layers} of {num_layers}: {_text(value)} rounds down to layer 0 here, "
                     "where no gate acts")
        else:
            note += f": layer{plural} {layers} of {num_layers}"
        parts.append(f"{key}={_text(fitted[key])} ({note})")
    return f"{name}: " + ", ".join(parts)


def _is_layer_spec(metadata: Sequence[Any]) -> bool:
    return any(m is _LAYER_MARK or getattr(m, "func", None) is _LAYER_MARK.func for m in metadata)


def _fraction(value: Any) -> Any:
    """An int layer ``0 < K < REFERENCE_DEPTH`` as ``"K/REFERENCE_DEPTH"``; anything else as is."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and 0 < value < REFERENCE_DEPTH:
        return f"{int(value)}/{REFERENCE_DEPTH}"
    return value


def _map(annotation: Any, value: Any) -> Any:
    """``value`` with every int layer that ``annotation`` types as a LayerSpec made a fraction."""
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *metadata = get_args(annotation)
        return _fraction(value) if _is_layer_spec(metadata) else _map(base, value)
    if origin is Union or origin is getattr(types, "UnionType", None):
        for arm in get_args(annotation):
            mapped = _map(arm, value)
            if _changed(mapped, value):
                return mapped
        return value
    if isinstance(value, (tuple, list)) and origin in (tuple, list, Sequence):
        args = get_args(annotation)
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            if len(args) != len(value):
                return value
            elements = list(args)
        else:
            elements = [args[0] if args else Any] * len(value)
        return type(value)(_map(a, v) for a, v in zip(elements, value))
    return value


def _changed(mapped: Any, value: Any) -> bool:
    return type(mapped) is not type(value) or mapped != value


def _fit(value: Any, num_layers: int) -> Any:
    if isinstance(value, (tuple, list)):
        return type(value)(_fit(v, num_layers) for v in value)
    if isinstance(value, str):
        try:
            fraction = Fraction(value.strip())
        except (ValueError, ZeroDivisionError):
            return value
        if 0 < fraction < 1 and math.floor(fraction * num_layers) < 1:
            return 1
    return value


def _resolve(value: Any, num_layers: int) -> Any:
    from ...schedule import resolve_layer

    try:
        return resolve_layer(value, num_layers)
    except Exception:  # shown as given: the run reports the error
        return value


def _elements(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (tuple, list)) else [value]


def _text(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_text(v) for v in value) + ")"
    if isinstance(value, Fraction):
        return str(value.numerator) if value.denominator == 1 else str(value)
    return str(value)
