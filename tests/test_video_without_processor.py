"""Video (and image) inputs assembled without the processor (issue #25 item 4).

A program that decodes frames itself builds ``pixel_values_videos``, ``video_grid_thw`` and the
expanded ``<|video_pad|>`` run by hand and usually leaves out ``mm_token_type_ids``. ``generate``
accepts that on Qwen-VL, but computes no M-RoPE then (every token gets plain text positions), so
the adapter, which read a video's grid back from its M-RoPE positions whenever ``generate`` had
dropped ``video_grid_thw`` (transformers 5.23+), found a ``0x72x72`` grid and refused the call. It
now takes the grid from the vision tower's call. These tests pin the issue's reproducer on the
three Qwen families, the helper that builds such inputs for every video family
(:func:`tokred.testing.processor_free_video_inputs`), and the refusal that remains.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import pytest
import torch

import tokred
from tokred import Budget, OptionsError, RuntimeStateError, Schedule, SelectorStage, TokredError, VisualTokens
from tokred.methods import RandomSelector
from tokred.testing import (
    VIDEO_ADAPTER_OPTIONS, VIDEO_FAMILIES, ProcessorFreeVideoUnsupported, processor_free_video_inputs, tiny_inputs,
    tiny_model, tiny_video_inputs,
)

QWEN = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
PROMPTS = ["Describe the video.", "What moves in this clip, and where does it go?"]
ATOL = 1e-5

_MODELS: dict[str, tuple[Any, Any]] = {}


def model_of(family: str) -> tuple[Any, Any]:
    if family not in _MODELS:
        _MODELS[family] = tiny_model(family)
    return _MODELS[family]


def method() -> tokred.Method:
    return tokred.create("random", keep_ratio=0.25)


def apply(model: Any, family: str, chosen: tokred.Method) -> Any:
    return tokred.apply(model, chosen, adapter_options=VIDEO_ADAPTER_OPTIONS.get(family))


def generate(model: Any, inputs: dict, **kwargs: Any) -> Any:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=6, do_sample=False, **kwargs)


def assert_cached_equals_frozen(model: Any, family: str, inputs: dict) -> Any:
    """Greedy ``generate`` under :func:`method` with the cache equals the recomputation without it
    on the same decisions (``run.frozen()``); returns the run, for its report."""
    with apply(model, family, method()) as run:
        cached = generate(model, inputs)
        with run.frozen():
            recomputed = generate(model, inputs, use_cache=False)
    assert torch.equal(cached, recomputed)
    return run


def step_logits(model: Any, inputs: dict, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated tokens and every step's logits ``[steps, B, V]`` (greedy)."""
    out = generate(model, inputs, output_logits=True, return_dict_in_generate=True, **kwargs)
    return out.sequences, torch.stack(out.logits)


def forward_or_refusal(model: Any, inputs: dict) -> torch.Tensor | None:
    """The plain forward's logits, or ``None`` where transformers refuses video without
    ``mm_token_type_ids`` in a plain forward (Qwen2-VL, Qwen3-VL; ``generate`` takes it)."""
    try:
        with torch.no_grad():
            return model(**inputs).logits
    except ValueError as exc:
        assert "mm_token_type_ids" in str(exc) and "mm_token_type_ids" not in inputs
        return None


def issue_inputs(model: Any, processor: Any, *, mm_token_type_ids: bool = False) -> dict[str, torch.Tensor]:
    """The issue's reproducer, written out: 288 patch rows, ``video_grid_thw=[[2, 12, 12]]``, 72
    ``<|video_pad|>`` between the vision start and end tokens (Qwen3-VL: two runs of 36, one per
    temporal patch, behind their timestamps, as its processor writes them), some text."""
    config = model.config
    vision = config.vision_config
    tokenizer = processor.tokenizer
    text = lambda s: tokenizer(s, add_special_tokens=False).input_ids  # noqa: E731
    vs, vp, ve = config.vision_start_token_id, config.video_token_id, config.vision_end_token_id
    if config.model_type == "qwen3_vl":
        video = text("<0.2 seconds>") + [vs] + [vp] * 36 + [ve] + text("<1.2 seconds>") + [vs] + [vp] * 36 + [ve]
    else:
        video = [vs] + [vp] * 72 + [ve]
    ids = torch.tensor([text("<|im_start|>user\n") + video + text("Describe the video.<|im_end|>\n<|im_start|>assistant\n")])
    rows = 2 * 12 * 12
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
              "pixel_values_videos": torch.randn(rows, 3 * vision.temporal_patch_size * vision.patch_size ** 2,
                                                 generator=torch.Generator().manual_seed(0)),
              "video_grid_thw": torch.tensor([[2, 12, 12]])}
    if mm_token_type_ids:
        inputs["mm_token_type_ids"] = (ids == vp).long() * 2
    return inputs


