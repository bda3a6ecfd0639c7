"""The runtime on the tiny LLaVA-1.5: exactness, caching, batching, hooks, errors (issue #2)."""

from __future__ import annotations

import pytest
import torch
import transformers

import tokred
from tokred import compat
from tokred import Budget, GateStage, RuntimeStateError, Schedule, SelectorStage, UnsupportedModelError
from tokred.methods import LastTokenAttentionGate, RandomSelector
from tokred.testing import tiny_inputs, tiny_model

PROMPT = "What is shown in this image?"
LONG_PROMPT = "Describe the picture in detail please, with the colours of every shape."

N = 576  # visual tokens per image of the tiny LLaVA


def logits(model, inputs):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model(**inputs).logits


def generate(model, inputs, **kwargs):  # type: ignore[no-untyped-def]
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=8, do_sample=False, **kwargs)


SCHEDULES = {
    "selector": Schedule(selector=SelectorStage(selector=RandomSelector(), budget=Budget(keep=64))),
    "gate": Schedule(gates=(GateStage(layer=2, gate=LastTokenAttentionGate(), budget=Budget(keep=48)),)),
    "combined": Schedule(
        selector=SelectorStage(selector=RandomSelector(seed=1), budget=Budget(keep=128)),
        gates=(GateStage(layer=3, gate=LastTokenAttentionGate(), budget=Budget(keep=32)),
               GateStage(layer=6, gate=LastTokenAttentionGate(), budget=Budget(keep=8))),
    ),
}
PROMISED = {"selector": [64] * 8, "gate": [576] * 2 + [48] * 6, "combined": [128] * 3 + [32] * 3 + [8] * 2}


@pytest.mark.parametrize("method", ["random", "fastv"])
def test_keep_all_budget_gives_the_unmodified_logits(llava, one_image, method: str) -> None:
    model, _ = llava
    expected = logits(model, one_image)
    with tokred.apply(model, tokred.create(method, keep=N)):
        got = logits(model, one_image)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_cached_generation_equals_recomputation_on_the_reduced_sequence(llava, one_image, kind: str) -> None:
    model, _ = llava
    with tokred.apply(model, SCHEDULES[kind]) as run:
        cached = generate(model, one_image)
        with run.frozen():
            recomputed = generate(model, one_image, use_cache=False)
    assert torch.equal(cached, recomputed)
    assert len(set(cached[0, -8:].tolist())) > 1, "degenerate generation would make this test vacuous"


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_each_layer_receives_the_promised_visual_tokens(llava, one_image, kind: str) -> None:
    model, _ = llava
    text_tokens = one_image["input_ids"].shape[1] - N
    seen: list[int] = []
    handles = [layer.register_forward_pre_hook(lambda m, a, k: seen.append(a[0].shape[1] - text_tokens), with_kwargs=True)
               for layer in model.model.language_model.layers]
    try:
        with tokred.apply(model, SCHEDULES[kind]) as run:
            logits(model, one_image)
    finally:
        for handle in handles:
            handle.remove()
    assert seen == PROMISED[kind]
    assert [per_layer[0] for per_layer in run.report.visual_tokens_per_layer] == PROMISED[kind]
    assert run.report.equivalent_visual_tokens == [sum(PROMISED[kind]) / 8]


def test_selector_run_equals_the_ideal_model_fed_only_kept_tokens(llava, one_image) -> None:
    """Stage I must be exactly "the language model sees only the kept tokens, at their positions"."""
    model, _ = llava
    with tokred.apply(model, SCHEDULES["selector"]) as run:
        got = logits(model, one_image)
    kept_visual = torch.tensor(run.report.images[0].kept_stage1)
    ids = one_image["input_ids"][0]
    image_positions = torch.nonzero(ids == model.config.image_token_id).flatten()
    keep = torch.ones_like(ids, dtype=torch.bool)
    keep[image_positions] = False
    keep[image_positions[kept_visual]] = True
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values=one_image["pixel_values"]).pooler_output[0]
        embeds = model.model.get_input_embeddings()(ids).clone()
        embeds[image_positions] = features
        positions = torch.nonzero(keep).flatten()
        hidden = model.model.language_model(inputs_embeds=embeds[positions][None], position_ids=positions[None],
                                            attention_mask=torch.ones(1, positions.numel(), dtype=torch.long)).last_hidden_state
        ideal = model.lm_head(hidden)
    torch.testing.assert_close(got, ideal, atol=1e-5, rtol=0)


