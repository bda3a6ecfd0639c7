"""Videos on every family that takes them: token counts per frame, layouts checked against what the
model computes, mixed image + video prompts, the acceptance run on Qwen2.5-VL, what is refused.

The properties every method must keep on videos are the video conformance matrix
(tests/test_conformance_video.py); the torch-only video processors are checked against the models'
own image processors here."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import tokred
from tokred import ImageLayout, OptionsError, RuntimeStateError, VisualTokens
from tokred.adapters.base import VisionProbes
from tokred.adapters.llava_next_video import pool_cls_attention
from tokred.testing import (
    VIDEO_ADAPTER_OPTIONS, VIDEO_FAMILIES, make_image, make_video, tiny_model, tiny_video_inputs,
)

PROMPT = "What happens in this video?"


def spans(model: Any, inputs: dict, family: str) -> list:
    adapter = tokred.default_registry().adapter_for(model, VIDEO_ADAPTER_OPTIONS.get(family))
    return adapter.image_spans(inputs["input_ids"], VisionProbes(), inputs)


def logits(model: Any, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


# ------------------------------------------------------------------------ token counts per frame

#: family -> (frames in tokred's layout, tokens per frame) of an 8-frame clip at the tiny models'
#: default sizes, and at the released checkpoints' vision geometry (widths stay tiny).
TINY_COUNTS = {
    "qwen2_vl": (4, (4, 4)), "qwen2_5_vl": (4, (4, 4)), "qwen3_vl": (4, (3, 3)),
    "llava_onevision": (8, (4, 4)), "llava_next_video": (8, (6, 6)), "internvl": (8, (8, 8)),
}
RELEASED_GEOMETRY = {
    "qwen2_vl": ({"max_video_pixels": 448 * 448}, (4, (16, 16))),
    "qwen2_5_vl": ({"max_video_pixels": 448 * 448}, (4, (16, 16))),
    "qwen3_vl": ({"max_video_pixels": 448 * 448}, (4, (14, 14))),
    "llava_onevision": ({"image_size": 384}, (8, (14, 14))),
    "llava_next_video": ({"image_size": 336}, (8, (12, 12))),
    "internvl": ({"image_size": 448}, (8, (16, 16))),
}


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_token_counts_per_frame(family: str) -> None:
    for overrides, (frames, grid) in [({}, TINY_COUNTS[family]), RELEASED_GEOMETRY[family]]:
        model, processor = tiny_model(family, **overrides)
        size = (448, 448) if overrides else (112, 112)
        inputs = tiny_video_inputs(processor, [PROMPT], frames=8, size=size)
        (span,) = spans(model, inputs, family)
        layout = span.layout
        assert layout.is_video and layout.num_frames == frames and set(layout.grids) == {grid}
        assert span.positions.numel() == frames * grid[0] * grid[1]
        assert layout.frame is not None and torch.equal(layout.frame, layout.tile)
        assert torch.bincount(layout.frame).tolist() == [grid[0] * grid[1]] * frames


def test_qwen_temporal_patches_follow_video_grid_thw_and_positions() -> None:
    for family in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        model, processor = tiny_model(family)
        inputs = tiny_video_inputs(processor, [PROMPT], frames=6)
        (span,) = spans(model, inputs, family)
        t, h, w = inputs["video_grid_thw"][0].tolist()
        assert (span.layout.num_frames, span.layout.grids[0]) == (t, (h // 2, w // 2)) and t == 3
        video = torch.nonzero(inputs["input_ids"][0] == model.config.video_token_id).flatten()
        assert torch.equal(span.positions, video)
        # The grid read back from M-RoPE positions (what generate leaves) is the same.
        positions = model.model.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                               video_grid_thw=inputs["video_grid_thw"],
                                               **({"second_per_grid_ts": inputs["second_per_grid_ts"]}
                                                  if "second_per_grid_ts" in inputs else {}))[0]
        without_grids = {k: v for k, v in inputs.items() if k not in ("video_grid_thw",)}
        without_grids["position_ids"] = positions
        without_grids["mm_encoder_outputs"] = {"video": type("Encoded", (), {"pooler_output": [torch.zeros(span.positions.numel(), 1)]})()}
        (from_positions,) = spans(model, without_grids, family)
        assert (from_positions.layout.num_frames, from_positions.layout.grids) == (span.layout.num_frames, span.layout.grids)
        if family == "qwen3_vl":  # one run per temporal patch, timestamps between them
            runs = torch.nonzero(video[1:] - video[:-1] != 1).numel() + 1
            assert runs == 3


def test_tiny_qwen_video_processor_matches_the_image_processor_on_a_still_clip() -> None:
    """A clip of one image repeated is what the image processor makes of the image (it repeats a
    still image to fill the temporal patch): the same patches, in the same order."""
    _, processor = tiny_model("qwen2_5_vl")
    frame = make_image(112, 112, seed=3)
    video = processor.video_processor([[frame, frame]])
    image = processor.image_processor([frame], return_tensors="pt")
    assert video["video_grid_thw"].tolist() == image["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert torch.allclose(video["pixel_values_videos"], image["pixel_values"], atol=2e-2)


@pytest.mark.parametrize("family", ["llava_onevision", "llava_next_video"])
def test_frame_features_land_where_the_layout_says(family: str) -> None:
    """The features the model scatters for a video equal, frame by frame, its own encoding of each
    frame alone: the layout's frames are the model's frames."""
    model, processor = tiny_model(family)
    inputs = tiny_video_inputs(processor, [PROMPT], frames=3)
    (span,) = spans(model, inputs, family)
    per_frame = span.positions.numel() // 3
    with torch.no_grad():  # (5.23+ append LLaVA-OneVision's newline to these features, 5.17 in the forward)
        def encoded(pixels: torch.Tensor) -> torch.Tensor:  # [tokens, D], however the release nests them
            features = model.model.get_video_features(pixels).pooler_output[0]
            return features.reshape(-1, features.shape[-1])

        whole = encoded(inputs["pixel_values_videos"])
        for frame in range(3):
            alone = encoded(inputs["pixel_values_videos"][:, frame:frame + 1])
            mine = (span.layout.frame == frame).nonzero().flatten()
            assert mine.numel() == per_frame and alone.shape[0] in (per_frame, per_frame + 1)
            assert torch.allclose(whole[mine], alone[:per_frame], atol=1e-5)


def test_onevision_layouts_follow_the_models_packing_downsampling_included() -> None:
    """Image layouts come from the model's own pack_image_features: checked against the real packed
    features' newline rows, with and without the downsampling of large tile grids."""
    for aspect_ratio, (rows, cols) in (("anyres_max_9", (16, 16)), ("anyres_max_1", (8, 8))):
        model, processor = tiny_model("llava_onevision", vision_aspect_ratio=aspect_ratio)
        inputs = tiny_video_inputs(processor, [PROMPT], images_per_prompt=1, videos_per_prompt=0)
        adapter = tokred.default_registry().adapter_for(model, {"newline_tokens": "prune"})
        (span,) = adapter.image_spans(inputs["input_ids"], VisionProbes(), inputs)
        assert span.layout.grids == ((8, 8), (rows, cols))
        with torch.no_grad():
            packed = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"],
                                                    batch_num_images=inputs["batch_num_images"]).pooler_output[0]
        newline = (packed == model.model.image_newline).all(dim=-1)
        assert torch.equal(newline, span.layout.extra)


