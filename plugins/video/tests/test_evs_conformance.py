"""``evs`` on the conformance suite with videos (every family is also in the core's matrices,
tests/test_conformance.py and tests/test_conformance_video.py); here its per-frame variant."""

from __future__ import annotations

import tokred
from tokred.testing import check_method


def test_per_frame_evs_conforms_on_videos() -> None:
    check_method(tokred.create("evs", keep_ratio=0.3, per_frame=True), families=["qwen2_5_vl", "qwen3_vl"],
                 attn_implementations=["sdpa"], modality="video")
