"""Tiled images: the LLaVA-NeXT and InternVL adapters, per-image budgets, spreading over tiles."""

from __future__ import annotations

import pytest
import torch

import tokred
from tokred import Budget, Gate, GateStage, Schedule, SelectorStage
from tokred.adapters.base import VisionProbes
from tokred.budget import split_proportionally
from tokred.errors import BudgetError, MethodContractError, OptionsError
from tokred.testing import make_image, tiny_model
from tokred.tokens import GateState, VisualTokens

REGISTRY = tokred.default_registry()
TILED = ["llava_next", "internvl"]
#: An image whose tile grid differs from the square default's: LLaVA-NeXT cuts 336x336 into 2x2
#: tiles and 200x600 into 1x3; InternVL cuts 336x336 into 2x2 and 480x640 into 2x3 (+ thumbnails).
OTHER_ASPECT = {"llava_next": (200, 600), "internvl": (480, 640)}


def _prompt(processor, images: int, question: str = "What is shown?") -> str:  # type: ignore[no-untyped-def]
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def _inputs(processor, images, question: str = "What is shown?"):  # type: ignore[no-untyped-def]
    return processor(images=images, text=[_prompt(processor, len(images), question)], return_tensors="pt")


def _spans(model, inputs, **options):  # type: ignore[no-untyped-def]
    return REGISTRY.adapter_for(model, options).image_spans(inputs["input_ids"], VisionProbes(), inputs)


# ------------------------------------------------------------------- layouts


def test_llava_next_layout_matches_the_packed_features() -> None:
    """Every token's (encoder row, cell) is where pack_image_features took its feature from, and
    newline tokens are exactly the model's image_newline rows."""
    model, processor = tiny_model("llava_next")
    inputs = _inputs(processor, [make_image(200, 600), make_image(336, 336, seed=1)])
    mm = model.model
    captured = []
    handle = mm.multi_modal_projector.register_forward_hook(lambda m, a, out: captured.append(out))
    with torch.no_grad():
        packed = mm.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output
    handle.remove()
    per_cell = captured[0].flatten(0, 1)                                   # [encoder rows * cells, D]
    spans = _spans(model, inputs, newline_tokens="prune")
    assert [s.layout.num_tiles for s in spans] == [4, 5]
    for span, features in zip(spans, packed):
        assert span.positions.numel() == features.shape[0]
        newline = span.layout.extra
        assert torch.equal(newline, span.probe_rows < 0)
        assert torch.equal(features[~newline], per_cell[span.probe_rows[~newline]])
        assert torch.equal(features[newline], mm.image_newline.expand(int(newline.sum()), -1))
        assert bool((span.layout.tile[: 12 * 12] == 0).all()) and span.layout.thumbnail_tile == 0


def test_llava_next_layout_without_image_sizes_is_recovered_from_the_features() -> None:
    """generate() drops image_sizes; the layout read from the packed features is the same."""
    model, processor = tiny_model("llava_next")
    inputs = _inputs(processor, [make_image(200, 600), make_image(640, 480, seed=1), make_image(336, 336, seed=2)])
    with torch.no_grad():
        encoded = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"])
    precomputed = {"input_ids": inputs["input_ids"], "mm_encoder_outputs": {"image": encoded}}
    for option in ("keep", "prune"):
        given, recovered = _spans(model, inputs, newline_tokens=option), _spans(model, precomputed, newline_tokens=option)
        for a, b in zip(given, recovered, strict=True):
            assert torch.equal(a.positions, b.positions) and torch.equal(a.probe_rows, b.probe_rows)
            assert torch.equal(a.layout.tile, b.layout.tile) and torch.equal(a.layout.row, b.layout.row)


