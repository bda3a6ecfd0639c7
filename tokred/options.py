"""Option types for methods and components: a bool is not a count, a string is not a number.

pydantic's default (lax) validation turns ``keep=True`` into 1, ``keep="64"`` into 64 and
``gate_layer=True`` into layer 1, so a typo or a mis-parsed value would run a plausible but wrong
experiment. Budgets, layers and other numeric options use these types instead::

    from tokred.options import Integer, LayerSpec, Number

    class MyMethod(BudgetOptions, Method):
        layer: LayerSpec = Field(2, description="...")
        tau: Number = Field(0.1, description="...")

* :data:`Integer` accepts Python and NumPy integers (``64``, ``numpy.int64(64)``), never ``bool``,
  ``float`` or ``str``;
* :data:`Number` accepts integers and reals (``0.5``, ``1``), never ``bool`` or ``str``;
* :data:`LayerSpec` accepts an :data:`Integer` layer index or a depth-fraction string such as
  ``"7/8"`` (checked by :func:`tokred.schedule.resolve_layer`), never ``bool`` or ``float``.
"""

from __future__ import annotations

import numbers
from typing import Annotated, Union

from pydantic import BeforeValidator

__all__ = ["Integer", "Number", "LayerSpec"]


def _integer(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"expected a whole number, got {type(value).__name__} {value!r}")
    return int(value)


def _number(value: object) -> object:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"expected a number, got {type(value).__name__} {value!r}")
    return float(value)


def _layer(value: object) -> object:
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"expected a layer index or a depth fraction such as '7/8', got {type(value).__name__} {value!r}")
    return int(value)


#: A whole-number option (token counts, seeds, sizes): ``bool``, ``float`` and ``str`` are refused.
Integer = Annotated[int, BeforeValidator(_integer)]
#: A real-number option (ratios, thresholds): ``bool`` and ``str`` are refused; integers become floats.
Number = Annotated[float, BeforeValidator(_number)]
#: A decoder layer: an index (negative counts from the end) or a depth fraction such as ``"7/8"``.
LayerSpec = Annotated[Union[int, str], BeforeValidator(_layer)]