def test_onevision_several_images_take_the_base_view_and_a_newline_each() -> None:
    model, processor = tiny_model("llava_onevision")
    inputs = tiny_video_inputs(processor, [PROMPT], images_per_prompt=2, videos_per_prompt=1)
    found = spans(model, inputs, "llava_onevision")
    assert [(s.image, s.layout.is_video, s.positions.numel()) for s in found] == [(0, False, 64), (1, False, 64), (2, True, 64)]
    # The newline after each image and after the video are image/video tokens that stay.
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 2 * 65
    assert int((inputs["input_ids"] == model.config.video_token_id).sum()) == 65


def test_next_video_cls_attention_is_pooled_like_the_patches() -> None:
    """A video frame's [CLS] attention is its CLIP [CLS] row at the feature layer (layer 0 of 2 for
    vision_feature_layer=-2), summed over each 2 x 2 block the resampler pools."""
    model, processor = tiny_model("llava_next_video", attn_implementation="eager")
    inputs = tiny_video_inputs(processor, [PROMPT], images_per_prompt=1, frames=2)
    captured: list[torch.Tensor] = []

    class Probe(tokred.Selector):
        inputs = frozenset({"cls_attention"})

        def select(self, tokens: VisualTokens, k: int) -> torch.Tensor:
            captured.append(tokens.cls_attention)
            return torch.arange(k)

    schedule = tokred.Schedule(selector=tokred.SelectorStage(selector=Probe(), budget=tokred.Budget(keep_ratio=1.0)))
    with tokred.apply(model, schedule):
        logits(model, inputs)
    image_cls, video_cls = captured
    assert image_cls.shape == (720,) and video_cls.shape == (2 * 36,)
    with torch.no_grad():
        attentions = model.model.vision_tower(inputs["pixel_values_videos"][0], output_attentions=True).attentions
    rows = attentions[0].mean(dim=1)[:, 0, 1:]                                      # [frames, 12 * 12]
    assert torch.allclose(video_cls, pool_cls_attention(rows, 12, 2).flatten(), atol=1e-5)
    assert torch.allclose(pool_cls_attention(torch.ones(1, 16), 4, 2), torch.full((1, 4), 4.0))


