"""The plugin registry: methods, selectors, gates and adapters, found through entry points.

A :class:`Registry` owns its ``pluggy.PluginManager``. Entry points of the ``tokred`` group are
loaded lazily, on the first query, in three steps:

1. **load** every plugin. One that fails to import, whose hook has a wrong signature, or that
   carries a function named like a hook that pluggy would never call (a misspelling such as
   ``tokred_register_method``, or a hook without ``@tokred.hookimpl``) is reported;
2. **collect** what every plugin's hooks register, in the order adapters, selectors, gates,
   methods. Each ``register()`` call is checked on its own (name, base class, option model): a bad
   one is refused and reported, the plugin's other registrations stand. A hook that raises keeps
   what it registered before the exception;
3. **resolve** the names, after every plugin has registered, so that the outcome never depends on
   the order plugins load in (see :class:`Registry` for the precedence rule).

Every problem is recorded in :attr:`Registry.errors` as a :class:`PluginFailure` naming the plugin,
its distribution and the hook; the other plugins load normally. Tests build their own
``Registry``; the module-level functions (``tokred.list_methods`` and friends) use
:func:`default_registry`.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib.metadata
import inspect
import re
import textwrap
import threading
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Mapping, Sequence

import pluggy
from pydantic import BaseModel, ValidationError

from . import hookspecs
from .components import Gate, Selector
from .errors import OptionsError, PluginError, TokredError, UnsupportedModelError
from .method import Method

if TYPE_CHECKING:
    import torch.nn as nn

    from .adapters.base import Adapter

__all__ = [
    "Registry", "Entry", "PluginFailure", "default_registry", "set_default_registry", "FIRST_PARTY_DISTRIBUTIONS",
    "suggest", "option_lines",
]

Kind = Literal["adapter", "selector", "gate", "method"]
_HOOKS: tuple[tuple[Kind, str], ...] = (
    ("adapter", "tokred_register_adapters"),
    ("selector", "tokred_register_selectors"),
    ("gate", "tokred_register_gates"),
    ("method", "tokred_register_methods"),
)
_KINDS: tuple[Kind, ...] = tuple(kind for kind, _ in _HOOKS)
_HOOK_NAMES: tuple[str, ...] = tuple(hook for _, hook in _HOOKS)
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")

FIRST_PARTY_DISTRIBUTIONS: frozenset[str] = frozenset({"tokred", "tokred-todre", "tokred-star", "tokred-baselines", "tokred-video"})
"""The distributions of this repository: a name (or alias) one of them registers belongs to it.

No other plugin can take such a name over, whatever its entry point is called (see
:class:`Registry`). ``tokred`` registers the adapters and the baselines, ``tokred-todre`` and
``tokred-star`` their methods; ``tokred-baselines`` is reserved for a future distribution of more
baseline methods. Everything else, plugins passed in-process to :class:`Registry` included, is
third-party.
"""


def suggest(word: str, candidates: Iterable[str], *, cutoff: float = 0.6) -> str | None:
    """The candidate closest to ``word`` (:func:`difflib.get_close_matches`), or ``None`` when none
    is close enough.

    Every "did you mean" of tokred comes from here: the registry's unknown names and options, the
    hook names of a plugin, and the command line's flags, commands, choices and options.
    """
    close = difflib.get_close_matches(word, list(dict.fromkeys(candidates)), n=1, cutoff=cutoff)
    return close[0] if close else None


def option_lines(fields: Mapping[str, Any], *, width: int = 100, indent: int = 2) -> list[str]:
    """The options of an option model, one per line, for error messages and listings.

    Each line holds the option's name, its default (``default 0.1``, or ``required``) and its
    description, in aligned columns; a description that does not fit in ``width`` columns wraps onto
    lines of its own, indented to its column::

          keep        default None     Visual tokens to keep per image (absolute). Excludes keep_ratio.
          spread      default 'image'  'image': rank all of an image's tokens together; 'tiles': split
                                       each image's budget over its tiles ...

    Args:
        fields: ``model_fields`` of a pydantic model (name -> ``FieldInfo``).
        width: the widest a line may be (a long name or default can exceed it; words never break).
        indent: spaces before every line.
    """
    rows = []
    for name, info in fields.items():
        default = "required" if info.is_required() else f"default {info.default!r}"
        rows.append((name, default, " ".join((info.description or "").split())))
    if not rows:
        return []
    names = max(len(name) for name, _, _ in rows)
    defaults = max(len(default) for _, default, _ in rows)
    column = indent + names + 2 + defaults + 2
    lines = []
    for name, default, text in rows:
        head = f"{' ' * indent}{name.ljust(names)}  {default.ljust(defaults)}  "
        if not text:
            lines.append(head.rstrip())
            continue
        # A text column narrower than 40 characters reads badly: the description goes under the row.
        if width - column >= 40:
            lines.extend(textwrap.wrap(text, width, initial_indent=head, subsequent_indent=" " * column,
                                       break_long_words=False, break_on_hyphens=False))
        else:
            lines.append(head.rstrip())
            lines.extend(textwrap.wrap(text, max(width, indent + 44), initial_indent=" " * (indent + 4),
                                       subsequent_indent=" " * (indent + 4), break_long_words=False,
                                       break_on_hyphens=False))
    return lines


def _hint(word: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'todre'?)`` when a candidate is close to ``word``, else ``""``."""
    close = suggest(word, candidates)
    return f" (did you mean {close!r}?)" if close is not None else ""


