"""The plugin registry: entry points, lazy loading, validation, precedence, broken plugins, errors."""

from __future__ import annotations

import importlib.metadata
import textwrap
import threading
import types
from pathlib import Path

import pytest
from pydantic import ConfigDict, Field

import tokred
from tokred import BudgetOptions, Method, OptionsError, PluginError, Registry, Schedule, Selector, SelectorStage, hookimpl
from tokred.methods import FastVMethod, RandomMethod, RandomSelector
from tokred.registry import FIRST_PARTY_DISTRIBUTIONS, default_registry, set_default_registry

INSTALLED = list(importlib.metadata.entry_points(group="tokred"))


def plugin(**hooks: object) -> types.SimpleNamespace:
    """An in-process plugin object with the given hook implementations."""
    namespace = types.SimpleNamespace(__name__=hooks.pop("name", "fake"))
    for hook_name, function in hooks.items():
        setattr(namespace, hook_name, hookimpl(function))
    return namespace


def distribution(root: Path, monkeypatch: pytest.MonkeyPatch, name: str, entry_points: dict[str, str],
                 modules: dict[str, str]) -> list[importlib.metadata.EntryPoint]:
    """The ``tokred`` entry points of a real (if tiny) installed distribution ``name``: a
    ``.dist-info`` folder under ``root``, with plugin modules (given as source) importable from
    ``root``. Its entry points carry their distribution exactly as pip-installed ones do."""
    dist_info = root / f"{name.replace('-', '_')}-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    lines = "".join(f"{ep} = {module}\n" for ep, module in entry_points.items())
    (dist_info / "entry_points.txt").write_text(f"[tokred]\n{lines}")
    for module, source in modules.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(root))
    return list(importlib.metadata.PathDistribution(dist_info).entry_points.select(group="tokred"))


class EverythingSelector(Selector):
    """Keeps the first k tokens."""

    def select(self, tokens, k):  # type: ignore[no-untyped-def]
        import torch

        return torch.arange(k)


class OtherSelector(EverythingSelector):
    """Another first-k selector, from another plugin."""


RESOLVE = "resolve it with Registry(prefer={{'{key}': '<distribution or plugin>'}}) or uninstall all but one of them"


# ------------------------------------------------------------------------------- loading


def test_builtins_register_through_the_core_distribution_entry_points() -> None:
    registry = Registry()
    assert {"random", "fastv"} <= set(registry.list_methods())
    assert "llava" in registry.list_adapters()
    for kind, name in (("method", "random"), ("method", "fastv"), ("adapter", "llava")):
        assert registry.entry(kind, name).distribution == "tokred"


def test_the_installed_plugins_load_without_errors() -> None:
    assert Registry().errors == []


def test_list_methods_filters_with_wildcards() -> None:
    assert tokred.list_methods("fast*") == ["fastv"]
    assert tokred.list_methods("nothing-matches-*") == []
    assert tokred.list_methods() == sorted(tokred.list_methods())


def test_entry_points_load_lazily() -> None:
    registry = Registry(entry_points=[importlib.metadata.EntryPoint("broken", "tokred_no_such_module_xyz", "tokred")])
    assert not registry._loaded  # nothing imported yet
    assert registry.list_methods() == []
    assert len(registry.errors) == 1


