"""The Qwen2-VL, Qwen2.5-VL and Qwen3-VL adapters on their tiny models (issue #5).

The conformance matrix (tests/test_conformance.py) already runs every method on the three families;
these tests pin what is specific to Qwen: merged 2x2 grids, M-RoPE positions at prefill and decode,
Qwen3-VL's deepstack features under stage I and under gates inside the deepstack layers, several
images per prompt, and what is refused (renumbered positions, continuing a pruned cache). Videos:
tests/test_video.py and tests/test_conformance_video.py.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Any, Callable, ClassVar

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

import tokred
from tokred import compat
from tokred import Budget, GateStage, RuntimeStateError, Schedule, ScheduleError, SelectorStage, VisualTokens
from tokred.methods import LastTokenAttentionGate, RandomSelector
from tokred.testing import make_image, tiny_inputs, tiny_model

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"]
#: Visual tokens of one 336 px test image: 24x24 patches of 14 px merged 2x2 (Qwen3-VL: 16 px
#: patches on a 320 px image, 20x20 merged 2x2).
TOKENS = {"qwen2_vl": 144, "qwen2_5_vl": 144, "qwen3_vl": 100}
GRID = {"qwen2_vl": (12, 12), "qwen2_5_vl": (12, 12), "qwen3_vl": (10, 10)}
PROMPT = "What is shown in this image?"
LONG_PROMPT = "Describe the picture in detail please, with the colours of every shape."


@pytest.fixture(scope="module", params=FAMILIES)
def qwen(request: pytest.FixtureRequest) -> tuple[str, Any, Any]:
    model, processor = tiny_model(request.param)
    return request.param, model, processor


def logits(model: Any, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def generate(model: Any, inputs: dict, **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=6, do_sample=False, **kwargs)


def schedule(keep: int = 40, gate_layer: int = 2, gate_keep: int = 12) -> Schedule:
    return Schedule(
        selector=SelectorStage(selector=RandomSelector(), budget=Budget(keep=keep)),
        gates=(GateStage(layer=gate_layer, gate=LastTokenAttentionGate(), budget=Budget(keep=gate_keep)),),
    )


class _Capture:
    """Records the keyword arguments the language model receives, after tokred's own pre-hook."""

    def __init__(self, model: Any) -> None:
        self.calls: list[dict[str, Any]] = []
        self.handle = model.model.language_model.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module: Any, args: tuple, kwargs: dict) -> None:
        self.calls.append({k: kwargs.get(k) for k in ("position_ids", "attention_mask", "visual_pos_masks",
                                                         "deepstack_visual_embeds", "inputs_embeds")})

    def __enter__(self) -> _Capture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


class _Force(LogitsProcessor):
    """Makes greedy decoding emit ``tokens`` ``[B, n]``, one column per step."""

    def __init__(self, tokens: torch.Tensor, prompt_length: int) -> None:
        self.tokens, self.prompt_length = tokens, prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_length
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter(1, self.tokens[:, step:step + 1], 0.0)


