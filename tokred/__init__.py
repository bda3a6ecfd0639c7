"""tokred: training-free visual-token reduction for vision-language models on ``transformers``.

Quick start::

    import tokred
    method = tokred.create("fastv", keep=64)
    with tokred.apply(model, method) as run:
        out = model.generate(**inputs, max_new_tokens=32)
    print(run.report.summary())
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    BudgetError,
    MethodContractError,
    OptionsError,
    PluginError,
    RuntimeStateError,
    ScheduleError,
    TokredError,
    TransformersInterfaceError,
    UnsupportedModelError,
    UntestedReleaseWarning,
)
from .hookspecs import hookimpl, hookspec

if TYPE_CHECKING:
    from .adapters.base import Adapter, ImageSpan, VisionProbes
    from .budget import Budget
    from .components import Gate, Selector, check_scores, top_k_indices
    from .method import BudgetOptions, Method
    from .options import Integer, LayerSpec, Number
    from .registry import Registry, default_registry
    from .runtime import Run, RunReport, apply
    from .schedule import GateStage, Schedule, SelectorStage
    from .tokens import GateState, ImageLayout, Selection, VisualTokens

# Imported on first use (PEP 562), so that `import tokred` (and `tokred --help`) imports neither
# torch nor pydantic; `from tokred import Run` and `tokred.Run` work as if imported above. One line
# per module, as the imports above.
_LAZY = {name: module for module, names in {
    ".adapters.base": ("Adapter", "ImageSpan", "VisionProbes"),
    ".budget": ("Budget",),
    ".components": ("Gate", "Selector", "check_scores", "top_k_indices"),
    ".method": ("BudgetOptions", "Method"),
    ".options": ("Integer", "LayerSpec", "Number"),
    ".registry": ("Registry", "default_registry"),
    ".runtime": ("Run", "RunReport", "apply"),
    ".schedule": ("GateStage", "Schedule", "SelectorStage"),
    ".tokens": ("GateState", "ImageLayout", "Selection", "VisualTokens"),
}.items() for name in names}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups do not come here again
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # registry and public functions
    "list_methods", "list_adapters", "list_selectors", "list_gates", "create", "apply",
    "Registry", "default_registry", "hookimpl", "hookspec",
    # interfaces
    "Selector", "Gate", "Schedule", "SelectorStage", "GateStage", "Budget", "Method", "BudgetOptions",
    "Adapter", "ImageSpan", "VisionProbes", "top_k_indices", "check_scores",
    # option types
    "Integer", "Number", "LayerSpec",
    # data objects
    "VisualTokens", "Selection", "GateState", "ImageLayout", "Run", "RunReport",
    # errors
    "TokredError", "OptionsError", "BudgetError", "ScheduleError", "UnsupportedModelError", "PluginError",
    "RuntimeStateError", "MethodContractError", "TransformersInterfaceError", "UntestedReleaseWarning",
]


def list_methods(pattern: str = "*") -> list[str]:
    """Sorted names of the registered methods matching the ``fnmatch`` pattern (e.g. ``"fast*"``)."""
    from .registry import default_registry

    return default_registry().list_methods(pattern)


def list_adapters(pattern: str = "*") -> list[str]:
    """Sorted names of the registered model families (adapters)."""
    from .registry import default_registry

    return default_registry().list_adapters(pattern)


def list_selectors(pattern: str = "*") -> list[str]:
    """Sorted names of the registered stage-I selectors."""
    from .registry import default_registry

    return default_registry().list_selectors(pattern)


def list_gates(pattern: str = "*") -> list[str]:
    """Sorted names of the registered stage-II gates."""
    from .registry import default_registry

    return default_registry().list_gates(pattern)


def create(name: str, **options: Any) -> Method:
    """Create the registered method ``name`` with validated ``options``.

    Unknown options raise :class:`OptionsError` listing the valid ones; impossible budgets raise
    :class:`BudgetError`. Both happen here, before any model is touched.
    """
    from .registry import default_registry

    return default_registry().create(name, **options)
