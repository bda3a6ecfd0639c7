"""Depth-matched layer options on the proxy (tokred.eval.proxy._depth): LLaVA-1.5's absolute layer
defaults become the same depth fractions, for every registered method, under the user's options.

Pure unit tests: nothing here loads the proxy or depends on its depth (layers are resolved with
explicit ``num_layers``)."""

from __future__ import annotations

import importlib.metadata
from typing import Optional

import pytest
from pydantic import Field

import tokred
from tokred.bench._presets import PRESETS
from tokred.cli._loading import layer_options_at_depth, layer_options_line, preset_layer_options
from tokred.eval.proxy._depth import REFERENCE_DEPTH, at_depth, describe, reference_depth_options
from tokred.options import LayerSpec
from tokred.schedule import resolve_layer


class _Layered(tokred.BudgetOptions, tokred.Method):
    """Base of the fake third-party methods: one selector stage, never run here."""

    def schedule(self) -> tokred.Schedule:
        from tokred.methods.random import RandomSelector

        return tokred.Schedule(selector=tokred.SelectorStage(selector=RandomSelector(), budget=self.budget))


class AbsoluteLayer(_Layered):
    gate_at: LayerSpec = Field(3, description="An absolute layer chosen for a 32-layer model.")
    other: int = Field(3, description="Not a layer: left alone.")


class FractionLayer(_Layered):
    gate_at: LayerSpec = Field("1/4", description="A depth fraction: resolves per model on its own.")


class EdgeLayers(_Layered):
    first: LayerSpec = Field(0, description="Layer 0: the same at every depth.")
    last: LayerSpec = Field(-1, description="Counted from the end.")
    deep: LayerSpec = Field(REFERENCE_DEPTH, description="Beyond LLaVA-1.5's depth: no fraction in (0, 1).")
    stages: tuple[LayerSpec, ...] = Field((0, 2, "1/2", -1, 16), description="Mixed stages.")
    maybe: Optional[LayerSpec] = Field(8, description="An optional layer.")


class _Plugin:
    @tokred.hookimpl
    def tokred_register_methods(self, register) -> None:  # type: ignore[no-untyped-def]
        register("absolute", AbsoluteLayer)
        register("fraction", FractionLayer)
        register("edges", EdgeLayers)


@pytest.fixture(scope="module")
def registry() -> tokred.Registry:
    registry = tokred.Registry(entry_points=list(importlib.metadata.entry_points(group="tokred")), plugins=(_Plugin(),))
    assert not registry.errors, registry.errors
    return registry


def test_the_shipped_methods_absolute_defaults_become_llava_depth_fractions(registry: tokred.Registry) -> None:
    assert REFERENCE_DEPTH == 32
    assert reference_depth_options(registry, "fastv") == {"layer": "2/32"}
    assert reference_depth_options(registry, "dart") == {"gate_layer": "2/32"}
    # Defaults that are depth fractions already resolve per model: nothing to match.
    for name in ("pdrop", "todre", "star", "random"):
        assert reference_depth_options(registry, name) == {}, name


def test_the_fractions_resolve_to_the_same_depth_as_on_llava() -> None:
    assert resolve_layer("2/32", 32) == 2  # LLaVA-1.5: the published layer
    assert resolve_layer("2/32", 16) == 1  # the retrained proxy's 16 layers: 1/16 of the depth, as on LLaVA
    assert resolve_layer("2/32", 64) == 4
    with pytest.raises(tokred.ScheduleError):
        resolve_layer("0/32", 16)  # fractions lie strictly in (0, 1): why layer 0 stays int 0


def test_a_third_party_methods_int_layer_default_is_mapped_and_a_fraction_is_not(registry: tokred.Registry) -> None:
    assert reference_depth_options(registry, "absolute") == {"gate_at": "3/32"}
    assert reference_depth_options(registry, "fraction") == {}


def test_layer_zero_negative_and_too_deep_layers_stay_as_they_are(registry: tokred.Registry) -> None:
    options = reference_depth_options(registry, "edges")
    assert options == {"stages": (0, "2/32", "1/2", -1, "16/32"), "maybe": "8/32"}
    assert options["stages"][0] == 0 and type(options["stages"][0]) is int
    registry.create("edges", **options)  # the mapped options are valid options of the method


def test_the_proxy_preset_names_the_function_and_others_have_none(registry: tokred.Registry) -> None:
    assert PRESETS["proxy"].layer_options == "tokred.eval.proxy._depth:reference_depth_options"
    assert PRESETS["proxy"].method_layer_options(registry, "fastv") == {"layer": "2/32"}
    assert PRESETS["tiny"].method_layer_options(registry, "fastv") == {}
    assert preset_layer_options("tiny", registry, ["fastv"], {}) == {}
    assert preset_layer_options(None, registry, ["fastv"], {}) == {}


def test_the_users_option_wins(registry: tokred.Registry) -> None:
    names = ["fastv", "dart", "random", "absolute"]
    assert preset_layer_options("proxy", registry, names, {"keep_ratio": 0.1}) == {
        "fastv": {"layer": "2/32"}, "dart": {"gate_layer": "2/32"}, "absolute": {"gate_at": "3/32"}}
    given = {"layer": 3}
    found = preset_layer_options("proxy", registry, names, given)
    assert "fastv" not in found and found["dart"] == {"gate_layer": "2/32"}
    # How tokred eval merges: the preset's layer options under the user's.
    method = registry.create("fastv", **{**reference_depth_options(registry, "fastv"), **given})
    assert method.layer == 3
    # Depth matching never changes the methods' own defaults.
    assert registry.create("fastv").layer == 2 and registry.create("dart").gate_layer == 2


def test_a_fraction_that_rounds_to_layer_zero_is_raised_to_the_shallowest_gate_layer() -> None:
    options = {"layer": "2/32", "stages": ("2/32", "8/32", "1/2")}
    assert at_depth(options, 16) == options
    assert at_depth(options, 32) == options
    assert at_depth(options, 4) == {"layer": 1, "stages": (1, "8/32", "1/2")}
    assert layer_options_at_depth({"fastv": {"layer": "2/32"}}, 16) == {"fastv": {"layer": "2/32"}}
    assert layer_options_at_depth({"fastv": {"layer": "2/32"}}, 8) == {"fastv": {"layer": 1}}  # 2/32 of 8 is 0.5
    assert [resolve_layer(v, 4) for v in at_depth(options, 4)["stages"]] == [1, 1, 2]


def test_the_line_says_what_was_depth_matched() -> None:
    assert describe("fastv", {"layer": "2/32"}, 16) == (
        "fastv: layer=2/32 (LLaVA-1.5's layer 2 of 32 at this model's depth: layer 1 of 16)")
    assert describe("pd", {"layers": (0, "2/32")}, 32) == (
        "pd: layers=(0, 2/32) (LLaVA-1.5's layers 0, 2 of 32 at this model's depth: layers 0, 2 of 32)")
    shallow = describe("fastv", {"layer": "2/32"}, 4)
    assert shallow.startswith("fastv: layer=1 (LLaVA-1.5's layer 2 of 32") and "layer 0" in shallow
    line = layer_options_line({"fastv": {"layer": "2/32"}, "dart": {"gate_layer": "2/32"}}, 16)
    assert line.startswith("depth-matched layers") and "fastv: layer=2/32" in line and "dart: gate_layer=2/32" in line
    assert layer_options_line({}, 16) == ""
