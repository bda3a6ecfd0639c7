"""The method contract and the error paths: what components return is checked, options are typed
strictly, impossible settings fail before the first decoder layer, and misuse gets a message that
says what is wrong."""

from __future__ import annotations

import contextlib
from typing import Iterator

import pytest
import torch

import tokred
from tokred import (
    BudgetError,
    Gate,
    GateStage,
    MethodContractError,
    OptionsError,
    RuntimeStateError,
    Schedule,
    ScheduleError,
    Selector,
    SelectorStage,
)
from tokred.testing import make_gate_state, make_visual_tokens, tiny_inputs, tiny_model

PROMPT = "What is shown in this image?"


@contextlib.contextmanager
def decoder_layer_calls(model: torch.nn.Module) -> Iterator[list[int]]:
    """Count the calls of every decoder layer of ``model`` (its language model's ``layers``)."""
    calls: list[int] = []
    handles = [layer.register_forward_pre_hook(lambda *a, i=i: calls.append(i))
               for i, layer in enumerate(model.model.language_model.layers)]
    try:
        yield calls
    finally:
        for handle in handles:
            handle.remove()


# --------------------------------------------------------------------------- scores (item 6)


class ShortScore(Selector):
    """Scores all tokens but the last."""

    def score(self, tokens):  # type: ignore[no-untyped-def]
        return tokens.features.norm(dim=-1)[:-1]


class NaNScore(Selector):
    """Scores with a NaN in the middle."""

    def score(self, tokens):  # type: ignore[no-untyped-def]
        scores = tokens.features.norm(dim=-1)
        scores[3] = float("nan")
        return scores


class BoolScore(Selector):
    """Scores with booleans."""

    def score(self, tokens):  # type: ignore[no-untyped-def]
        return tokens.features[:, 0] > 0


class ListScore(Selector):
    """Scores as a Python list."""

    def score(self, tokens):  # type: ignore[no-untyped-def]
        return [1.0] * tokens.num_tokens


class IntegerScore(Selector):
    """Integer scores are scores: the token index."""

    def score(self, tokens):  # type: ignore[no-untyped-def]
        return torch.arange(tokens.num_tokens)


@pytest.mark.parametrize(("selector", "message"), [
    (ShortScore(), r"ShortScore.score returned shape \(11,\), expected \(12,\): one score per token"),
    (NaNScore(), r"NaNScore.score returned 1 non-finite scores \(NaN or infinity; the first at token 3, nan\)"),
    (BoolScore(), r"BoolScore.score returned dtype torch.bool, expected a real floating-point or integer tensor"),
    (ListScore(), r"ListScore.score returned list, expected a tensor of shape \(12,\)"),
])
def test_selector_scores_are_checked(selector: Selector, message: str) -> None:
    tokens = make_visual_tokens(torch.randn(12, 4), grid=(3, 4))
    with pytest.raises(MethodContractError, match=message):
        selector.select(tokens, 4)


def test_integer_scores_are_accepted() -> None:
    tokens = make_visual_tokens(torch.randn(12, 4), grid=(3, 4))
    assert sorted(IntegerScore().select(tokens, 3).tolist()) == [9, 10, 11]


class NaNGate(Gate):
    """Attention-free gate whose scores are NaN."""

    def score(self, state):  # type: ignore[no-untyped-def]
        return torch.full((state.num_visual,), float("nan"))


class ShortGate(Gate):
    """Gate that forgets one token."""

    def score(self, state):  # type: ignore[no-untyped-def]
        return torch.ones(state.num_visual - 1)


def _state(keep: int = 2) -> tokred.GateState:
    attention = torch.softmax(torch.randn(2, 9, 9), dim=-1)
    return make_gate_state(attention, visual=[2, 3, 4, 5], system=[0, 1], instruction=[6, 7, 8], keep_per_image=[keep])