# ------------------------------------------------------------------------------ the reproducer


@pytest.mark.parametrize("family", QWEN)
def test_the_issue_reproducer_generates_under_a_reduction(family: str) -> None:
    model, processor = model_of(family)
    inputs = issue_inputs(model, processor)
    assert (inputs["input_ids"] == model.config.video_token_id).sum() == 72
    generate(model, inputs)                                                   # the unmodified model takes it
    expected = forward_or_refusal(model, inputs)
    if expected is not None:  # Qwen2.5-VL's forward takes it too (text positions); the others refuse it
        with apply(model, family, method().keep_everything()):
            assert (forward_or_refusal(model, inputs) - expected).abs().max().item() <= ATOL
    with apply(model, family, method()) as run:
        generate(model, inputs)
    assert run.report.visual_tokens_input == [72]
    assert run.report.visual_tokens_per_layer[0] == [18]


@pytest.mark.parametrize("mm_token_type_ids", [False, True], ids=["bare", "with_token_types"])
@pytest.mark.parametrize("family", QWEN)
def test_the_issue_reproducer_keeps_the_properties(family: str, mm_token_type_ids: bool) -> None:
    """Keep-everything gives the unmodified model's logits at every step (the positions stay what
    transformers computed: text positions without ``mm_token_type_ids``, M-RoPE with them), and with
    tokens dropped the cached generation equals the frozen recomputation."""
    model, processor = model_of(family)
    inputs = issue_inputs(model, processor, mm_token_type_ids=mm_token_type_ids)
    expected_tokens, expected = step_logits(model, inputs)
    with apply(model, family, method().keep_everything()):
        tokens, got = step_logits(model, inputs)
    assert torch.equal(tokens, expected_tokens)
    assert (got - expected).abs().max().item() <= ATOL
    assert_cached_equals_frozen(model, family, inputs)


class _Recording(RandomSelector):
    seen: ClassVar[list[VisualTokens]] = []

    def select(self, tokens: VisualTokens, k: int) -> torch.Tensor:
        _Recording.seen.append(tokens)
        return super().select(tokens, k)


