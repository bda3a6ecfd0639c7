"""Shared fixtures: tiny offline models and their inputs."""

from __future__ import annotations

import os

import pytest

from tokred.testing import tiny_inputs, tiny_model

#: The parameters of a conformance-matrix test (tests/test_conformance.py, tests/test_conformance_video.py).
_MATRIX = ("method", "family", "attn_implementation", "prop")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--conformance-stratum", choices=("all", "half"), default="all",
        help="'half' runs half of the conformance matrices, chosen so that every (method, family, property) "
             "still runs once (with one of the two attention implementations) and every (family, attention "
             "implementation, property) with half of the methods: what .ci/run uses on the oldest transformers, "
             "the full matrix running on the newest",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("conformance_stratum") != "half":
        return
    # Number each parameter's values in the order they are collected (methods, families,
    # implementations and properties are parametrized in a fixed order).
    numbers: dict[str, dict[object, int]] = {name: {} for name in _MATRIX}
    kept, deselected = [], []
    for item in items:
        spec = getattr(item, "callspec", None)
        if spec is None or not set(_MATRIX) <= set(spec.params):
            kept.append(item)
            continue
        index = {name: numbers[name].setdefault(spec.params[name], len(numbers[name])) for name in _MATRIX}
        in_stratum = (index["method"] + index["family"] + index["prop"]) % 2 == index["attn_implementation"]
        (kept if in_stratum else deselected).append(item)
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept


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
