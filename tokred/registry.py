"""The plugin registry: methods, selectors, gates and adapters, found through entry points.

A :class:`Registry` owns its ``pluggy.PluginManager``. Entry points of the ``tokred`` group are
loaded lazily, on the first query, one by one: a plugin that fails to import or whose hook raises is
recorded in :attr:`Registry.errors` (naming the plugin, its distribution and the hook) and the
others load normally. Tests build their own ``Registry``; the module-level functions
(``tokred.list_methods`` and friends) use :func:`default_registry`.
"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import inspect
import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Literal, Mapping, Sequence

import pluggy
from pydantic import ValidationError

from . import hookspecs
from .components import Gate, Selector
from .errors import OptionsError, PluginError, TokredError, UnsupportedModelError
from .method import Method

if TYPE_CHECKING:
    import torch.nn as nn

    from .adapters.base import Adapter

__all__ = ["Registry", "Entry", "PluginFailure", "default_registry"]

Kind = Literal["adapter", "selector", "gate", "method"]
_HOOKS: tuple[tuple[Kind, str], ...] = (
    ("adapter", "tokred_register_adapters"),
    ("selector", "tokred_register_selectors"),
    ("gate", "tokred_register_gates"),
    ("method", "tokred_register_methods"),
)
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")


@dataclass(frozen=True)
class Entry:
    """One registered thing and who provided it."""

    kind: Kind
    name: str
    obj: type
    plugin: str
    distribution: str | None
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be loaded or whose registration hook failed."""

    plugin: str
    distribution: str | None
    hook: str
    error: BaseException

    def __str__(self) -> str:
        where = f"{self.plugin}" + (f" (from {self.distribution})" if self.distribution else "")
        return f"plugin {where} failed in {self.hook}: {type(self.error).__name__}: {self.error}"


def _base_for(kind: Kind) -> type:
    if kind == "adapter":
        from .adapters.base import Adapter

        return Adapter
    return {"selector": Selector, "gate": Gate, "method": Method}[kind]


@dataclass
class _Plugin:
    obj: object
    name: str
    distribution: str | None


