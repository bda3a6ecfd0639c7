"""A hostile plugin, installed next to the real ones, earns exactly the errors the docs show.

The plugin is ``tests/tokred_hostile.py``, installed here as the entry point ``hostile`` of a
distribution ``tokred-hostile`` (a ``.dist-info`` folder in a temporary directory, so its entry point
carries its distribution exactly as a pip-installed one does). Only the registry's side is checked
here; the runtime's refusal of the NaN scores of ``hostile.nan`` is tested with the runtime.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

import tokred
from tokred import OptionsError, Registry
from tokred.methods import FastVMethod

ROOT = Path(__file__).resolve().parents[1]
INSTALLED = list(importlib.metadata.entry_points(group="tokred"))

_WHERE = "plugin hostile (from tokred-hostile) failed in"
_HOOKS = "the hooks are tokred_register_adapters, tokred_register_selectors, tokred_register_gates, tokred_register_methods"
_CONTESTED = (
    "selector name 'example.norm' is claimed by plugin 'example' (distribution tokred-example-plugin) and plugin "
    "'hostile' (distribution tokred-hostile), so it belongs to neither"
)
_RESOLVE = (
    "resolve it with Registry(prefer={'selector:example.norm': '<distribution or plugin>'}) "
    "or uninstall all but one of them"
)

#: What ``Registry.errors`` holds, and ``tokred list`` prints, with the hostile plugin installed.
EXPECTED = [
    f"{_WHERE} registration: PluginError: tokred_register_gates is named like a tokred hook but is not marked "
    "@tokred.hookimpl, so it is never called; decorate it with @tokred.hookimpl",
    f"{_WHERE} registration: PluginError: tokred_register_method is marked @tokred.hookimpl but is not a tokred "
    f"hook, so it is never called (did you mean tokred_register_methods?); {_HOOKS}",
    f"{_WHERE} tokred_register_selectors: PluginError: selector 'hostile.undescribed' (UndescribedSelector) is not "
    "registered: option 'strength' has no description",
    f"{_WHERE} tokred_register_methods: PluginError: method 'hostile.required' (RequiredMethod) is not registered: "
    "option 'strength' has no default",
    "plugin example (from tokred-example-plugin) failed in tokred_register_selectors: PluginError: "
    f"{_CONTESTED}: selector 'example.norm' (NormSelector) is not registered; {_RESOLVE}",
    f"{_WHERE} tokred_register_selectors: PluginError: {_CONTESTED}: selector 'hostile.nan' (NanScoreSelector) is "
    f"registered without the alias 'example.norm'; {_RESOLVE}",
    f"{_WHERE} tokred_register_methods: PluginError: method name 'fastv' belongs to first-party plugin "
    "'tokred-methods' (distribution tokred): method 'hostile-nan' (NanMethod) is registered without the alias 'fastv'",
    f"{_WHERE} tokred_register_methods: PluginError: method name 'todre' belongs to first-party plugin 'todre' "
    "(distribution tokred-todre): method 'hostile-nan' (NanMethod) is registered without the alias 'todre'",
]


@pytest.fixture
def hostile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[importlib.metadata.EntryPoint]:
    """The entry points of the installed distribution ``tokred-hostile``: ``hostile = tokred_hostile``."""
    dist_info = tmp_path / "tokred_hostile-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: tokred-hostile\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text("[tokred]\nhostile = tokred_hostile\n")
    monkeypatch.syspath_prepend(str(Path(__file__).parent))  # where tokred_hostile.py lives
    return list(importlib.metadata.PathDistribution(dist_info).entry_points.select(group="tokred"))


@pytest.fixture
def registry(hostile: list[importlib.metadata.EntryPoint]) -> Registry:
    if "example" not in {ep.name for ep in INSTALLED}:
        pytest.skip("the example plugin is not installed (pip install -e examples/tokred-example-plugin)")
    return Registry(entry_points=[*hostile, *INSTALLED])


def test_the_hostile_plugin_earns_exactly_these_errors(registry: Registry) -> None:
    assert [str(f) for f in registry.errors] == EXPECTED


def test_the_first_party_names_stay_first_party(registry: Registry) -> None:
    from tokred_todre import ToDREMethod

    assert type(registry.create("fastv")) is FastVMethod
    assert type(registry.create("todre")) is ToDREMethod
    assert registry.entry("method", "hostile-nan").aliases == ()


def test_a_contested_third_party_name_belongs_to_neither(registry: Registry) -> None:
    assert "example.norm" not in registry.list_selectors()
    with pytest.raises(OptionsError) as excinfo:
        registry.selector("example.norm")
    assert str(excinfo.value).startswith(f"selector 'example.norm' is not registered: {_CONTESTED}; {_RESOLVE}. registered: ")
    assert "example-norm" in registry.list_methods()  # the example's method builds its selector itself


def test_prefer_resolves_the_clash(hostile: list[importlib.metadata.EntryPoint]) -> None:
    from tokred_example.norm import NormSelector

    registry = Registry(entry_points=[*hostile, *INSTALLED], prefer={"selector:example.norm": "tokred-example-plugin"})
    assert registry.entry("selector", "example.norm").obj is NormSelector
    assert [e for e in registry.errors if "example.norm" in str(e)] == []


def test_what_stays_registered_is_there_for_the_runtime_checks(registry: Registry) -> None:
    import tokred_hostile

    assert registry.entry("selector", "hostile.nan").obj is tokred_hostile.NanScoreSelector
    assert registry.describe(tokred_hostile.NanScoreSelector()) == (
        "selector 'hostile.nan' (NanScoreSelector) from plugin 'hostile' (distribution tokred-hostile)"
    )
    assert registry.describe(registry.create("hostile-nan")) == (
        "method 'hostile-nan' (NanMethod) from plugin 'hostile' (distribution tokred-hostile)"
    )
    assert {"hostile.never", "hostile.undescribed", "hostile.required"}.isdisjoint(
        [*registry.list_selectors(), *registry.list_gates(), *registry.list_methods()]
    )


def test_in_process_the_same_plugin_is_reported_as_in_process(hostile: list[importlib.metadata.EntryPoint]) -> None:
    """Without the example plugin nothing contests ``example.norm``; the rest reads the same, the
    plugin named by its module and ``(in-process)``."""
    import tokred_hostile

    registry = Registry(entry_points=[ep for ep in INSTALLED if ep.name != "example"], plugins=[tokred_hostile])
    in_process = [e.replace(_WHERE, "plugin tokred_hostile (in-process) failed in") for e in EXPECTED if "example" not in e]
    assert [str(f) for f in registry.errors] == in_process
    assert registry.describe(tokred_hostile.NanScoreSelector) == (
        "selector 'hostile.nan' (NanScoreSelector) from plugin 'tokred_hostile' (in-process)"
    )


def test_tokred_list_prints_the_same_texts(registry: Registry, capsys: pytest.CaptureFixture[str]) -> None:
    from tokred.cli import main

    assert main(["list"], registry=registry) == 0
    out = capsys.readouterr().out
    assert out.split("plugins that failed to load\n", 1)[1].splitlines() == [f"  {e}" for e in EXPECTED]


def test_the_troubleshooting_page_shows_the_same_texts() -> None:
    page = (ROOT / "docs/troubleshooting.md").read_text()
    section = page.split("## A plugin's registrations are refused", 1)[1].split("\n## ", 1)[0]
    missing = [e for e in EXPECTED if f"  {e}\n" not in section]
    assert not missing, "docs/troubleshooting.md does not show: " + "\n".join(missing)
    assert tokred.registry.FIRST_PARTY_DISTRIBUTIONS <= set(section.replace("`", " ").replace(",", " ").split())


def test_the_troubleshooting_pages_prefer_snippet_runs() -> None:
    import re
    import textwrap

    from tokred.registry import set_default_registry

    if "example" not in {ep.name for ep in INSTALLED}:
        pytest.skip("the snippet names the example plugin's selector")
    page = (ROOT / "docs/troubleshooting.md").read_text()
    section = page.split("## A plugin's registrations are refused", 1)[1].split("\n## ", 1)[0]
    [snippet] = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    previous = set_default_registry(None)
    try:
        namespace: dict[str, object] = {}
        exec(textwrap.dedent(snippet), namespace)  # noqa: S102 - the page's own code
        assert tokred.default_registry() is namespace["registry"]
        assert tokred.default_registry().prefer == {"selector:example.norm": "tokred-example-plugin"}
    finally:
        set_default_registry(previous)


def test_the_runtime_refuses_nan_scores_naming_the_method_plugin_and_distribution(registry: Registry) -> None:
    from tokred.testing import tiny_inputs, tiny_model

    model, processor = tiny_model("llava")
    with tokred.apply(model, registry.create("hostile-nan", keep=8), registry=registry):
        with pytest.raises(tokred.MethodContractError) as info:
            model(**tiny_inputs(processor, ["What is shown?"]))
    assert str(info.value) == (
        "selector 'hostile.nan' (NanScoreSelector) from plugin 'hostile' (distribution tokred-hostile): "
        "NanScoreSelector.score returned 576 non-finite scores (NaN or infinity; the first at token 0, nan): "
        "scores must be finite"
    )
