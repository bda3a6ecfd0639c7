"""``Run.frozen``: replaying the latest prefill's decisions, also onto other rows and longer text."""

from __future__ import annotations

import pytest
import torch

import tokred
from tokred import RuntimeStateError
from tokred.testing import make_image, tiny_model

PROMPTS = ("USER: <image>\nWhat is it? ASSISTANT:", "USER: <image>\nDescribe the picture please. ASSISTANT:")


def _inputs(processor, texts, seeds):  # type: ignore[no-untyped-def]
    processor.tokenizer.padding_side = "left"
    return processor(images=[make_image(seed=s) for s in seeds], text=list(texts), return_tensors="pt", padding=True)


@pytest.mark.parametrize("method", ["random", "fastv", "todre", "star"])
def test_rows_replay_their_source_rows_decisions_onto_longer_text(method: str) -> None:
    model, processor = tiny_model("llava")
    prompts = _inputs(processor, PROMPTS, [0, 1])
    continued = [PROMPTS[0] + " a cat", PROMPTS[0] + " two red shapes on a table", PROMPTS[1] + " a dog"]
    rows = [0, 0, 1]
    with tokred.apply(model, tokred.create(method, keep=16)) as run, torch.no_grad():
        model(**prompts)
        decided = run.report.kept_indices
        with run.frozen(rows=rows):
            model(**_inputs(processor, continued, [0, 0, 1]))
        replayed = run.report.kept_indices
    assert replayed == [decided[r] for r in rows]


def test_a_replayed_row_must_hold_the_same_images() -> None:
    model, processor = tiny_model("qwen2_vl")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    small = processor(images=[make_image(336, 336)], text=[text], return_tensors="pt")
    large = processor(images=[make_image(200, 600)], text=[text], return_tensors="pt")
    with tokred.apply(model, tokred.create("random", keep=8)) as run, torch.no_grad():
        model(**small)
        with run.frozen(rows=[0]), pytest.raises(RuntimeStateError, match="was made on 144"):
            model(**large)


def test_rows_must_name_every_row_of_the_frozen_prefill() -> None:
    model, processor = tiny_model("llava")
    with tokred.apply(model, tokred.create("fastv", keep=16)) as run, torch.no_grad():
        model(**_inputs(processor, PROMPTS[:1], [0]))
        with run.frozen(rows=[0]), pytest.raises(RuntimeStateError, match=r"names 1 rows, but this prefill has row 1"):
            model(**_inputs(processor, PROMPTS, [0, 0]))
        with pytest.raises(RuntimeStateError, match="rows must be row indices"):
            with run.frozen(rows=[True]):
                pass