def test_renumbered_positions_are_contiguous(llava_sdpa) -> None:
    model, processor = llava_sdpa
    inputs = tiny_inputs(processor, [PROMPT])
    schedule = SCHEDULES["selector"].model_copy(update={"positions": "renumber"})
    received: list[torch.Tensor] = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: received.append(k["position_ids"]), with_kwargs=True)
    try:
        with tokred.apply(model, schedule) as run:
            generate(model, inputs)
            with run.frozen():
                assert torch.equal(generate(model, inputs), generate(model, inputs, use_cache=False))
    finally:
        handle.remove()
    prefill, first_step = received[0], received[1]
    assert torch.equal(prefill[0], torch.arange(prefill.shape[1]))
    assert first_step.tolist() == [[prefill.shape[1]]]


def test_gate_scores_are_the_real_attention_of_the_previous_layer() -> None:
    """FastV's choice must equal the top-k of eager attention probabilities of layer K-1."""
    model, processor = tiny_model("llava", attn_implementation="eager")
    inputs = tiny_inputs(processor, [PROMPT])
    image_positions = torch.nonzero(inputs["input_ids"][0] == model.config.image_token_id).flatten()
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    scores = attentions[1][0, :, -1, image_positions].mean(0)  # layer K-1 = 1, last query
    expected = sorted(torch.sort(scores, descending=True, stable=True).indices[:40].tolist())
    with tokred.apply(model, tokred.create("fastv", keep=40, layer=2)) as run:
        logits(model, inputs)
    assert run.report.images[0].kept_final == expected


def test_vision_cls_attention_matches_clip_eager_attentions() -> None:
    model, processor = tiny_model("llava", attn_implementation="eager")
    inputs = tiny_inputs(processor, [PROMPT])
    captured = []

    class Probe(RandomSelector):
        inputs = frozenset({"cls_attention", "pre_projector"})

        def select(self, tokens, k):  # type: ignore[no-untyped-def]
            captured.append(tokens)
            return super().select(tokens, k)

    with tokred.apply(model, Schedule(selector=SelectorStage(selector=Probe(), budget=Budget(keep=8)))):
        logits(model, inputs)
    with torch.no_grad():
        vision = model.model.vision_tower(inputs["pixel_values"], output_attentions=True, output_hidden_states=True)
    # vision_feature_layer=-2 of a 2-layer tower: the output of layer 0, so layer 0's attention.
    expected = vision.attentions[0][0, :, 0, 1:].mean(0)
    torch.testing.assert_close(captured[0].cls_attention, expected, atol=1e-6, rtol=0)
    assert captured[0].pre_projector.shape == (N, model.config.vision_config.hidden_size)
    torch.testing.assert_close(captured[0].pre_projector, vision.hidden_states[-2][0, 1:], atol=1e-6, rtol=0)
    assert captured[0].layout.grids == ((24, 24),)


def test_vision_probes_reach_the_selector_under_generate(llava_sdpa) -> None:
    """generate() runs the vision tower before the model's forward (mm_encoder_outputs)."""
    model, processor = llava_sdpa
    inputs = tiny_inputs(processor, [PROMPT, LONG_PROMPT])
    captured = []

    class Probe(RandomSelector):
        inputs = frozenset({"cls_attention", "pre_projector"})

        def select(self, tokens, k):  # type: ignore[no-untyped-def]
            captured.append((tokens.cls_attention, tokens.pre_projector))
            return super().select(tokens, k)

    with tokred.apply(model, Schedule(selector=SelectorStage(selector=Probe(), budget=Budget(keep=8)))):
        generate(model, inputs)
        plain = len(captured)
        logits(model, inputs)
    assert plain == 2 and len(captured) == 4
    for (cls_generate, pre_generate), (cls_plain, pre_plain) in zip(captured[:2], captured[2:]):
        assert cls_generate is not None and pre_generate is not None
        torch.testing.assert_close(cls_generate, cls_plain)
        torch.testing.assert_close(pre_generate, pre_plain)
    assert not torch.equal(captured[0][0], captured[1][0]), "each image must get its own [CLS] attention"


def test_later_gate_budget_above_the_selector_is_refused_at_apply(llava_sdpa) -> None:
    model, _ = llava_sdpa
    schedule = Schedule(
        selector=SelectorStage(selector=RandomSelector(), budget=Budget(keep_ratio=0.1)),
        gates=(GateStage(layer=2, gate=LastTokenAttentionGate(), budget=Budget(keep=64)),),
    )
    with pytest.raises(tokred.BudgetError, match="only 58 survive"):
        tokred.apply(model, schedule)


