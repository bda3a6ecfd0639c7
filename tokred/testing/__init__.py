"""Testing utilities for tokred and its plugins: tiny offline models and the conformance suite.

``tiny_model(family)`` builds a random-weight model of a supported family with the real
``transformers`` classes and processor, offline. ``check_method(name)`` runs every conformance
property (see :mod:`tokred.testing._checks`) on every registered adapter that has a tiny model.
"""

from ._checks import (
    CHECKS,
    DEGENERATE_SIZES,
    ConformanceError,
    NotApplicable,
    Refusal,
    check_method,
    checks_for,
    conformance_cases,
    parametrize_with_checks,
    tiny_inputs,
    tiny_video_inputs,
)
from ._builders import make_gate_state, make_visual_tokens
from ._tiny import FAMILIES, VIDEO_ADAPTER_OPTIONS, VIDEO_FAMILIES, make_image, tiny_model
from ._video import ProcessorFreeVideoUnsupported, make_video, processor_free_video_inputs

__all__ = [
    "FAMILIES", "VIDEO_FAMILIES", "VIDEO_ADAPTER_OPTIONS", "make_image", "make_video", "tiny_model", "tiny_inputs",
    "processor_free_video_inputs", "ProcessorFreeVideoUnsupported",
    "tiny_video_inputs", "make_visual_tokens", "make_gate_state",
    "CHECKS", "DEGENERATE_SIZES", "ConformanceError", "NotApplicable", "Refusal", "check_method", "checks_for",
    "conformance_cases", "parametrize_with_checks",
]
