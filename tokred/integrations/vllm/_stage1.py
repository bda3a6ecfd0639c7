"""The one place where the vLLM integration calls a tokred Selector (stage I).

To be replaced by the engine-neutral stage-I function of the core once it exists.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["select_image"]


def select_image(stage: Any, features: torch.Tensor, layout: Any, k: int, *,
                 pre_projector: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``stage.selector`` on one image's ``[N, D]`` embeddings; keep ``k``.

    Returns ``(indices, kept)``: the kept indices in spatial (ascending) order and their ``[k, D]``
    embeddings (replacement features for merging selectors)."""
    import tokred

    n = features.shape[0]
    if k == n:
        return torch.arange(n), features
    if stage.budget.spread != "image":
        raise NotImplementedError("tokred in vLLM: budgets spread over tiles are not supported yet")
    if "cls_attention" in stage.selector.inputs:
        raise tokred.OptionsError(
            f"{type(stage.selector).__name__} asks for the vision [CLS] attention, which vLLM's vision towers "
            "do not expose; choose the selector's option that does without it (e.g. todre pivot='max_norm')"
        )
    tokens = tokred.VisualTokens(features=features, layout=layout, pre_projector=pre_projector)
    result = stage.selector.select(tokens, k)
    selection = result if isinstance(result, tokred.Selection) else tokred.Selection(result)
    indices = selection.indices.detach().long().cpu()
    if indices.numel() != k or torch.unique(indices).numel() != k or int(indices.min()) < 0 or int(indices.max()) >= n:
        raise tokred.MethodContractError(
            f"{type(stage.selector).__name__}.select must return {k} distinct indices in 0..{n - 1}"
        )
    order = torch.argsort(indices)
    indices = indices[order]
    if selection.features is not None:
        kept = selection.features[order.to(selection.features.device)].to(features.dtype)
    else:
        kept = features[indices.to(features.device)]
    return indices, kept
