"""Options the baseline methods share: how positions continue after stage I, and how a ratio rounds.

Both exist because the authors' code differs from tokred's defaults in ways a user may want to
reproduce, not because tokred needs them:

* the LLaVA code of DivPrune, VisionZip and CDPruner calls the language model without position ids
  after removing tokens, so the survivors are **renumbered** ``0 .. L' - 1`` (LLaVA's
  ``prepare_inputs_labels_for_multimodal`` returns ``position_ids=None``); tokred keeps the positions
  the tokens had in the full sequence by default, which every family supports (M-RoPE models refuse
  renumbering);
* DivPrune rounds ``ratio * N`` half to even (Python's ``round``), PyramidDrop truncates
  (``int()``); tokred rounds half up.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field
from tokred import Budget

__all__ = ["PositionsOption", "RoundingOption", "Positions", "Rounding"]

#: What position ids the surviving tokens get (``tokred.Schedule.positions``).
Positions = Literal["original", "renumber"]
#: How ``keep_ratio * N`` becomes a count (``tokred.Budget.rounding``).
Rounding = Literal["half_up", "half_even", "down"]


class PositionsOption(BaseModel):
    """``positions``: ``"original"`` (default, ours: every family) or ``"renumber"`` (the authors'
    LLaVA code; refused by M-RoPE models)."""

    positions: Positions = Field(
        "original",
        description="Position ids of the surviving tokens: 'original' (those of the full sequence; default, ours, every "
        "family) or 'renumber' (contiguous, as the authors' LLaVA code does; refused on Qwen-VL's M-RoPE).",
    )


class RoundingOption(BaseModel):
    """``rounding`` of ``keep_ratio * N``, applied to the method's budget (:class:`tokred.Budget`)."""

    rounding: Rounding = Field(
        "half_up",
        description="How keep_ratio * N becomes a count: 'half_up' (tokred's rule), 'half_even' (Python's round) or "
        "'down' (int()); at least 1 token either way. Only matters for keep_ratio.",
    )

    def rounded(self, budget: Budget) -> Budget:
        """``budget`` with this rounding."""
        return Budget(**{**budget.model_dump(), "rounding": self.rounding})
