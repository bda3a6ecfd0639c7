"""VisionZip: the pure function against the authors' outputs, the key metric, the selector."""

from __future__ import annotations

import pytest
import torch
import tokred
from tokred.testing import make_visual_tokens
from tokred_baselines import VisionZipSelector, contextual_count, visionzip_merge


def _authors_tokens(case: dict) -> tuple[torch.Tensor, object]:
    """The authors' ``[dominant + contextual, D_v]`` output rebuilt from ours: [CLS] row, the
    dominant patches' rows, the contextual tokens (``clip_encoder.py`` 57 and 83)."""
    dominant, contextual = int(case["dominant"]), int(case["contextual"])
    result = visionzip_merge(case["cls_attention_heads"][:, 1:], case["hidden"][1:], case["metric"][1:],
                             dominant - 1, contextual)
    patches = case["hidden"][1:]
    return torch.cat([case["hidden"][:1], patches[result.dominant], result.contextual]), result


@pytest.mark.reference("visionzip")
def test_reproduces_the_authors_tokens(case: dict) -> None:
    """``CLIPVisionTower_VisionZip.forward`` (dvlab-research/VisionZip@3151f6d, clip_encoder.py 31-85):
    the dominant and target patches exactly, the tokens within float tolerance."""
    tokens, result = _authors_tokens(case)
    assert torch.equal(result.dominant, case["dominant_patches_sorted"])
    assert torch.equal(torch.sort(case["all_indices"][1:] - 1).values, result.dominant)
    assert torch.equal(result.targets, case["contextual_target_patches"])
    assert tokens.shape == case["tokens"].shape
    torch.testing.assert_close(tokens, case["tokens"], rtol=1e-5, atol=1e-6)


@pytest.mark.reference("visionzip", ["clip24_n144_d28_c4"])
def test_the_metric_is_the_head_mean_of_the_layer_keys(case: dict) -> None:
    """What tokred's ``vision_keys`` captures (``tokred.adapters.base.key_rows``) is the authors'
    metric: ``k_proj(layer_norm1(x))`` of the feature layer, reshaped to heads and averaged."""
    from tokred.adapters.base import key_rows

    x = torch.nn.functional.layer_norm(case["layer_input"], (case["layer_input"].shape[-1],), case["ln1_weight"],
                                       case["ln1_bias"], float(case["ln_eps"]))
    keys = x @ case["k_proj_weight"].T + case["k_proj_bias"]                    # [N + 1, H * d]
    heads = int(case["num_heads"])
    per_head = keys.view(keys.shape[0], heads, -1).transpose(0, 1)[None]        # [1, H, N + 1, d]
    torch.testing.assert_close(key_rows(per_head)[0], case["metric"], rtol=1e-5, atol=1e-6)


@pytest.mark.reference("visionzip")
def test_the_head_mean_ranks_as_the_head_sum(case: dict) -> None:
    """tokred captures the head *mean* of the [CLS] attention; the dominant patches are the same."""
    dominant, contextual = int(case["dominant"]) - 1, int(case["contextual"])
    mean = case["cls_attention_heads"][:, 1:].mean(dim=0)
    result = visionzip_merge(mean, case["hidden"][1:], case["metric"][1:], dominant, contextual)
    assert torch.equal(result.dominant, case["dominant_patches_sorted"])


def test_contextual_count_gives_the_readme_splits() -> None:
    ratio = 10 / 64
    assert [contextual_count(k, ratio) for k in (64, 128, 192)] == [10, 20, 30]
    assert contextual_count(1, ratio) == 0 and contextual_count(576, 0.0) == 0


def _tokens(n: int = 36, seed: int = 0, **extra: object) -> tokred.VisualTokens:
    g = torch.Generator().manual_seed(seed)
    pre = torch.randn(n, 6, generator=g)
    weight = torch.randn(6, 10, generator=g)
    project = lambda rows: torch.tanh(rows @ weight)  # noqa: E731 - a stand-in projector
    return make_visual_tokens(project(pre), grid=(6, n // 6), cls_attention=torch.rand(n, generator=g),
                              pre_projector=pre, vision_keys=torch.randn(n, 4, generator=g), project=project)


def test_selector_merges_before_the_projector_and_keeps_exactly_k() -> None:
    tokens = _tokens()
    selection = VisionZipSelector(contextual_ratio=0.25).select(tokens, 12)
    c = contextual_count(12, 0.25)
    result = visionzip_merge(tokens.cls_attention, tokens.pre_projector, tokens.vision_keys, 12 - c, c)
    assert selection.indices.tolist() == torch.cat([result.dominant, result.targets]).tolist()
    assert torch.unique(selection.indices).numel() == 12
    torch.testing.assert_close(selection.features[: 12 - c], tokens.features[result.dominant])
    torch.testing.assert_close(selection.features[12 - c:], tokens.project(result.contextual))


def test_selector_keep_everything_is_exact() -> None:
    tokens = _tokens()
    selection = VisionZipSelector().select(tokens, 36)
    order = torch.argsort(selection.indices)
    assert selection.indices[order].tolist() == list(range(36))
    assert torch.equal(selection.features[order], tokens.features)


def test_refused_on_models_without_cls_attention() -> None:
    from tokred.testing import tiny_model

    model, _ = tiny_model("qwen2_vl")
    with pytest.raises(tokred.ScheduleError, match="cls_attention.*pre_projector.*vision_keys"):
        tokred.apply(model, tokred.create("visionzip"))