def test_llava_next_newline_tokens_stay_by_default_and_are_not_counted() -> None:
    model, processor = tiny_model("llava_next")
    inputs = _inputs(processor, [make_image()])
    image_tokens = int((inputs["input_ids"] == model.config.image_token_id).sum())   # 144 + 24 x 25
    newlines = 24
    seen: list[int] = []
    handle = model.model.language_model.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["hidden_states"].shape[1] if "hidden_states" in kwargs else args[0].shape[1]),
        with_kwargs=True)
    text = inputs["input_ids"].shape[1] - image_tokens
    try:
        with tokred.apply(model, tokred.create("random", keep=10)) as run, torch.no_grad():
            model(**inputs)
        assert run.report.visual_tokens_input == [image_tokens - newlines]
        assert seen[-1] == text + newlines + 10
        with tokred.apply(model, tokred.create("random", keep_ratio=0.5), adapter_options={"newline_tokens": "prune"}) as run, torch.no_grad():
            model(**inputs)
        assert run.report.visual_tokens_input == [image_tokens]
        assert seen[-1] == text + round(image_tokens / 2)
    finally:
        handle.remove()


def test_adapter_options_are_checked() -> None:
    model, _ = tiny_model("llava_next")
    with pytest.raises(OptionsError, match="newline_tokens"):
        tokred.apply(model, tokred.create("random"), adapter_options={"newlines": "keep"})
    with pytest.raises(OptionsError, match="'keep' or 'prune'"):
        tokred.apply(model, tokred.create("random"), adapter_options={"newline_tokens": "drop"})
    llava, _ = tiny_model("llava")
    with pytest.raises(OptionsError, match="valid: none"):
        tokred.apply(llava, tokred.create("random"), adapter_options={"newline_tokens": "keep"})


def test_pre_projector_is_not_offered_for_newline_candidates() -> None:
    model, _ = tiny_model("llava_next")
    assert "pre_projector" in REGISTRY.adapter_for(model).available_inputs()
    assert "pre_projector" not in REGISTRY.adapter_for(model, {"newline_tokens": "prune"}).available_inputs()


def test_internvl_layout_puts_the_thumbnail_last() -> None:
    model, processor = tiny_model("internvl")
    inputs = _inputs(processor, [make_image(480, 640), make_image(100, 100, seed=1)])
    big, small = _spans(model, inputs)
    assert big.layout.num_tiles == 7 and big.layout.thumbnail_tile == 6
    assert int(big.layout.thumbnail_mask().sum()) == 64 and bool(big.layout.thumbnail_mask()[-64:].all())
    assert small.layout.num_tiles == 1 and small.layout.thumbnail_tile == 0   # one tile is the whole image
    assert torch.equal(small.probe_rows, torch.arange(64) + 7 * 64)         # encoder rows follow on
    no_thumbnail, _ = _spans(model, inputs, use_thumbnail=False)
    assert no_thumbnail.layout.thumbnail_tile is None and bool(no_thumbnail.layout.thumbnail_mask().all())


def test_internvl_cls_attention_is_pooled_over_the_merged_patches() -> None:
    """Independent reference: which four patches a merged token holds is read off the features
    themselves (its channels are the patches' features), and eager attention gives the [CLS] row."""
    model, processor = tiny_model("internvl", attn_implementation="eager")
    inputs = _inputs(processor, [make_image(336, 336)])
    # Noise, so that no two patches share a feature row (flat regions of a drawn image do).
    inputs["pixel_values"] = torch.randn(inputs["pixel_values"].shape, generator=torch.Generator().manual_seed(0))
    adapter = REGISTRY.adapter_for(model)
    probes = VisionProbes()
    removers = adapter.install_vision_probes(probes, frozenset({"cls_attention", "pre_projector"}))
    try:
        with torch.no_grad():
            model(**inputs)
            vision = model.model.vision_tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    finally:
        for remove in removers:
            remove()
    cls_row = vision.attentions[-1].mean(dim=1)[:, 0, 1:]                 # [tiles, 256 patches]
    patches = vision.last_hidden_state[:, 1:]                            # [tiles, 256, D_v]
    width = patches.shape[-1]
    for tile, (pooled, merged) in enumerate(zip(probes.cls_attention, probes.pre_projector)):
        assert pooled.shape == (64,) and merged.shape == (64, 4 * width)
        for token in range(64):
            parts = merged[token].view(4, width)
            owners = [int(torch.nonzero((patches[tile] == part).all(dim=-1)).flatten()[0]) for part in parts]
            assert len(set(owners)) == 4
            assert torch.allclose(pooled[token], cls_row[tile, owners].sum(), atol=1e-6)


