"""Does the SYNTHETIC PROXY work like a real LVLM? The mechanism figures of issue #26.

Each figure is measured on held-out items with the hand-built inputs of :mod:`._inputs` (no tokred
runtime involved), so that it checks the *model*, not a method:

* ``full``: accuracy per question type, unreduced; ``no_image``: no visual token at all (what the
  question alone gives, the type's prior or a little above).
* ``drop_early`` / ``drop_late``: every visual token removed from decoder layer ``L/16`` on
  (LLaVA-1.5's layer 2 of 32) / ``3L/4`` on. In a real LVLM the question keeps reading the image
  well past the first layers (FastV, PyramidDrop); a proxy that moves everything into the text in
  layer 0 cannot tell one gate from another.
* ``one_patch``: only the most covered patch the answer depends on (the one-patch oracle): no single
  token should carry the answer.
* ``random_25``: a uniformly random quarter of the visual tokens, from the input on.
* ``informative_tokens``: how many visual tokens the answer depends on, per type, and per scene
  (every object and sign patch).
* ``cls_attention``: the share of the variance of the vision tower's [CLS] attention (the layer
  LLaVA reads, mean over heads) that the patch position alone explains: near 1 means [CLS]
  attention is a fixed positional pattern, not a summary of the image.
* ``norms``: the distribution of the projected visual tokens' L2 norms (does any token stand out, as
  the high-norm "register" tokens of large ViTs do?).

Figures rank methods on this synthetic task only; they are not the papers' benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import transformers

from ._inputs import NUM_VISUAL, pixel_values, project, visual_features
from ._measure import Context, Selection, accuracy_by_kind, select_oracle, select_random
from ._scenes import KINDS, ProxyItem

__all__ = ["mechanism_figures", "select_none", "cls_attention", "early_layer", "late_layer"]


def select_none() -> Selection:
    """Keep no visual token."""

    def select(ctx: Context) -> torch.Tensor:
        return torch.zeros(len(ctx.items), 0, dtype=torch.long)

    return select


def early_layer(num_layers: int) -> int:
    """``L/16``, rounded down and at least 1: LLaVA-1.5's layer 2 of 32 at this depth."""
    return max(1, num_layers // 16)


def late_layer(num_layers: int) -> int:
    """``3L/4``, rounded down."""
    return (3 * num_layers) // 4


@torch.no_grad()
def cls_attention(model: transformers.LlavaForConditionalGeneration, pixels: torch.Tensor) -> torch.Tensor:
    """``[B, 256]``: the attention [CLS] pays each patch in the tower layer whose output LLaVA reads
    (``vision_feature_layer``), mean over heads, softmax over [CLS] and the patches."""
    tower = model.model.vision_tower
    out = tower(pixels, output_hidden_states=True)
    layers = getattr(tower, "vision_model", tower).encoder.layers  # CLIPVisionModel holds the encoder itself in 5.x
    index = model.config.vision_feature_layer % (len(layers) + 1) - 1  # the layer producing that output
    layer = layers[index]
    x = layer.layer_norm1(out.hidden_states[index])
    attn = layer.self_attn
    b, n, _ = x.shape
    q = attn.q_proj(x[:, :1]).view(b, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(b, n, attn.num_heads, attn.head_dim).transpose(1, 2)
    probs = (q @ k.transpose(-1, -2) * attn.scale).softmax(dim=-1)  # [B, H, 1, N]
    return probs.mean(dim=1)[:, 0, 1:]


def _variance_explained_by_position(values: torch.Tensor) -> float:
    """R^2 of predicting ``values`` ``[B, 256]`` by the per-position mean over images."""
    residual = values - values.mean(dim=0, keepdim=True)
    total = values - values.mean()
    return float(1 - residual.pow(2).sum() / total.pow(2).sum())


@torch.no_grad()
def mechanism_figures(model: transformers.LlavaForConditionalGeneration, processor: transformers.LlavaProcessor,
                      items: Sequence[ProxyItem], batch_size: int = 64) -> dict[str, object]:
    """Every figure of the module docstring on ``items``: accuracies as ``{"all": ..., <kind>: ...}``."""
    layers = model.config.get_text_config().num_hidden_layers
    figures: dict[str, object] = {
        "full": accuracy_by_kind(model, processor, items, None, batch_size=batch_size),
        "no_image": accuracy_by_kind(model, processor, items, select_none(), batch_size=batch_size),
        "drop_early": accuracy_by_kind(model, processor, items, select_none(), prune_layer=early_layer(layers),
                                       batch_size=batch_size),
        "drop_late": accuracy_by_kind(model, processor, items, select_none(), prune_layer=late_layer(layers),
                                      batch_size=batch_size),
        "one_patch": accuracy_by_kind(model, processor, items, select_oracle(1), batch_size=batch_size),
        "random_25": accuracy_by_kind(model, processor, items, select_random(NUM_VISUAL // 4), batch_size=batch_size),
        "layers": {"early": float(early_layer(layers)), "late": float(late_layer(layers))},
    }
    informative = {kind: [len(it.target_tokens) for it in items if it.kind == kind] for kind in KINDS}
    figures["informative_tokens"] = {kind: float(np.mean(v)) for kind, v in informative.items() if v}
    figures["informative_tokens"]["scene"] = float(np.mean(  # type: ignore[index]
        [int((it.coverage.sum(axis=0) > 0).sum()) for it in items]))
    attention, norms = [], []
    for start in range(0, len(items), batch_size):
        pixels = pixel_values([it.image for it in items[start:start + batch_size]])
        attention.append(cls_attention(model, pixels))
        norms.append(project(model, visual_features(model, pixels)).norm(dim=-1).flatten())
    attn = torch.cat(attention)
    figures["cls_attention"] = {"variance_explained_by_position": _variance_explained_by_position(attn)}
    every = torch.cat(norms)
    median = float(every.median())
    figures["norms"] = {"median": median, "p99_over_median": float(every.quantile(0.99)) / median,
                        "max_over_median": float(every.max()) / median,
                        "share_over_2x_median": float((every > 2 * median).float().mean())}
    return figures