class Registry:
    """Registered methods, selectors, gates and adapters.

    Args:
        entry_points: the entry points to load; default: every entry point of the ``tokred`` group
            installed in the environment. Pass ``()`` for an empty registry.
        plugins: extra in-process plugin objects (modules or instances with hook implementations),
            registered as if they came from an entry point; useful in tests.
    """

    def __init__(
        self,
        entry_points: Iterable[importlib.metadata.EntryPoint] | None = None,
        plugins: Sequence[object] = (),
    ) -> None:
        self._entry_points = entry_points
        self._extra_plugins = list(plugins)
        self._pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self._pm.add_hookspecs(hookspecs)
        self._entries: dict[Kind, dict[str, Entry]] = {kind: {} for kind, _ in _HOOKS}
        self._aliases: dict[Kind, dict[str, str]] = {kind: {} for kind, _ in _HOOKS}
        self._errors: list[PluginFailure] = []
        self._loaded = False
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- loading

    @property
    def errors(self) -> list[PluginFailure]:
        """Plugins that failed to load or register (loads the registry first)."""
        self._ensure_loaded()
        return list(self._errors)

    @property
    def plugin_manager(self) -> pluggy.PluginManager:
        self._ensure_loaded()
        return self._pm

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            plugins = self._load_plugins()
            for kind, hook in _HOOKS:
                for plugin in plugins:
                    self._run_hook(plugin, kind, hook)
            self._loaded = True

    def _load_plugins(self) -> list[_Plugin]:
        eps = (
            self._entry_points
            if self._entry_points is not None
            else importlib.metadata.entry_points(group=hookspecs.PROJECT_NAME)
        )
        candidates: list[tuple[str, str | None, Callable[[], object]]] = []
        for ep in sorted(eps, key=lambda e: e.name):
            dist = getattr(getattr(ep, "dist", None), "name", None)
            candidates.append((ep.name, dist, ep.load))
        for obj in self._extra_plugins:
            name = getattr(obj, "__name__", type(obj).__name__)
            candidates.append((name, None, lambda obj=obj: obj))

        loaded: list[_Plugin] = []
        for name, dist, load in candidates:
            try:
                obj = load()
            except Exception as exc:  # a broken plugin must not take the others down
                self._errors.append(PluginFailure(name, dist, "import", exc))
                continue
            try:
                self._pm.register(obj, name=name)
            except Exception as exc:  # pluggy validates hook implementations against the specs here
                self._errors.append(PluginFailure(name, dist, "registration", exc))
                continue
            loaded.append(_Plugin(obj, name, dist))
        return loaded

    def _run_hook(self, plugin: _Plugin, kind: Kind, hook: str) -> None:
        impls = [i for i in getattr(self._pm.hook, hook).get_hookimpls() if i.plugin is plugin.obj]
        for impl in impls:
            staged: list[Entry] = []
            register = self._registrar(staged, kind, plugin)
            try:
                impl.function(*[{"register": register}[arg] for arg in impl.argnames])
            except Exception as exc:
                self._errors.append(PluginFailure(plugin.name, plugin.distribution, hook, exc))
                continue
            for entry in staged:  # all or nothing per hook call: no half-registered plugin
                clash = self._clash(entry)
                if clash is not None:
                    self._errors.append(PluginFailure(plugin.name, plugin.distribution, hook, PluginError(clash)))
                    continue
                self._entries[kind][entry.name] = entry
                for alias in entry.aliases:
                    self._aliases[kind][alias] = entry.name

    def _registrar(self, staged: list[Entry], kind: Kind, plugin: _Plugin) -> Callable[..., None]:
        """The ``register`` callback handed to one hook call: it checks and stages entries in
        ``staged``, bound here so that a callback kept by a plugin cannot write into a later call."""
        def register(name: str, obj: type, *, aliases: Sequence[str] = ()) -> None:
            staged.append(self._check_entry(kind, name, obj, tuple(aliases), plugin))

        return register

    def _check_entry(self, kind: Kind, name: str, obj: type, aliases: tuple[str, ...], plugin: _Plugin) -> Entry:
        for n in (name, *aliases):
            if not isinstance(n, str) or not _NAME.match(n):
                raise PluginError(f"invalid {kind} name {n!r}: use lowercase letters, digits, '_', '-' and '.'")
        base = _base_for(kind)
        if not (isinstance(obj, type) and issubclass(obj, base)):
            raise PluginError(f"{kind} {name!r} must be a subclass of {base.__module__}.{base.__qualname__}, got {obj!r}")
        return Entry(kind, name, obj, plugin.name, plugin.distribution, aliases)

    def _clash(self, entry: Entry) -> str | None:
        taken = {**{n: e.plugin for n, e in self._entries[entry.kind].items()},
                 **{a: self._entries[entry.kind][t].plugin for a, t in self._aliases[entry.kind].items()}}
        for n in (entry.name, *entry.aliases):
            if n in taken:
                return f"{entry.kind} name {n!r} from plugin {entry.plugin!r} is already registered by plugin {taken[n]!r}"
        return None

    # ----------------------------------------------------------------- queries

    def entries(self, kind: Kind) -> list[Entry]:
        """Every registered entry of ``kind``, sorted by name."""
        self._ensure_loaded()
        return sorted(self._entries[kind].values(), key=lambda e: e.name)

    def entry(self, kind: Kind, name: str) -> Entry:
        """The entry called ``name`` (or an alias of it); a clear error listing the valid names otherwise."""
        self._ensure_loaded()
        canonical = self._aliases[kind].get(name, name)
        try:
            return self._entries[kind][canonical]
        except KeyError:
            valid = ", ".join(sorted(self._entries[kind])) or "none"
            hint = ""
            if self._errors:
                hint = " Some plugins failed to load: " + "; ".join(str(e) for e in self._errors)
            raise OptionsError(f"unknown {kind} {name!r}; registered: {valid}.{hint}") from None

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
        self._ensure_loaded()
        for kind in ("selector", "gate", "method", "adapter"):
            for entry in self._entries[kind].values():  # type: ignore[index]
                if entry.obj is cls:
                    return entry.name
        raise OptionsError(f"{cls.__qualname__} is not registered; register it through a plugin to serialise it")

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


def _adapter_instance(entry: Entry, model: nn.Module, options: dict[str, Any]) -> Adapter:
    parameters = inspect.signature(entry.obj).parameters
    valid = sorted(name for name, p in parameters.items()
                   if p.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("family",))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise OptionsError(
            f"adapter {entry.name!r} has no option {', '.join(map(repr, unknown))}; "
            f"valid: {', '.join(valid) if valid else 'none'}"
        )
    return entry.obj(model, family=entry.name, **options)  # type: ignore[no-any-return]


def _instantiate(entry: Entry, options: dict[str, Any]) -> Any:
    cls = entry.obj
    unknown = sorted(set(options) - set(cls.model_fields))
    if unknown:
        raise OptionsError(f"{entry.kind} {entry.name!r} has no option {', '.join(map(repr, unknown))}; {_describe_fields(cls)}")
    try:
        return cls(**options)
    except ValidationError as exc:
        cause = _tokred_cause(exc)
        if cause is not None:
            raise type(cause)(f"{entry.kind} {entry.name!r}: {cause}") from None
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors())
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


def _describe_fields(cls: type) -> str:
    fields = getattr(cls, "model_fields", {})
    if not fields:
        return "it takes no options"
    parts = [f"{n} (default {f.default!r}): {f.description or ''}".rstrip(": ") for n, f in fields.items()]
    return "valid options: " + "; ".join(parts)


_default: Registry | None = None
_default_lock = threading.Lock()


def default_registry() -> Registry:
    """The registry built from the installed entry points, created on first use."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Registry()
        return _default
