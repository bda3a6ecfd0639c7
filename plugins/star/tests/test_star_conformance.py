"""DESIGN.md section 6: tokred's conformance suite on STAR and its single-stage variants (LLaVA)."""

from __future__ import annotations

from typing import Any

import pytest
import tokred
from tokred.testing import check_method

VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "absolute-budget": {"keep": 64},                 # the capped stage-I default path
    "stage1-only": {"stage2": False, "keep": 48},
    "stage2-only": {"stage1": False, "gate_layer": "1/2"},
}


def test_registered_name_passes() -> None:
    """``check_method("star")`` as any plugin author would call it: every property, sdpa and eager."""
    check_method("star", families=["llava"])


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("variant", [v for v in VARIANTS if v != "defaults"])
def test_variants_pass(variant: str, impl: str) -> None:
    check_method(tokred.create("star", **VARIANTS[variant]), families=["llava"], attn_implementations=(impl,))


def test_pre_projector_features_pass() -> None:
    check_method(tokred.create("star", stage1_features="pre_projector"), families=["llava"])