def masked_reference(model: Any, inputs: dict, absent_from: dict[int, torch.Tensor]) -> torch.Tensor:
    """Logits of the *unmodified* model in which the positions ``absent_from[l]`` (bool ``[B, L]``)
    are hidden as attention keys from decoder layer ``l`` on. For the tokens that stay, this is what
    removing those positions from layer ``l`` on must give: same positions, same deepstack features,
    nothing computed through tokred's packing. Masks are additive float, which sdpa and eager take."""
    layers = model.model.language_model.layers
    real = inputs["attention_mask"].bool()
    length = real.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    absent = torch.zeros_like(real)
    masks = []
    for index in range(len(layers)):
        absent = absent | absent_from.get(index, torch.zeros_like(real))
        allowed = (causal[None] & (real & ~absent)[:, None, :]) | torch.eye(length, dtype=torch.bool)[None]
        masks.append(torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)[:, None])

    def hook(index: int) -> Callable[[Any, tuple, dict], tuple[tuple, dict]]:
        def replace(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            return args, {**kwargs, "attention_mask": masks[index]}
        return replace

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        return logits(model, inputs)
    finally:
        for handle in handles:
            handle.remove()


# ----------------------------------------------------------------------------- tiny models


def test_adapters_are_registered_under_their_family_names() -> None:
    assert set(FAMILIES) <= set(tokred.list_adapters())


def test_tiny_models_build_offline_without_torchvision(qwen: tuple[str, Any, Any]) -> None:
    family, model, processor = qwen
    inputs = tiny_inputs(processor, [PROMPT])
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == TOKENS[family]
    assert inputs["image_grid_thw"].tolist() == [[1, 2 * GRID[family][0], 2 * GRID[family][1]]]
    assert type(processor).__name__ == type(model).__name__.replace("ForConditionalGeneration", "Processor")
    assert "torchvision" not in sys.modules  # the tiny video processor computes its tensors with torch


# ------------------------------------------------------------------------------- layouts


class _Probe(RandomSelector):
    """Records what the selector receives; asks for every optional input."""

    inputs: ClassVar[frozenset[str]] = frozenset({"cls_attention", "pre_projector"})
    seen: ClassVar[list[VisualTokens]] = []

    def select(self, tokens: VisualTokens, k: int) -> torch.Tensor:
        _Probe.seen.append(tokens)
        return super().select(tokens, k)


@pytest.mark.parametrize("through", ["forward", "generate"])
def test_selectors_get_the_merged_grid_and_no_cls_attention(qwen: tuple[str, Any, Any], through: str) -> None:
    """Grids of a square and a portrait image, from image_grid_thw (forward) or, since generate drops
    it after running the vision tower itself, from the grids the tower was called with (never from
    the M-RoPE positions, which describe no grid without mm_token_type_ids:
    tests/test_video_without_processor.py)."""
    family, model, processor = qwen
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                                         {"type": "text", "text": PROMPT}]}],
                                         add_generation_prompt=True)
    inputs = dict(processor(text=[text], images=[make_image(), make_image(224, 336, seed=1)], return_tensors="pt"))
    rows, cols = GRID[family]
    portrait = (rows, 7) if family == "qwen3_vl" else (12, 8)    # 224 px wide -> 14 or 16 px patches
    _Probe.seen.clear()
    with tokred.apply(model, Schedule(selector=SelectorStage(selector=_Probe(), budget=Budget(keep=8)))) as run:
        logits(model, inputs) if through == "forward" else generate(model, inputs)
    first, second = _Probe.seen[:2]
    assert first.layout.grids == ((rows, cols),) and second.layout.grids == (portrait,)
    assert second.layout.row.tolist() == [i // portrait[1] for i in range(portrait[0] * portrait[1])]
    assert second.layout.col.tolist() == [i % portrait[1] for i in range(portrait[0] * portrait[1])]
    assert first.cls_attention is None and first.pre_projector is None
    assert run.adapter.available_inputs() == frozenset()
    assert [r.num_tokens for r in run.report.images] == [rows * cols, portrait[0] * portrait[1]]


# ------------------------------------------------------------------- exactness references


@pytest.mark.parametrize("gate_layer", [1, 2, 5])
def test_reduction_equals_the_unmodified_model_with_the_dropped_tokens_hidden(qwen: tuple[str, Any, Any], gate_layer: int) -> None:
    """Stage I and a gate (for Qwen3-VL at layers 1 and 2 inside the deepstack layers, 5 after them)
    give, for every surviving token, the logits of the unmodified model in which the dropped tokens
    are hidden from the layer they were dropped at. Misaligned positions or deepstack rows would show."""
    family, model, processor = qwen
    inputs = tiny_inputs(processor, [PROMPT])
    with tokred.apply(model, schedule(gate_layer=gate_layer)) as run:
        got = logits(model, inputs)
    ids = inputs["input_ids"][0]
    image = torch.nonzero(ids == model.config.image_token_id).flatten()
    record = run.report.images[0]
    before = torch.zeros_like(ids, dtype=torch.bool)
    before[image] = True
    before[image[record.kept_stage1]] = False
    at_gate = torch.zeros_like(before)
    at_gate[image[record.kept_stage1]] = True
    at_gate[image[record.kept_final]] = False
    expected = masked_reference(model, inputs, {0: before[None], gate_layer: at_gate[None]})
    survivors = ~(before | at_gate)
    assert got.shape[1] == int(survivors.sum()) == ids.numel() - TOKENS[family] + 12
    torch.testing.assert_close(got[0], expected[0, survivors], atol=1e-4, rtol=0)


def test_deepstack_inputs_follow_stage_one_and_gates() -> None:
    """What Qwen3-VL's language model holds: deepstack rows for the surviving visual tokens only,
    shrunk in place when a gate inside the deepstack layers drops tokens."""
    model, processor = tiny_model("qwen3_vl")
    inputs = tiny_inputs(processor, [PROMPT, LONG_PROMPT])
    with _Capture(model) as unmodified:
        logits(model, inputs)
    full_mask = unmodified.calls[0]["visual_pos_masks"]
    full_embeds = unmodified.calls[0]["deepstack_visual_embeds"]
    assert len(full_embeds) == 3 and full_embeds[0].shape[0] == int(full_mask.sum()) == 2 * TOKENS["qwen3_vl"]
    with tokred.apply(model, schedule(keep=40, gate_layer=1, gate_keep=12)) as run, _Capture(model) as reduced:
        logits(model, inputs)
    held_mask, held_embeds = reduced.calls[0]["visual_pos_masks"], reduced.calls[0]["deepstack_visual_embeds"]
    assert held_mask.sum(1).tolist() == [12, 12]          # shrunk in place at the gate of layer 1
    for row, record in enumerate(run.report.images):
        row_start = row * TOKENS["qwen3_vl"]
        for level in range(3):
            kept = held_embeds[level][12 * row:12 * (row + 1)]
            torch.testing.assert_close(kept, full_embeds[level][row_start + torch.tensor(record.kept_final)], atol=0, rtol=0)


# ------------------------------------------------------------------------------ positions


def test_prefill_positions_are_the_full_sequence_positions_of_the_survivors(qwen: tuple[str, Any, Any]) -> None:
    family, model, processor = qwen
    inputs = tiny_inputs(processor, [PROMPT])
    with _Capture(model) as unmodified:
        logits(model, inputs)
    full = unmodified.calls[0]["position_ids"]                                    # [3, 1, L]
    with tokred.apply(model, schedule()) as run, _Capture(model) as reduced:
        logits(model, inputs)
    ids = inputs["input_ids"][0]
    image = torch.nonzero(ids == model.config.image_token_id).flatten()
    keep = ids != model.config.image_token_id
    keep[image[run.report.images[0].kept_stage1]] = True
    assert torch.equal(reduced.calls[0]["position_ids"], full[:, :, keep])
    rows, cols = GRID[family]
    start = int(image[0])                                 # text before the image counts one per token
    assert full[:, 0, image].amin(dim=1).tolist() == [start] * 3
    assert full[:, 0, image].amax(dim=1).tolist() == [start, start + rows - 1, start + cols - 1]
    assert model.model.rope_deltas.tolist() == [[max(rows, cols) - TOKENS[family]]]


@pytest.mark.parametrize("padded", [False, True], ids=["one-prompt", "padded-batch"])
def test_decoding_positions_after_pruning_equal_the_unpruned_models(qwen: tuple[str, Any, Any], padded: bool) -> None:
    """The position ids the text model receives at each decode step, for the same generated tokens,
    are the unpruned model's: through generate, and through a manual loop that passes none."""
    family, model, processor = qwen
    inputs = tiny_inputs(processor, [PROMPT, LONG_PROMPT] if padded else [PROMPT])
    length = inputs["input_ids"].shape[1]
    with tokred.apply(model, schedule()), _Capture(model) as pruned:
        tokens = generate(model, inputs)[:, length:]
    force = LogitsProcessorList([_Force(tokens, length)])
    with _Capture(model) as unpruned:
        assert torch.equal(generate(model, inputs, logits_processor=force)[:, length:], tokens)
    assert pruned.calls[0]["inputs_embeds"].shape[1] < length          # the prefill really was pruned
    steps = [c["position_ids"] for c in pruned.calls[1:]]
    assert len(steps) == tokens.shape[1] - 1 and steps[0].shape[0] == 4   # generate's [text, t, h, w] rows
    for got, expected in zip(steps, [c["position_ids"] for c in unpruned.calls[1:]]):
        assert torch.equal(got, expected)
    if padded:
        return  # manual decoding without a mask and with padding is wrong in the unmodified model too

    def manual() -> list[torch.Tensor]:
        """Prefill, then three steps that pass neither position ids nor a mask."""
        with _Capture(model) as seen, torch.no_grad():
            cache = compat.output_cache(model(**inputs, use_cache=True))
            for step in range(3):
                model(input_ids=tokens[:, step:step + 1], **{compat.cache_keyword(): cache})
        return [c["position_ids"] for c in seen.calls[1:]]

    unpruned_manual = manual()
    with tokred.apply(model, schedule()):
        pruned_manual = manual()
    assert [p.shape for p in pruned_manual] == [torch.Size([3, 1, 1])] * 3
    for got, expected in zip(pruned_manual, unpruned_manual):
        assert torch.equal(got, expected)
    assert int(pruned_manual[0].flatten()[0]) == int(steps[0][1:].flatten()[0])   # same place as generate's


def test_manual_decoding_with_a_mask_continues_where_generate_does(qwen: tuple[str, Any, Any]) -> None:
    """With an attention mask and no position ids, transformers 5.23's Qwen models fail to decode
    (they take the mask's cumsum over every column); under tokred they get the correct positions."""
    family, model, processor = qwen
    inputs = tiny_inputs(processor, [PROMPT, LONG_PROMPT])
    length = inputs["input_ids"].shape[1]
    with tokred.apply(model, schedule()), _Capture(model) as seen:
        expected = generate(model, inputs)[:, length:]
        reference_positions = [c["position_ids"][1:] for c in seen.calls[1:]]
        seen.calls.clear()
        suppressed = torch.tensor(model.generation_config.suppress_tokens)

        def greedy(scores: torch.Tensor) -> torch.Tensor:
            return scores[:, -1].index_fill(-1, suppressed, float("-inf")).argmax(-1)

        with torch.no_grad():
            out = model(**inputs, use_cache=True)
            mask, cache, tokens = inputs["attention_mask"], compat.output_cache(out), [greedy(out.logits)]
            for _ in range(5):
                mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
                out = model(input_ids=tokens[-1][:, None], attention_mask=mask, **{compat.cache_keyword(): cache})
                tokens.append(greedy(out.logits))
    assert torch.equal(torch.stack(tokens, dim=1), expected)
    for got, want in zip([c["position_ids"] for c in seen.calls[1:]], reference_positions):
        assert torch.equal(got, want)


def test_explicit_generate_style_positions_continue_a_forward_prefill(qwen: tuple[str, Any, Any]) -> None:
    """Decode-time checks compare M-RoPE positions, not generate's leading plain-text row: position
    ids in generate's ``[4, B, n]`` layout are accepted after a prefill that used ``[3, B, L]``, and
    ones that skip ahead are refused."""
    family, model, processor = qwen
    inputs = tiny_inputs(processor, [PROMPT])
    length = inputs["input_ids"].shape[1]
    with tokred.apply(model, schedule()), torch.no_grad():
        out = model(**inputs, use_cache=True)
        following = out.logits[:, -1:].argmax(-1)
        rope = length + model.model.rope_deltas                                   # [1, 1]
        positions = torch.stack([torch.full_like(rope, length), rope, rope, rope])  # [4, 1, 1]
        model(input_ids=following, position_ids=positions, **{compat.cache_keyword(): compat.output_cache(out)})
        with pytest.raises(RuntimeStateError, match="Continuing a conversation"):
            model(input_ids=following, position_ids=positions + 2, **{compat.cache_keyword(): compat.output_cache(out)})


def test_adjacent_images_are_told_apart_by_their_token_counts(qwen: tuple[str, Any, Any]) -> None:
    family, model, _ = qwen
    adapter = tokred.default_registry().adapter_for(model)
    image = model.config.image_token_id
    ids = torch.tensor([[7, 8] + [image] * 10 + [9], [7] + [image] * 6 + [8, 8, 8, 8, 8, 8]])
    spans = adapter.image_spans(ids, None, {"image_grid_thw": torch.tensor([[1, 4, 4], [1, 4, 6], [1, 4, 6]])})
    assert [(s.sample, s.image, s.positions.tolist(), s.layout.grids) for s in spans] == [
        (0, 0, [2, 3, 4, 5], ((2, 2),)), (0, 1, list(range(6, 12)), ((2, 3),)), (1, 0, list(range(1, 7)), ((2, 3),))]
    with pytest.raises(RuntimeStateError, match="do not split"):
        adapter.image_spans(ids, None, {"image_grid_thw": torch.tensor([[1, 4, 6], [1, 4, 6], [1, 4, 6]])})


# ------------------------------------------------------------------------------ images


@pytest.mark.parametrize("method", ["random", "fastv", "todre", "star"])
def test_two_images_with_keep_16_keep_16_each_and_cache_matches_recomputation(qwen: tuple[str, Any, Any], method: str) -> None:
    family, model, processor = qwen
    inputs = tiny_inputs(processor, [PROMPT], images_per_prompt=2)
    options = {"tau": 0.0} if method == "todre" else {}   # tau=0: ToDRE's gate never drops the rest
    with tokred.apply(model, tokred.create(method, keep=16, **options)) as run:
        cached = generate(model, inputs)
        with run.frozen():
            recomputed = generate(model, inputs, use_cache=False)
    assert torch.equal(cached, recomputed)
    assert [(r.sample, r.image, r.num_tokens, len(r.kept_final)) for r in run.report.images] == [
        (0, 0, TOKENS[family], 16), (0, 1, TOKENS[family], 16)]
    assert run.report.visual_tokens_per_layer[-1] == [32]
    assert all(0 <= i < TOKENS[family] for r in run.report.images for i in r.kept_final)


# ------------------------------------------------------------------------------ refusals


def test_renumbered_positions_are_refused_before_any_forward(qwen: tuple[str, Any, Any]) -> None:
    family, model, _ = qwen
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ScheduleError, match="renumber.*M-RoPE"):
            tokred.apply(model, schedule().model_copy(update={"positions": "renumber"}))
    finally:
        handle.remove()
    assert not calls


