"""Odd but valid image shapes on the anyres families (issue #25, item 3).

The unmodified LLaVA-NeXT, LLaVA-NeXT-Video and LLaVA-OneVision models run on a 1 x 1 px image and
on slivers such as 3 x 2000 or 2000 x 3 px, so tokred must too. Two things made them fail:

* ``unpad_image`` rounds the kept side *down* (``int(round(x, 7))``): a tall sliver keeps ``H' x 0``
  cells, yet the model still appends a newline token to each of those empty rows; a wide sliver keeps
  no row at all (no newline either). tokred's layouts dropped the newlines of empty rows (their tile
  was read from a last cell that did not exist), and its readers of ``generate``'s packed features
  took an image without rows for a malformed one.
* Under ``generate`` (transformers 5.23+) ``image_sizes`` is gone and the tile grid is recovered from
  the packed features. A 1 x 1 px image (1 x 2 tiles) and a 166 x 171 px one (2 x 1 tiles) both unpad
  to one tile's worth of cells in three encoder rows; only the encoder cells the features were
  projected from tell them apart. Several row-less images need their thumbnails located to count
  their tiles.

Every check runs on both ends of the tested transformers range (5.17 passes ``image_sizes`` to the
prefill under ``generate``; 5.25 does not).
"""

from __future__ import annotations

import functools

import pytest
import torch

import tokred
from tokred import compat
from tokred.adapters.base import VisionProbes
from tokred.errors import RuntimeStateError
from tokred.testing import make_image, tiny_model

#: The families whose anyres unpadding is shape-dependent (LLaVA-NeXT-Video reuses LLaVA-NeXT's).
FAMILIES = ["llava_next", "llava_next_video", "llava_onevision"]
#: ``(width, height)``: a single pixel, slivers a tile grid unpads to no column (tall) or no row
#: (wide), and their mirror images.
SHAPES = [(1, 1), (1, 100), (100, 1), (3, 2000), (2000, 3), (10, 500), (500, 10)]
#: An image that unpads like the 1 x 1 px one (12 x 12 cells in three encoder rows) from 2 x 1 tiles
#: instead of 1 x 2: what generate()'s layout recovery must tell apart.
TWIN = (166, 171)
REGISTRY = tokred.default_registry()
_ATOL = 1e-5
_BATCH_ATOL = 2e-4


def _ids(shape: tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


@functools.lru_cache(maxsize=None)
def _model(family: str):  # type: ignore[no-untyped-def]
    """One tiny model per family for the whole module: every check leaves it unmodified."""
    model, processor = tiny_model(family)
    processor.tokenizer.padding_side = "left"
    return model, processor


def _inputs(processor, sizes, questions=None, seed: int = 0):  # type: ignore[no-untyped-def]
    """One prompt per ``(width, height)`` in ``sizes``, each with that one image; prompt ``i``'s image
    is seeded ``seed + i`` (so a prompt alone gets the image it had in a batch)."""
    questions = questions or ["What is shown?"] * len(sizes)
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True)
        for q in questions]
    images = [make_image(w, h, seed=seed + i) for i, (w, h) in enumerate(sizes)]
    return dict(processor(images=images, text=texts, return_tensors="pt", padding=True))


def _generate(model, inputs, **kwargs):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=4, do_sample=False, **kwargs)


def _logits(model, inputs):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(**inputs).logits


# --------------------------------------------------------------------- properties


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("family", FAMILIES)
def test_keeping_everything_is_the_unmodified_model(family: str, shape: tuple[int, int]) -> None:
    """No reduction: the logits and the generated tokens are the unmodified model's."""
    model, processor = _model(family)
    inputs = _inputs(processor, [shape])
    expected, expected_tokens = _logits(model, inputs), _generate(model, inputs)
    with tokred.apply(model, tokred.create("random").keep_everything()):
        got, tokens = _logits(model, inputs), _generate(model, inputs)
    assert (got - expected).abs().max().item() <= _ATOL
    assert torch.equal(tokens, expected_tokens)