def test_internvl_frames_are_one_video_only_when_asked() -> None:
    model, processor = tiny_model("internvl")
    inputs = tiny_video_inputs(processor, [PROMPT], images_per_prompt=1, frames=3)
    registry = tokred.default_registry()
    separate = registry.adapter_for(model).image_spans(inputs["input_ids"], VisionProbes(), inputs)
    grouped = registry.adapter_for(model, {"frames_as_video": True}).image_spans(inputs["input_ids"], VisionProbes(), inputs)
    assert [s.positions.numel() for s in separate] == [320, 64, 64, 64]
    assert [(s.positions.numel(), s.layout.is_video, s.layout.num_frames) for s in grouped] == [(320, False, 1), (192, True, 3)]
    assert grouped[1].probe_rows is not None and grouped[1].probe_rows[0] == 320  # the frames' rows follow the image's
    with pytest.raises(OptionsError, match="frames_as_video"):
        registry.adapter_for(model, {"frames_as_video": "yes"})


# --------------------------------------------------------------------------------- mixed prompts


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_mixed_image_and_video_prompts(family: str) -> None:
    """An image then a video in each of two prompts: both reduced with their own budgets, numbered in
    sequence order, a batch equal to each prompt alone, cached generation equal to recomputation."""
    model, processor = tiny_model(family)
    prompts = [PROMPT, "Describe the picture and then the video in detail please."]
    frames = (4, 4) if getattr(processor.video_processor, "stacks_frames", False) else (4, 6)
    batch = tiny_video_inputs(processor, prompts, images_per_prompt=1, frames=frames)
    method = tokred.create("random", keep_ratio=0.2)
    options = VIDEO_ADAPTER_OPTIONS.get(family)
    with tokred.apply(model, method, adapter_options=options) as run, torch.no_grad():
        batched = model.generate(**batch, max_new_tokens=4, do_sample=False)
        records = run.report.images
        assert [(r.sample, r.image, r.kind) for r in records] == [(0, 0, "image"), (0, 1, "video"), (1, 0, "image"), (1, 1, "video")]
        for r in records:
            assert len(r.kept_final) == max(1, int(0.2 * r.num_tokens + 0.5))
        for i, prompt in enumerate(prompts):
            alone = tiny_video_inputs(processor, [prompt], images_per_prompt=1, frames=frames, first_prompt=i)
            alone_tokens = model.generate(**alone, max_new_tokens=4, do_sample=False)
            assert run.report.kept_indices == [records[2 * i].kept_final, records[2 * i + 1].kept_final]
            assert alone_tokens[0, -4:].tolist() == batched[i, -4:].tolist()
        with run.frozen():  # the latest prefill is the second prompt alone
            recomputed = model.generate(**alone, max_new_tokens=4, do_sample=False, use_cache=False)
        assert recomputed[0, -4:].tolist() == batched[1, -4:].tolist()


# ------------------------------------------------------------------------- acceptance: Qwen2.5-VL


