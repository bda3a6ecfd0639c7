"""Testing utilities: tiny offline models and the conformance suite."""

from ._tiny import FAMILIES, make_image, tiny_model

__all__ = ["FAMILIES", "make_image", "tiny_model"]