@pytest.mark.parametrize("method", ["random", "fastv"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("family", FAMILIES)
def test_reduced_generation_is_cache_consistent(family: str, shape: tuple[int, int], method: str) -> None:
    """Tokens dropped (before the LLM or inside it): cached generate equals the frozen recomputation."""
    model, processor = _model(family)
    inputs = _inputs(processor, [shape])
    with tokred.apply(model, tokred.create(method, keep_ratio=0.25)) as run:
        cached = _generate(model, inputs)
        with run.frozen():
            recomputed = _generate(model, inputs, use_cache=False)
    assert run.report.visual_tokens_input == [REGISTRY.adapter_for(model).count_visual_tokens(inputs)]
    assert torch.equal(cached, recomputed)


@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_with_a_square_image_decides_as_each_prompt_alone(family: str, shape: tuple[int, int]) -> None:
    """An odd image next to a 336 x 336 one in a padded batch: same kept indices, last-token logits
    and generated tokens as each prompt alone."""
    model, processor = _model(family)
    sizes, questions = [shape, (336, 336)], ["What is shown?", "Describe the picture please."]
    batch = _inputs(processor, sizes, questions)
    with tokred.apply(model, tokred.create("random", keep_ratio=0.25)) as run:
        batch_logits = _logits(model, batch)[:, -1]
        batch_kept = run.report.kept_indices
        batch_tokens = _generate(model, batch)[:, batch["input_ids"].shape[1]:]
        for i in range(2):
            alone = _inputs(processor, sizes[i:i + 1], questions[i:i + 1], seed=i)
            alone_logits = _logits(model, alone)[:, -1]
            assert run.report.kept_indices[0] == batch_kept[i]
            assert (alone_logits[0] - batch_logits[i]).abs().max().item() <= _BATCH_ATOL
            assert torch.equal(_generate(model, alone)[0, alone["input_ids"].shape[1]:], batch_tokens[i])


# ------------------------------------------------------ generate()'s layout recovery


def _generate_call(model, inputs):  # type: ignore[no-untyped-def]
    """The multimodal model's keyword arguments at generate()'s prefill (unmodified model)."""
    calls = []
    handle = model.model.register_forward_pre_hook(lambda m, a, k: calls.append(dict(k)), with_kwargs=True)
    try:
        with torch.no_grad():
            model.generate(**inputs, max_new_tokens=1, do_sample=False)
    finally:
        handle.remove()
    return calls[0]


def _assert_same_spans(model, given, recovered) -> None:  # type: ignore[no-untyped-def]
    for option in ("keep", "prune"):
        adapter = REGISTRY.adapter_for(model, {"newline_tokens": option})
        a = adapter.image_spans(given["input_ids"], VisionProbes(), given)
        b = adapter.image_spans(recovered["input_ids"], VisionProbes(), recovered)
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x.positions, y.positions)
            assert torch.equal(x.layout.tile, y.layout.tile) and x.layout.grids == y.layout.grids
            assert torch.equal(x.layout.row, y.layout.row) and torch.equal(x.layout.col, y.layout.col)
            assert (x.probe_rows is None) == (y.probe_rows is None)
            assert x.probe_rows is None or torch.equal(x.probe_rows, y.probe_rows)


#: Prompts of several images: the 1 x 1 image next to its twin, and row-less slivers of 3, 3 and 4
#: encoder rows (their tiles are counted by where their thumbnails sit).
MIXED = [[(1, 1)], [TWIN], [(1, 1), TWIN, (2000, 3), (100, 1), (500, 10)]]


@pytest.mark.parametrize("shapes", [[s] for s in SHAPES] + MIXED, ids=lambda shapes: "+".join(map(_ids, shapes)))
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_recovers_the_layouts_image_sizes_give(family: str, shapes: list[tuple[int, int]]) -> None:
    """What the prefill under generate() receives gives every image the layout (tiles, cells, encoder
    rows) the processor's image_sizes give: on 5.23+ that is the packed features and encoder outputs,
    including a 1 x 1 image and its 2 x 1-tile twin in one prompt, and row-less slivers of different
    tile counts."""
    model, processor = _model(family)
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}] * len(shapes) + [{"type": "text", "text": "What?"}]}],
        add_generation_prompt=True)]
    inputs = dict(processor(images=[make_image(w, h, seed=i) for i, (w, h) in enumerate(shapes)], text=texts,
                            return_tensors="pt"))
    call = _generate_call(model, inputs)
    call["input_ids"] = inputs["input_ids"]
    _assert_same_spans(model, inputs, call)


