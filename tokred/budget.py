"""Token budgets: how many visual tokens a stage keeps.

Rules (documented in the user guide and tested):

* exactly one of ``keep`` (an absolute count) and ``keep_ratio`` (a fraction in ``(0, 1]``);
* budgets are **per image**: ``keep=64`` on a two-image prompt keeps 64 of each;
* ``keep_ratio`` is relative to the image's own number of visual tokens ``N`` and rounds half up,
  never below one token: ``k = max(1, floor(keep_ratio * N + 0.5))``. A method that reproduces a
  paper's code may choose another rounding of ``keep_ratio * N`` (``rounding="half_even"``, Python's
  ``round``; ``rounding="down"``, ``int()``), still never below one token;
* ``keep > N`` is an error (:class:`~tokred.errors.BudgetError`), never a silent clamp. It is raised
  by :func:`tokred.apply` when the model's token count per image is fixed by its config, otherwise
  when the image is seen, before the language model runs. ``keep == N`` keeps everything.
  A method may build a *derived* budget with ``at_most_all=True`` (STAR's "twice the final
  budget"), which keeps all ``N`` tokens when ``keep > N``; what a user types never clamps.
* tiled images (LLaVA-NeXT, InternVL) are one image: ``keep`` counts over all of its tiles and its
  thumbnail, and ``keep_ratio`` is relative to all of their tokens. ``spread="tiles"`` splits each
  image's budget over its tiles in proportion to their token counts
  (:func:`split_proportionally`) and reduces every tile on its own; untiled images are one tile.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .options import Integer, Number
from .errors import BudgetError

__all__ = ["Budget", "split_proportionally"]


class Budget(BaseModel):
    """How many visual tokens of each image a stage keeps."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    keep: Integer | None = Field(None, description="Visual tokens to keep per image (absolute count, >= 1).")
    keep_ratio: Number | None = Field(
        None, description="Fraction of each image's visual tokens to keep, in (0, 1]; rounds half up, at least 1."
    )
    at_most_all: bool = Field(
        False,
        description="keep larger than an image's token count keeps all of them instead of raising; for derived "
        "budgets such as 'twice the final budget', never for what a user typed.",
    )
    spread: Literal["image", "tiles"] = Field(
        "image",
        description="'image': the stage ranks all of an image's tokens together (tiles and thumbnail alike); "
        "'tiles': the image's budget is split over its tiles in proportion to their token counts (largest "
        "remainder) and each tile is reduced on its own. Untiled images are one tile.",
    )
    rounding: Literal["half_up", "half_even", "down"] = Field(
        "half_up",
        description="How keep_ratio * N becomes a count (never below 1): 'half_up' (tokred's rule), 'half_even' "
        "(Python's round) or 'down' (int(), towards zero); for methods that reproduce a paper's code.",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> Budget:
        if self.keep is not None and self.keep_ratio is not None:
            raise BudgetError(f"give either keep or keep_ratio, not both (got keep={self.keep}, keep_ratio={self.keep_ratio})")
        if self.keep is None and self.keep_ratio is None:
            raise BudgetError("a budget needs keep=K or keep_ratio=R")
        if self.keep is not None and self.keep < 1:
            raise BudgetError(f"keep must be >= 1 (got {self.keep}); to drop every visual token use a gate with no budget")
        if self.keep_ratio is not None and not (0.0 < self.keep_ratio <= 1.0):  # also rejects NaN
            raise BudgetError(f"keep_ratio must be in (0, 1] (got {self.keep_ratio})")
        return self

    def tokens_for(self, num_tokens: int, *, what: str = "image") -> int:
        """The number of tokens to keep out of ``num_tokens``; raises :class:`BudgetError` if impossible."""
        if self.keep is not None:
            if self.keep > num_tokens and self.at_most_all:
                return num_tokens
            if self.keep > num_tokens:
                raise BudgetError(
                    f"keep={self.keep} is larger than the {num_tokens} visual tokens of this {what}; "
                    "tokred never clamps silently: lower keep or use keep_ratio"
                )
            return self.keep
        assert self.keep_ratio is not None
        exact = self.keep_ratio * num_tokens
        if self.rounding == "half_even":
            count = round(exact)
        elif self.rounding == "down":
            count = math.floor(exact)
        else:
            count = math.floor(exact + 0.5)
        return max(1, min(num_tokens, count))

    def describe(self) -> str:
        tiles = ", spread over tiles" if self.spread == "tiles" else ""
        if self.keep_ratio is not None:
            rounding = "" if self.rounding == "half_up" else f", rounding {self.rounding}"
            return f"keep_ratio={self.keep_ratio:g}{rounding}{tiles}"
        return f"keep={self.keep}" + (" (at most all)" if self.at_most_all else "") + tiles


def split_proportionally(k: int, sizes: Sequence[int]) -> list[int]:
    """Split ``k`` tokens over groups of ``sizes`` tokens in proportion to their sizes.

    Largest-remainder (Hamilton) apportionment in exact integer arithmetic: every group first gets
    ``floor(k * size / total)``, and the tokens left over go to the largest remainders, ties to the
    earlier group. The parts sum to ``k`` and none exceeds its group's size (for ``k <= total``).

    >>> split_proportionally(10, [64, 64, 64, 64, 64])
    [2, 2, 2, 2, 2]
    >>> split_proportionally(7, [144, 144, 144, 144, 150])
    [2, 1, 1, 1, 2]
    """
    total = sum(sizes)
    if not 0 <= k <= total:
        raise BudgetError(f"cannot split {k} tokens over groups holding {total}")
    if total == 0:
        return [0] * len(sizes)
    parts = [k * size // total for size in sizes]
    remainders = [k * size % total for size in sizes]
    for index in sorted(range(len(sizes)), key=lambda i: (-remainders[i], i))[: k - sum(parts)]:
        parts[index] += 1
    return parts
