"""The video conformance matrix: every registered method x every adapter whose tiny model takes
videos x attention implementation x property, on prompts with one synthetic clip each (4 frames;
clips of 4 and 6 frames in one batch where the processor allows clips of different lengths).
Generated from the registries like the image matrix (tests/test_conformance.py), so registering a
method or a video-capable adapter enrols it."""

from __future__ import annotations

import pytest

import tokred
from tokred.testing import checks_for, VIDEO_FAMILIES, check_method

REGISTRY = tokred.default_registry()
METHODS = REGISTRY.list_methods()
VIDEO_CAPABLE = [family for family in REGISTRY.list_adapters() if family in VIDEO_FAMILIES]


def test_every_video_family_has_a_registered_adapter() -> None:
    assert sorted(VIDEO_CAPABLE) == sorted(VIDEO_FAMILIES)
    assert {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "llava_next_video", "internvl"} <= set(VIDEO_CAPABLE)


@pytest.mark.parametrize("prop", checks_for("video"))
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("family", VIDEO_CAPABLE)
@pytest.mark.parametrize("method", METHODS)
def test_conformance_on_videos(method: str, family: str, attn_implementation: str, prop: str) -> None:
    refused = check_method(method, families=[family], attn_implementations=[attn_implementation], checks=[prop],
                           modality="video")
    if refused:  # refused before any model call, or the property does not apply, with a clear reason
        pytest.skip(refused[0].message if refused[0].check else f"tokred.apply refuses {method} on {family}: {refused[0].message}")
