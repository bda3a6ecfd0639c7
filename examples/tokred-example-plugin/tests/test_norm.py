"""What the example.norm selector keeps: the largest-norm tokens, or with center=True the outliers."""

from __future__ import annotations

import pytest
import tokred
import torch
from tokred import ImageLayout, VisualTokens
from tokred.testing import tiny_inputs
from tokred_example import NormMethod, NormSelector

# Five tokens with 2-d features. Raw norms: 10, 10, 10, 10.05, 0. Distances from the mean feature
# (8, 0.2): 2.01, 2.01, 2.01, 2.15, 8.0.
FEATURES = torch.tensor([[10.0, 0.0], [10.0, 0.0], [10.0, 0.0], [10.0, 1.0], [0.0, 0.0]])


def _tokens(features: torch.Tensor) -> VisualTokens:
    return VisualTokens(features=features, layout=ImageLayout.grid(1, features.shape[0]))


def test_keeps_the_largest_norms() -> None:
    selector = NormSelector()
    assert torch.allclose(selector.score(_tokens(FEATURES)), torch.tensor([10.0, 10.0, 10.0, 101.0**0.5, 0.0]))
    assert selector.select(_tokens(FEATURES), 1).tolist() == [3]
    assert selector.select(_tokens(FEATURES), 2).tolist() == [3, 0]   # equal norms: the lower index first


def test_center_keeps_the_token_farthest_from_the_mean() -> None:
    assert NormSelector(center=True).select(_tokens(FEATURES), 1).tolist() == [4]
    assert NormSelector(center=True).select(_tokens(FEATURES), 2).tolist() == [4, 3]


def test_scores_half_precision_features_in_float32() -> None:
    # 300^2 overflows float16; the score must not.
    scores = NormSelector().score(_tokens(torch.full((3, 4), 300.0, dtype=torch.float16)))
    assert scores.dtype == torch.float32
    assert torch.allclose(scores, torch.full((3,), 600.0))


def test_method_options() -> None:
    assert tokred.create("example-norm").schedule().selector.budget.tokens_for(576) == 144   # keep_ratio 0.25
    method = tokred.create("example-norm", keep=64, center=True)
    assert isinstance(method, NormMethod)
    assert method.schedule().selector.selector == NormSelector(center=True)
    with pytest.raises(tokred.OptionsError):
        tokred.create("example-norm", centre=True)


def test_keeps_the_largest_projected_features_of_a_llava_image(tiny_model) -> None:
    """End to end: the kept indices are the top 32 norms of what LLaVA's projector produced,
    captured here with a hook of our own."""
    model, processor = tiny_model("llava")
    inputs = tiny_inputs(processor, ["What is shown in this image?"])
    projected = []
    handle = model.model.multi_modal_projector.register_forward_hook(lambda m, a, out: projected.append(out))
    try:
        with tokred.apply(model, tokred.create("example-norm", keep=32)) as run, torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    norms = projected[0][0].float().norm(dim=-1)                       # [576]
    assert run.report.kept_indices == [sorted(norms.topk(32).indices.tolist())]
    assert run.report.visual_tokens_per_layer == [[32]] * model.config.text_config.num_hidden_layers
