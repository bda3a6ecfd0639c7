"""tokred's conformance suite on the example plugin's method: every property, every model family."""

from __future__ import annotations

import tokred
from tokred.testing import check_method, parametrize_with_checks


def test_example_norm_conforms() -> None:
    # Every registered model family with a tiny model, sdpa and eager attention, six properties.
    check_method("example-norm")


# The same suite as one pytest test per (method, family, attention, property), for a non-default
# option: a failure names its case in the test id, e.g. example-norm-qwen2_vl-eager-batch_invariance.
@parametrize_with_checks([tokred.create("example-norm", center=True, keep=32)])
def test_centered_variant_conforms(case, check) -> None:
    check(case)