def _provider(plugin: str, distribution: str | None, in_process: bool) -> str:
    """``plugin 'todre' (distribution tokred-todre)``: who registered something, for messages."""
    if distribution:
        return f"plugin {plugin!r} (distribution {distribution})"
    return f"plugin {plugin!r} " + ("(in-process)" if in_process else "(no distribution)")


@dataclass(frozen=True)
class Entry:
    """One registered thing and who provided it.

    ``distribution`` is ``None`` for plugins passed in-process (``in_process`` is then ``True``) and
    for entry points built by hand without a distribution.
    """

    kind: Kind
    name: str
    obj: type
    plugin: str
    distribution: str | None
    aliases: tuple[str, ...] = ()
    in_process: bool = False

    @property
    def provider(self) -> str:
        """``plugin 'todre' (distribution tokred-todre)``, ``plugin 'mine' (in-process)``."""
        return _provider(self.plugin, self.distribution, self.in_process)

    @property
    def first_party(self) -> bool:
        """Whether a distribution of this repository (:data:`FIRST_PARTY_DISTRIBUTIONS`) provides it."""
        return self.distribution in FIRST_PARTY_DISTRIBUTIONS

    @property
    def label(self) -> str:
        """``method 'todre' (ToDREMethod)``: the registered name and the class, for messages."""
        return f"{self.kind} {self.name!r} ({self.obj.__name__})"


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded, or one of its registrations that was refused.

    ``hook`` is where it happened: ``"import"``, ``"registration"`` (checking the plugin's hook
    functions when it is added to the plugin manager) or the name of the registration hook.
    """

    plugin: str
    distribution: str | None
    hook: str
    error: BaseException
    in_process: bool = False

    def __str__(self) -> str:
        if self.distribution:
            where = f"{self.plugin} (from {self.distribution})"
        else:
            where = f"{self.plugin} (in-process)" if self.in_process else self.plugin
        return f"plugin {where} failed in {self.hook}: {type(self.error).__name__}: {self.error}"


def _base_for(kind: Kind) -> type:
    if kind == "adapter":
        from .adapters.base import Adapter

        return Adapter
    return {"selector": Selector, "gate": Gate, "method": Method}[kind]


def _kind_of(cls: type) -> str:
    """The registry kind a class would be registered as, from its base class; ``"class"`` if none."""
    from .adapters.base import Adapter

    for kind, base in (("selector", Selector), ("gate", Gate), ("method", Method), ("adapter", Adapter)):
        if issubclass(cls, base):
            return kind
    return "class"


@dataclass
class _Plugin:
    obj: object
    name: str
    distribution: str | None
    in_process: bool
    registered: int = 0  #: register() calls its hooks made, accepted or refused
    hooks: list[str] = field(default_factory=list)  #: the registration hooks it implements

    @property
    def first_party(self) -> bool:
        return self.distribution in FIRST_PARTY_DISTRIBUTIONS

    @property
    def provider(self) -> str:
        return _provider(self.name, self.distribution, self.in_process)

    def failure(self, hook: str, message: str | BaseException) -> PluginFailure:
        error = message if isinstance(message, BaseException) else PluginError(message)
        return PluginFailure(self.name, self.distribution, hook, error, self.in_process)


@dataclass(frozen=True)
class _Claim:
    """One name (the primary name or an alias) that one registration asks for."""

    entry: Entry
    name: str
    hook: str
    plugin: _Plugin

    @property
    def is_alias(self) -> bool:
        return self.name != self.entry.name


@dataclass
class _State:
    """Everything a load produces; assigned to the registry in one step once complete."""

    pm: pluggy.PluginManager
    entries: dict[Kind, dict[str, Entry]]
    aliases: dict[Kind, dict[str, str]]
    contested: dict[Kind, dict[str, str]]  #: names nobody got, with why, for unknown-name errors
    errors: list[PluginFailure]


class Registry:
    """Registered methods, selectors, gates and adapters.

    **Precedence.** Names are unique per kind (a method and a gate may both be called ``fastv``),
    aliases included. Names are resolved after every plugin has registered, never in load order:

    * a name claimed by exactly one registration belongs to it;
    * a name claimed by a first-party distribution (:data:`FIRST_PARTY_DISTRIBUTIONS`) and by
      others belongs to the first-party one; the others' claims are refused and reported;
    * a name claimed by several third parties (or, by mistake, by several first-party
      distributions) belongs to **nobody** until the clash is resolved: every claim is refused and
      reported, naming every claimant, so that which plugin a user gets never depends on what
      else happens to be installed. ``prefer`` resolves it.

    A registration that loses its primary name is not registered at all (its aliases neither); one
    that loses an alias stays, without that alias. Every claim counts, including those of a
    registration that lost its primary name elsewhere.

    Args:
        entry_points: the entry points to load; default: every entry point of the ``tokred`` group
            installed in the environment. Pass ``()`` for an empty registry.
        plugins: extra in-process plugin objects (modules or instances with hook implementations),
            registered as if they came from an entry point; useful in tests. They have no
            distribution, count as third-party and are reported as ``(in-process)``.
        prefer: who gets a contested name: ``{"<kind>:<name>": "<distribution or plugin>"}``, e.g.
            ``{"method:sparse": "tokred-sparsevlm"}``; the value is a distribution name, or the
            plugin's name (its entry-point name; for an in-process plugin its ``__name__``). It is
            the user's decision, so it also decides a name a first-party distribution claims. The
            other claimants of that name lose it without an error. It has no effect on a name
            nobody contests.
    """

    def __init__(
        self,
        entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
        plugins: Sequence[object] = (),
        *,
        prefer: Mapping[str, str] | None = None,
    ) -> None:
        self._entry_points = entry_points
        self._extra_plugins = list(plugins)
        self._prefer = _check_prefer(prefer or {})
        self._state = _State(self._new_plugin_manager(), {k: {} for k in _KINDS}, {k: {} for k in _KINDS},
                             {k: {} for k in _KINDS}, [])
        self._loaded = False
        self._loading = False
        # Re-entrant so that a query from inside loading (a hook, a method's defaults) on the loading
        # thread gets a clear error from _ensure_loaded instead of a deadlock.
        self._lock = threading.RLock()

    @staticmethod
    def _new_plugin_manager() -> pluggy.PluginManager:
        pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        pm.add_hookspecs(hookspecs)
        return pm

    # ----------------------------------------------------------------- loading

    @property
    def errors(self) -> list[PluginFailure]:
        """Plugins that failed to load, and registrations that were refused (loads the registry first)."""
        self._ensure_loaded()
        return list(self._state.errors)

    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        self._ensure_loaded()
        return self._state.pm

    @property
    def prefer(self) -> dict[str, str]:
        """The ``prefer`` mapping this registry resolves clashes with (a copy)."""
        return dict(self._prefer)

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            if self._loading:
                raise PluginError(
                    "the registry was queried while it is still loading its plugins (from a plugin's hook, or while "
                    "creating a method with its default options); a plugin must not query the registry before it "
                    "is loaded"
                )
            self._loading = True
            try:
                self._state = self._load()
                self._loaded = True
            finally:
                self._loading = False

    def _load(self) -> _State:
        pm = self._new_plugin_manager()
        errors: list[PluginFailure] = []
        plugins = self._load_plugins(pm, errors)
        claims: list[_Claim] = []
        for kind, hook in _HOOKS:
            for plugin in plugins:
                self._run_hook(pm, plugin, kind, hook, claims, errors)
        failed = {(f.plugin, f.in_process) for f in errors}
        for plugin in plugins:
            if plugin.registered == 0 and (plugin.name, plugin.in_process) not in failed:
                errors.append(plugin.failure("registration", _registers_nothing(plugin)))
        state = _State(pm, {k: {} for k in _KINDS}, {k: {} for k in _KINDS}, {k: {} for k in _KINDS}, errors)
        self._resolve(claims, state)
        return state

    def _load_plugins(self, pm: pluggy.PluginManager, errors: list[PluginFailure]) -> list[_Plugin]:
        eps = (
            self._entry_points
            if self._entry_points is not None
            else importlib.metadata.entry_points(group=hookspecs.PROJECT_NAME)
        )
        candidates: list[tuple[_Plugin, Callable[[], object]]] = []
        for ep in sorted(eps, key=lambda e: e.name):
            dist = getattr(getattr(ep, "dist", None), "name", None)
            candidates.append((_Plugin(None, ep.name, dist, in_process=False), ep.load))
        for obj in self._extra_plugins:
            name = getattr(obj, "__name__", type(obj).__name__)
            candidates.append((_Plugin(obj, name, None, in_process=True), lambda obj=obj: obj))

        loaded: list[_Plugin] = []
        for plugin, load in candidates:
            try:
                plugin.obj = load()
            except Exception as exc:  # a broken plugin must not take the others down
                errors.append(plugin.failure("import", exc))
                continue
            try:
                pm.register(plugin.obj, name=plugin.name)
            except Exception as exc:  # pluggy validates hook implementations against the specs here
                errors.append(plugin.failure("registration", exc))
                continue
            errors.extend(plugin.failure("registration", message) for message in _stray_hooks(pm, plugin.obj))
            plugin.hooks = [h for h in _HOOK_NAMES
                            if any(i.plugin is plugin.obj for i in getattr(pm.hook, h).get_hookimpls())]
            loaded.append(plugin)
        return loaded

    def _run_hook(self, pm: pluggy.PluginManager, plugin: _Plugin, kind: Kind, hook: str,
                  claims: list[_Claim], errors: list[PluginFailure]) -> None:
        impls = [i for i in getattr(pm.hook, hook).get_hookimpls() if i.plugin is plugin.obj]
        for impl in impls:
            open_ = [True]
            register = self._registrar(kind, hook, plugin, claims, errors, open_)
            try:
                impl.function(*[{"register": register}[arg] for arg in impl.argnames])
            except Exception as exc:
                # What the hook registered before raising was checked one by one and stays.
                errors.append(plugin.failure(hook, exc))
            finally:
                open_[0] = False

    def _registrar(self, kind: Kind, hook: str, plugin: _Plugin, claims: list[_Claim],
                   errors: list[PluginFailure], open_: list[bool]) -> Callable[..., None]:
        """The ``register`` callback handed to one hook call. It checks each registration on its own:
        a refused one is reported and the hook goes on, so one mistake does not cost the plugin
        everything else it registers. It stops working when its hook call returns."""

        def register(name: str, obj: type, *, aliases: Sequence[str] = ()) -> None:
            if not open_[0]:
                raise PluginError(f"register() was called after {hook} returned; call it from inside the hook")
            plugin.registered += 1
            try:
                entry = _check_entry(kind, name, obj, aliases, plugin)
                _check_not_repeated(entry, plugin, claims)
            except PluginError as exc:
                errors.append(plugin.failure(hook, exc))
                return
            claims.extend(_Claim(entry, n, hook, plugin) for n in (entry.name, *entry.aliases))

        return register

    def _resolve(self, claims: list[_Claim], state: _State) -> None:
        """Give every name to its owner (see the class docstring), then register what kept its name."""
        by_name: dict[tuple[Kind, str], list[_Claim]] = {}
        for claim in claims:
            by_name.setdefault((claim.entry.kind, claim.name), []).append(claim)
        lost: set[tuple[int, str]] = set()  # (id of the claimed entry, name it lost)
        # Sorted, so that the errors too come in an order independent of how the plugins loaded.
        for (kind, name), group in sorted(by_name.items(), key=lambda item: (_KINDS.index(item[0][0]), item[0][1])):
            if len(group) == 1:
                continue
            key = f"{kind}:{name}"
            wanted = self._prefer.get(key)
            preferred = [c for c in group if wanted is not None and wanted in (c.plugin.distribution, c.plugin.name)]
            first_party = [c for c in group if c.plugin.first_party]
            if len(preferred) == 1:
                winner, reason = preferred[0], "prefer"
            elif len(first_party) == 1:
                winner, reason = first_party[0], "first-party"
            else:
                winner, reason = None, "nobody"
            claimants = sorted(group, key=lambda c: (c.plugin.name, c.plugin.distribution or ""))
            if winner is None:
                state.contested[kind][name] = _contested(kind, name, claimants, wanted, len(preferred))
            for claim in claimants:
                if claim is winner:
                    continue
                lost.add((id(claim.entry), name))
                if reason == "first-party":
                    assert winner is not None
                    message = f"{kind} name {name!r} belongs to first-party {winner.plugin.provider}: {_refused(claim)}"
                    state.errors.append(claim.plugin.failure(claim.hook, message))
                elif reason == "nobody":
                    message = f"{state.contested[kind][name]}: {_refused(claim)}; {_how_to_resolve(kind, name)}"
                    state.errors.append(claim.plugin.failure(claim.hook, message))
        seen: set[int] = set()
        for claim in claims:
            entry = claim.entry
            if id(entry) in seen:
                continue
            seen.add(id(entry))
            if (id(entry), entry.name) in lost:
                continue
            kept = replace(entry, aliases=tuple(a for a in entry.aliases if (id(entry), a) not in lost))
            state.entries[kept.kind][kept.name] = kept
            for alias in kept.aliases:
                state.aliases[kept.kind][alias] = kept.name

    # ----------------------------------------------------------------- queries

    def entries(self, kind: Kind) -> list[Entry]:
        """Every registered entry of ``kind``, sorted by name."""
        self._ensure_loaded()
        return sorted(self._state.entries[kind].values(), key=lambda e: e.name)

    def entry(self, kind: Kind, name: str) -> Entry:
        """The entry called ``name`` (or an alias of it); a clear error listing the valid names otherwise.

        The error names the closest registered name or alias when one is close (:func:`suggest`):
        ``unknown method 'todr' (did you mean 'todre'?); registered: ...``. :meth:`create`,
        :meth:`selector`, :meth:`gate` and the command line look names up here.

        A name that several plugins claim, and that therefore belongs to nobody, is named as such,
        with the claimants and how to resolve the clash.
        """
        self._ensure_loaded()
        canonical = self._state.aliases[kind].get(name, name)
        try:
            return self._state.entries[kind][canonical]
        except KeyError:
            valid = ", ".join(sorted(self._state.entries[kind])) or "none"
            contested = self._state.contested[kind].get(name)
            if contested is not None:
                raise OptionsError(
                    f"{kind} {name!r} is not registered: {contested}; {_how_to_resolve(kind, name)}. "
                    f"registered: {valid}."
                ) from None
            registered = [n for e in self._state.entries[kind].values() for n in (e.name, *e.aliases)]
            failed = ""
            if self._state.errors:
                failed = " Some plugins failed to load: " + "; ".join(str(e) for e in self._state.errors)
            raise OptionsError(f"unknown {kind} {name!r}{_hint(name, registered)}; registered: {valid}.{failed}") from None

    def _list(self, kind: Kind, pattern: str) -> list[str]:
        return [e.name for e in self.entries(kind) if fnmatch.fnmatchcase(e.name, pattern)]

    def list_methods(self, pattern: str = "*") -> list[str]:
        """Sorted names of registered methods matching the ``fnmatch`` ``pattern``."""
        return self._list("method", pattern)

    def list_selectors(self, pattern: str = "*") -> list[str]:
        return self._list("selector", pattern)

    def list_gates(self, pattern: str = "*") -> list[str]:
        return self._list("gate", pattern)

    def list_adapters(self, pattern: str = "*") -> list[str]:
        return self._list("adapter", pattern)

    def create(self, name: str, **options: Any) -> Method:
        """Instantiate the method ``name`` with validated ``options``."""
        return _instantiate(self.entry("method", name), options)

    def selector(self, name: str, **options: Any) -> Selector:
        return _instantiate(self.entry("selector", name), options)  # type: ignore[return-value]

    def gate(self, name: str, **options: Any) -> Gate:
        return _instantiate(self.entry("gate", name), options)  # type: ignore[return-value]

    def name_of(self, obj: object) -> str:
        """The registered name of a component or method instance (or class)."""
        cls = obj if isinstance(obj, type) else type(obj)
        entry = self._entry_of(obj)
        if entry is None:
            raise OptionsError(f"{cls.__qualname__} is not registered; register it through a plugin to serialise it")
        return entry.name

    def _entry_of(self, obj: object) -> Entry | None:
        """The entry whose class is ``obj``'s (exactly, not a base of it). An adapter instance picks
        the entry of its own family: one adapter class may be registered for several families."""
        self._ensure_loaded()
        cls = obj if isinstance(obj, type) else type(obj)
        family = None if isinstance(obj, type) else getattr(obj, "family", None)
        for kind in ("selector", "gate", "method", "adapter"):
            matches = [e for e in self.entries(kind) if e.obj is cls]  # type: ignore[arg-type]
            for entry in matches:
                if entry.name == family:
                    return entry
            if matches:
                return matches[0]
        return None

    def describe(self, obj: object) -> str:
        """Who ``obj`` is, for error messages: a registered name, its class and who provided it.

        ``obj`` is a selector, gate, method or adapter, instance or class. The format, for a class
        that is registered (or an instance of one)::

            <kind> '<name>' (<ClassName>) from plugin '<plugin>' (distribution <distribution>)

        e.g. ``selector 'random' (RandomSelector) from plugin 'tokred-methods' (distribution tokred)``.
        ``(distribution <distribution>)`` reads ``(in-process)`` for a plugin passed as
        ``Registry(plugins=[...])`` and ``(no distribution)`` for an entry point built by hand. A
        class registered under several names is described by the first name in sorted order, an
        adapter instance by its own family. For anything else::

            unregistered <kind> <ClassName> (defined in <module>)

        e.g. ``unregistered selector BadSelector (defined in my_tests)``, where ``<kind>`` comes
        from the base class (``selector``, ``gate``, ``method``, ``adapter``) and is left out, with
        its space, for other objects (``unregistered dict (defined in builtins)``). A subclass of a
        registered class is unregistered: it is not what the name creates.

        It never raises: it is meant for building other errors. Queried while the registry is
        still loading its plugins, it describes everything as unregistered.
        """
        cls = obj if isinstance(obj, type) else type(obj)
        try:
            entry = self._entry_of(obj)
        except PluginError:
            entry = None
        if entry is not None:
            return f"{entry.label} from {entry.provider}"
        kind = _kind_of(cls)
        what = cls.__name__ if kind == "class" else f"{kind} {cls.__name__}"
        return f"unregistered {what} (defined in {cls.__module__})"

    def adapter_for(self, model: nn.Module, options: Mapping[str, Any] | None = None) -> Adapter:
        """An adapter instance for ``model``: the one naming the most specific class in its MRO.

        ``options`` are the adapter's own keyword options (e.g. LLaVA-NeXT's ``newline_tokens``);
        unknown ones raise :class:`OptionsError` naming the valid ones.
        """
        adapters = self.entries("adapter")
        for cls in type(model).__mro__:
            for entry in adapters:
                if cls.__name__ in entry.obj.model_classes:  # type: ignore[attr-defined]
                    return _adapter_instance(entry, model, dict(options or {}))
        supported = sorted(c for e in adapters for c in e.obj.model_classes)  # type: ignore[attr-defined]
        raise UnsupportedModelError(
            f"no tokred adapter handles {type(model).__name__}; supported model classes: {', '.join(supported) or 'none'}"
        )


# --------------------------------------------------------------------- checks of one plugin


def _check_prefer(prefer: Mapping[str, str]) -> dict[str, str]:
    """``prefer`` as a dict, refused now if malformed: a typo would otherwise leave a clash unresolved
    without saying why."""
    checked: dict[str, str] = {}
    for key, value in prefer.items():
        kind, _, name = key.partition(":") if isinstance(key, str) else ("", "", "")
        if kind not in _KINDS or not _NAME.match(name):
            raise OptionsError(
                f"prefer key {key!r} is not '<kind>:<name>' with a kind among {', '.join(_KINDS)} and a valid name "
                "(e.g. 'method:sparse')"
            )
        if not isinstance(value, str) or not value:
            raise OptionsError(f"prefer[{key!r}] must name a distribution or a plugin, got {value!r}")
        checked[key] = value
    return checked


def _did_you_mean(name: str) -> str:
    close = suggest(name, _HOOK_NAMES)
    return f" (did you mean {close}?)" if close else ""


def _stray_hooks(pm: pluggy.PluginManager, obj: object) -> list[str]:
    """Functions of plugin ``obj`` that look like registration hooks but that pluggy never calls.

    pytest refuses unknown hooks (``PluginManager.check_pending``); we report them instead, so that
    the plugin's valid hooks still run. Two mistakes are caught: a function marked
    ``@tokred.hookimpl`` whose name is no hook (``tokred_register_method``), and a function named
    like a hook (exactly, starting with ``tokred_register``, or close to a hook's name) that is not
    marked. A marked function with ``optionalhook=True`` is a hook of some other (newer) interface
    that the plugin knows may be missing, and is not reported.
    """
    problems: dict[str, str] = {}
    for caller in pm.get_hookcallers(obj) or []:
        if caller.has_spec():
            continue
        for impl in caller.get_hookimpls():
            if impl.plugin is obj and not impl.optionalhook:
                problems[caller.name] = (
                    f"{caller.name} is marked @tokred.hookimpl but is not a tokred hook, so it is never called"
                    f"{_did_you_mean(caller.name)}; the hooks are {', '.join(_HOOK_NAMES)}"
                )
    for attr in dir(obj):
        if attr.startswith("_") or attr in problems:
            continue
        try:
            value = getattr(obj, attr)
            marked = pm.parse_hookimpl_opts(obj, attr) is not None
        except Exception:  # an attribute that cannot be read is no hook of ours
            continue
        if marked or not inspect.isroutine(value):
            continue
        if attr in _HOOK_NAMES:
            problems[attr] = (
                f"{attr} is named like a tokred hook but is not marked @tokred.hookimpl, so it is never called; "
                "decorate it with @tokred.hookimpl"
            )
        elif attr.startswith("tokred_register") or suggest(attr, _HOOK_NAMES, cutoff=0.8) is not None:
            problems[attr] = (
                f"{attr} is named like a tokred hook but is neither marked @tokred.hookimpl nor a hook's name, "
                f"so it is never called{_did_you_mean(attr)}; the hooks are {', '.join(_HOOK_NAMES)}"
            )
    return [problems[name] for name in sorted(problems)]


def _registers_nothing(plugin: _Plugin) -> str:
    if not plugin.hooks:
        return (
            "registers nothing: it has no function marked @tokred.hookimpl named after a hook "
            f"({', '.join(_HOOK_NAMES)})"
        )
    return f"registers nothing: {', '.join(plugin.hooks)} ran without calling register()"


def _check_entry(kind: Kind, name: str, obj: type, aliases: Sequence[str], plugin: _Plugin) -> Entry:
    """The entry one ``register()`` call asks for, or :class:`PluginError` saying why it is refused."""
    what = getattr(obj, "__name__", repr(obj))
    if isinstance(aliases, str):  # aliases="fastv" would otherwise alias every letter
        raise PluginError(
            f"the aliases of {kind} {name!r} ({what}) must be a sequence of names, not the string {aliases!r}; "
            f"write aliases=({aliases!r},)"
        )
    aliases = tuple(aliases)
    if not isinstance(name, str) or not _NAME.match(name):
        raise PluginError(f"invalid {kind} name {name!r} for {what}: use lowercase letters, digits, '_', '-' and '.'")
    for alias in aliases:
        if not isinstance(alias, str) or not _NAME.match(alias):
            raise PluginError(
                f"invalid alias {alias!r} of {kind} {name!r} ({what}): use lowercase letters, digits, '_', '-' and '.'"
            )
    names = (name, *aliases)
    repeated = next((n for i, n in enumerate(names) if n in names[:i]), None)
    if repeated is not None:
        raise PluginError(f"{kind} {name!r} ({what}) gives {repeated!r} twice among its name and aliases")
    base = _base_for(kind)
    if not (isinstance(obj, type) and issubclass(obj, base)):
        raise PluginError(f"{kind} {name!r} must be a subclass of {base.__module__}.{base.__qualname__}, got {obj!r}")
    if issubclass(obj, BaseModel):
        problems = _option_problems(kind, obj)
        if problems:
            raise PluginError(f"{kind} {name!r} ({what}) is not registered: {'; '.join(problems)}")
    return Entry(kind, name, obj, plugin.name, plugin.distribution, aliases, plugin.in_process)


def _option_problems(kind: Kind, cls: type[BaseModel]) -> list[str]:
    """What DESIGN section 3 promises of an option model and ``cls`` breaks.

    Checked at registration, so that ``tokred list`` never shows an undocumented option and a
    method's defaults never fail for the first time inside the conformance suite or a user's run.
    """
    problems = []
    extra = cls.model_config.get("extra") or "ignore"  # pydantic's default when unset
    if extra != "forbid":
        problems.append(f"its model_config has extra={extra!r}, not extra='forbid'")
    for field_name, info in cls.model_fields.items():
        missing = [what for what, absent in (("description", not (info.description or "").strip()),
                                             ("default", info.is_required())) if absent]
        if missing:
            problems.append(f"option {field_name!r} has no {' and no '.join(missing)}")
    if kind == "method" and not problems:
        try:
            cls()
        except Exception as exc:  # whatever the defaults raise is the plugin's bug, reported as such
            problems.append(f"{cls.__name__}() with its default options fails: {_exception_text(exc)}")
    return problems


def _exception_text(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        cause = _tokred_cause(exc)
        if cause is not None:
            return f"{type(cause).__name__}: {cause}"
        return "ValidationError: " + "; ".join(
            f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors()
        )
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _check_not_repeated(entry: Entry, plugin: _Plugin, claims: Sequence[_Claim]) -> None:
    """Refuse a plugin's second registration of a name it already claimed (its own bug, not a clash)."""
    names = (entry.name, *entry.aliases)
    for claim in claims:
        if claim.plugin is plugin and claim.entry.kind == entry.kind and claim.name in names:
            raise PluginError(
                f"{entry.kind} name {claim.name!r} is already registered by this plugin, for {claim.entry.label}: "
                f"{entry.label} is not registered"
            )


# --------------------------------------------------------------------- messages of the resolution


def _refused(claim: _Claim) -> str:
    if claim.is_alias:
        return f"{claim.entry.label} is registered without the alias {claim.name!r}"
    return f"{claim.entry.label} is not registered"


def _contested(kind: Kind, name: str, claimants: Sequence[_Claim], preferred: str | None, matches: int) -> str:
    who = [c.plugin.provider for c in claimants]
    listed = ", ".join(who[:-1]) + " and " + who[-1]
    nobody = "neither" if len(who) == 2 else "none of them"
    text = f"{kind} name {name!r} is claimed by {listed}, so it belongs to {nobody}"
    if preferred is not None:
        text += f" (prefer names {preferred!r}, which matches {'none' if matches == 0 else 'more than one'} of them)"
    return text


def _how_to_resolve(kind: Kind, name: str) -> str:
    return (
        f"resolve it with Registry(prefer={{{f'{kind}:{name}'!r}: '<distribution or plugin>'}}) "
        "or uninstall all but one of them"
    )


def _adapter_instance(entry: Entry, model: nn.Module, options: dict[str, Any]) -> Adapter:
    parameters = inspect.signature(entry.obj).parameters
    valid = sorted(name for name, p in parameters.items()
                   if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("family",))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise OptionsError(
            f"adapter {entry.name!r} has no option {', '.join(map(repr, unknown))}{_option_hints(unknown, valid)}; "
            f"valid: {', '.join(valid) if valid else 'none'}"
        )
    return entry.obj(model, family=entry.name, **options)  # type: ignore[no-any-return]


def _instantiate(entry: Entry, options: dict[str, Any]) -> Any:
    cls = entry.obj
    unknown = sorted(set(options) - set(cls.model_fields))
    if unknown:
        raise OptionsError(f"{entry.kind} {entry.name!r} has no option {', '.join(map(repr, unknown))}"
                           f"{_option_hints(unknown, cls.model_fields)}; {_describe_fields(cls)}")
    try:
        return cls(**options)
    except ValidationError as exc:
        cause = _tokred_cause(exc)
        if cause is not None:
            raise type(cause)(f"{entry.kind} {entry.name!r}: {cause}") from None
        # pydantic prefixes the messages of validators' ValueErrors with "Value error, ".
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg'].removeprefix('Value error, ')}"
                             for e in exc.errors())
        raise OptionsError(f"invalid options for {entry.kind} {entry.name!r}: {problems}. {_describe_fields(cls)}") from None


