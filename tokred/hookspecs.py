"""Hook specifications: the complete plugin interface of tokred.

A plugin is any importable object (usually a module) with functions marked ``@tokred.hookimpl``
whose names match the specifications below. It is found through the ``tokred`` entry-point group::

    # pyproject.toml of a third-party distribution
    [project.entry-points.tokred]
    mymethod = "tokred_mymethod.plugin"

Every registration hook receives a ``register`` callback instead of returning values, so that the
core owns uniqueness of names, aliases and error reporting::

    register(name: str, obj: type, *, aliases: Sequence[str] = ())

What the core checks, and reports by plugin, distribution and hook (``tokred list`` shows it,
``Registry.errors`` holds it) while what other plugins registered keeps working:

* **each registration on its own.** Names are lowercase (letters, digits, ``_``, ``-``, ``.``);
  ``obj`` subclasses the hook's base class; a selector's, gate's or method's options form a
  pydantic model with ``extra="forbid"`` whose every field has a ``description`` and a default,
  and a method can be created with those defaults. A registration that fails a check is refused;
  the hook's other registrations stand. A hook that raises keeps what it registered before.
* **names, once every plugin has registered** (so never in load order), per kind and aliases
  included: a name claimed once belongs to its claimant; a name claimed by a distribution of this
  repository (``tokred.registry.FIRST_PARTY_DISTRIBUTIONS``) belongs to it; a name several third
  parties claim belongs to none of them until ``tokred.Registry(prefer={"<kind>:<name>": "<dist>"})``
  picks one, or all but one are uninstalled. Losing the primary name loses the whole registration;
  losing an alias loses only the alias. Prefix your names with your plugin's name.
* **the hooks themselves**: a function marked ``@tokred.hookimpl`` whose name is no hook below (a
  misspelling such as ``tokred_register_method``), and a function named like a hook but not marked,
  are reported with the hook names; pluggy would silently never call them. Mark a hook of some other
  interface ``@tokred.hookimpl(optionalhook=True)``. A plugin that registers nothing is reported too.

Hooks run in the order adapters, selectors, gates, methods. A hook must not query the registry
(it is still loading: that is an error), and ``register`` works only during its hook call.
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
