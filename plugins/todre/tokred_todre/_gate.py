"""``todre.migration``: ToDRE's stage-II Gate ("information migration", inside the language model).

Li, Yang, Lu, arXiv 2505.18757 v2, section on task relevance: by a late decoder layer the visual
information a task needs has migrated into the text tokens, so the visual tokens can go. At one layer
(depth 7/8 by default) the gate measures, over all heads, the share of attention that instruction-text
queries give to visual keys and the share that visual queries give to text keys. If both are below
``tau`` (0.10) every remaining visual token of that sample is removed for the rest of the prefill and
for decoding; otherwise nothing changes. The decision is per sample.

**Layer convention.** tokred's gates decide at layer ``l`` from the attention computed in layer
``l - 1`` and only their survivors reach layers ``l, l+1, ...`` (:mod:`tokred.schedule`). With the
default ``gate_layer="7/8"`` of a 32-layer decoder, the ratios are read from layer 27 and layers 28
to 31 see no visual token when the gate fires (ours: the paper names one layer for both).

**Causal-mask subtlety.** Visual queries can only attend to keys that precede them. In the image-first
templates of LLaVA, Qwen-VL and InternVL the instruction follows the image, so visual queries see only
the text before the image (the system prompt, including BOS and role tags) and never the
instruction. The implementation asks for ``state.attention("visual", "text")``: probabilities
normalised over every key each visual query can see (causal mask and padding included), restricted
to all text keys; keys a query cannot see contribute exactly 0. So the visual -> text share is, in
effect, the share given to the preceding system text (and, with several images, to text between
them). Ours: it is neither renormalised over text-the-query-could-see nor stripped of BOS (an
attention sink in many LLMs); the paper does not say, and we keep the plain definition. Which
positions are "instruction" and "system" text comes from the model's adapter
(``Adapter.text_roles``), never from prompt-layout constants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from pydantic import Field
from tokred import Gate, GateState
from tokred.options import Number
from tokred.tokens import AttentionRole

if TYPE_CHECKING:
    import torch

__all__ = ["InformationMigrationGate", "MigrationRatios", "migration_ratios"]


@dataclass(frozen=True)
class MigrationRatios:
    """The two attention shares ToDRE's gate compares with ``tau`` (each in ``[0, 1]``).

    Attributes:
        text_to_visual: mean over heads and instruction-text queries of the attention mass on
            visual keys; ``None`` when the sample has no instruction text (no query to average).
        visual_to_text: mean over heads and visual queries of the attention mass on text keys;
            0 when the sample has no text at all (no attention mass can land on an empty key set).
    """

    text_to_visual: float | None
    visual_to_text: float

    def below(self, tau: float) -> bool:
        """Whether both shares are strictly below ``tau``. ``False`` when ``text_to_visual`` is
        ``None`` (ours: without instruction text there is no evidence that the visual tokens are no
        longer needed, and the sample's last position may itself be visual)."""
        return self.text_to_visual is not None and self.text_to_visual < tau and self.visual_to_text < tau


def _attention_mass(state: GateState, queries: AttentionRole, keys: AttentionRole, num_keys: int) -> float:
    """Mean over heads and ``queries`` of the attention mass on ``keys`` (``state.attention`` is
    ``[heads, Q, K]``, each row normalised over every key its query can see). Needs ``Q >= 1``."""
    if num_keys == 0:
        return 0.0
    probabilities = state.attention(queries, keys)                            # [H, Q, K]
    return float(probabilities.float().sum(dim=-1).mean())                     # sum over K -> [H, Q] -> mean


def _text_to_visual(state: GateState) -> float | None:
    """Instruction queries -> visual keys, from ``[H, T_instr, V]``; ``None`` without instruction text."""
    if state.num_instruction == 0:
        return None
    return _attention_mass(state, "instruction", "visual", state.num_visual)


def _visual_to_text(state: GateState) -> float:
    """Visual queries -> text keys, from ``[H, V, T_sys + T_instr]``; 0 without text or visual tokens."""
    if state.num_visual == 0:
        return 0.0
    return _attention_mass(state, "visual", "text", state.num_system + state.num_instruction)


def migration_ratios(state: GateState) -> MigrationRatios:
    """ToDRE's two attention shares for one sample at the gate's layer (read from layer ``l - 1``).

    Shapes: ``state.attention("instruction", "visual")`` is ``[H, T_instr, V]`` and
    ``state.attention("visual", "text")`` is ``[H, V, T_sys + T_instr]``; each is summed over keys and
    averaged over heads and queries (arXiv 2505.18757 v2; the averaging order is ours, the paper
    states the average only as "over all heads"). Empty sets follow :class:`MigrationRatios`.
    """
    return MigrationRatios(_text_to_visual(state), _visual_to_text(state))


class InformationMigrationGate(Gate):
    """ToDRE stage II: drop every visual token of a sample when both attention shares fall below ``tau``.

    All-or-none, per sample, no budget (``requires_budget = False``). ``select(state)`` returns
    ``arange(V)`` (keep all) or an empty tensor (drop all); the runtime then removes the dropped
    tokens from this layer on and from the layer's KV cache, so decoding never sees them again. The
    gate runs once per prefill (ours, as the paper prunes during prefill); decoding steps reuse the
    decision. See :func:`migration_ratios` for the measurement and the module docstring for the
    causal-mask subtlety.
    """

    requires_budget: ClassVar[bool] = False

    tau: Number = Field(
        0.10, ge=0.0, le=1.0,
        description="Threshold on both attention shares (text->visual, visual->text); below it on both, "
        "the sample's visual tokens are dropped. 0 never drops; the paper uses 0.10.",
    )

    def fires(self, state: GateState) -> bool:
        """Whether this sample's visual tokens are dropped at this layer: the decision of
        :meth:`MigrationRatios.below`, computed lazily. The cheap instruction -> visual share
        (``T_instr`` query rows) is measured first; the visual -> text share (``V`` query rows, the
        expensive one) only when the first is below ``tau``."""
        text_to_visual = _text_to_visual(state)
        if text_to_visual is None or not text_to_visual < self.tau:
            return False
        return _visual_to_text(state) < self.tau

    def select(self, state: GateState) -> torch.Tensor:
        import torch

        if self.fires(state):
            return torch.zeros(0, dtype=torch.long)
        return torch.arange(state.num_visual)
