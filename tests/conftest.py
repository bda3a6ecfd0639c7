"""Shared fixtures: tiny offline models and their inputs."""

from __future__ import annotations

import pytest

from tokred.testing import tiny_inputs, tiny_model

PROMPT = "What is shown in this image?"
LONG_PROMPT = "Describe the picture in detail please, with the colours of every shape."


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