# --------------------------------------------------------------- ToDRE pivot


@pytest.mark.parametrize("family", TILED)
def test_todre_pivot_comes_from_the_thumbnail(family: str) -> None:
    """A crafted [CLS] attention whose global maximum lies in a tile: the pivot (ToDRE's first
    choice, k=1) is the thumbnail's maximum instead."""
    model, processor = tiny_model(family)
    (span,) = _spans(model, _inputs(processor, [make_image(480, 640)]))
    n = span.positions.numel()
    # Where the models put the thumbnail: LLaVA-NeXT first (12 x 12 tokens), InternVL last (8 x 8).
    thumbnail = torch.arange(144) if family == "llava_next" else torch.arange(n - 64, n)
    assert torch.equal(torch.nonzero(span.layout.thumbnail_mask()).flatten(), thumbnail)
    tile_token = 200 if family == "llava_next" else 5
    attention = torch.full((n,), 0.1)
    attention[tile_token] = 0.9
    attention[thumbnail[7]] = 0.5
    tokens = VisualTokens(features=torch.randn(n, 16), layout=span.layout, cls_attention=attention)
    selector = REGISTRY.selector("todre.diversity")
    assert selector.select(tokens, 1).tolist() == [int(thumbnail[7])]


def test_todre_pivot_end_to_end_is_the_thumbnail_cls_maximum() -> None:
    """With keep=1 ToDRE keeps only its pivot: the thumbnail token its [CLS] attends to most, from
    an eager reference of the vision tower."""
    model, processor = tiny_model("llava_next", attn_implementation="eager")
    inputs = _inputs(processor, [make_image(200, 600)])
    with torch.no_grad():
        thumbnail_pixels = inputs["pixel_values"][0, :1]
        attentions = model.model.vision_tower(thumbnail_pixels, output_attentions=True).attentions
    layer = model.config.vision_feature_layer % (len(attentions) + 1) - 1
    expected = int(attentions[layer].mean(dim=1)[0, 0, 1:].argmax())
    with tokred.apply(model, tokred.create("todre", keep=1, stage2=False)) as run, torch.no_grad():
        model(**inputs)
    assert run.report.images[0].kept_final == [expected]


# ------------------------------------------------- budgets, images, generation


@pytest.mark.parametrize("method", ["random", "fastv", "todre", "star"])
@pytest.mark.parametrize("family", TILED)
def test_two_images_of_different_tilings_keep_their_own_budgets(family: str, method: str) -> None:
    model, processor = tiny_model(family)
    images = [make_image(336, 336), make_image(*OTHER_ASPECT[family], seed=1)]
    inputs = _inputs(processor, images)
    spans = _spans(model, inputs)
    assert spans[0].layout.num_tiles != spans[1].layout.num_tiles
    sizes = [s.positions.numel() for s in spans]
    with tokred.apply(model, tokred.create(method, keep=20)) as run:
        cached = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        assert [len(image.kept_final) for image in run.report.images] == [20, 20]
        assert [image.num_tokens for image in run.report.images] == sizes
        with run.frozen():
            recomputed = model.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=False)
    assert torch.equal(cached, recomputed)
    with tokred.apply(model, tokred.create(method, keep_ratio=0.1)) as run, torch.no_grad():
        model(**inputs)
    assert [len(image.kept_final) for image in run.report.images] == [max(1, int(0.1 * n + 0.5)) for n in sizes]


@pytest.mark.parametrize("family", TILED)
def test_other_aspect_ratio_single_image_generation_is_cache_consistent(family: str) -> None:
    model, processor = tiny_model(family)
    inputs = _inputs(processor, [make_image(*OTHER_ASPECT[family])])
    (span,) = _spans(model, inputs)
    with tokred.apply(model, tokred.create("todre", keep_ratio=0.2)) as run:
        cached = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        with run.frozen():
            recomputed = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert run.report.visual_tokens_input == [span.positions.numel()]
    assert torch.equal(cached, recomputed)


