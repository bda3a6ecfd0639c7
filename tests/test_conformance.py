"""The conformance matrix: every registered method x every adapter with a tiny model x attention
implementation x property. Generated from the registries, so registering a method enrols it."""

from __future__ import annotations

import pytest

import tokred
from tokred.testing import checks_for, FAMILIES, check_method

REGISTRY = tokred.default_registry()
METHODS = REGISTRY.list_methods()
FAMILIES_WITH_TINY_MODELS = [family for family in REGISTRY.list_adapters() if family in FAMILIES]


def test_every_registered_adapter_has_a_tiny_model() -> None:
    assert sorted(FAMILIES_WITH_TINY_MODELS) == REGISTRY.list_adapters()


@pytest.mark.parametrize("prop", checks_for("image"))
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES_WITH_TINY_MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_conformance(method: str, family: str, attn_implementation: str, prop: str) -> None:
    refused = check_method(method, families=[family], attn_implementations=[attn_implementation], checks=[prop])
    if refused:  # refused before any model call, or the property does not apply, with a clear reason
        pytest.skip(refused[0].message if refused[0].check else f"tokred.apply refuses {method} on {family}: {refused[0].message}")
