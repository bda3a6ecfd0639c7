"""Model adapters shipped with tokred, registered through the ``tokred`` entry point group."""

from __future__ import annotations

from ..hookspecs import hookimpl
from .base import Adapter, ImageSpan, VisionProbes
from .internvl import InternVLAdapter
from .llava import LlavaAdapter
from .llava_next import LlavaNextAdapter
from .llava_next_video import LlavaNextVideoAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .qwen_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter, Qwen3VLAdapter, QwenVLAdapter

__all__ = [
    "Adapter", "ImageSpan", "VisionProbes", "LlavaAdapter", "LlavaNextAdapter", "LlavaOnevisionAdapter", "LlavaNextVideoAdapter",
    "InternVLAdapter",
    "QwenVLAdapter", "Qwen2VLAdapter", "Qwen2_5_VLAdapter", "Qwen3VLAdapter",
]


@hookimpl
def tokred_register_adapters(register) -> None:  # type: ignore[no-untyped-def]
    register("llava", LlavaAdapter)
    register("llava_next", LlavaNextAdapter)
    register("llava_onevision", LlavaOnevisionAdapter)
    register("llava_next_video", LlavaNextVideoAdapter)
    register("internvl", InternVLAdapter)
    register("qwen2_vl", Qwen2VLAdapter)
    register("qwen2_5_vl", Qwen2_5_VLAdapter)
    register("qwen3_vl", Qwen3VLAdapter)
