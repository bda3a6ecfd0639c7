"""tokred-video: video token reduction for tokred.

* ``evs`` (:class:`EVSSelector`, :class:`EVSMethod`): Efficient Video Sampling, vLLM's temporal
  rule (``vllm/multimodal/video_prune/evs.py``): keep the tokens that changed most since the same
  cell of the previous frame, the first frame first.

Every other registered method reduces videos too: a video is one visual item whose layout knows its
frames (:attr:`tokred.ImageLayout.frame`); this distribution holds the methods that need them.
"""

from __future__ import annotations

from ._evs import NO_PREVIOUS_FRAME, EVSMethod, EVSSelector, evs_scores, previous_cell, spread_evenly

__version__ = "0.1.0"

__all__ = ["__version__", "NO_PREVIOUS_FRAME", "EVSSelector", "EVSMethod", "evs_scores", "previous_cell", "spread_evenly"]