def _tokred_cause(exc: ValidationError) -> TokredError | None:
    """The tokred error a validator raised, if any (pydantic wraps them, also in nested models)."""
    for error in exc.errors():
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, ValidationError):
            cause = _tokred_cause(cause)
        if isinstance(cause, TokredError):
            return cause
    return None


def _option_hints(unknown: Sequence[str], valid: Iterable[str]) -> str:
    """`` (did you mean 'keep' for 'kep'?)`` for the unknown options close to a valid one, else ``""``."""
    valid = list(valid)
    hints = [f"did you mean {close!r} for {name!r}?" for name in unknown if (close := suggest(name, valid))]
    return f" ({' '.join(hints)})" if hints else ""


def _describe_fields(cls: type) -> str:
    """``valid options:`` and then the options one per line (:func:`option_lines`), or ``it takes
    no options``: the end of an unknown or invalid option's error."""
    fields = getattr(cls, "model_fields", {})
    if not fields:
        return "it takes no options"
    return "valid options:\n" + "\n".join(option_lines(fields))


_default: Registry | None = None
_default_lock = threading.Lock()


def default_registry() -> Registry:
    """The registry the module-level functions use: the one given to :func:`set_default_registry`,
    or else one built from the installed entry points on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Registry()
        return _default


def set_default_registry(registry: Registry | None) -> Registry | None:
    """Make ``registry`` the one ``tokred.create``, ``tokred.list_methods``, ``tokred.apply`` and
    ``tokred.cli.main`` use by default; returns the previous one (``None`` if none was built yet).

    This is how a program resolves a name clash for the module-level functions, in code and never
    through the environment::

        set_default_registry(Registry(prefer={"method:sparse": "tokred-sparsevlm"}))

    ``None`` goes back to building one from the installed entry points on next use.
    """
    global _default
    if registry is not None and not isinstance(registry, Registry):
        raise TypeError(f"set_default_registry() takes a tokred.Registry or None, got {type(registry).__name__}")
    with _default_lock:
        previous, _default = _default, registry
        return previous
