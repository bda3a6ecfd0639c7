"""STAR stage II: the gate's scores are the model's real attention, and its fallback."""

from __future__ import annotations

from typing import Any

import pytest
import tokred
import torch
from pydantic import PrivateAttr
from tokred import Budget, GateStage, GateState, Schedule
from tokred.testing import make_image

from tokred_star import CrossAttentionGate


class RecordingGate(CrossAttentionGate):
    """STAR's gate, recording ``(sample, visual_token [V], score [V])`` of every call and each
    call's number of instruction positions."""

    _calls: list[tuple[int, torch.Tensor, torch.Tensor]] = PrivateAttr(default_factory=list)
    _instruction: list[int] = PrivateAttr(default_factory=list)

    def score(self, state: GateState) -> torch.Tensor:
        scores = super().score(state)
        self._calls.append((state.sample_index, state.visual_token.clone(), scores.detach().clone()))
        self._instruction.append(state.num_instruction)
        return scores


def eager_reference(model: Any, inputs: dict[str, torch.Tensor], layer: int) -> list[torch.Tensor]:
    """Per row, ``[N]``: the unreduced eager model's attention of layer ``layer - 1`` from the
    instruction text (real text tokens after the row's first image token) to the image tokens,
    averaged over heads and instruction queries."""
    with torch.no_grad():
        attentions = model(**inputs, output_attentions=True).attentions
    probs = attentions[layer - 1]                                             # [B, H, L, L]
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    image = ids == model.config.image_token_id
    rows = []
    for b in range(ids.shape[0]):
        after_image = torch.arange(ids.shape[1]) > int(torch.nonzero(image[b])[0])
        instruction = torch.nonzero(mask[b] & ~image[b] & after_image).flatten()
        visual = torch.nonzero(image[b]).flatten()
        rows.append(probs[b][:, instruction][:, :, visual].mean(dim=(0, 1)).float())
    return rows


@pytest.mark.parametrize("layer", [1, 2, 7])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_scores_equal_eager_output_attentions(llava: Any, llava_eager: Any, two_prompts: dict, layer: int, impl: str) -> None:
    reference_model = llava_eager[0]
    expected = eager_reference(reference_model, two_prompts, layer)
    gate = RecordingGate()
    schedule = Schedule(gates=(GateStage(layer=layer, gate=gate, budget=Budget(keep_ratio=0.25)),))
    model = llava[0] if impl == "sdpa" else reference_model
    with tokred.apply(model, schedule), torch.no_grad():
        model(**two_prompts)
    assert [sample for sample, _, _ in gate._calls] == [0, 1]
    for (_, visual_token, scores), want in zip(gate._calls, expected, strict=True):
        assert visual_token.tolist() == list(range(576))        # no stage I: every token alive, in order
        torch.testing.assert_close(scores, want, rtol=0, atol=1e-5)
        assert float(want.std()) > 1e-3 * float(want.mean()), "reference attention must not be uniform"


def test_gate_keeps_the_top_instruction_attention(llava: Any, one_prompt: dict) -> None:
    model, _ = llava
    gate = RecordingGate()
    schedule = Schedule(gates=(GateStage(layer=3, gate=gate, budget=Budget(keep=50)),))
    with tokred.apply(model, schedule) as run, torch.no_grad():
        model(**one_prompt)
    (_, _, scores), = gate._calls
    assert run.report.images[0].kept_final == sorted(tokred.top_k_indices(scores, 50).tolist())


def test_stage2_after_stage1_scores_only_the_survivors(llava: Any, one_prompt: dict) -> None:
    model, _ = llava
    gate = RecordingGate()
    schedule = tokred.create("star", keep=30).schedule()
    schedule = schedule.model_copy(update={"gates": (GateStage(layer=2, gate=gate, budget=Budget(keep=30)),)})
    with tokred.apply(model, schedule) as run, torch.no_grad():
        model(**one_prompt)
    (_, visual_token, scores), = gate._calls
    image = run.report.images[0]
    assert visual_token.tolist() == image.kept_stage1 and len(image.kept_stage1) == 60
    assert scores.shape == (60,)
    assert set(image.kept_final) <= set(image.kept_stage1) and len(image.kept_final) == 30


def _state(num_instruction: int, calls: list[tuple[str, str]]) -> GateState:
    heads, visual = 2, 5

    def attention(queries: str, keys: str) -> torch.Tensor:
        calls.append((queries, keys))
        rows = max(num_instruction, 1) if queries == "instruction" else 1
        return torch.arange(heads * rows * visual, dtype=torch.float32).reshape(heads, rows, visual)

    return GateState(
        layer=2, sample_index=0, visual_image=torch.zeros(visual, dtype=torch.long),
        visual_token=torch.arange(visual), keep_per_image=[2], num_instruction=num_instruction, num_system=1,
        hidden_states=torch.zeros(8, 4), attention_source=attention,
    )


def test_score_averages_heads_and_instruction_queries() -> None:
    calls: list[tuple[str, str]] = []
    scores = CrossAttentionGate().score(_state(3, calls))
    assert calls == [("instruction", "visual")]
    expected = torch.arange(2 * 3 * 5, dtype=torch.float32).reshape(2, 3, 5).mean(dim=(0, 1))
    torch.testing.assert_close(scores, expected)


def test_no_instruction_text_falls_back_to_the_last_position() -> None:
    calls: list[tuple[str, str]] = []
    scores = CrossAttentionGate().score(_state(0, calls))
    assert calls == [("last", "visual")]
    assert scores.shape == (5,)


def test_prompt_ending_with_the_image_runs(llava: Any) -> None:
    model, processor = llava
    inputs = dict(processor(text=["USER: <image>"], images=[make_image()], return_tensors="pt"))
    gate = RecordingGate()
    with tokred.apply(model, Schedule(gates=(GateStage(layer=2, gate=gate, budget=Budget(keep=10)),))) as run, torch.no_grad():
        model(**inputs)
    assert gate._instruction == [0]
    assert gate._calls[0][2].shape == (576,)
    assert len(run.report.images[0].kept_final) == 10


def test_gate_is_registered_and_takes_no_options() -> None:
    registry = tokred.default_registry()
    assert isinstance(registry.gate("star.cross_attention"), CrossAttentionGate)
    with pytest.raises(tokred.OptionsError, match="takes no options"):
        registry.gate("star.cross_attention", layer=2)
