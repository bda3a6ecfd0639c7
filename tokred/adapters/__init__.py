"""Model adapters shipped with tokred, registered through the ``tokred`` entry point group."""

from __future__ import annotations

from ..hookspecs import hookimpl
from .base import Adapter, ImageSpan, VisionProbes
from .llava import LlavaAdapter

__all__ = ["Adapter", "ImageSpan", "VisionProbes", "LlavaAdapter"]


@hookimpl
def tokred_register_adapters(register) -> None:  # type: ignore[no-untyped-def]
    register("llava", LlavaAdapter)