@pytest.mark.parametrize("family", QWEN)
def test_the_grid_is_the_video_towers_not_one_read_from_positions(family: str) -> None:
    """The selector sees the 2 x 6 x 6 merged grid the tower was called with."""
    model, processor = model_of(family)
    inputs = issue_inputs(model, processor)
    _Recording.seen.clear()
    with tokred.apply(model, Schedule(selector=SelectorStage(selector=_Recording(), budget=Budget(keep=18)))):
        generate(model, inputs)
    layout = _Recording.seen[0].layout
    assert layout.is_video and layout.num_frames == 2 and layout.grids == ((6, 6), (6, 6))
    assert layout.row.tolist() == [i % 36 // 6 for i in range(72)]


@pytest.mark.parametrize("family", QWEN)
def test_processor_free_images_too(family: str) -> None:
    """The same holds for images: ``image_grid_thw`` is dropped by ``generate`` alike."""
    model, processor = model_of(family)
    inputs = tiny_inputs(processor, ["What is shown in this image?"])
    inputs.pop("mm_token_type_ids")
    expected_tokens, expected = step_logits(model, inputs)
    with tokred.apply(model, method().keep_everything()):
        tokens, got = step_logits(model, inputs)
    assert torch.equal(tokens, expected_tokens) and (got - expected).abs().max().item() <= ATOL
    with tokred.apply(model, method()) as run:
        cached = generate(model, inputs)
        with run.frozen():
            assert torch.equal(cached, generate(model, inputs, use_cache=False))


@pytest.mark.parametrize("family", QWEN)
def test_beams_repeat_the_towers_outputs_and_keep_their_grids(family: str) -> None:
    """``generate(num_beams=2, num_return_sequences=2)`` repeats the tower's per-video outputs in
    place; every repetition still maps to its grid."""
    model, processor = model_of(family)
    inputs = processor_free_video_inputs(model, processor, PROMPTS, frames=[4, 6], mm_token_type_ids=False)
    expected = generate(model, inputs, num_beams=2, num_return_sequences=2)
    with tokred.apply(model, method().keep_everything()):
        assert torch.equal(generate(model, inputs, num_beams=2, num_return_sequences=2), expected)


def _answers(model: Any, generated: torch.Tensor, length: int) -> list[list[int]]:
    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    answers = []
    for row in generated[:, length:].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        answers.append(row[:end])
    return answers


@pytest.mark.parametrize("mm_token_type_ids", [False, True], ids=["bare", "with_token_types"])
@pytest.mark.parametrize("family", QWEN)
def test_a_batch_of_processor_free_videos_equals_each_alone(family: str, mm_token_type_ids: bool) -> None:
    model, processor = model_of(family)
    frames = [4, 6]
    batch = processor_free_video_inputs(model, processor, PROMPTS, frames=frames, mm_token_type_ids=mm_token_type_ids)
    alone = [processor_free_video_inputs(model, processor, [prompt], frames=frames, first_prompt=i,
                                         mm_token_type_ids=mm_token_type_ids) for i, prompt in enumerate(PROMPTS)]
    with tokred.apply(model, method()) as run:
        together = _answers(model, generate(model, batch), batch["input_ids"].shape[1])
        assert run.report.visual_tokens_input == [72, 108]
        each = [_answers(model, generate(model, x), x["input_ids"].shape[1])[0] for x in alone]
    assert together == each


@pytest.mark.skipif("mm_encoder_outputs" not in inspect.signature(tiny_model("qwen2_vl")[0].forward).parameters,
                    reason="this transformers' generate hands the model the pixels and grids, not the tower's outputs")
@pytest.mark.parametrize("family", QWEN)
def test_encoder_outputs_from_outside_the_run_without_token_types_are_refused(family: str) -> None:
    """The one input left that tokred cannot lay out: the tower ran before ``tokred.apply`` (its
    outputs passed as ``mm_encoder_outputs``) and the call has no ``mm_token_type_ids``, so neither
    the grid nor M-RoPE positions reach the run. Refused before any decoder layer, naming both fixes;
    with ``mm_token_type_ids`` the positions describe the grid and it runs."""
    model, processor = model_of(family)
    for with_types in (False, True):
        inputs = issue_inputs(model, processor, mm_token_type_ids=with_types)
        with torch.no_grad():
            encoded = model.model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"],
                                                     return_dict=True)
        call = {k: v for k, v in inputs.items() if k != "pixel_values_videos"}
        layers: list[int] = []
        handle = model.model.language_model.layers[0].register_forward_pre_hook(lambda *a: layers.append(1))
        try:
            with tokred.apply(model, method()):
                if with_types:
                    generate(model, call, mm_encoder_outputs={"video": encoded})
                    continue
                with pytest.raises(RuntimeStateError, match="mm_token_type_ids") as refused:
                    generate(model, call, mm_encoder_outputs={"video": encoded})
        finally:
            handle.remove()
        assert "mm_encoder_outputs" in str(refused.value) and layers == []


# ------------------------------------------------------------------------------------- the helper


