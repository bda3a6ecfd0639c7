"""The two kinds of reduction components: :class:`Selector` (stage I) and :class:`Gate` (stage II).

A component is a small pydantic model whose fields are its options (``extra="forbid"``, every field
described). Its author writes one method:

* a Selector writes ``score(tokens) -> [N]`` (higher is kept) *or* ``select(tokens, k) -> [k]``;
* a Gate writes ``score(state) -> [V]`` *or* ``select(state) -> [k]``.

Everything else (budgets, top-k, sorting back to spatial order, checking the returned indices,
gathering, bookkeeping) is the runtime's job, so every method is held to the same contract.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

from .errors import MethodContractError
from .tokens import GateState, Selection, VisualTokens

if TYPE_CHECKING:
    import torch

__all__ = ["Component", "Selector", "Gate", "top_k_indices", "check_scores"]


class Component(BaseModel):
    """Base of selectors and gates: a frozen, validated set of options."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


def top_k_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest ``scores`` (``[N]``), ties broken towards the lower index.

    ``torch.topk`` does not promise an order among equal values; a stable descending sort does, and
    deterministic tie-breaking is what makes kept indices reproducible across batch compositions.
    """
    import torch

    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [N], got shape {tuple(scores.shape)}")
    order = torch.sort(scores.float(), descending=True, stable=True).indices
    return order[:k]


def check_scores(scores: object, n: int, *, who: str) -> torch.Tensor:
    """``scores`` as a ``[n]`` tensor, or :class:`~tokred.errors.MethodContractError` naming ``who``.

    A score is one real number per token: a 1-D floating-point or integer tensor of length ``n``
    with no NaN or infinity. Anything else would be ranked silently wrong (a score of length
    ``n - 1`` can never keep token ``n - 1``; NaN sorts arbitrarily), so it is refused."""
    import torch

    integer_dtypes = (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8)
    if not isinstance(scores, torch.Tensor):
        raise MethodContractError(f"{who} returned {type(scores).__name__}, expected a tensor of shape ({n},)")
    if scores.shape != (n,):
        raise MethodContractError(f"{who} returned shape {tuple(scores.shape)}, expected ({n},): one score per token")
    if not (scores.is_floating_point() or scores.dtype in integer_dtypes):  # bool and complex are not scores
        raise MethodContractError(f"{who} returned dtype {scores.dtype}, expected a real floating-point or integer tensor")
    if scores.is_floating_point():
        bad = ~torch.isfinite(scores)
        if bool(bad.any()):
            first = int(torch.nonzero(bad)[0])
            raise MethodContractError(
                f"{who} returned {int(bad.sum())} non-finite scores (NaN or infinity; the first at token {first}, "
                f"{float(scores[first].detach())}): scores must be finite"
            )
    return scores


class Selector(Component):
    """Stage I: chooses which visual tokens of one image enter the language model.

    Subclasses override :meth:`score` or :meth:`select`. The runtime passes ``k`` already resolved
    from the stage's budget, checks the result (``k`` unique indices in range) and restores spatial
    order, so ``select`` may return indices in any order.
    """

    #: Optional inputs the selector reads; the runtime captures only these. Possible values:
    #: ``"cls_attention"`` (vision [CLS] -> patch attention), ``"pre_projector"`` features (with
    #: them, :attr:`VisualTokens.project`, the model's projector), ``"vision_keys"`` (the vision
    #: encoder's key states at the [CLS]-attention layer) and ``"instruction_embeddings"`` (always
    #: filled; listing it declares that the selection depends on the prompt's text).
    #: A selector gets ``None`` for an input the model cannot provide and falls back as it documents,
    #: unless the input is also in :meth:`required_inputs`.
    inputs: ClassVar[frozenset[str]] = frozenset()

    def required_inputs(self) -> frozenset[str]:
        """The inputs (of :attr:`inputs`) without which these options cannot run. ``tokred.apply``
        refuses the schedule on a model whose adapter cannot provide one, before any forward.
        Default: none."""
        return frozenset()

    def validate(self, num_tokens: int) -> None:
        """Refuse options that cannot work on an image (or tile, with ``spread="tiles"``) of
        ``num_tokens`` visual tokens, by raising :class:`~tokred.errors.OptionsError`. The runtime
        calls it for every image before any selector runs (and ``tokred.apply`` does, when the
        model's config fixes the count), so a bad option fails before the language model, with a
        clear message. Default: accept."""

    def score(self, tokens: VisualTokens) -> torch.Tensor:
        """Importance of each token: ``[N]`` float, higher is kept."""
        raise NotImplementedError(f"{type(self).__name__} must override score() or select()")

    def select(self, tokens: VisualTokens, k: int) -> torch.Tensor | Selection:
        """Indices ``[k]`` of the tokens to keep (any order), or a :class:`Selection` with features.

        Default: the ``k`` highest of :meth:`score`, which must be ``[N]`` real and finite
        (:func:`check_scores`)."""
        scores = check_scores(self.score(tokens), tokens.num_tokens, who=f"{type(self).__name__}.score")
        return top_k_indices(scores, k)


class Gate(Component):
    """Stage II: decides, at one decoder layer, which of a sample's alive visual tokens stay.

    Subclasses override :meth:`score` (ranked per image against ``state.keep_per_image``, or per
    tile against ``state.keep_per_tile`` when the budget is spread over tiles) or
    :meth:`select` (free choice, e.g. all-or-none). Tokens not returned are removed from this layer
    on, for the rest of the prefill and for every decoding step.
    """

    #: Whether the gate needs a budget. All-or-none gates (ToDRE's) set this to ``False``.
    requires_budget: ClassVar[bool] = True

    #: Which layer's attention :meth:`GateState.attention` and :meth:`GateState.keys` read:
    #:
    #: * ``"previous"`` (default; FastV's convention): layer ``l - 1``, observed while it runs, at
    #:   no extra cost;
    #: * ``"own"``: the gate's layer ``l`` itself, on the hidden states entering it (before this
    #:   gate drops anything): the runtime runs that layer's input normalisation and attention
    #:   module once more, under the observer and without the KV cache, before the gate decides.
    #:   That is the attention the first layer after the drop would compute (PyramidDrop's score);
    #:   it costs one attention block over the current sequence per gate.
    #:
    #: A subclass may override it as a property that depends on its options.
    attention_layer: ClassVar[Literal["previous", "own"]] = "previous"

    def score(self, state: GateState) -> torch.Tensor:
        """Importance of each alive visual token: ``[V]`` float, higher is kept."""
        raise NotImplementedError(f"{type(self).__name__} must override score() or select()")

    def select(self, state: GateState) -> torch.Tensor:
        """Alive-relative indices ``[k]`` (into ``0..V-1``) of the visual tokens that stay."""
        import torch

        if state.keep_per_image is None:
            raise NotImplementedError(f"{type(self).__name__} has no budget; it must override select()")
        scores = check_scores(self.score(state), state.num_visual, who=f"{type(self).__name__}.score").detach().float().cpu()
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
