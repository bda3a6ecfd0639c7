"""The two kinds of reduction components: :class:`Selector` (stage I) and :class:`Gate` (stage II).

A component is a small pydantic model whose fields are its options (``extra="forbid"``, every field
described). Its author writes one method:

* a Selector writes ``score(tokens) -> [N]`` (higher is kept) *or* ``select(tokens, k) -> [k]``;
* a Gate writes ``score(state) -> [V]`` *or* ``select(state) -> [k]``.

Everything else (budgets, top-k, sorting back to spatial order, checking the returned indices,
gathering, bookkeeping) is the runtime's job, so every method is held to the same contract.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from .tokens import GateState, Selection, VisualTokens

__all__ = ["Component", "Selector", "Gate", "top_k_indices"]


class Component(BaseModel):
    """Base of selectors and gates: a frozen, validated set of options."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest ``scores`` (``[N]``), ties broken towards the lower index.

    ``torch.topk`` does not promise an order among equal values; a stable descending sort does, and
    deterministic tie-breaking is what makes kept indices reproducible across batch compositions.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [N], got shape {tuple(scores.shape)}")
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return order[:k]


class Selector(Component):
    """Stage I: chooses which visual tokens of one image enter the language model.

    Subclasses override :meth:`score` or :meth:`select`. The runtime passes ``k`` already resolved
    from the stage's budget, checks the result (``k`` unique indices in range) and restores spatial
    order, so ``select`` may return indices in any order.
    """

    #: Optional inputs the selector reads; the runtime captures only these. Possible values:
    #: ``"cls_attention"`` (vision [CLS] -> patch attention) and ``"pre_projector"`` features.
    inputs: ClassVar[frozenset[str]] = frozenset()

    def score(self, tokens: VisualTokens) -> torch.Tensor:
        """Importance of each token: ``[N]`` float, higher is kept."""
        raise NotImplementedError(f"{type(self).__name__} must override score() or select()")

    def select(self, tokens: VisualTokens, k: int) -> torch.Tensor | Selection:
        """Indices ``[k]`` of the tokens to keep (any order), or a :class:`Selection` with features."""
        return top_k_indices(self.score(tokens), k)


class Gate(Component):
    """Stage II: decides, at one decoder layer, which of a sample's alive visual tokens stay.

    Subclasses override :meth:`score` (ranked per image against ``state.keep_per_image``, or per
    tile against ``state.keep_per_tile`` when the budget is spread over tiles) or
    :meth:`select` (free choice, e.g. all-or-none). Tokens not returned are removed from this layer
    on, for the rest of the prefill and for every decoding step.
    """

    #: Whether the gate needs a budget. All-or-none gates (ToDRE's) set this to ``False``.
    requires_budget: ClassVar[bool] = True

    def score(self, state: GateState) -> torch.Tensor:
        """Importance of each alive visual token: ``[V]`` float, higher is kept."""
        raise NotImplementedError(f"{type(self).__name__} must override score() or select()")

    def select(self, state: GateState) -> torch.Tensor:
        """Alive-relative indices ``[k]`` (into ``0..V-1``) of the visual tokens that stay."""
        if state.keep_per_image is None:
            raise NotImplementedError(f"{type(self).__name__} has no budget; it must override select()")
        scores = self.score(state).detach().float().cpu()
        if scores.shape != (state.num_visual,):
            raise ValueError(f"{type(self).__name__}.score returned shape {tuple(scores.shape)}, expected ({state.num_visual},)")
        kept = []
        for image, k in enumerate(state.keep_per_image):
            in_image = state.visual_image == image
            if state.keep_per_tile is None or state.visual_tile is None:
                groups = [(in_image, k)]
            else:
                groups = [(in_image & (state.visual_tile == tile), k_tile)
                          for tile, k_tile in enumerate(state.keep_per_tile[image])]
            for in_group, k_group in groups:
                members = torch.nonzero(in_group).flatten()
                kept.append(members[top_k_indices(scores[members], k_group)])
        return torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long)
