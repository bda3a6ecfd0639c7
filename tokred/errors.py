"""Exceptions raised by tokred.

Every error a user can trigger derives from :class:`TokredError`, so ``except tokred.TokredError``
catches them all. Each error is raised before a model call where the problem can be known then.
:class:`BudgetError` and :class:`ScheduleError` deliberately do not derive from ``ValueError``:
pydantic wraps ``ValueError`` raised in validators into its own ``ValidationError``, and these must
reach the user as themselves (``tokred.Budget(keep=0)`` raises ``BudgetError``).
"""

from __future__ import annotations

__all__ = [
    "TokredError",
    "OptionsError",
    "BudgetError",
    "ScheduleError",
    "UnsupportedModelError",
    "PluginError",
    "RuntimeStateError",
    "MethodContractError",
    "TransformersInterfaceError",
    "UntestedReleaseWarning",
]


class TokredError(Exception):
    """Base class of every error raised by tokred."""


class OptionsError(TokredError, ValueError):
    """A method, selector or gate was given an unknown or invalid option."""


class BudgetError(TokredError):
    """A token budget is impossible (zero, negative, both ``keep`` and ``keep_ratio``, larger than
    the number of visual tokens, or larger than an earlier stage's budget)."""


class ScheduleError(TokredError):
    """A schedule does not fit the model (e.g. a gate layer outside the decoder)."""


class UnsupportedModelError(TokredError, TypeError):
    """No registered adapter handles this model class."""


class PluginError(TokredError):
    """A plugin failed to load or to register; the message names the plugin and the hook."""


class RuntimeStateError(TokredError, RuntimeError):
    """The model is used in a way the active run cannot handle correctly (nested ``apply``,
    a static cache, continuing on a pruned cache through ``generate``)."""


class MethodContractError(TokredError, RuntimeError):
    """A selector or gate returned something that breaks its contract (duplicate or out-of-range
    indices, more tokens than its budget); the message names the component."""


class TransformersInterfaceError(TokredError, RuntimeError):
    """``transformers`` called tokred's hooks in a way it does not recognise (a renamed keyword, a
    cache it cannot read, a call it cannot classify as prefill or decoding step). The message names
    the installed ``transformers`` release and what tokred expected (see :mod:`tokred.compat`)."""


class UntestedReleaseWarning(UserWarning):
    """The installed ``transformers`` lies outside the range tokred is tested with
    (:data:`tokred.compat.TESTED_TRANSFORMERS`): ``pip install`` never resolves such a release, so it
    was installed on purpose (``--no-deps``, a pinned environment). :func:`tokred.apply` warns once
    per process; the message names the release, the tested range and the pip command that installs
    a tested one. Silence it with ``warnings.filterwarnings("ignore", category=UntestedReleaseWarning)``."""