@pytest.mark.parametrize("family", ["llava_next", "llava_next_video"])
def test_generate_decides_on_the_twin_images_as_forward_does(family: str) -> None:
    """VisionZip reads [CLS] attention, key states and pre-projector features through each token's
    encoder cell: generate()'s prefill keeps the tokens forward keeps, for the 1 x 1 image and its
    twin, which would swap cells if the tile grid were guessed."""
    model, processor = _model(family)
    for shape in [(1, 1), TWIN]:
        inputs = _inputs(processor, [shape])
        with tokred.apply(model, tokred.create("visionzip", keep_ratio=0.25)) as run:
            _logits(model, inputs)
            forward_kept = run.report.kept_indices
            _generate(model, inputs)
            assert run.report.kept_indices == forward_kept


def test_an_ambiguous_tiling_without_the_encoder_cells_is_refused_with_the_cause() -> None:
    """Packed features alone cannot tell a 1 x 1 image's 1 x 2 tiles from 2 x 1: without the feature
    layer's hidden states tokred refuses, naming the ambiguity and what to do, instead of guessing."""
    model, processor = _model("llava_next")
    inputs = _inputs(processor, [(1, 1)])
    with torch.no_grad():
        encoded = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    encoded.hidden_states = None
    recovered = {"input_ids": inputs["input_ids"], "mm_encoder_outputs": {"image": encoded}}
    adapter = REGISTRY.adapter_for(model)
    with pytest.raises(RuntimeStateError, match=r"unpadded grids \[\(12, 12\)\] fit the tile grids .*resize the image"):
        adapter.image_spans(inputs["input_ids"], VisionProbes(), recovered)


@pytest.mark.parametrize("groups", [[[(1, 1), TWIN]], [[(1, 1)], [TWIN]], [[(2000, 3), (500, 10)], [(100, 1)]]],
                         ids=["twins-in-one-prompt", "twins-in-two-prompts", "slivers"])
@pytest.mark.parametrize("family", ["llava_next", "llava_next_video"])
def test_beam_search_on_odd_images_is_cache_consistent(family: str, groups) -> None:  # type: ignore[no-untyped-def]
    """Beams repeat every prompt's packed features after the tower ran once; the layouts are read
    from the images the tower saw, so beams decide as the frozen cache-free recomputation does."""
    model, processor = _model(family)
    texts = [processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}] * len(g) + [{"type": "text", "text": "What?"}]}],
        add_generation_prompt=True) for g in groups]
    images = [make_image(w, h, seed=i) for i, (w, h) in enumerate(size for g in groups for size in g)]
    inputs = dict(processor(images=images, text=texts, return_tensors="pt", padding=True))
    if not torch.equal(_generate(model, inputs, num_beams=2), _generate(model, inputs, num_beams=2, use_cache=False)):
        pytest.skip(f"transformers {compat.transformers_version()}: the unmodified {family} model's beam search "
                    "gives different tokens with and without a cache on these prompts")
    with tokred.apply(model, tokred.create("random", keep_ratio=0.25)) as run:
        cached = _generate(model, inputs, num_beams=2)
        with run.frozen():
            recomputed = _generate(model, inputs, num_beams=2, use_cache=False)
    assert torch.equal(cached, recomputed)