@pytest.mark.parametrize("kind", sorted(SCHEDULES))
def test_padded_batch_gives_the_same_tokens_as_each_prompt_alone(llava, kind: str) -> None:
    model, processor = llava
    batch = tiny_inputs(processor, [PROMPT, LONG_PROMPT])
    assert (batch["attention_mask"] == 0).any(), "the batch must be padded for this test to mean anything"
    with tokred.apply(model, SCHEDULES[kind]) as run:
        together = generate(model, batch)[:, -8:]
        batch_kept = run.report.kept_indices
        for row, prompt in enumerate([PROMPT, LONG_PROMPT]):
            alone = tiny_inputs(processor, [prompt])
            alone["pixel_values"] = batch["pixel_values"][row:row + 1]
            assert torch.equal(generate(model, alone)[0, -8:], together[row])
            assert run.report.kept_indices[0] == batch_kept[row]


def test_two_images_in_one_prompt_keep_the_budget_each(llava_sdpa) -> None:
    model, processor = llava_sdpa
    inputs = tiny_inputs(processor, [PROMPT], images_per_prompt=2)
    with tokred.apply(model, SCHEDULES["combined"]) as run:
        cached = generate(model, inputs)
        with run.frozen():
            assert torch.equal(cached, generate(model, inputs, use_cache=False))
    assert [(r.sample, r.image, len(r.kept_stage1), len(r.kept_final)) for r in run.report.images] == [(0, 0, 128, 8), (0, 1, 128, 8)]
    assert run.report.visual_tokens_per_layer[0] == [256] and run.report.visual_tokens_per_layer[-1] == [16]


def test_hooks_are_removed_after_the_block_and_after_an_exception(llava_sdpa) -> None:
    model, processor = llava_sdpa
    inputs = tiny_inputs(processor, [PROMPT])
    expected = logits(model, inputs)

    def census() -> list:
        return [(n, dict(m._forward_pre_hooks), dict(m._forward_hooks), id(getattr(m, "config", None)))
                for n, m in model.named_modules()]

    before = census()
    with tokred.apply(model, SCHEDULES["combined"]) as run:
        assert run.active and census() != before
    assert census() == before and not run.active
    with pytest.raises(ZeroDivisionError):
        with tokred.apply(model, SCHEDULES["combined"]):
            logits(model, inputs)
            1 / 0  # noqa: B018
    assert census() == before
    torch.testing.assert_close(logits(model, inputs), expected, atol=0, rtol=0)


def test_applying_twice_at_once_is_refused(llava_sdpa) -> None:
    model, _ = llava_sdpa
    with tokred.apply(model, tokred.create("random")):
        with pytest.raises(RuntimeStateError, match="already has an active tokred run"):
            with tokred.apply(model, tokred.create("fastv")):
                pass
    with tokred.apply(model, tokred.create("fastv")):  # usable again once the first run ended
        pass


def test_text_only_input_passes_through_unchanged(llava) -> None:
    model, processor = llava
    text = dict(processor(text=["USER: Tell me a story about a fox. ASSISTANT:"], return_tensors="pt"))
    expected_logits, expected_tokens = logits(model, text), generate(model, text)
    with tokred.apply(model, SCHEDULES["combined"]) as run:
        assert torch.equal(logits(model, text), expected_logits)
        assert torch.equal(generate(model, text), expected_tokens)
    assert run.report.visual_tokens_input == [0]