@pytest.mark.parametrize(("gate", "message"), [
    (NaNGate(), r"NaNGate.score returned 4 non-finite scores"),
    (ShortGate(), r"ShortGate.score returned shape \(3,\), expected \(4,\)"),
])
def test_gate_scores_are_checked(gate: Gate, message: str) -> None:
    with pytest.raises(MethodContractError, match=message):
        gate.select(_state())


def test_nan_scores_fail_the_run_before_the_language_model() -> None:
    model, processor = tiny_model("llava")
    schedule = Schedule(selector=SelectorStage(selector=NaNScore(), budget=tokred.Budget(keep=8)))
    with decoder_layer_calls(model) as calls, tokred.apply(model, schedule), pytest.raises(MethodContractError):
        model(**tiny_inputs(processor, [PROMPT]))
    assert calls == []


# ----------------------------------------------------------------------- strict types (item 7)


@pytest.mark.parametrize(("name", "options", "field"), [
    ("random", {"keep": "64"}, "keep"),
    ("random", {"keep": True}, "keep"),
    ("random", {"keep": 64.0}, "keep"),
    ("random", {"keep_ratio": "0.5"}, "keep_ratio"),
    ("random", {"keep_ratio": True}, "keep_ratio"),
    ("random", {"seed": True}, "seed"),
    ("fastv", {"layer": True}, "layer"),
    ("fastv", {"layer": 2.0}, "layer"),
    ("todre", {"gate_layer": True}, "gate_layer"),
    ("todre", {"tau": "0.1"}, "tau"),
])
def test_budgets_layers_and_numbers_are_not_coerced(name: str, options: dict, field: str) -> None:
    with pytest.raises(OptionsError, match=f"{field}: .*expected a"):
        tokred.create(name, **options)


def test_integers_of_any_kind_and_integer_ratios_are_accepted() -> None:
    import numpy as np

    assert tokred.create("random", keep=np.int64(5)).keep == 5
    assert tokred.create("random", keep_ratio=1).keep_ratio == 1.0
    assert tokred.create("fastv", layer="1/4").layer == "1/4"
    with pytest.raises(Exception, match="expected a layer index"):
        GateStage(layer=True, gate=tokred.default_registry().gate("last_token_attention"), budget=tokred.Budget(keep=4))


# ------------------------------------------------------------ checks before the decoder (item 8)


def test_a_gate_budget_above_a_variable_image_count_fails_before_any_decoder_layer() -> None:
    model, processor = tiny_model("qwen2_vl")                                 # 144 visual tokens per tiny image
    inputs = tiny_inputs(processor, [PROMPT])
    with decoder_layer_calls(model) as calls, tokred.apply(model, tokred.create("fastv", keep=200)):
        with pytest.raises(BudgetError, match="keep=200 is larger than the 144 visual tokens"):
            model(**inputs)
    assert calls == []


def test_a_gate_budget_above_the_selector_budget_fails_before_any_decoder_layer() -> None:
    model, processor = tiny_model("qwen2_vl")
    gate = tokred.default_registry().gate("last_token_attention")
    schedule = Schedule(selector=SelectorStage(selector=tokred.default_registry().selector("random"),
                                               budget=tokred.Budget(keep_ratio=0.25)),
                        gates=(GateStage(layer=2, gate=gate, budget=tokred.Budget(keep=40)),))
    with decoder_layer_calls(model) as calls, tokred.apply(model, schedule):
        with pytest.raises(BudgetError, match="keeps 40 visual tokens per image but only 36 survive the stage before"):
            model(**tiny_inputs(processor, [PROMPT]))
    assert calls == []


def test_an_impossible_selector_option_fails_at_apply_on_a_fixed_count_model() -> None:
    model, _ = tiny_model("llava")                                           # 576 tokens fixed by the config
    with pytest.raises(OptionsError, match=r"pivot='index:99999' is outside an image of 576 visual tokens"):
        tokred.apply(model, tokred.create("todre", pivot="index:99999"))


