"""The plugin registry: entry points, lazy loading, validation, broken plugins, errors."""

from __future__ import annotations

import importlib.metadata
import types

import pytest

import tokred
from tokred import OptionsError, Registry, Selector, hookimpl

INSTALLED = list(importlib.metadata.entry_points(group="tokred"))


def plugin(**hooks: object) -> types.SimpleNamespace:
    """An in-process plugin object with the given hook implementations."""
    namespace = types.SimpleNamespace(__name__=hooks.pop("name", "fake"))
    for hook_name, function in hooks.items():
        setattr(namespace, hook_name, hookimpl(function))
    return namespace


class EverythingSelector(Selector):
    """Keeps the first k tokens."""

    def select(self, tokens, k):  # type: ignore[no-untyped-def]
        import torch

        return torch.arange(k)


def test_builtins_register_through_the_core_distribution_entry_points() -> None:
    registry = Registry()
    assert {"random", "fastv"} <= set(registry.list_methods())
    assert "llava" in registry.list_adapters()
    for kind, name in (("method", "random"), ("method", "fastv"), ("adapter", "llava")):
        assert registry.entry(kind, name).distribution == "tokred"


def test_list_methods_filters_with_wildcards() -> None:
    assert tokred.list_methods("fast*") == ["fastv"]
    assert tokred.list_methods("nothing-matches-*") == []
    assert tokred.list_methods() == sorted(tokred.list_methods())


def test_entry_points_load_lazily() -> None:
    registry = Registry(entry_points=[importlib.metadata.EntryPoint("broken", "tokred_no_such_module_xyz", "tokred")])
    assert registry._errors == []  # nothing imported yet
    assert registry.list_methods() == []
    assert len(registry.errors) == 1


def test_broken_plugin_is_named_and_does_not_hide_the_others() -> None:
    broken = importlib.metadata.EntryPoint("broken", "tokred_no_such_module_xyz", "tokred")
    registry = Registry(entry_points=[*INSTALLED, broken])
    assert {"random", "fastv"} <= set(registry.list_methods())
    [failure] = registry.errors
    assert failure.plugin == "broken" and failure.hook == "import"
    assert "broken" in str(failure) and "ModuleNotFoundError" in str(failure)
    with pytest.raises(OptionsError, match="broken"):
        registry.create("mymethod")  # the message points at the broken plugin


def test_hook_that_raises_is_reported_and_registers_nothing() -> None:
    def tokred_register_selectors(register):  # type: ignore[no-untyped-def]
        register("half", EverythingSelector)
        raise RuntimeError("boom")

    registry = Registry(entry_points=[], plugins=[plugin(name="halfway", tokred_register_selectors=tokred_register_selectors)])
    assert registry.list_selectors() == []
    [failure] = registry.errors
    assert (failure.plugin, failure.hook) == ("halfway", "tokred_register_selectors")


def test_duplicate_names_are_refused_naming_both_plugins() -> None:
    def tokred_register_selectors(register):  # type: ignore[no-untyped-def]
        register("first", EverythingSelector)

    first = plugin(name="one", tokred_register_selectors=tokred_register_selectors)
    second = plugin(name="two", tokred_register_selectors=tokred_register_selectors)
    registry = Registry(entry_points=[], plugins=[first, second])
    assert registry.entry("selector", "first").plugin == "one"
    [failure] = registry.errors
    assert "'one'" in str(failure.error) and failure.plugin == "two"


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


def test_hook_with_a_wrong_signature_is_refused_at_registration() -> None:
    def tokred_register_methods(register, unexpected):  # type: ignore[no-untyped-def]
        pass

    registry = Registry(entry_points=[], plugins=[plugin(name="odd", tokred_register_methods=tokred_register_methods)])
    [failure] = registry.errors
    assert failure.hook == "registration" and "unexpected" in str(failure.error)


def test_aliases_resolve_to_the_entry() -> None:
    registry = Registry()
    assert registry.entry("gate", "fastv").name == "last_token_attention"


def test_unknown_option_names_the_valid_ones() -> None:
    with pytest.raises(OptionsError) as excinfo:
        tokred.create("fastv", kep=3)
    message = str(excinfo.value)
    assert "'kep'" in message and "keep" in message and "keep_ratio" in message and "layer" in message


def test_wrong_option_type_is_an_options_error() -> None:
    with pytest.raises(OptionsError, match="seed"):
        tokred.create("random", seed="not a number")


def test_unknown_method_lists_the_registered_ones() -> None:
    with pytest.raises(OptionsError, match="fastv, random"):
        tokred.create("no-such-method")


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
