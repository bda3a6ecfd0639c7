"""Stage I as the vLLM integration runs it (``reduce_image``), without vLLM: the same kept indices as
tokred's transformers runtime on the same embeddings, tokens that always stay, replacement features,
and a front end / worker disagreement caught."""

from __future__ import annotations

import pytest
import torch

import tokred
from tokred import ImageLayout, Schedule, Selection, Selector, SelectorStage, VisualTokens
from tokred.compat import Keyword
from tokred.integrations.vllm._config import TokredConfig
from tokred.integrations.vllm._stage1 import reduce_image
from tokred.testing import tiny_inputs, tiny_model


def _image_embeddings(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """``[576, D]``: the LLaVA input embeddings of the image, where the unmodified multimodal model
    hands them to its language model."""
    seen: dict[str, torch.Tensor] = {}

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        seen["embeds"] = kwargs[Keyword.INPUTS_EMBEDS]

    handle = model.model.language_model.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    image = inputs["input_ids"][0] == model.config.image_token_index
    return seen["embeds"][0, image]


@pytest.mark.parametrize("config", [
    {"method": "random", "keep": 40, "seed": 3},
    {"method": "example-norm", "keep": 40, "center": True},
    {"method": "star", "keep": 20, "stage2": False},
    {"method": "todre", "keep": 40, "stage2": False, "pivot": "max_norm"},
])
def test_kept_indices_equal_the_transformers_runtime(config: dict) -> None:
    model, processor = tiny_model("llava")
    inputs = tiny_inputs(processor, ["What is shown in this image?"])
    schedule = TokredConfig.parse(config, where="test").schedule()
    with torch.no_grad(), tokred.apply(model, schedule) as run:
        model(**inputs)
    expected = run.report.images[0].kept_stage1
    embeddings = _image_embeddings(model, inputs)
    k = schedule.selector.budget.tokens_for(embeddings.shape[0])
    kept, reduction = reduce_image(schedule, embeddings, keep=k, layout=ImageLayout.grid(24, 24))
    assert reduction.record.kept_stage1 == expected == reduction.kept_in_run
    assert torch.equal(kept, embeddings[expected])


class _Merge(Selector):
    """Keeps the first ``k`` tokens and replaces their features by their negatives."""

    def select(self, tokens: VisualTokens, k: int) -> Selection:
        index = torch.arange(k - 1, -1, -1)   # unsorted on purpose
        return Selection(index, -tokens.features[index])


def test_non_candidates_always_stay_and_replacement_features_land_on_their_tokens() -> None:
    run = torch.arange(10, dtype=torch.float32)[:, None].repeat(1, 3)      # [10, 3], row i holds i
    newlines = torch.tensor([4, 9])
    candidates = torch.tensor([0, 1, 2, 3, 5, 6, 7, 8])
    schedule = Schedule(selector=SelectorStage(selector=_Merge(), budget=tokred.Budget(keep=3)))
    kept, reduction = reduce_image(schedule, run, keep=5, layout=ImageLayout.grid(2, 4), candidates=candidates,
                                   describe=lambda c: type(c).__name__)
    assert reduction.kept_in_run == [0, 1, 2, 4, 9]
    assert reduction.record.kept_stage1 == [0, 1, 2]
    assert torch.equal(kept[:, 0], torch.tensor([0.0, -1.0, -2.0, 4.0, 9.0]))
    assert newlines.tolist() == [i for i in reduction.kept_in_run if i not in candidates.tolist()]


def test_a_budget_the_processor_did_not_count_is_caught() -> None:
    schedule = TokredConfig.parse({"method": "random", "keep": 4}, where="t").schedule()
    with pytest.raises(RuntimeError, match="the processor left 5 placeholders"):
        reduce_image(schedule, torch.zeros(16, 2), keep=5, layout=ImageLayout.grid(4, 4))


def test_contract_violations_name_the_selector() -> None:
    class _Twice(Selector):
        def select(self, tokens: VisualTokens, k: int) -> torch.Tensor:
            return torch.zeros(k, dtype=torch.long)

    schedule = Schedule(selector=SelectorStage(selector=_Twice(), budget=tokred.Budget(keep=2)))
    with pytest.raises(tokred.MethodContractError, match="unregistered selector _Twice.*duplicate indices"):
        reduce_image(schedule, torch.zeros(4, 2), keep=2, layout=ImageLayout.grid(2, 2))
