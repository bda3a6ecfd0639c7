"""Shared fixtures: tiny offline models and their inputs."""

from __future__ import annotations

import os

import pytest

from tokred.testing import tiny_inputs, tiny_model

PROMPT = "What is shown in this image?"
LONG_PROMPT = "Describe the picture in detail please, with the colours of every shape."


@pytest.fixture
def tested_release() -> str:
    """The installed transformers release, for tests that assert it lies in the tested range.

    pip never resolves a release outside it (pyproject.toml's bounds are the tested ones), so one
    found here was installed on purpose (``--no-deps``, a pinned environment, ``.ci/next-release.sh``
    trying the next release): those tests skip, naming the release and the range, instead of failing
    the user's run. CI sets ``TOKRED_REQUIRE_TESTED_RANGE=1``, which makes that skip a failure."""
    from tokred import compat

    version = compat.transformers_version()
    if not compat.in_tested_range(version):
        reason = (f"transformers {version} lies outside the tested range {compat.TESTED_TRANSFORMERS[0]} to "
                  f"{compat.TESTED_TRANSFORMERS[1]} (pip install '{compat.tested_requirement()}' installs one inside it)")
        if os.environ.get("TOKRED_REQUIRE_TESTED_RANGE") == "1":
            pytest.fail(reason + "; TOKRED_REQUIRE_TESTED_RANGE=1 requires a tested release")
        pytest.skip(reason)
    return version


@pytest.fixture(params=["sdpa", "eager"])
def attn_implementation(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def llava(attn_implementation: str):
    """``(model, processor)``: the tiny LLaVA-1.5 (576 visual tokens per image, 8 decoder layers)."""
    return tiny_model("llava", attn_implementation=attn_implementation)


@pytest.fixture
def llava_sdpa():
    return tiny_model("llava", attn_implementation="sdpa")


@pytest.fixture
def one_image(llava):
    _, processor = llava
    return tiny_inputs(processor, [PROMPT])
