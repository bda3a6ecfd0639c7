"""Hook specifications: the complete plugin interface of tokred.

A plugin is any importable object (usually a module) with functions marked ``@tokred.hookimpl``
whose names match the specifications below. It is found through the ``tokred`` entry-point group::

    # pyproject.toml of a third-party distribution
    [project.entry-points.tokred]
    mymethod = "tokred_mymethod.plugin"

Every registration hook receives a ``register`` callback instead of returning values, so that the
core owns uniqueness of names, aliases and error reporting::

    register(name: str, obj: type, *, aliases: Sequence[str] = ())

Names are lowercase (letters, digits, ``_``, ``-``, ``.``), unique across all plugins; a clash is
reported naming both plugins, and the later registration is dropped. A plugin that fails to import,
or whose hook raises, is reported by name (``tokred list`` shows it, ``Registry.errors`` holds it);
what other plugins registered keeps working. Hooks run in the order adapters, selectors, gates,
methods, so a method may refer to selectors and gates registered by any plugin.
"""

from __future__ import annotations

import pluggy

__all__ = ["hookspec", "hookimpl", "PROJECT_NAME"]

#: The pluggy project name and the entry-point group.
PROJECT_NAME = "tokred"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def tokred_register_adapters(register) -> None:  # type: ignore[no-untyped-def]
    """Register model adapters.

    ``register(name, adapter_cls)`` where ``adapter_cls`` subclasses :class:`tokred.Adapter` and lists
    the ``transformers`` model class names it handles in ``model_classes``. ``name`` is the model
    family shown by :func:`tokred.list_adapters` (e.g. ``"llava"``). When several adapters claim a
    class, the one naming the most specific class in the model's MRO wins.
    """


@hookspec
def tokred_register_selectors(register) -> None:  # type: ignore[no-untyped-def]
    """Register stage-I selectors.

    ``register(name, selector_cls)`` where ``selector_cls`` subclasses :class:`tokred.Selector`.
    Its fields are its options. Selectors are building blocks for methods and for hand-written
    :class:`tokred.Schedule` objects; registering one makes it addressable by name in serialised
    schedules.
    """


@hookspec
def tokred_register_gates(register) -> None:  # type: ignore[no-untyped-def]
    """Register stage-II gates.

    ``register(name, gate_cls)`` where ``gate_cls`` subclasses :class:`tokred.Gate`.
    """


@hookspec
def tokred_register_methods(register) -> None:  # type: ignore[no-untyped-def]
    """Register methods: the presets users create with ``tokred.create(name, **options)``.

    ``register(name, method_cls, aliases=())`` where ``method_cls`` subclasses :class:`tokred.Method`.
    Every registered method is enrolled in the conformance suite (:mod:`tokred.testing`) on every
    registered adapter.
    """
