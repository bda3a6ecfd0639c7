"""Fixtures of the command-line tests: the installed registry and a tiny model saved to disk."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest

import tokred
from tokred.testing import make_image, tiny_model


@pytest.fixture
def registry() -> tokred.Registry:
    """A fresh registry of the installed plugins."""
    return tokred.Registry(entry_points=list(importlib.metadata.entry_points(group="tokred")))


@pytest.fixture(scope="session")
def saved_llava(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny LLaVA saved to disk with its processor (the real ``from_pretrained`` path runs), and a PNG."""
    root = tmp_path_factory.mktemp("saved-llava")
    model, processor = tiny_model("llava")
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    make_image().save(root / "image.png")
    return root / "model", root / "image.png"


@pytest.fixture(autouse=True)
def _own_random_state():  # noqa: ANN202
    """Each command-line test runs on a fork of torch's global random state and leaves it as it
    found it: building models draws from it, and later tests of unseeded methods depend on it."""
    import torch

    with torch.random.fork_rng():
        yield
