"""The payload of tokred's ``lmms_eval.models`` entry point.

lmms-eval loads every entry point of that group when it builds its model registry (also for
``lmms-eval models``, which lists them), so this module stays light: it names the model class by
its import path and lmms-eval imports :mod:`tokred.integrations.lmms_eval` only when ``--model tokred``
is asked for.
"""

from __future__ import annotations

from typing import Any

__all__ = ["manifest"]

MODEL_ID = "tokred"
CLASS_PATH = "tokred.integrations.lmms_eval.TokredLMM"


def manifest() -> Any:
    """``lmms_eval.models.registry_v2.ModelManifest`` for ``--model tokred`` (a "simple" model: it
    receives each task's ``doc_to_text`` prompt and builds the chat prompt itself)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)
