"""``visionzip``: VisionZip, dominant plus merged contextual tokens (Yang et al., CVPR 2025).

Stage I, before the language model, on the vision encoder's side. Code:
``dvlab-research/VisionZip@3151f6df4fca36a4cd1c985e5956e725b1f9ad02``: the selection and merge in
``visionzip/clip_encoder.py`` 31-85 (``CLIPVisionTower_VisionZip.forward``), the key metric in
``visionzip/utils.py`` 10-135, the projector after merging in ``visionzip/llava_arch.py`` 31-35.
What the code does, which we follow:

* **inputs**, all from the vision encoder's feature layer (LLaVA's ``vision_feature_layer=-2``,
  ``utils.py`` 186-200 sets the metric layer to the same one): the [CLS] token's attention to the
  patches (``attn[:, :, 0, 1:]``, 51), the layer's output features before the projector (44), and
  the layer's key states averaged over heads (``raw_key_states.mean(1)``, ``utils.py`` 24 and 89);
* **dominant tokens** (51-57): the patches with the highest [CLS] attention summed over heads
  (``topk``), kept with their own features, in ascending patch order;
* **contextual tokens** (60-80): the remaining patches in ascending order; targets at a uniform
  stride *in that list*, ``step = max(1, M // contextual)``, ``arange(0, M, step)[:contextual]``
  (67-68); every other remaining patch is assigned to the target whose L2-normalised key is most
  similar (``argmax``, the first target on ties, 72-74); each contextual token is **the target's own
  feature plus the mean of its assigned patches' features** (75-80), a target with none stays as it is;
* merging happens on the **pre-projector** features; the projector then maps the merged rows
  (``encode_images_visionzip``, ``llava_arch.py`` 31-35).

Where tokred's contract forces a difference, :func:`visionzip_merge` reproduces the authors' output
given the authors' counts (tested against their fixtures) and the registered selector differs:

* the code keeps the vision [CLS] token as an LLM token and counts it among the ``dominant``
  (``visionzip(model, dominant=54, contextual=10)`` keeps [CLS] + 53 patches + 10 merged tokens).
  tokred cannot place a token that has no image position, so the selector keeps no [CLS] and gives
  its slot to one more dominant patch: a budget of ``k`` is ``k - c`` dominant patches and ``c``
  contextual tokens;
* a contextual token takes the position (and the index in the run report) of its target patch
  (**ours**: the code appends contextual tokens after the dominant ones, in target order, and
  renumbers positions);
* the [CLS] attention tokred captures is the head *mean*, not the sum: the same ranking.

Choices neither the paper nor the code fixes (**ours**):

* the split of the budget: ``c = round_half_up(contextual_ratio * k)`` contextual tokens, default
  ``contextual_ratio = 10/64``, which gives the README's 10 of 64, 20 of 128 and 30 of 192 (the
  code's counts are absolute);
* a contextual token that merged no other patch keeps the model's own projected feature (equal to
  projecting its pre-projector row, without a second projector call), so keeping every token is
  exact;
* tiled images: ``spread="tiles"`` by default, so every tile (and the thumbnail) is reduced on its
  own with a share of the budget in proportion to its tokens, as the code reduces every crop of
  LLaVA-NeXT with the same counts (``llava_arch.py`` 91-135);
* InternVL's merged 2x2 tokens carry the concatenated keys of their four patches (the adapter's
  rule, alike their features); the code supports CLIP only.

Families: the selector needs the [CLS] attention, the vision keys and the pre-projector features
(:meth:`VisionZipSelector.required_inputs`), so ``tokred.apply`` refuses it on Qwen2/2.5/3-VL
and LLaVA-OneVision, whose vision towers (Qwen's ViT, SigLIP) have no [CLS] token, with a :class:`~tokred.ScheduleError` naming the missing
inputs.

Cost: ``O(N log N)`` for the dominant top-k and ``O(M c D_k)`` for the assignment, plus one
projector call on the ``c`` merged rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal, TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: `tokred list` starts without it
    import torch
from pydantic import Field
from tokred import BudgetOptions, Method, RuntimeStateError, Schedule, Selection, Selector, SelectorStage, VisualTokens
from tokred.components import top_k_indices
from tokred.options import Number

from ._common import PositionsOption

__all__ = ["VisionZipResult", "visionzip_dominant", "visionzip_merge", "contextual_count", "VisionZipSelector",
           "VisionZipMethod"]

#: The README's split, 10 contextual of 64 tokens (``visionzip(model, dominant=54, contextual=10)``).
DEFAULT_CONTEXTUAL_RATIO = 10 / 64


@dataclass(frozen=True)
class VisionZipResult:
    """What :func:`visionzip_merge` returns for one image (or crop) of ``N`` patches.

    Attributes:
        dominant: ``[d]`` long, the dominant patches, ascending.
        targets: ``[c]`` long, the patch each contextual token is anchored to, ascending (the
            code's target order).
        contextual: ``[c, D_v]`` the contextual tokens' pre-projector features: the target's
            feature plus the mean of the features of the patches assigned to it.
        merged: ``[c]`` long, how many other patches each contextual token absorbed (0: the
            target's feature unchanged).
    """

    dominant: torch.Tensor
    targets: torch.Tensor
    contextual: torch.Tensor
    merged: torch.Tensor


def visionzip_dominant(cls_attention: torch.Tensor, dominant: int) -> torch.Tensor:
    """``[dominant]`` long, ascending: the patches with the highest [CLS] attention.

    ``cls_attention`` is ``[H, N]`` (per head: summed over heads, as ``clip_encoder.py`` 52 does) or
    ``[N]`` (already reduced over heads; a head mean ranks the same). Ties go to the lower index
    (tokred's :func:`~tokred.top_k_indices`; the code's ``topk`` leaves them unspecified)."""
    import torch

    scores = cls_attention.detach().float()
    if scores.dim() == 2:
        scores = scores.sum(dim=0)
    if scores.dim() != 1:
        raise ValueError(f"cls_attention must be [H, N] or [N], got shape {tuple(cls_attention.shape)}")
    if not 0 <= dominant <= scores.numel():
        raise ValueError(f"dominant must lie in 0..{scores.numel()}, got {dominant}")
    return torch.sort(top_k_indices(scores.cpu(), dominant)).values


def visionzip_merge(cls_attention: torch.Tensor, features: torch.Tensor, keys: torch.Tensor, dominant: int,
                    contextual: int) -> VisionZipResult:
    """VisionZip's dominant selection and contextual merge for one image of ``N`` patches
    (``clip_encoder.py`` 51-80), without the [CLS] token.

    To reproduce the code's output for ``visionzip(model, dominant=D, contextual=C)``: pass the
    patches' rows only (``cls_attention[:, 1:]``, ``hidden[1:]``, ``metric[1:]``) and
    ``dominant=D - 1``; the code's tokens are then ``[hidden[0], hidden[1:][dominant], contextual]``.

    Args:
        cls_attention: ``[H, N]`` or ``[N]`` [CLS] -> patch attention at the feature layer.
        features: ``[N, D_v]`` the feature layer's output (pre-projector).
        keys: ``[N, D_k]`` the feature layer's key states, averaged over heads (the code's metric).
        dominant: patches kept by [CLS] attention.
        contextual: merged tokens made from the rest, ``0 <= contextual <= N - dominant``.

    Returns:
        A :class:`VisionZipResult`; the merged features are computed in float32 or wider.
    """
    import torch

    n = int(features.shape[0])
    if keys.shape[0] != n:
        raise ValueError(f"keys have {keys.shape[0]} rows for {n} features")
    dominant_index = visionzip_dominant(cls_attention, dominant).to(features.device)
    remaining_mask = torch.ones(n, dtype=torch.bool, device=features.device)
    remaining_mask[dominant_index] = False
    remaining = torch.nonzero(remaining_mask).flatten()                       # [M], ascending
    m = int(remaining.numel())
    if not 0 <= contextual <= m:
        raise ValueError(f"contextual must lie in 0..{m} (the patches left after {dominant} dominant ones), got {contextual}")
    accumulate = torch.promote_types(features.dtype, torch.float32)
    empty = torch.zeros(0, dtype=torch.long, device=features.device)
    if contextual == 0:
        nothing = torch.zeros(0, features.shape[1], dtype=accumulate, device=features.device)
        return VisionZipResult(dominant_index, empty, nothing, empty)
    metric = keys.detach()[remaining].to(accumulate)
    metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-12)     # [M, D_k]
    step = max(1, m // contextual)
    target_pos = torch.arange(0, m, step, device=features.device)[:contextual]  # positions in the remaining list
    is_target = torch.zeros(m, dtype=torch.bool, device=features.device)
    is_target[target_pos] = True
    others = torch.nonzero(~is_target).flatten()
    hidden = features.detach()[remaining].to(accumulate)                       # [M, D_v]
    assignment = torch.argmax(metric[others] @ metric[target_pos].T, dim=1)    # [M - c], first target on ties
    sums = torch.zeros(contextual, hidden.shape[1], dtype=accumulate, device=features.device)
    sums.index_add_(0, assignment, hidden[others])
    merged = torch.bincount(assignment, minlength=contextual)
    contextual_features = hidden[target_pos] + sums / merged.clamp(min=1).unsqueeze(-1).to(accumulate)
    return VisionZipResult(dominant_index, remaining[target_pos], contextual_features, merged)


def contextual_count(k: int, ratio: float) -> int:
    """Contextual tokens of a budget of ``k``: ``floor(ratio * k + 0.5)``, at most ``k - 1`` so that
    one dominant token always remains (ours; ``ratio=10/64`` gives 10 of 64, 20 of 128, 30 of 192)."""
    return max(0, min(k - 1, math.floor(ratio * k + 0.5)))


class VisionZipSelector(Selector):
    """VisionZip (Yang et al., CVPR 2025): keep the patches the vision [CLS] token attends to most
    and merge the rest into a few contextual tokens, before the projector.

    ``select(tokens, k)`` keeps ``k - c`` dominant patches (``tokens.cls_attention``) and ``c``
    contextual tokens (:func:`contextual_count`), each anchored at its target patch, merged on
    ``tokens.pre_projector`` with ``tokens.vision_keys`` as the similarity metric
    (:func:`visionzip_merge`) and projected with ``tokens.project``. It returns a
    :class:`~tokred.Selection` whose features are the model's own projected features for dominant
    and unmerged tokens and the projected merges for the others.
    """

    inputs: ClassVar[frozenset[str]] = frozenset({"cls_attention", "vision_keys", "pre_projector"})

    contextual_ratio: Number = Field(
        DEFAULT_CONTEXTUAL_RATIO, ge=0.0, lt=1.0,
        description="Share of the budget given to merged contextual tokens, rounded half up (default 10/64, ours: "
        "the README's 54 + 10 split without the [CLS] token).",
    )

    def required_inputs(self) -> frozenset[str]:
        """All three: without [CLS] attention, vision keys or pre-projector features there is no VisionZip."""
        return self.inputs

    def select(self, tokens: VisualTokens, k: int) -> Selection:
        import torch

        if tokens.cls_attention is None or tokens.vision_keys is None or tokens.pre_projector is None:
            raise RuntimeStateError("visionzip needs the [CLS] attention, the vision keys and the pre-projector "
                                    "features, and this model's adapter did not provide all three")
        c = contextual_count(k, self.contextual_ratio)
        result = visionzip_merge(tokens.cls_attention, tokens.pre_projector, tokens.vision_keys, k - c, c)
        device = tokens.features.device
        indices = torch.cat([result.dominant, result.targets]).to(device)
        features = tokens.features[indices].clone()                            # [k, D]
        merged = torch.nonzero(result.merged > 0).flatten()
        if merged.numel():
            if tokens.project is None:
                raise RuntimeStateError("visionzip merges pre-projector features, but this model's adapter offers no "
                                        "projector (Adapter.projector) to map them")
            rows = result.contextual[merged].to(tokens.pre_projector.dtype)
            features[result.dominant.numel() + merged.to(device)] = tokens.project(rows).to(features.dtype).to(device)
        return Selection(indices.cpu(), features)


class VisionZipMethod(PositionsOption, BudgetOptions, Method):
    """VisionZip: dominant tokens by vision [CLS] attention plus merged contextual tokens, before the LLM (Yang et al., CVPR 2025).

    Options: ``keep`` / ``keep_ratio`` (default ``keep_ratio=0.111``, 64 of 576: the README's
    setting), ``contextual_ratio`` (default 10/64, ours), ``spread`` (default ``"tiles"``: every
    tile reduced on its own, as the code reduces every crop) and ``positions``. Refused on Qwen-VL
    (no vision [CLS] token).
    """

    default_keep_ratio = 0.111

    spread: Literal["image", "tiles"] = Field(
        "tiles",
        description="'tiles' (default: each tile and the thumbnail reduced on its own with a proportional share, as the "
        "code reduces every crop) or 'image' (one pool over all of an image's tokens).",
    )
    contextual_ratio: Number = Field(
        DEFAULT_CONTEXTUAL_RATIO, ge=0.0, lt=1.0,
        description="Share of the budget given to merged contextual tokens, rounded half up (default 10/64, ours).",
    )

    def schedule(self) -> Schedule:
        return Schedule(
            selector=SelectorStage(selector=VisionZipSelector(contextual_ratio=self.contextual_ratio), budget=self.budget),
            positions=self.positions,
        )