def _drop_template_wrapper(ids: list[int], start: int, end: int, video: int) -> list[int]:
    """A Qwen3-VL row as processors that keep the chat template's ``<|vision_start|>`` ...
    ``<|vision_end|>`` around the expanded video (transformers 5.17) write it, without that outer
    pair: in the layout itself every start token is followed by a video token and no end token
    follows another."""
    return [token for i, token in enumerate(ids)
            if not (token == start and ids[i + 1] != video) and not (token == end and ids[i - 1] == end)]


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_the_helper_builds_what_the_processor_builds(family: str) -> None:
    """At a size the tiny processor keeps, and with two videos per prompt, the hand-built inputs
    equal the processor's tensor for tensor (on transformers 5.17 the Qwen3-VL processor also keeps
    the chat template's vision start/end pair around each expanded video; the helper writes the
    layout later releases and the released model use)."""
    model, processor = model_of(family)
    vision = model.config.vision_config
    qwen = family in QWEN
    if qwen:
        size = (6 * vision.patch_size,) * 2
    else:
        side = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
        size = (side, side)
    frames: Any = [4, 3] if qwen else 3
    built = processor_free_video_inputs(model, processor, PROMPTS, frames=frames, videos_per_prompt=2, size=size)
    expected = tiny_video_inputs(processor, PROMPTS, frames=frames, videos_per_prompt=2, size=size)
    assert sorted(built) == sorted(expected)
    for name, value in expected.items():
        if name in ("input_ids", "attention_mask", "mm_token_type_ids") and family == "qwen3_vl" and \
                not torch.equal(built["input_ids"], value if name == "input_ids" else expected["input_ids"]):
            config = model.config
            real = [row[mask.bool()].tolist() for row, mask in zip(expected["input_ids"], expected["attention_mask"])]
            unwrapped = [_drop_template_wrapper(r, config.vision_start_token_id, config.vision_end_token_id,
                                                config.video_token_id) for r in real]
            mine = [row[mask.bool()].tolist() for row, mask in zip(built["input_ids"], built["attention_mask"])]
            assert mine == unwrapped
            continue
        assert built[name].shape == value.shape, name
        assert torch.allclose(built[name].float(), value.float(), atol=1e-6), name


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_the_unmodified_model_takes_the_helpers_inputs(family: str) -> None:
    model, processor = model_of(family)
    inputs = processor_free_video_inputs(model, processor, PROMPTS, frames=[4, 4])
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[:2] == inputs["input_ids"].shape
    generate(model, inputs)
    if family in QWEN:
        bare = processor_free_video_inputs(model, processor, PROMPTS, frames=[4, 4], mm_token_type_ids=False)
        assert "mm_token_type_ids" not in bare and "second_per_grid_ts" not in bare
        generate(model, bare)
        forward_or_refusal(model, bare)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_the_helpers_inputs_keep_the_properties(family: str) -> None:
    """What the conformance suite's ``video_without_processor`` property checks, for ``random``."""
    model, processor = model_of(family)
    inputs = processor_free_video_inputs(model, processor, PROMPTS[:1])
    with torch.no_grad():
        expected = model(**inputs).logits
    with apply(model, family, method().keep_everything()), torch.no_grad():
        got = model(**inputs).logits
    assert (got - expected).abs().max().item() <= ATOL
    run = assert_cached_equals_frozen(model, family, inputs)
    assert run.report.visual_tokens_per_layer[0][0] < run.report.visual_tokens_input[0]


def test_the_helper_refuses_what_it_cannot_build() -> None:
    model, processor = model_of("llava")
    with pytest.raises(ProcessorFreeVideoUnsupported, match="model_type 'llava'") as refused:
        processor_free_video_inputs(model, processor, PROMPTS)
    assert isinstance(refused.value, NotImplementedError) and isinstance(refused.value, TokredError)
    model, processor = model_of("qwen2_vl")
    with pytest.raises(OptionsError, match="multiples of"):
        processor_free_video_inputs(model, processor, PROMPTS, size=(100, 100))
    model, processor = model_of("llava_onevision")
    with pytest.raises(OptionsError, match="same\\s+number of frames"):
        processor_free_video_inputs(model, processor, PROMPTS, frames=[4, 6])
    with pytest.raises(OptionsError, match="size must be None"):
        processor_free_video_inputs(model, processor, PROMPTS, size=(64, 64))