def test_an_impossible_selector_option_fails_before_any_decoder_layer_on_a_variable_count_model() -> None:
    model, processor = tiny_model("qwen2_vl")
    with decoder_layer_calls(model) as calls, tokred.apply(model, tokred.create("todre", pivot="index:99999")):
        with pytest.raises(OptionsError, match=r"outside an image of 144 visual tokens \(valid: index:0 to index:143\)"):
            model(**tiny_inputs(processor, [PROMPT]))
    assert calls == []


def test_a_selector_needing_an_input_the_model_lacks_is_refused_at_apply() -> None:
    model, _ = tiny_model("qwen2_vl")
    with pytest.raises(ScheduleError, match="needs pre_projector, which the qwen2_vl adapter cannot provide"):
        tokred.apply(model, tokred.create("star", stage1_features="pre_projector"))


# ------------------------------------------------------------------- builders for tests (item 9)


def test_make_gate_state_slices_the_given_attention_by_role() -> None:
    attention = torch.softmax(torch.randn(2, 9, 9), dim=-1)
    state = make_gate_state(attention, visual=[2, 3, 4, 5], system=[0, 1], instruction=[6, 7, 8], keep_per_image=[2])
    torch.testing.assert_close(state.attention("instruction", "visual"), attention[:, 6:9, 2:6])
    torch.testing.assert_close(state.attention("last", "visual"), attention[:, 8:9, 2:6])
    torch.testing.assert_close(state.attention("visual", "text"), attention[:, 2:6][:, :, [0, 1, 6, 7, 8]])
    assert state.num_visual == 4 and state.num_instruction == 3 and state.num_system == 2


def test_a_real_gate_runs_on_a_hand_made_state() -> None:
    attention = torch.zeros(1, 9, 9)
    attention[:, 8, 4] = attention[:, 8, 2] = 0.5                           # the last token reads tokens 4 and 2
    state = make_gate_state(attention, visual=[2, 3, 4, 5], instruction=[6, 7, 8], keep_per_image=[2])
    fastv = tokred.default_registry().gate("last_token_attention")
    assert sorted(fastv.select(state).tolist()) == [0, 2]                    # alive-relative: positions 2 and 4


def test_make_visual_tokens_checks_its_layout() -> None:
    with pytest.raises(ValueError, match="a 3x3 grid holds 9 tokens, not 12"):
        make_visual_tokens(torch.randn(12, 4), grid=(3, 3))
    tokens = make_visual_tokens(torch.randn(12, 4), grid=(3, 4), cls_attention=torch.rand(12))
    assert tokens.layout.grids == ((3, 4),) and tokens.cls_attention is not None


def test_selectors_get_the_instruction_embeddings() -> None:
    seen: list[torch.Tensor] = []

    class Recording(Selector):
        """Keeps the first k tokens and records what it was given."""

        def select(self, tokens, k):  # type: ignore[no-untyped-def]
            seen.append(tokens.instruction_embeddings)
            return torch.arange(k)

    model, processor = tiny_model("llava")
    inputs = tiny_inputs(processor, [PROMPT, PROMPT + " Please answer."])
    embeddings = model.get_input_embeddings()(inputs["input_ids"])
    schedule = Schedule(selector=SelectorStage(selector=Recording(), budget=tokred.Budget(keep=4)))
    with tokred.apply(model, schedule), torch.no_grad():
        model(**inputs)
    for sample, got in enumerate(seen):
        ids = inputs["input_ids"][sample]
        image = torch.nonzero(ids == model.config.image_token_id).flatten()
        after = torch.arange(int(image[-1]) + 1, ids.numel())
        torch.testing.assert_close(got, embeddings[sample, after])


# ---------------------------------------------------------------------- right padding (item 10)


def test_right_padding_is_refused_before_any_decoder_layer_saying_so() -> None:
    model, processor = tiny_model("llava")
    processor.tokenizer.padding_side = "right"
    inputs = tiny_inputs(processor, [PROMPT, PROMPT + " Describe every shape in the picture."])
    assert inputs["attention_mask"][0, -1] == 0
    with decoder_layer_calls(model) as calls, tokred.apply(model, tokred.create("random", keep=16)):
        with pytest.raises(RuntimeStateError, match=r"rows \[0\] has padding after real tokens \(right padding\).*"
                                                    r"padding_side='left'"):
            model.generate(**inputs, max_new_tokens=2)
    assert calls == []