def test_keep_larger_than_an_image_is_an_error_at_the_image() -> None:
    model, processor = tiny_model("internvl")
    inputs = _inputs(processor, [make_image(100, 100)])                     # one tile: 64 tokens
    with tokred.apply(model, tokred.create("random", keep=65)), pytest.raises(BudgetError, match="64 visual tokens"):
        model(**inputs)


# ------------------------------------------------------------ spread over tiles


def test_split_proportionally() -> None:
    assert split_proportionally(10, [64] * 5) == [2] * 5
    assert split_proportionally(7, [144, 144, 144, 144, 150]) == [2, 1, 1, 1, 2]
    assert split_proportionally(5, [10, 0, 3]) == [4, 0, 1]
    assert split_proportionally(0, [3, 4]) == [0, 0]
    assert split_proportionally(7, [3, 4]) == [3, 4]
    for k in range(0, 30):
        parts = split_proportionally(k, [13, 2, 9, 5])
        assert sum(parts) == k and all(p <= s for p, s in zip(parts, [13, 2, 9, 5]))
    with pytest.raises(BudgetError):
        split_proportionally(30, [13, 2, 9, 5])


@pytest.mark.parametrize("family", TILED)
def test_spread_over_tiles_keeps_each_tiles_share(family: str) -> None:
    model, processor = tiny_model(family)
    inputs = _inputs(processor, [make_image(480, 640)])
    (span,) = _spans(model, inputs)
    tile_sizes = torch.bincount(span.layout.tile).tolist()
    shares = split_proportionally(30, tile_sizes)
    with tokred.apply(model, tokred.create("random", keep=30, spread="tiles")) as run, torch.no_grad():
        model(**inputs)
    kept_tiles = torch.bincount(span.layout.tile[run.report.images[0].kept_final], minlength=len(tile_sizes)).tolist()
    assert kept_tiles == shares
    with tokred.apply(model, tokred.create("fastv", keep=30, spread="tiles")) as run, torch.no_grad():
        model(**inputs)
    kept_tiles = torch.bincount(span.layout.tile[run.report.images[0].kept_final], minlength=len(tile_sizes)).tolist()
    assert kept_tiles == shares


def test_spread_over_tiles_runs_the_selector_on_each_tile_alone() -> None:
    model, processor = tiny_model("internvl")
    inputs = _inputs(processor, [make_image(336, 336)])
    calls: list[tuple[int, int, int | None]] = []
    selector = REGISTRY.selector("random")

    class Spy(type(selector)):  # type: ignore[misc]
        def select(self, tokens: VisualTokens, k: int):  # type: ignore[no-untyped-def]
            calls.append((tokens.num_tokens, k, tokens.layout.thumbnail_tile))
            return super().select(tokens, k)

    schedule = Schedule(selector=SelectorStage(selector=Spy(), budget=Budget(keep=12, spread="tiles")))
    with tokred.apply(model, schedule), torch.no_grad():
        model(**inputs)
    assert calls == [(64, 3, 0), (64, 3, 0), (64, 2, 0), (64, 2, 0), (64, 2, 0)]


def test_a_gate_that_ignores_the_tile_shares_is_caught() -> None:
    model, processor = tiny_model("internvl")
    inputs = _inputs(processor, [make_image(336, 336)])

    class FirstK(Gate):
        def select(self, state: GateState) -> torch.Tensor:
            return torch.arange(sum(state.keep_per_image or []))

    schedule = Schedule(gates=(GateStage(layer=2, gate=FirstK(), budget=Budget(keep=10, spread="tiles")),))
    with tokred.apply(model, schedule), torch.no_grad(), pytest.raises(MethodContractError, match="keep_per_tile"):
        model(**inputs)


def test_count_visual_tokens_counts_the_adapters_candidates() -> None:
    model, processor = tiny_model("llava_next")
    inputs = _inputs(processor, [make_image(), make_image(200, 600, seed=1)])
    assert REGISTRY.adapter_for(model).count_visual_tokens(inputs) == 720 + 576
    assert REGISTRY.adapter_for(model, {"newline_tokens": "prune"}).count_visual_tokens(inputs) == 744 + 612
    text_only = processor(text=["USER: hello ASSISTANT:"], return_tensors="pt")
    assert REGISTRY.adapter_for(model).count_visual_tokens(text_only) == 0
