"""``random``: a seeded random Selector, the floor every method should beat."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field

from ..options import Integer
from ..components import Selector
from ..method import BudgetOptions, Method
from ..schedule import Schedule, SelectorStage
from ..tokens import VisualTokens

if TYPE_CHECKING:
    import torch

__all__ = ["RandomSelector", "RandomMethod"]


class RandomSelector(Selector):
    """Keeps ``k`` tokens drawn uniformly without replacement.

    The draw depends only on ``seed``, ``N`` and ``k``, not on the image's place in the batch, so a
    prompt gives the same kept indices alone or batched (our choice: reproducible comparisons
    matter more here than independent draws per image).
    """

    seed: Integer = Field(0, description="Seed of the random draw.")

    def select(self, tokens: VisualTokens, k: int) -> torch.Tensor:
        import torch

        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(tokens.num_tokens, generator=generator)[:k]


class RandomMethod(BudgetOptions, Method):
    """Random selection before the LLM (baseline)."""

    default_keep_ratio = 0.25

    seed: Integer = Field(0, description="Seed of the random draw.")

    def schedule(self) -> Schedule:
        return Schedule(selector=SelectorStage(selector=RandomSelector(seed=self.seed), budget=self.budget))
