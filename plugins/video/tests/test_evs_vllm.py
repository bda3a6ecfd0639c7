"""``evs`` keeps exactly what vLLM's EVS keeps, on stored inputs (fixtures/README.md says how the
fixture was made: vLLM 0.32.0, ``vllm/multimodal/video_prune/evs.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tokred import ImageLayout, VisualTokens
from tokred_video import EVSSelector

FIXTURE = torch.load(Path(__file__).parent / "fixtures" / "evs_vllm_cases.pt", weights_only=True)
CASES = FIXTURE["cases"]


def _tokens(case: dict) -> VisualTokens:
    t, h, w = case["video_size_thw"]
    merge = case["spatial_merge_size"]
    return VisualTokens(features=case["embeds"], layout=ImageLayout.video(t, h // merge, w // merge))


def test_the_fixture_comes_from_vllm_0_32() -> None:
    assert FIXTURE["vllm_version"] == "0.32.0"
    assert len(CASES) == 6


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_kept_mask_equals_vllms(case: dict) -> None:
    kept = EVSSelector().select(_tokens(case), case["retained"])
    mask = torch.zeros(case["mask"].numel(), dtype=torch.bool)
    mask[kept] = True
    assert kept.numel() == case["retained"] == int(case["mask"].sum())
    assert torch.equal(mask, case["mask"]), f"differs at {torch.nonzero(mask != case['mask']).flatten().tolist()}"


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_vllms_count_is_a_keep_budget(case: dict) -> None:
    """The documented way to get vLLM's count through a tokred budget: keep=max(tokens_per_frame, int(N * (1 - q)))."""
    t, h, w = case["video_size_thw"]
    per_frame = (h // case["spatial_merge_size"]) * (w // case["spatial_merge_size"])
    assert max(per_frame, int(t * per_frame * (1 - case["q"]))) == case["retained"]
