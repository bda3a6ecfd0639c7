"""DESIGN.md section 6: the conformance suite on every adapter with a tiny model (LLaVA here)."""

from __future__ import annotations

import pytest

import tokred
from tokred.testing import check_method


def test_todre_conforms() -> None:
    check_method("todre")


@pytest.mark.parametrize(
    "options, attn_implementations",
    [
        pytest.param({"stage2": False}, ("sdpa", "eager"), id="stage1-only"),
        pytest.param({"stage1": False}, ("sdpa", "eager"), id="stage2-only"),
        # tau = 1 makes the gate fire on every sample: the all-or-none drop, its cache and decoding.
        pytest.param({"tau": 1.0}, ("sdpa", "eager"), id="both-stages-gate-fires"),
        pytest.param({"stage1": False, "tau": 1.0, "gate_layer": 2}, ("sdpa",), id="stage2-only-fires-early"),
        pytest.param({"stage2": False, "objective": "k_center", "pivot": "max_norm"}, ("sdpa",), id="k-center-max-norm"),
    ],
)
def test_todre_variants_conform(options: dict, attn_implementations: tuple[str, ...]) -> None:
    check_method(tokred.create("todre", **options), attn_implementations=attn_implementations)