def test_qwen2_5_vl_video_keep_ratio_0_1_acceptance() -> None:
    """tokred.apply on a Qwen2.5-VL video prompt with keep_ratio=0.1 keeps 10% of the clip's tokens
    (checked per layer with hooks of our own), generates with the cache as it recomputes without,
    and a batch of two clips of different lengths equals each clip alone."""
    model, processor = tiny_model("qwen2_5_vl")
    prompts = [PROMPT, "Describe the clip, frame by frame, with every colour."]
    clips = (16, 10)                                   # 8 and 5 temporal patches of 16 tokens: 128 and 80
    method = tokred.create("todre", keep_ratio=0.1, stage2=False)
    seen: list[int] = []
    layers = model.model.language_model.layers
    handles = [layer.register_forward_pre_hook(lambda m, a, k: seen.append(int((k.get("hidden_states", a[0] if a else None)).shape[1])),
                                               with_kwargs=True) for layer in layers]
    try:
        alone = [tiny_video_inputs(processor, [p], frames=clips, first_prompt=i) for i, p in enumerate(prompts)]
        with tokred.apply(model, method) as run, torch.no_grad():
            model(**alone[0])
            tokens = int((alone[0]["input_ids"] == model.config.video_token_id).sum())
            assert tokens == 128 and run.report.visual_tokens_input == [128]
            assert run.report.visual_tokens_per_layer == [[13]] * len(layers)  # round(0.1 * 128)
            text = alone[0]["input_ids"].shape[1] - tokens
            assert seen == [text + 13] * len(layers)
            assert run.report.images[0].kept_per_tile and sum(run.report.images[0].kept_per_tile) == 13

            cached = model.generate(**alone[0], max_new_tokens=6, do_sample=False)
            with run.frozen():
                recomputed = model.generate(**alone[0], max_new_tokens=6, do_sample=False, use_cache=False)
            assert torch.equal(cached, recomputed)

            batch = tiny_video_inputs(processor, prompts, frames=clips)
            assert batch["video_grid_thw"][:, 0].tolist() == [8, 5]
            batched = model.generate(**batch, max_new_tokens=6, do_sample=False)
            batch_kept = run.report.kept_indices
            assert [len(k) for k in batch_kept] == [13, 8]
            for i in range(2):
                single = model.generate(**alone[i], max_new_tokens=6, do_sample=False)
                assert run.report.kept_indices == [batch_kept[i]]
                assert single[0, -6:].tolist() == batched[i, -6:].tolist()
    finally:
        for handle in handles:
            handle.remove()


# ------------------------------------------------------------------------------- ToDRE on videos


def test_todre_pivot_is_taken_over_all_frames() -> None:
    pytest.importorskip("tokred_todre")
    from tokred_todre import pivot_index

    layout = ImageLayout.video(4, 3, 3)
    attention = torch.zeros(36)
    attention[31] = 1.0                                 # the [CLS]-attention maximum is in the last frame
    tokens = VisualTokens(torch.randn(36, 8), layout, cls_attention=attention)
    assert layout.thumbnail_mask().all()
    assert pivot_index(tokens, "cls_attention") == 31


# ---------------------------------------------------------------------------------------- refused


def test_onevision_without_full_feature_strategy_is_refused() -> None:
    model, _ = tiny_model("llava_onevision")
    model.config.vision_feature_select_strategy = "default"
    with pytest.raises(RuntimeStateError, match="'full'"):
        tokred.apply(model, tokred.create("random"))


def test_a_video_budget_larger_than_the_clip_is_refused_before_the_language_model() -> None:
    model, processor = tiny_model("qwen2_vl")
    inputs = tiny_video_inputs(processor, [PROMPT], frames=4)
    calls: list[int] = []
    handle = model.model.language_model.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with tokred.apply(model, tokred.create("random", keep=33)), \
                pytest.raises(tokred.BudgetError, match="video 0 of sample 0 has 32 visual tokens"):
            logits(model, inputs)
    finally:
        handle.remove()
    assert not calls


def test_frames_of_different_lengths_in_one_stacked_call_are_refused_by_the_processor() -> None:
    _, processor = tiny_model("llava_onevision")
    with pytest.raises(ValueError, match="same number of frames"):
        processor.video_processor([make_video(2), make_video(3)])


# ------------------------------------------------------------------------------------ pictures


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava_onevision", "internvl"])
def test_show_draws_a_video_as_a_strip_of_frames(family: str) -> None:
    from tokred.show import show

    model, processor = tiny_model(family)
    clip = make_video(8, 224, 224, seed=1)
    image = make_image()
    content = [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "What moves?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = {k: v for k, v in processor(text=[text], images=[[image]], videos=[clip], return_tensors="pt").items()
              if k != "video_metadata"}
    figure = show(model, processor, inputs, tokred.create("random", keep_ratio=0.25), [image, clip], title="x",
                  adapter_options=VIDEO_ADAPTER_OPTIONS.get(family))
    frames = [p for p in figure.panels if p.image == 1 and p.stage == "entering"]
    expected = 4 if family.startswith("qwen") else 8          # Qwen-VL merges two sampled frames into one
    assert [p.tile for p in frames] == list(range(expected))
    assert sum(p.kept for p in frames) == round(0.25 * sum(p.grid[0] * p.grid[1] for p in frames))
    tops = {p.box[1] for p in frames}
    assert len(tops) == 1                                      # one row: a strip
