"""The runtime: applying a schedule to a model and reporting what happened."""

from ._run import Run, apply
from .report import ImageRecord, RunReport

__all__ = ["Run", "apply", "RunReport", "ImageRecord"]
