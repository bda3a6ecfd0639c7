"""``fastv``: FastV (Chen et al., "An Image is Worth 1/2 Tokens After Layer 2", ECCV 2024).

After layer ``K - 1`` every visual token is ranked by the attention it receives from the last
token of the prompt, averaged over heads; only the top ones reach layers ``K`` and later. The paper's
default is ``K = 2`` and dropping ``R = 50%`` of the image tokens (``keep_ratio=0.5`` here).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from ..options import LayerSpec
from ..components import Gate
from ..method import BudgetOptions, Method
from ..schedule import GateStage, Schedule
from ..tokens import GateState

if TYPE_CHECKING:
    import torch

__all__ = ["LastTokenAttentionGate", "FastVMethod"]


class LastTokenAttentionGate(Gate):
    """Scores each alive visual token by the attention the last prompt token gives it.

    Shapes: ``state.attention("last", "visual")`` is ``[heads, 1, V]``; the score is its head mean
    ``[V]``. During decoding the gate does not run again: the prefill decision holds.
    """

    def score(self, state: GateState) -> torch.Tensor:
        return state.attention("last", "visual").mean(dim=0)[0]


class FastVMethod(BudgetOptions, Method):
    """FastV: drop visual tokens at layer K by last-token attention (Chen et al. 2024)."""

    default_keep_ratio = 0.5

    layer: LayerSpec = Field(2, description="Decoder layer K from which only the kept tokens remain (int or depth fraction like '1/4').")

    def schedule(self) -> Schedule:
        return Schedule(gates=(GateStage(layer=self.layer, gate=LastTokenAttentionGate(), budget=self.budget),))
