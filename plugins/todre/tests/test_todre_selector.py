"""Stage I: pivot rules and the Selector, on hand-built VisualTokens and on the tiny LLaVA."""

from __future__ import annotations

import pytest
import torch

import tokred
from tokred import ImageLayout, VisualTokens
from tokred.testing import FAMILIES, tiny_inputs, tiny_model
from tokred_todre import DiversitySelector, k_center, max_sum_diversity, pivot_index


def _tokens(n: int = 12, d: int = 5, *, cls: torch.Tensor | None = None, layout: ImageLayout | None = None,
            seed: int = 0) -> VisualTokens:
    features = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return VisualTokens(features=features, layout=layout or ImageLayout.grid(3, n // 3), cls_attention=cls)


def _tiled(tiles: list[int], thumbnail: int) -> ImageLayout:
    tile = torch.tensor(tiles)
    idx = torch.arange(len(tiles))
    return ImageLayout(tile=tile, row=idx, col=idx, grids=((1, len(tiles)),) * (max(tiles) + 1),
                       thumbnail_tile=thumbnail)


def test_pivot_is_the_cls_argmax() -> None:
    cls = torch.tensor([0.1, 0.3, 0.05, 0.9, 0.2, 0.9, 0.0, 0.1, 0.1, 0.1, 0.1, 0.1])
    assert pivot_index(_tokens(cls=cls), "cls_attention") == 3                  # tie 3 / 5: lowest index


def test_tiled_pivot_uses_the_thumbnail_only() -> None:
    # Tokens 0-3 belong to a high-resolution tile, 4-7 to the global thumbnail (tile 1).
    layout = _tiled([0, 0, 0, 0, 1, 1, 1, 1], thumbnail=1)
    cls = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.1, 0.3, 0.2, 0.05])
    norms = torch.tensor([9.0, 9.0, 9.0, 9.0, 1.0, 2.0, 4.0, 3.0])
    tokens = VisualTokens(features=norms[:, None] * torch.ones(8, 4), layout=layout, cls_attention=cls)
    assert pivot_index(tokens, "cls_attention") == 5
    assert pivot_index(tokens, "max_norm") == 6


def test_extra_tokens_are_never_the_pivot() -> None:
    # A kept [CLS] token (or a row separator) carries the highest score but is not a patch.
    cls = torch.tensor([0.99, 0.2, 0.5, 0.1, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])
    layout = ImageLayout.grid(3, 3, leading_extra=1)
    tokens = VisualTokens(features=torch.randn(10, 4), layout=layout, cls_attention=cls)
    assert pivot_index(tokens, "cls_attention") == 2


def test_without_cls_the_pivot_falls_back_to_max_norm() -> None:
    tokens = _tokens(cls=None)
    norms = tokens.features.norm(dim=1)
    assert pivot_index(tokens, "cls_attention") == int(norms.argmax()) == pivot_index(tokens, "max_norm")


def test_index_pivot() -> None:
    tokens = _tokens()
    assert pivot_index(tokens, "index:0") == 0
    assert pivot_index(tokens, "index:11") == 11
    with pytest.raises(ValueError, match="outside"):
        pivot_index(tokens, "index:12")


def test_mismatched_cls_attention_is_refused() -> None:
    with pytest.raises(ValueError, match="cls_attention has 5 entries"):
        pivot_index(_tokens(cls=torch.rand(5)), "cls_attention")


@pytest.mark.parametrize("rule", ["index:", "index:-1", "index:01", "cls", "MAX_NORM", "index:2 "])
def test_invalid_pivot_rules(rule: str) -> None:
    with pytest.raises(ValueError):
        DiversitySelector(pivot=rule)
    with pytest.raises(tokred.OptionsError, match="pivot"):
        tokred.default_registry().selector("todre.diversity", pivot=rule)


@pytest.mark.parametrize("objective, fn", [("max_sum", max_sum_diversity), ("k_center", k_center)])
def test_select_runs_the_greedy_from_the_pivot(objective: str, fn) -> None:
    cls = torch.zeros(12)
    cls[7] = 1.0
    tokens = _tokens(cls=cls)
    chosen = DiversitySelector(objective=objective).select(tokens, 5)
    assert chosen.tolist() == fn(tokens.features, 5, 7).tolist()
    assert chosen[0] == 7                                                       # chosen order, pivot first


def test_keeping_everything_skips_the_greedy_loop() -> None:
    tokens = _tokens(cls=torch.rand(12))
    assert DiversitySelector().select(tokens, 12).tolist() == list(range(12))


def test_registered_selector_and_options() -> None:
    selector = tokred.default_registry().selector("todre.diversity", objective="k_center", pivot="index:3")
    assert isinstance(selector, DiversitySelector)
    assert selector.inputs == frozenset()  # the index pivot needs no [CLS] attention captured
    assert DiversitySelector().inputs == frozenset({"cls_attention"})
    with pytest.raises(tokred.OptionsError, match="objective"):
        tokred.default_registry().selector("todre.diversity", objective="max_min")


def _record_selection(family: str) -> tuple[list[VisualTokens], tokred.Run]:
    """Run a recording DiversitySelector (keep=20) on one tiny-model prompt of ``family``."""
    model, processor = tiny_model(family)
    inputs = tiny_inputs(processor, ["What is shown in this image?"])
    seen: list[VisualTokens] = []

    class Recording(DiversitySelector):
        def select(self, tokens: VisualTokens, k: int) -> torch.Tensor:
            seen.append(tokens)
            return super().select(tokens, k)

    schedule = tokred.Schedule(selector=tokred.SelectorStage(selector=Recording(), budget=tokred.Budget(keep=20)))
    with tokred.apply(model, schedule) as run, torch.no_grad():
        model(**inputs)
    return seen, run


def test_on_llava_the_pivot_is_the_cls_argmax_and_is_kept() -> None:
    """On the tiny LLaVA the runtime hands the vision tower's [CLS] attention to the selector."""
    (tokens,), run = _record_selection("llava")
    assert tokens.cls_attention is not None and tokens.cls_attention.shape == (576,)
    pivot = int(tokens.cls_attention.argmax())
    expected = sorted(max_sum_diversity(tokens.features, 20, pivot).tolist())
    assert run.report.images[0].kept_stage1 == expected                        # spatial order restored
    assert pivot in expected


@pytest.mark.skipif("qwen2_5_vl" not in FAMILIES, reason="no tiny Qwen2.5-VL in this tokred")
def test_on_qwen_without_cls_the_pivot_is_the_max_norm_token() -> None:
    """Qwen-VL's vision encoder has no [CLS] token: the documented fallback picks the pivot."""
    (tokens,), run = _record_selection("qwen2_5_vl")
    assert tokens.cls_attention is None
    pivot = int(tokens.features.float().norm(dim=1).argmax())
    assert pivot_index(tokens, "cls_attention") == pivot
    expected = sorted(max_sum_diversity(tokens.features, 20, pivot).tolist())
    assert run.report.images[0].kept_stage1 == expected