def test_continuing_a_pruned_cache_through_generate_fails_clearly(qwen: tuple[str, Any, Any]) -> None:
    family, model, processor = qwen
    inputs = tiny_inputs(processor, [PROMPT])
    follow = processor.tokenizer(" And?", return_tensors="pt", add_special_tokens=False).input_ids
    with tokred.apply(model, schedule()), torch.no_grad():
        first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
        follow_up = torch.cat([first.sequences, follow], dim=1)
        for mask in (torch.ones_like(follow_up), None):   # generate drops an all-ones mask: both paths
            with pytest.raises(RuntimeStateError, match="Continuing a conversation on a cache"):
                model.generate(input_ids=follow_up, attention_mask=mask, **{compat.cache_keyword(): compat.output_cache(first)},
                               max_new_tokens=2)


# ---------------------------------------------------------------------------------- docs


def test_qwen2_5_vl_todre_recipe_runs(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tokred_todre", reason="the recipe needs the tokred-todre plugin (plugins/todre)")
    runpy.run_path(str(ROOT / "docs/examples/qwen2_5_vl_todre.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "todre on qwen2_5_vl" in out and "288 visual tokens in" in out
    assert "kept per image: [14, 14]" in out
    assert out.count("image ") >= 2


def test_the_recipe_page_includes_the_tested_file_and_is_in_the_nav() -> None:
    page = (ROOT / "docs/recipes/qwen2_5_vl_todre.md").read_text()
    assert '--8<-- "docs/examples/qwen2_5_vl_todre.py"' in page
    assert "recipes/qwen2_5_vl_todre.md" in (ROOT / "mkdocs.yml").read_text()
