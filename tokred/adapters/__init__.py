"""Model adapters shipped with tokred, registered through the ``tokred`` entry point group."""

from __future__ import annotations

from ..hookspecs import hookimpl
from .base import Adapter, ImageSpan, VisionProbes
from .llava import LlavaAdapter
from .qwen_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter, Qwen3VLAdapter, QwenVLAdapter

__all__ = [
    "Adapter", "ImageSpan", "VisionProbes", "LlavaAdapter",
    "QwenVLAdapter", "Qwen2VLAdapter", "Qwen2_5_VLAdapter", "Qwen3VLAdapter",
]


@hookimpl
def tokred_register_adapters(register) -> None:  # type: ignore[no-untyped-def]
    register("llava", LlavaAdapter)
    register("qwen2_vl", Qwen2VLAdapter)
    register("qwen2_5_vl", Qwen2_5_VLAdapter)
    register("qwen3_vl", Qwen3VLAdapter)