def test_loading_happens_once_when_threads_race_for_it() -> None:
    calls: list[int] = []

    def tokred_register_selectors(register):  # type: ignore[no-untyped-def]
        calls.append(1)
        register("everything", EverythingSelector)

    registry = Registry(entry_points=[], plugins=[plugin(name="once", tokred_register_selectors=tokred_register_selectors)])
    start = threading.Barrier(8)
    results: list[list[str]] = []

    def query() -> None:
        start.wait()
        results.append(registry.list_selectors())

    threads = [threading.Thread(target=query) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert calls == [1] and results == [["everything"]] * 8


def test_a_hook_that_queries_the_registry_gets_an_error_not_a_deadlock() -> None:
    registry: Registry

    def tokred_register_selectors(register):  # type: ignore[no-untyped-def]
        registry.list_methods()

    registry = Registry(entry_points=[], plugins=[plugin(name="eager", tokred_register_selectors=tokred_register_selectors)])
    [failure] = registry.errors
    assert failure.hook == "tokred_register_selectors" and "still loading" in str(failure.error)


def test_register_kept_after_its_hook_returned_refuses_to_work() -> None:
    kept: list = []

    def tokred_register_selectors(register):  # type: ignore[no-untyped-def]
        register("everything", EverythingSelector)
        kept.append(register)

    registry = Registry(entry_points=[], plugins=[plugin(name="keeper", tokred_register_selectors=tokred_register_selectors)])
    assert registry.list_selectors() == ["everything"]
    with pytest.raises(PluginError, match="after tokred_register_selectors returned"):
        kept[0]("later", OtherSelector)
    assert registry.list_selectors() == ["everything"]


def test_broken_plugin_is_named_and_does_not_hide_the_others() -> None:
    broken = importlib.metadata.EntryPoint("broken", "tokred_no_such_module_xyz", "tokred")
    registry = Registry(entry_points=[*INSTALLED, broken])
    assert {"random", "fastv"} <= set(registry.list_methods())
    [failure] = registry.errors
    assert failure.plugin == "broken" and failure.hook == "import"
    assert "broken" in str(failure) and "ModuleNotFoundError" in str(failure)
    with pytest.raises(OptionsError, match="broken"):
        registry.create("mymethod")  # the message points at the broken plugin


def test_hook_with_a_wrong_signature_is_refused_at_registration() -> None:
    def tokred_register_methods(register, unexpected):  # type: ignore[no-untyped-def]
        pass

    registry = Registry(entry_points=[], plugins=[plugin(name="odd", tokred_register_methods=tokred_register_methods)])
    [failure] = registry.errors
    assert failure.hook == "registration" and "unexpected" in str(failure.error)


# ---------------------------------------------------------- finding 1: precedence of names


_AACLASH = '''
    import tokred
    from tokred.methods import FastVMethod, RandomSelector

    class ImpostorSelector(RandomSelector):
        """Not the genuine random selector."""

    class ImpostorToDRE(FastVMethod):
        """Not ToDRE."""

    class ImpostorFastV(FastVMethod):
        """Not FastV."""

    @tokred.hookimpl
    def tokred_register_selectors(register):
        register("random", ImpostorSelector)

    @tokred.hookimpl
    def tokred_register_methods(register):
        register("todre", ImpostorToDRE)
        register("aaclash-fast", ImpostorFastV, aliases=("fastv",))
'''


@pytest.mark.parametrize("entry_point", ["aaclash", "zzclash"])
def test_a_plugin_cannot_take_over_first_party_names(entry_point: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The adversarial finding: the entry point sorting first used to win every clash, and the
    genuine ToDRE plugin was the one listed as failed."""
    from tokred_todre import ToDREMethod

    hostile = distribution(tmp_path, monkeypatch, "aaclash-dist", {entry_point: "aaclash_plugin"},
                           {"aaclash_plugin": _AACLASH})
    registry = Registry(entry_points=[*hostile, *INSTALLED])
    assert type(registry.create("todre")) is ToDREMethod
    assert type(registry.create("fastv")) is FastVMethod
    assert type(registry.selector("random")) is RandomSelector
    assert registry.entry("method", "aaclash-fast").aliases == ()  # kept, without the alias it lost
    where = f"plugin {entry_point} (from aaclash-dist)"
    assert [str(f) for f in registry.errors] == [
        f"{where} failed in tokred_register_selectors: PluginError: selector name 'random' belongs to first-party "
        "plugin 'tokred-methods' (distribution tokred): selector 'random' (ImpostorSelector) is not registered",
        f"{where} failed in tokred_register_methods: PluginError: method name 'fastv' belongs to first-party "
        "plugin 'tokred-methods' (distribution tokred): method 'aaclash-fast' (ImpostorFastV) is registered "
        "without the alias 'fastv'",
        f"{where} failed in tokred_register_methods: PluginError: method name 'todre' belongs to first-party "
        "plugin 'todre' (distribution tokred-todre): method 'todre' (ImpostorToDRE) is not registered",
    ]


def test_the_first_party_distributions_are_this_repositorys() -> None:
    assert FIRST_PARTY_DISTRIBUTIONS == {"tokred", "tokred-todre", "tokred-star", "tokred-baselines", "tokred-video"}
    installed = {e.distribution for kind in ("method", "adapter") for e in Registry().entries(kind)}  # type: ignore[arg-type]
    assert {"tokred", "tokred-todre", "tokred-star", "tokred-video"} <= installed


def test_a_third_party_clash_gives_the_name_to_neither_and_names_both() -> None:
    """Both claimants lose: which one a user gets must not depend on what else is installed."""
    def one(register):  # type: ignore[no-untyped-def]
        register("first", EverythingSelector)

    def two(register):  # type: ignore[no-untyped-def]
        register("first", OtherSelector)
        register("second", OtherSelector)

    contested = ("selector name 'first' is claimed by plugin 'one' (in-process) and plugin 'two' (in-process), "
                 "so it belongs to neither")
    resolve = RESOLVE.format(key="selector:first")
    a, b = plugin(name="one", tokred_register_selectors=one), plugin(name="two", tokred_register_selectors=two)
    for plugins in ([a, b], [b, a]):
        registry = Registry(entry_points=[], plugins=plugins)
        assert registry.list_selectors() == ["second"]
        assert sorted(str(f) for f in registry.errors) == [
            f"plugin one (in-process) failed in tokred_register_selectors: PluginError: {contested}: "
            f"selector 'first' (EverythingSelector) is not registered; {resolve}",
            f"plugin two (in-process) failed in tokred_register_selectors: PluginError: {contested}: "
            f"selector 'first' (OtherSelector) is not registered; {resolve}",
        ]
        with pytest.raises(OptionsError) as excinfo:
            registry.selector("first")
        assert str(excinfo.value) == f"selector 'first' is not registered: {contested}; {resolve}. registered: second."


def test_a_clash_through_an_alias_drops_only_that_alias() -> None:
    def one(register):  # type: ignore[no-untyped-def]
        register("first", EverythingSelector)

    def two(register):  # type: ignore[no-untyped-def]
        register("mine", OtherSelector, aliases=("first", "also-mine"))

    registry = Registry(entry_points=[], plugins=[plugin(name="one", tokred_register_selectors=one),
                                                  plugin(name="two", tokred_register_selectors=two)])
    assert registry.list_selectors() == ["mine"]
    assert registry.entry("selector", "mine").aliases == ("also-mine",)
    assert registry.entry("selector", "also-mine").obj is OtherSelector
    assert [f.plugin for f in registry.errors] == ["one", "two"]
    assert str(registry.errors[1].error).endswith(
        ": selector 'mine' (OtherSelector) is registered without the alias 'first'; " + RESOLVE.format(key="selector:first")
    )


def test_prefer_resolves_a_clash_whatever_the_order() -> None:
    def one(register):  # type: ignore[no-untyped-def]
        register("first", EverythingSelector)

    def two(register):  # type: ignore[no-untyped-def]
        register("mine", OtherSelector, aliases=("first",))

    a, b = plugin(name="one", tokred_register_selectors=one), plugin(name="two", tokred_register_selectors=two)
    for plugins in ([a, b], [b, a]):
        registry = Registry(entry_points=[], plugins=plugins, prefer={"selector:first": "two"})
        assert registry.entry("selector", "first").obj is OtherSelector
        assert registry.errors == []  # the user decided: no error
        assert registry.list_selectors() == ["mine"]  # 'one' lost its primary name, so its entry is gone

    stale = Registry(entry_points=[], plugins=[a, b], prefer={"selector:first": "three"})
    assert "so it belongs to neither (prefer names 'three', which matches none of them): " in str(stale.errors[0])


def test_prefer_names_a_distribution_and_may_overrule_first_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokred_todre import ToDREMethod

    hostile = distribution(tmp_path, monkeypatch, "aaclash-dist", {"aaclash": "aaclash_plugin"},
                           {"aaclash_plugin": _AACLASH})
    registry = Registry(entry_points=[*hostile, *INSTALLED], prefer={"method:todre": "aaclash-dist"})
    assert type(registry.create("todre")).__name__ == "ImpostorToDRE"
    assert type(Registry(entry_points=[*hostile, *INSTALLED], prefer={"method:todre": "tokred-todre"}).create("todre")) \
        is ToDREMethod
    assert [f.error.args[0].split(":")[0] for f in registry.errors] == [
        "selector name 'random' belongs to first-party plugin 'tokred-methods' (distribution tokred)",
        "method name 'fastv' belongs to first-party plugin 'tokred-methods' (distribution tokred)",
    ]


@pytest.mark.parametrize("prefer", [{"methd:todre": "x"}, {"todre": "x"}, {"method:Bad Name": "x"}, {"method:todre": ""}])
def test_malformed_prefer_is_refused_at_construction(prefer: dict[str, str]) -> None:
    with pytest.raises(OptionsError, match="prefer"):
        Registry(entry_points=[], prefer=prefer)


def test_losing_the_primary_name_loses_the_aliases_too() -> None:
    def tokred_register_methods(register):  # type: ignore[no-untyped-def]
        register("fastv", FastVMethod, aliases=("my-fastv",))

    registry = Registry(entry_points=INSTALLED, plugins=[plugin(name="copycat", tokred_register_methods=tokred_register_methods)])
    assert "my-fastv" not in registry.list_methods()
    with pytest.raises(OptionsError, match="unknown method 'my-fastv'"):
        registry.entry("method", "my-fastv")
    assert registry.entry("method", "fastv").distribution == "tokred"
    [failure] = registry.errors
    assert failure.plugin == "copycat" and str(failure.error) == (
        "method name 'fastv' belongs to first-party plugin 'tokred-methods' (distribution tokred): "
        "method 'fastv' (FastVMethod) is not registered"
    )


def test_set_default_registry_swaps_what_the_module_functions_use() -> None:
    def tokred_register_methods(register):  # type: ignore[no-untyped-def]
        register("only-here", RandomMethod)

    previous = set_default_registry(Registry(entry_points=[], plugins=[plugin(tokred_register_methods=tokred_register_methods)]))
    try:
        assert tokred.list_methods() == ["only-here"]
    finally:
        set_default_registry(previous)
    assert "only-here" not in tokred.list_methods()
    assert default_registry() is previous or previous is None
    with pytest.raises(TypeError):
        set_default_registry({"method:x": "y"})  # type: ignore[arg-type]


# -------------------------------------------------------------- finding 2: misspelled hooks


def test_a_marked_misspelled_hook_is_reported_with_a_suggestion_and_the_valid_ones_run() -> None:
    def tokred_register_method(register):  # type: ignore[no-untyped-def]
        register("never", RandomMethod)

    def tokred_register_selectors(register):  # type: ignore[no-untyped-def]
        register("typo.selector", EverythingSelector)

    registry = Registry(entry_points=[], plugins=[plugin(name="typo", tokred_register_method=tokred_register_method,
                                                         tokred_register_selectors=tokred_register_selectors)])
    assert registry.list_selectors() == ["typo.selector"] and registry.list_methods() == []
    assert [str(f) for f in registry.errors] == [
        "plugin typo (in-process) failed in registration: PluginError: tokred_register_method is marked "
        "@tokred.hookimpl but is not a tokred hook, so it is never called (did you mean tokred_register_methods?); "
        "the hooks are tokred_register_adapters, tokred_register_selectors, tokred_register_gates, tokred_register_methods"
    ]


def test_a_hook_without_the_marker_is_reported() -> None:
    def tokred_register_methods(register):  # type: ignore[no-untyped-def]
        register("never", RandomMethod)

    def tokred_register_gate(register):  # type: ignore[no-untyped-def]
        pass

    def tokred_helper() -> None:  # named like tokred, not like a hook: not a mistake
        pass

    unmarked = types.SimpleNamespace(__name__="unmarked", tokred_register_methods=tokred_register_methods,
                                     tokred_register_gate=tokred_register_gate, tokred_helper=tokred_helper)
    registry = Registry(entry_points=[], plugins=[unmarked])
    assert registry.list_methods() == []
    where = "plugin unmarked (in-process) failed in registration: PluginError: "
    assert [str(f) for f in registry.errors] == [
        where + "tokred_register_gate is named like a tokred hook but is neither marked @tokred.hookimpl nor a hook's "
        "name, so it is never called (did you mean tokred_register_gates?); the hooks are tokred_register_adapters, "
        "tokred_register_selectors, tokred_register_gates, tokred_register_methods",
        where + "tokred_register_methods is named like a tokred hook but is not marked @tokred.hookimpl, so it is "
        "never called; decorate it with @tokred.hookimpl",
    ]


def test_an_optional_hook_of_another_interface_is_not_a_mistake() -> None:
    def tokred_register_schedules(register):  # type: ignore[no-untyped-def]
        pass

    def tokred_register_selectors(register):  # type: ignore[no-untyped-def]
        register("future.selector", EverythingSelector)

    future = types.SimpleNamespace(
        __name__="future", tokred_register_schedules=hookimpl(optionalhook=True)(tokred_register_schedules),
        tokred_register_selectors=hookimpl(tokred_register_selectors),
    )
    registry = Registry(entry_points=[], plugins=[future])
    assert registry.errors == [] and registry.list_selectors() == ["future.selector"]


def test_a_plugin_that_registers_nothing_is_reported() -> None:
    def tokred_register_methods(register):  # type: ignore[no-untyped-def]
        pass

    registry = Registry(entry_points=[], plugins=[plugin(name="quiet", tokred_register_methods=tokred_register_methods),
                                                  types.SimpleNamespace(__name__="empty")])
    assert [str(f) for f in registry.errors] == [
        "plugin quiet (in-process) failed in registration: PluginError: registers nothing: tokred_register_methods "
        "ran without calling register()",
        "plugin empty (in-process) failed in registration: PluginError: registers nothing: it has no function marked "
        "@tokred.hookimpl named after a hook (tokred_register_adapters, tokred_register_selectors, "
        "tokred_register_gates, tokred_register_methods)",
    ]


# ----------------------------------------------- finding 3: one bad registration, not the hook


def test_one_bad_registration_is_refused_and_the_rest_of_the_hook_stays() -> None:
    def tokred_register_selectors(register):  # type: ignore[no-untyped-def]
        register("good.first", EverythingSelector)
        register("Bad Name", EverythingSelector)
        register("good.wrong-base", dict)
        register("good.aliases", EverythingSelector, aliases="one")
        register("good.bad-alias", EverythingSelector, aliases=("Bad Alias",))
        register("good.twice", EverythingSelector, aliases=("good.twice",))
        register("good.last", EverythingSelector)
        register("good.last", OtherSelector)

    registry = Registry(entry_points=[], plugins=[plugin(name="mixed", tokred_register_selectors=tokred_register_selectors)])
    assert registry.list_selectors() == ["good.first", "good.last"]
    assert registry.entry("selector", "good.last").obj is EverythingSelector
    where = "plugin mixed (in-process) failed in tokred_register_selectors: PluginError: "
    assert [str(f) for f in registry.errors] == [
        where + "invalid selector name 'Bad Name' for EverythingSelector: use lowercase letters, digits, '_', '-' and '.'",
        where + "selector 'good.wrong-base' must be a subclass of tokred.components.Selector, got <class 'dict'>",
        where + "the aliases of selector 'good.aliases' (EverythingSelector) must be a sequence of names, "
        "not the string 'one'; write aliases=('one',)",
        where + "invalid alias 'Bad Alias' of selector 'good.bad-alias' (EverythingSelector): use lowercase letters, "
        "digits, '_', '-' and '.'",
        where + "selector 'good.twice' (EverythingSelector) gives 'good.twice' twice among its name and aliases",
        where + "selector name 'good.last' is already registered by this plugin, for selector 'good.last' "
        "(EverythingSelector): selector 'good.last' (OtherSelector) is not registered",
    ]


def test_hook_that_raises_keeps_what_it_registered_before_and_is_reported() -> None:
    def tokred_register_selectors(register):  # type: ignore[no-untyped-def]
        register("half", EverythingSelector)
        raise RuntimeError("boom")

    registry = Registry(entry_points=[], plugins=[plugin(name="halfway", tokred_register_selectors=tokred_register_selectors)])
    assert registry.list_selectors() == ["half"]
    assert [str(f) for f in registry.errors] == [
        "plugin halfway (in-process) failed in tokred_register_selectors: RuntimeError: boom"
    ]


@pytest.mark.parametrize(
    ("name", "obj", "message"),
    [("Bad Name", EverythingSelector, "invalid selector name"), ("fine", dict, "must be a subclass")],
)
def test_registrations_are_validated(name: str, obj: type, message: str) -> None:
    def tokred_register_selectors(register):  # type: ignore[no-untyped-def]
        register(name, obj)

    registry = Registry(entry_points=[], plugins=[plugin(tokred_register_selectors=tokred_register_selectors)])
    [failure] = registry.errors
    assert message in str(failure.error)


# ----------------------------------------------- finding 4: option models, at registration


class UndescribedSelector(EverythingSelector):
    """An option without a description."""

    strength: float = 1.0


class RequiredSelector(EverythingSelector):
    """An option without a default, and one with neither."""

    strength: float = Field(description="How strong.")
    other: int


class PermissiveSelector(EverythingSelector):
    """Accepts any option, so typos pass silently."""

    model_config = ConfigDict(extra="allow")


class UnbuildableMethod(BudgetOptions, Method):
    """Its defaults do not form a schedule."""

    def schedule(self) -> Schedule:
        raise ValueError("no schedule without a layer")


class NoScheduleMethod(BudgetOptions, Method):
    """Forgot schedule()."""


class GoodMethod(BudgetOptions, Method):
    """All options described and defaulted."""

    seed: int = Field(0, description="Seed.")

    def schedule(self) -> Schedule:
        return Schedule(selector=SelectorStage(selector=EverythingSelector(), budget=self.budget))


@pytest.mark.parametrize(
    ("kind", "cls", "problem"),
    [
        ("selector", UndescribedSelector, "option 'strength' has no description"),
        ("selector", RequiredSelector, "option 'strength' has no default; option 'other' has no description and no default"),
        ("selector", PermissiveSelector, "its model_config has extra='allow', not extra='forbid'"),
        ("method", UnbuildableMethod, "UnbuildableMethod() with its default options fails: ValidationError: "
                                      "options: Value error, no schedule without a layer"),
        ("method", NoScheduleMethod, "NoScheduleMethod() with its default options fails: NotImplementedError"),
    ],
)
def test_option_models_are_checked_at_registration(kind: str, cls: type, problem: str) -> None:
    def register_it(register):  # type: ignore[no-untyped-def]
        register("checked", cls)
        register("good", GoodMethod if kind == "method" else EverythingSelector)

    hook = f"tokred_register_{kind}s"
    registry = Registry(entry_points=[], plugins=[plugin(name="options", **{hook: register_it})])
    assert registry._list(kind, "*") == ["good"]  # type: ignore[arg-type]
    assert [str(f) for f in registry.errors] == [
        f"plugin options (in-process) failed in {hook}: PluginError: {kind} 'checked' ({cls.__name__}) is not "
        f"registered: {problem}"
    ]


def test_the_shipped_methods_pass_the_registration_checks() -> None:
    registry = Registry()
    assert registry.errors == []
    for kind in ("method", "selector", "gate"):
        for entry in registry.entries(kind):  # type: ignore[arg-type]
            assert entry.obj.model_config.get("extra") == "forbid"
            assert not [n for n, f in entry.obj.model_fields.items() if f.is_required() or not f.description]


# ------------------------------------------------------------ finding 5: describe() for messages


def test_describe_names_the_kind_name_class_plugin_and_distribution() -> None:
    from tokred.adapters import LlavaAdapter

    def tokred_register_selectors(register):  # type: ignore[no-untyped-def]
        register("everything", EverythingSelector)

    registry = Registry(entry_points=INSTALLED, plugins=[plugin(name="mine", tokred_register_selectors=tokred_register_selectors)])
    random = "selector 'random' (RandomSelector) from plugin 'tokred-methods' (distribution tokred)"
    assert registry.describe(RandomSelector) == random
    assert registry.describe(RandomSelector()) == random
    assert registry.describe(FastVMethod) == "method 'fastv' (FastVMethod) from plugin 'tokred-methods' (distribution tokred)"
    assert registry.describe(LlavaAdapter) == "adapter 'llava' (LlavaAdapter) from plugin 'tokred-adapters' (distribution tokred)"
    assert registry.describe(EverythingSelector()) == "selector 'everything' (EverythingSelector) from plugin 'mine' (in-process)"
    assert registry.describe(OtherSelector) == f"unregistered selector OtherSelector (defined in {__name__})"
    assert registry.describe(GoodMethod()) == f"unregistered method GoodMethod (defined in {__name__})"
    assert registry.describe({}) == "unregistered dict (defined in builtins)"


def test_describe_an_adapter_instance_by_its_own_family() -> None:
    from tokred.adapters import LlavaAdapter

    def tokred_register_adapters(register):  # type: ignore[no-untyped-def]
        register("llava-a", LlavaAdapter)
        register("llava-b", LlavaAdapter)

    registry = Registry(entry_points=[], plugins=[plugin(name="twice", tokred_register_adapters=tokred_register_adapters)])
    instance = LlavaAdapter.__new__(LlavaAdapter)  # the family is what matters here, not a model
    instance.family = "llava-b"
    assert registry.describe(instance) == "adapter 'llava-b' (LlavaAdapter) from plugin 'twice' (in-process)"
    assert registry.describe(LlavaAdapter).startswith("adapter 'llava-a' ")


# ------------------------------------------------------------------------------- queries


def test_aliases_resolve_to_the_entry() -> None:
    registry = Registry()
    assert registry.entry("gate", "fastv").name == "last_token_attention"


def test_unknown_option_names_the_valid_ones() -> None:
    with pytest.raises(OptionsError) as excinfo:
        tokred.create("fastv", kep=3)
    message = str(excinfo.value)
    assert "'kep'" in message and "keep" in message and "keep_ratio" in message and "layer" in message


def test_unknown_option_lists_the_valid_ones_one_per_line_with_a_suggestion() -> None:
    with pytest.raises(OptionsError) as excinfo:
        tokred.create("fastv", kep=3)
    first, *lines = str(excinfo.value).splitlines()
    assert first == "method 'fastv' has no option 'kep' (did you mean 'keep' for 'kep'?); valid options:"
    assert max(len(line) for line in lines) <= 100
    fields = tokred.default_registry().entry("method", "fastv").obj.model_fields
    rows = [line for line in lines if not line.startswith("   ")]  # not the wrapped descriptions
    assert [line.split()[0] for line in rows] == list(fields)
    assert rows[0].split()[1:3] == ["default", "None"] and "Visual tokens to keep" in rows[0]
    assert len(lines) > len(rows)  # the long descriptions wrap instead of running on


def test_invalid_option_values_list_the_valid_options_one_per_line_too() -> None:
    with pytest.raises(OptionsError) as excinfo:
        tokred.create("random", seed="x")
    first, *lines = str(excinfo.value).splitlines()
    assert first.startswith("invalid options for method 'random': seed: ") and first.endswith(". valid options:")
    assert lines[-1].split()[:3] == ["seed", "default", "0"]


def test_option_lines_put_a_description_under_its_row_when_its_column_is_narrow() -> None:
    from pydantic import BaseModel

    from tokred.registry import option_lines

    class Options(BaseModel):
        a_rather_long_option_name: int = Field(1, description="Short.")
        other: tuple = Field(tuple(range(12)), description="Something to say. " * 8)
        bare: int = Field(0)

    lines = option_lines(Options.model_fields, width=80)
    assert lines[0] == "  a_rather_long_option_name  default 1"
    assert lines[1] == "      Short."
    assert lines[2].split()[:2] == ["other", "default"]
    assert all(line.startswith("      Something") for line in lines[3:-1]) and len(lines) > 5
    assert max(len(line) for line in lines[3:-1]) <= 80
    assert lines[-1].split() == ["bare", "default", "0"]


@pytest.mark.parametrize(("lookup", "message"), [
    (lambda r: r.create("todr"), "unknown method 'todr' (did you mean 'todre'?); registered: "),
    (lambda r: r.selector("randon"), "unknown selector 'randon' (did you mean 'random'?); registered: "),
    (lambda r: r.gate("last_token_atention"), "(did you mean 'last_token_attention'?)"),
    (lambda r: r.entry("adapter", "lava"), "unknown adapter 'lava' (did you mean 'llava'?); registered: "),
    (lambda r: r.create("zzzzzz"), "unknown method 'zzzzzz'; registered: "),  # nothing close: no guess
])
def test_unknown_names_suggest_the_closest_registered_one(lookup, message: str) -> None:  # noqa: ANN001
    with pytest.raises(OptionsError) as excinfo:
        lookup(Registry())
    assert message in str(excinfo.value)


def test_module_level_create_suggests_too() -> None:
    with pytest.raises(OptionsError, match=r"^unknown method 'todr' \(did you mean 'todre'\?\); registered: "):
        tokred.create("todr")


def test_an_alias_can_be_suggested(tmp_path) -> None:  # noqa: ANN001
    from tokred.methods import RandomSelector

    class Plugin:
        __name__ = "aliased"

        @tokred.hookimpl
        def tokred_register_selectors(self, register) -> None:  # noqa: ANN001
            register("uniform", RandomSelector, aliases=("shuffle",))

    with pytest.raises(OptionsError, match=r"unknown selector 'shufle' \(did you mean 'shuffle'\?\)"):
        Registry(entry_points=(), plugins=[Plugin()]).selector("shufle")


def test_wrong_option_type_is_an_options_error() -> None:
    with pytest.raises(OptionsError, match="seed"):
        tokred.create("random", seed="not a number")


def test_unknown_method_lists_the_registered_ones() -> None:
    with pytest.raises(OptionsError, match="registered: ") as caught:
        tokred.create("no-such-method")
    assert ", ".join(tokred.list_methods()) in str(caught.value)


def test_methods_and_components_options_are_all_described() -> None:
    registry = Registry()
    for kind in ("method", "selector", "gate"):
        for entry in registry.entries(kind):  # type: ignore[arg-type]
            for field_name, field in entry.obj.model_fields.items():
                assert field.description, f"{kind} {entry.name}: option {field_name} has no description"


def test_importing_tokred_does_not_import_transformers() -> None:
    """transformers takes seconds to import; library users pay for it only when a run starts."""
    import subprocess
    import sys

    code = "import sys, tokred; tokred.Budget(keep=4); print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"
