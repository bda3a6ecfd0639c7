"""Stage II: the migration ratios on hand-built states, and the gate firing (or not) in a model."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import pytest
import torch
import torch.nn as nn

import tokred
from tokred import Budget, GateStage, GateState, Schedule, SelectorStage, compat
from tokred.testing import tiny_inputs, tiny_model
from tokred_todre import DiversitySelector, InformationMigrationGate, MigrationRatios, migration_ratios

PROMPTS = ("What is shown in this image?", "Describe the picture in detail please, with the colours of every shape.")
GATE_LAYER = 7  # "7/8" of the tiny LLaVA's 8 decoder layers


# ------------------------------------------------------------------ hand-built states


def _state(full: torch.Tensor, roles: dict[str, list[int]], requests: list[tuple[str, str]] | None = None) -> GateState:
    """A GateState over a sequence whose ``[H, L, L]`` attention probabilities are ``full``."""
    index = {name: torch.tensor(positions, dtype=torch.long) for name, positions in roles.items()}
    index["text"] = torch.sort(torch.cat([index["system"], index["instruction"]])).values
    num_visual = len(roles["visual"])

    def attention(queries: str, keys: str) -> torch.Tensor:
        if requests is not None:
            requests.append((queries, keys))
        return full[:, index[queries]][:, :, index[keys]]

    return GateState(
        layer=GATE_LAYER, sample_index=0, visual_image=torch.zeros(num_visual, dtype=torch.long),
        visual_token=torch.arange(num_visual), keep_per_image=None, num_instruction=len(roles["instruction"]),
        num_system=len(roles["system"]), hidden_states=torch.zeros(full.shape[-1], 4), attention_source=attention,
    )


def _causal_attention(length: int, heads: int = 3, seed: int = 0) -> torch.Tensor:
    logits = torch.randn(heads, length, length, generator=torch.Generator().manual_seed(seed))
    future = torch.triu(torch.ones(length, length, dtype=torch.bool), diagonal=1)
    return torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)   # [H, L, L]


# system text 0-1, image 2-5, instruction 6-8 (image-first template)
ROLES = {"system": [0, 1], "visual": [2, 3, 4, 5], "instruction": [6, 7, 8]}


def test_ratios_are_attention_mass_averaged_over_heads_and_queries() -> None:
    full = _causal_attention(9)
    ratios = migration_ratios(_state(full, ROLES))
    expected_t2v = full[:, 6:9, 2:6].sum(-1).mean()
    expected_v2t = full[:, 2:6][:, :, [0, 1, 6, 7, 8]].sum(-1).mean()
    assert ratios.text_to_visual == pytest.approx(float(expected_t2v), abs=1e-6)
    assert ratios.visual_to_text == pytest.approx(float(expected_v2t), abs=1e-6)
    # Causal mask: visual queries cannot see the instruction, so only the system text counts.
    assert ratios.visual_to_text == pytest.approx(float(full[:, 2:6, 0:2].sum(-1).mean()), abs=1e-6)


def _constant_state(t2v: float, v2t: float, *, system: int = 2, instruction: int = 2, visual: int = 4,
                    heads: int = 2) -> GateState:
    """A state whose instruction->visual and visual->text masses are exactly ``t2v`` and ``v2t``."""
    text = system + instruction

    def attention(queries: str, keys: str) -> torch.Tensor:
        if (queries, keys) == ("instruction", "visual"):
            return torch.full((heads, instruction, visual), t2v / visual)
        if (queries, keys) == ("visual", "text"):
            return torch.full((heads, visual, text), v2t / text)
        raise AssertionError(f"unexpected request {queries} -> {keys}")

    return GateState(
        layer=GATE_LAYER, sample_index=0, visual_image=torch.zeros(visual, dtype=torch.long),
        visual_token=torch.arange(visual), keep_per_image=None, num_instruction=instruction, num_system=system,
        hidden_states=torch.zeros(text + visual, 4), attention_source=attention,
    )


@pytest.mark.parametrize(
    "t2v, v2t, tau, fires",
    [
        (0.05, 0.08, 0.10, True),     # both below: drop
        (0.05, 0.25, 0.10, False),    # visual tokens still read the text
        (0.50, 0.02, 0.10, False),    # the instruction still reads the image
        (0.125, 0.0625, 0.125, False),  # "below" is strict (exact binary fractions)
        (0.0625, 0.0625, 0.125, True),
        (0.0, 0.0, 0.0, False),       # tau = 0 never fires
        (0.99, 0.99, 1.0, True),      # tau = 1 fires whenever both shares are below 1
    ],
)
def test_decision(t2v: float, v2t: float, tau: float, fires: bool) -> None:
    state = _constant_state(t2v, v2t)
    gate = InformationMigrationGate(tau=tau)
    assert gate.fires(state) is fires
    kept = gate.select(state)
    assert kept.dtype == torch.long
    assert kept.tolist() == ([] if fires else [0, 1, 2, 3])


def test_the_expensive_share_is_only_measured_when_needed() -> None:
    # visual -> text has V query rows; it decides nothing once text -> visual is not below tau.
    full = _causal_attention(9)
    t2v = float(full[:, 6:9, 2:6].sum(-1).mean())
    requests: list[tuple[str, str]] = []
    assert not InformationMigrationGate(tau=t2v).fires(_state(full, ROLES, requests))
    assert requests == [("instruction", "visual")]
    requests.clear()
    InformationMigrationGate(tau=min(1.0, t2v + 0.01)).fires(_state(full, ROLES, requests))
    assert requests == [("instruction", "visual"), ("visual", "text")]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("tau", [0.0, 0.1, 0.3, 0.5, 0.7, 1.0])
def test_fires_agrees_with_the_ratios(seed: int, tau: float) -> None:
    state = _state(_causal_attention(9, seed=seed), ROLES)
    assert InformationMigrationGate(tau=tau).fires(state) is migration_ratios(state).below(tau)


def test_without_instruction_text_the_gate_keeps_everything() -> None:
    requests: list[tuple[str, str]] = []
    full = _causal_attention(6)
    state = _state(full, {"system": [0, 1], "visual": [2, 3, 4, 5], "instruction": []}, requests)
    ratios = migration_ratios(state)
    assert ratios.text_to_visual is None
    assert ("instruction", "visual") not in requests
    assert not InformationMigrationGate(tau=1.0).fires(state)


def test_without_system_text_visual_to_text_is_zero() -> None:
    # Image first, nothing before it: visual queries see no text at all (the causal mask hides the
    # instruction), so the share is exactly 0 and text -> visual alone decides.
    full = _causal_attention(7)
    state = _state(full, {"system": [], "visual": [0, 1, 2, 3], "instruction": [4, 5, 6]})
    ratios = migration_ratios(state)
    assert ratios.visual_to_text == 0.0
    t2v = float(full[:, 4:7, 0:4].sum(-1).mean())
    assert InformationMigrationGate(tau=t2v + 1e-3).fires(state)
    assert not InformationMigrationGate(tau=t2v - 1e-3).fires(state)


def test_empty_key_set_has_zero_mass() -> None:
    state = _state(_causal_attention(4), {"system": [], "visual": [0, 1, 2, 3], "instruction": []})
    assert migration_ratios(state) == MigrationRatios(text_to_visual=None, visual_to_text=0.0)


def test_tau_is_validated() -> None:
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(tokred.OptionsError, match="tau"):
            tokred.default_registry().gate("todre.migration", tau=bad)
    assert InformationMigrationGate.requires_budget is False


# ------------------------------------------------------------------ in a model


def _text_tokens(inputs: dict[str, torch.Tensor], image_token_id: int) -> list[int]:
    real = inputs["attention_mask"].bool()
    return [int(n) for n in (real & (inputs["input_ids"] != image_token_id)).sum(1)]


@contextmanager
def _count_visual(layers: list[nn.Module], text_tokens: list[int]) -> Iterator[list[list[int]]]:
    """Per decoder layer, per sample, the visual tokens the layer receives in the first forward,
    counted from the layer's own inputs (real positions the last query can see, minus text)."""
    counts: list[list[int]] = []

    def make(index: int) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if len(counts) == len(layers):
                return                                                          # decoding steps
            hidden = args[0] if args else kwargs["hidden_states"]
            mask = kwargs.get("attention_mask")
            if mask is None:
                real = [hidden.shape[1]] * hidden.shape[0]
            else:
                last = mask[:, 0, -1]                                           # [B, K]
                visible = last if last.dtype == torch.bool else last == 0
                real = [int(n) for n in visible.sum(-1)]
            counts.append([r - t for r, t in zip(real, text_tokens, strict=True)])

        return hook

    handles = [layer.register_forward_pre_hook(make(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def _run(model: nn.Module, inputs: dict[str, torch.Tensor], method: Any, **generate: Any) -> tuple[Any, list[list[int]], Any]:
    layers = list(model.model.language_model.layers)
    text = _text_tokens(inputs, model.config.image_token_id)
    with tokred.apply(model, method) as run, _count_visual(layers, text) as counts, torch.no_grad():
        out = model.generate(**inputs, **generate) if generate else model(**inputs)
    return run, counts, out


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("stage1, entering", [(True, 58), (False, 576)])
def test_gate_fires_and_removes_visual_tokens_for_prefill_and_decoding(attn_implementation: str, stage1: bool,
                                                                       entering: int) -> None:
    # tau = 1: both shares of a sample with text before and after its image are below 1.
    model, processor = tiny_model("llava", attn_implementation=attn_implementation)
    inputs = tiny_inputs(processor, PROMPTS[:1])
    run, counts, out = _run(model, inputs, tokred.create("todre", stage1=stage1, tau=1.0),
                            max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    expected = [[entering]] * GATE_LAYER + [[0]]
    assert counts == expected
    assert run.report.visual_tokens_per_layer == expected
    assert run.report.kept_indices == [[]]
    # Decoding: the layers from the gate on cached only the text, the earlier ones the image too.
    text = _text_tokens(inputs, model.config.image_token_id)[0]
    cached = [layer.keys.shape[-2] for layer in compat.output_cache(out).layers]
    generated_before_last = out.sequences.shape[1] - inputs["input_ids"].shape[1] - 1
    assert cached == [text + entering + generated_before_last] * GATE_LAYER + [text + generated_before_last]


@pytest.mark.parametrize("stage1, entering", [(True, 58), (False, 576)])
def test_gate_does_not_fire_at_tau_zero(stage1: bool, entering: int) -> None:
    model, processor = tiny_model("llava")
    inputs = tiny_inputs(processor, PROMPTS[:1])
    run, counts, _ = _run(model, inputs, tokred.create("todre", stage1=stage1, tau=0.0))
    assert counts == run.report.visual_tokens_per_layer == [[entering]] * 8
    assert len(run.report.kept_indices[0]) == entering


def test_gate_does_not_fire_on_the_tiny_model_at_the_papers_tau() -> None:
    """Random weights spread attention almost uniformly, so the instruction gives the 576 visual keys
    most of its attention: far above 0.10, nothing is dropped."""
    model, processor = tiny_model("llava")
    inputs = tiny_inputs(processor, PROMPTS[:1])
    run, counts, _ = _run(model, inputs, tokred.create("todre", stage1=False))
    assert counts == run.report.visual_tokens_per_layer == [[576]] * 8


def _probe_ratios(model: nn.Module, inputs: dict[str, torch.Tensor]) -> dict[int, MigrationRatios]:
    """Each sample's ratios at the gate layer, with stage I as in the default method."""
    ratios: dict[int, MigrationRatios] = {}

    class Probe(InformationMigrationGate):
        def select(self, state: GateState) -> torch.Tensor:
            ratios[state.sample_index] = migration_ratios(state)
            return super().select(state)

    schedule = Schedule(
        selector=SelectorStage(selector=DiversitySelector(), budget=Budget(keep_ratio=0.1)),
        gates=(GateStage(layer="7/8", gate=Probe(tau=0.0)),),
    )
    with tokred.apply(model, schedule), torch.no_grad():
        model(**inputs)
    return ratios


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_per_sample_decisions_in_a_batch(attn_implementation: str) -> None:
    model, processor = tiny_model("llava", attn_implementation=attn_implementation)
    batch = tiny_inputs(processor, PROMPTS)
    ratios = _probe_ratios(model, batch)
    assert set(ratios) == {0, 1}
    # A sample fires when its larger share is below tau: put tau between the two samples' values.
    larger = {s: max(r.text_to_visual, r.visual_to_text) for s, r in ratios.items()}  # type: ignore[type-var]
    assert abs(larger[0] - larger[1]) > 1e-3
    tau = (larger[0] + larger[1]) / 2
    fires = {s: larger[s] < tau for s in (0, 1)}
    assert sorted(fires.values()) == [False, True]

    method = tokred.create("todre", tau=tau)
    run, counts, _ = _run(model, batch, method)
    expected = [[58, 58]] * GATE_LAYER + [[0 if fires[0] else 58, 0 if fires[1] else 58]]
    assert counts == expected
    assert run.report.visual_tokens_per_layer == expected
    assert [len(k) for k in run.report.kept_indices] == expected[-1]

    # The same decision for each prompt alone, and the same logits as in the batch.
    with tokred.apply(model, method) as run, torch.no_grad():
        batch_logits = model(**batch).logits[:, -1]
        for sample, prompt in enumerate(PROMPTS):
            alone = tiny_inputs(processor, [prompt])
            alone["pixel_values"] = batch["pixel_values"][sample:sample + 1]
            logits = model(**alone).logits[0, -1]
            assert run.report.visual_tokens_per_layer[-1] == [expected[-1][sample]]
            assert torch.allclose(logits, batch_logits[sample], atol=1e-4)