class _NoCalls:
    """Counts forward calls of a model."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, *args: object) -> None:
        self.calls += 1


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (lambda: tokred.create("random", keep=0), tokred.BudgetError, "keep must be >= 1"),
        (lambda: tokred.create("random", keep=N + 1), tokred.BudgetError, "larger than the 576 visual tokens"),
        (lambda: tokred.create("fastv", keep=N + 1), tokred.BudgetError, "larger than the 576 visual tokens"),
        (lambda: tokred.create("random", keep=4, keep_ratio=0.1), tokred.BudgetError, "not both"),
        (lambda: tokred.create("random", keeep=4), tokred.OptionsError, "valid options"),
        (lambda: tokred.create("fastv", layer=8), tokred.ScheduleError, "outside 1..7"),
        (lambda: tokred.create("fastv", layer=0), tokred.ScheduleError, "layer 0"),
    ],
)
def test_bad_options_fail_clearly_before_any_forward_pass(llava_sdpa, make, error, message) -> None:  # type: ignore[no-untyped-def]
    model, _ = llava_sdpa
    counter = _NoCalls(model)
    with pytest.raises(error, match=message):
        tokred.apply(model, make())
    counter.handle.remove()
    assert counter.calls == 0


def test_unsupported_model_class_is_refused() -> None:
    config = transformers.LlamaConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=32)
    model = transformers.LlamaForCausalLM(config)
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM.*LlavaForConditionalGeneration"):
        tokred.apply(model, tokred.create("random"))


def test_static_cache_is_refused_with_a_clear_error(llava_sdpa, ) -> None:
    model, processor = llava_sdpa
    inputs = tiny_inputs(processor, [PROMPT])
    with tokred.apply(model, SCHEDULES["gate"]):
        with pytest.raises(RuntimeStateError, match="DynamicCache"):
            generate(model, inputs, cache_implementation="static")


def test_continuing_a_pruned_cache_through_generate_fails_clearly(llava_sdpa) -> None:
    model, processor = llava_sdpa
    inputs = tiny_inputs(processor, [PROMPT])
    with tokred.apply(model, SCHEDULES["selector"]):
        with torch.no_grad():
            first = model.generate(**inputs, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
            follow_up = torch.cat([first.sequences, processor.tokenizer(" And?", return_tensors="pt",
                                                                         add_special_tokens=False).input_ids], dim=1)
            with pytest.raises(RuntimeStateError, match="Continuing a conversation on a cache"):
                model.generate(input_ids=follow_up, attention_mask=torch.ones_like(follow_up),
                               **{compat.cache_keyword(): compat.output_cache(first)}, max_new_tokens=2)


def test_foreign_cache_is_refused(llava_sdpa) -> None:
    model, processor = llava_sdpa
    inputs = tiny_inputs(processor, [PROMPT])
    with torch.no_grad():
        cache = compat.output_cache(model(**inputs, use_cache=True))
    with tokred.apply(model, SCHEDULES["selector"]):
        with pytest.raises(RuntimeStateError, match="not filled by the active tokred run"):
            model(input_ids=inputs["input_ids"][:, -1:], **{compat.cache_keyword(): cache})


def test_report_summary_and_dict(llava_sdpa) -> None:
    model, processor = llava_sdpa
    inputs = tiny_inputs(processor, [PROMPT])
    with tokred.apply(model, tokred.create("fastv", keep=64)) as run:
        logits(model, inputs)
    data = run.report.to_dict()
    assert data["method"] == "fastv" and data["family"] == "llava" and data["prefills"] == 1
    assert data["visual_tokens_per_layer"][1] == [576] and data["visual_tokens_per_layer"][2] == [64]
    assert data["equivalent_visual_tokens"] == [(2 * 576 + 6 * 64) / 8]
    assert data["gating_seconds"] > 0 and data["selection_seconds"] == 0
    assert "576 x2, 64 x6" in run.report.summary()


def test_attention_slices_are_the_same_in_query_blocks() -> None:
    """Blocking over queries bounds memory; probabilities agree to float rounding (the matmul
    kernels differ with the block size)."""
    from tokred.runtime._gating import attention_slice as _attention_slice

    generator = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 50, 8, generator=generator)                   # [B, H, L, d]
    key = torch.randn(2, 2, 50, 8, generator=generator)                     # grouped KV heads
    valid = torch.ones(50, dtype=torch.bool)
    valid[:3] = False                                                       # left padding
    queries, keys = torch.arange(10, 50), torch.arange(5, 45, 3)
    whole = _attention_slice((query, key, 0.35), 1, queries, keys, valid, block_elements=1 << 30)
    for block_elements in (1, 4 * 50 * 7, 4 * 50 * 40 - 1):
        blocked = _attention_slice((query, key, 0.35), 1, queries, keys, valid, block_elements=block_elements)
        assert torch.allclose(blocked, whole, rtol=0, atol=1e-6)
    assert whole.shape == (4, 40, 14)
    assert _attention_slice((query, key, 0.35), 1, torch.arange(0), keys, valid).shape == (4, 0, 14)


def test_report_records_the_tokens_alive_after_each_gate() -> None:
    model, processor = tiny_model("llava")
    inputs = tiny_inputs(processor, ["Describe the image.", "What colour is the largest shape?"])
    schedule = Schedule(
        selector=SelectorStage(selector=RandomSelector(), budget=Budget(keep=64)),
        gates=(GateStage(layer=3, gate=LastTokenAttentionGate(), budget=Budget(keep=32)),
               GateStage(layer=6, gate=LastTokenAttentionGate(), budget=Budget(keep=8))),
    )
    with tokred.apply(model, schedule) as run, torch.no_grad():
        model(**inputs)
    for image in run.report.images:
        (first_layer, first), (second_layer, second) = image.kept_after_gates
        assert (first_layer, second_layer) == (3, 6) and (len(first), len(second)) == (32, 8)
        assert set(second) <= set(first) <= set(image.kept_stage1)
        assert second == image.kept_final
