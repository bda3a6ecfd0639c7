"""The conformance matrix: every registered method x every adapter with a tiny model x attention
implementation x property. Generated from the registries, so registering a method enrols it."""

from __future__ import annotations

import pytest

import tokred
from tokred.testing import CHECKS, FAMILIES, check_method

REGISTRY = tokred.default_registry()
METHODS = REGISTRY.list_methods()
FAMILIES_WITH_TINY_MODELS = [family for family in REGISTRY.list_adapters() if family in FAMILIES]


def test_every_registered_adapter_has_a_tiny_model() -> None:
    assert sorted(FAMILIES_WITH_TINY_MODELS) == REGISTRY.list_adapters()


@pytest.mark.parametrize("prop", list(CHECKS))
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES_WITH_TINY_MODELS)
@pytest.mark.parametrize("method", METHODS)
def test_conformance(method: str, family: str, attn_implementation: str, prop: str) -> None:
    refused = check_method(method, families=[family], attn_implementations=[attn_implementation], checks=[prop])
    if refused:  # refused before any model call, with a clear reason (checked by check_method)
        pytest.skip(f"tokred.apply refuses {method} on {family}: {refused[0].message}")
