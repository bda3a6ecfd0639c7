"""Shared fixtures of the tokred-star tests: tiny offline LLaVA models, inputs, a layer census."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch.nn as nn
from tokred.testing import tiny_inputs, tiny_model

try:
    import tokred_star  # noqa: F401 - the distribution under test, registered through its entry point
except ImportError as exc:
    raise ImportError(
        "the tokred-star plugin is not installed; from the repository root run: "
        "pip install -c constraints.txt -e plugins/star"
    ) from exc

PROMPTS = ("What is shown in this image?", "Describe the picture in detail please, with the colours of every shape.")


@pytest.fixture(scope="module")
def llava() -> tuple[nn.Module, Any]:
    """Tiny LLaVA-1.5 (sdpa): 576 visual tokens per image, 8 decoder layers, 4 query / 2 KV heads."""
    return tiny_model("llava", attn_implementation="sdpa")


@pytest.fixture(scope="module")
def llava_eager() -> tuple[nn.Module, Any]:
    """The same weights as :func:`llava` (same seed) with eager attention."""
    return tiny_model("llava", attn_implementation="eager")


@pytest.fixture(scope="module")
def one_prompt(llava: tuple[nn.Module, Any]) -> dict[str, torch.Tensor]:
    return tiny_inputs(llava[1], PROMPTS[:1])


@pytest.fixture(scope="module")
def two_prompts(llava: tuple[nn.Module, Any]) -> dict[str, torch.Tensor]:
    """Two prompts of different lengths, left-padded into one batch."""
    return tiny_inputs(llava[1], PROMPTS)


class LayerCensus:
    """Visual tokens each decoder layer receives, counted by our own forward pre-hooks.

    For a one-row, unpadded batch, a layer's visual tokens are its input length minus the row's text
    tokens (tokred never drops text). ``visual[f][l]`` is the count at layer ``l`` in forward ``f``.
    """

    def __init__(self, model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
        ids = inputs["input_ids"]
        assert ids.shape[0] == 1, "the census counts one-row batches"
        self.text_tokens = int(ids.shape[1] - (ids == model.config.image_token_id).sum())
        self.layers = list(model.model.language_model.layers)
        self.lengths: list[list[int]] = []

    def _hook(self, index: int) -> Callable[..., None]:
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == 0:
                self.lengths.append([])
            self.lengths[-1].append(int(hidden.shape[1]))

        return record

    @property
    def visual(self) -> list[list[int]]:
        return [[n - self.text_tokens for n in forward] for forward in self.lengths]

    def __enter__(self) -> LayerCensus:
        self._handles = [layer.register_forward_pre_hook(self._hook(i), with_kwargs=True)
                         for i, layer in enumerate(self.layers)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()


@pytest.fixture
def census() -> type[LayerCensus]:
    """``with census(model, inputs) as c:`` then ``c.visual[forward][layer]``."""
    return LayerCensus
