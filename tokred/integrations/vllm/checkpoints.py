"""Write tokred's tiny test models as checkpoints that vLLM loads, like a released checkpoint would.

``transformers`` 5.x saves a LLaVA CLIP tower flat (``vision_tower.embeddings.*``), while released
LLaVA checkpoints, and vLLM's CLIP loader, use ``vision_tower.vision_model.*``. The Qwen-VL tiny
models use an image-only processor subclass of tokred's, whose name ``save_pretrained`` records.
:func:`save_tiny_checkpoint` writes both the way released checkpoints have them, so stock vLLM loads
them and ``transformers`` still loads them back to the same weights. Nothing here imports vLLM.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["save_tiny_checkpoint", "CLIP_TOWER_PARTS"]

#: Top-level modules of a transformers ``CLIPVisionTransformer`` / ``SiglipVisionTransformer``; a
#: tower saved with these directly under ``vision_tower.`` lacks the ``vision_model.`` level.
CLIP_TOWER_PARTS = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.", "head.")

# The image-only processor subclasses of tokred.testing and the transformers class they stand for.
_PROCESSOR_CLASSES = {
    "Qwen2VLImageProcessor": "Qwen2VLProcessor",
    "Qwen2_5_VLImageProcessor": "Qwen2_5_VLProcessor",
    "Qwen3VLImageProcessor": "Qwen3VLProcessor",
}


def _released_name(key: str) -> str:
    for prefix in ("vision_tower.", "model.vision_tower."):
        if key.startswith(prefix) and key[len(prefix):].startswith(CLIP_TOWER_PARTS):
            return prefix + "vision_model." + key[len(prefix):]
    return key


def save_tiny_checkpoint(family: str, path: str | Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Save ``tokred.testing.tiny_model(family, seed=seed, **overrides)`` (model and processor) to
    ``path`` in the layout of released checkpoints; returns the path."""
    from safetensors.torch import load_file, save_file

    from ...testing import tiny_model

    path = Path(path)
    model, processor = tiny_model(family, seed=seed, **overrides)
    model.save_pretrained(path)
    processor.save_pretrained(path)

    weights_file = path / "model.safetensors"
    weights = load_file(weights_file)
    renamed = {_released_name(key): value for key, value in weights.items()}
    if renamed.keys() != weights.keys():
        save_file(renamed, weights_file, metadata={"format": "pt"})

    for name in ("processor_config.json", "tokenizer_config.json", "preprocessor_config.json"):
        config_file = path / name
        if not config_file.exists():
            continue
        config = json.loads(config_file.read_text())
        cls = config.get("processor_class")
        if cls in _PROCESSOR_CLASSES:
            config["processor_class"] = _PROCESSOR_CLASSES[cls]
            config_file.write_text(json.dumps(config, indent=2) + "\n")
    return path