# ------------------------------------------------------------------------------ labels (item 11)


def _labels(inputs: dict[str, torch.Tensor], answer_tokens: int = 4) -> torch.Tensor:
    labels = inputs["input_ids"].clone()
    labels[:, :-answer_tokens] = -100
    return labels


def test_labels_under_a_keep_everything_run_give_the_unmodified_loss() -> None:
    model, processor = tiny_model("llava")
    inputs = tiny_inputs(processor, [PROMPT, PROMPT + " Please answer."])
    with torch.no_grad():
        expected = model(**inputs, labels=_labels(inputs)).loss
        with tokred.apply(model, tokred.create("fastv").keep_everything()):
            got = model(**inputs, labels=_labels(inputs)).loss
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("method", ["random", "fastv", "todre"])
def test_labels_are_scored_on_the_surviving_positions(method: str) -> None:
    model, processor = tiny_model("llava")
    inputs = tiny_inputs(processor, [PROMPT, PROMPT + " Please answer."])
    labels = _labels(inputs)
    with tokred.apply(model, tokred.create(method, keep=16)) as run, torch.no_grad():
        out = model(**inputs, labels=labels)
    positions = run.output_positions
    assert positions is not None and out.logits.shape[:2] == positions.shape
    # By hand: the label of each output position, shifted by one output position.
    survivors = labels.gather(1, positions.clamp(min=0)).masked_fill(positions < 0, -100)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].flatten(0, 1), survivors[:, 1:].flatten(),
                                                 ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)


def test_output_positions_map_reduced_logits_to_input_columns() -> None:
    model, processor = tiny_model("llava")
    inputs = tiny_inputs(processor, [PROMPT, PROMPT + " Please answer."])
    with tokred.apply(model, tokred.create("random", keep=16)) as run, torch.no_grad():
        model(**inputs)
    positions = run.output_positions
    assert positions is not None
    length = inputs["input_ids"].shape[1]
    for row in range(2):
        real = positions[row][positions[row] >= 0]
        assert real[-1] == length - 1 and torch.all(real[1:] > real[:-1])  # in order, ending at the last column
        assert int((inputs["input_ids"][row, real] == model.config.image_token_id).sum()) == 16



# ------------------------------------------------------------------ who broke the contract (item 5)


class DuplicateSelector(Selector):
    """Returns the first index k times."""

    def select(self, tokens, k):  # type: ignore[no-untyped-def]
        return torch.zeros(k, dtype=torch.long)


class DuplicateMethod(tokred.BudgetOptions, tokred.Method):
    """For the test below: stage I by DuplicateSelector."""

    def schedule(self) -> Schedule:
        return Schedule(selector=SelectorStage(selector=DuplicateSelector(), budget=self.budget))


def test_contract_errors_name_the_registered_component_and_its_plugin() -> None:
    import types

    plugin = types.SimpleNamespace(
        __name__="dups",
        tokred_register_selectors=tokred.hookimpl(lambda register: register("dup", DuplicateSelector)),
        tokred_register_methods=tokred.hookimpl(lambda register: register("dup-method", DuplicateMethod)),
    )
    registry = tokred.Registry(entry_points=(), plugins=[tokred.adapters, plugin])
    model, processor = tiny_model("llava")
    with tokred.apply(model, registry.create("dup-method", keep=4), registry=registry):
        with pytest.raises(MethodContractError) as info:
            model(**tiny_inputs(processor, [PROMPT]))
    assert str(info.value) == "selector 'dup' (DuplicateSelector) from plugin 'dups' (in-process): select() returned duplicate indices"


def test_a_misspelt_option_gets_a_suggestion() -> None:
    with pytest.raises(OptionsError, match=r"method 'todre' has no option 'tua' \(did you mean 'tau' for 'tua'\?\)"):
        tokred.create("todre", tua=0.1)
