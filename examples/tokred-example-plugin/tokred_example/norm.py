"""The ``example.norm`` selector and the ``example-norm`` method.

A token-norm heuristic, not a published method: tokens whose embeddings have a large norm tend to be
the ones that stand out from the rest of the image. It needs nothing but the projected features
every adapter provides, so it runs on every supported model family.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import Field
from tokred import BudgetOptions, Method, Schedule, Selector, SelectorStage, VisualTokens

if TYPE_CHECKING:  # torch is imported where a score is computed: `tokred list` starts without it
    import torch

__all__ = ["NormSelector", "NormMethod"]

_CENTER = (
    "Subtract the image's mean feature before taking the norm, so tokens are ranked by their distance "
    "from the image's average token rather than by their size."
)


class NormSelector(Selector):
    """Keeps the visual tokens whose projected features have the largest L2 norm.

    For one image with features ``[N, D]`` (the language model's input embeddings of its tokens),
    the score of token ``i`` is ``||features[i]||_2`` (``[N]``), computed in float32 whatever the
    model's dtype. tokred's runtime keeps the ``k`` highest scores (ties to the lower index) and puts
    the kept tokens back in spatial order.

    With ``center=True`` the score is ``||features[i] - mean_j features[j]||_2``: a feature direction
    that every token of the image shares no longer decides the ranking.

    The score depends only on the image's own tokens, never on its place in the batch, so a prompt
    keeps the same tokens alone and in a padded batch.
    """

    center: bool = Field(False, description=_CENTER)

    def score(self, tokens: VisualTokens) -> torch.Tensor:
        import torch

        features = tokens.features.float()                            # [N, D]
        if self.center:
            features = features - features.mean(dim=0, keepdim=True)  # [N, D]
        return torch.linalg.vector_norm(features, dim=-1)             # [N]: higher is kept


class NormMethod(BudgetOptions, Method):
    """Example: keep each image's visual tokens with the largest feature norm, before the LLM.

    ``tokred.create("example-norm", keep=64)`` keeps 64 tokens of every image; without a budget it
    keeps a quarter of each image's tokens (``keep_ratio=0.25``). Every decoder layer then sees the
    kept tokens only.
    """

    default_keep_ratio = 0.25

    center: bool = Field(False, description=_CENTER)

    def schedule(self) -> Schedule:
        return Schedule(selector=SelectorStage(selector=NormSelector(center=self.center), budget=self.budget))
