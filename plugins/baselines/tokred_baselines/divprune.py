"""``divprune``: DivPrune, diversity-based visual token pruning (Alvar et al., CVPR 2025).

Stage I, before the language model: on the projected visual tokens of an image, greedily solve a
max-min diversity problem (farthest-point / k-center selection) in cosine distance. Code:
``vbdi/divprune@799e2d950aa01ba7860907f5a6d86061f885dca6``, ``LLaVA/llava/model/llava_arch.py``
(``pairwise_cosine_similarity`` 147-150, ``DivPrune`` 152-171, its call in
``prepare_inputs_labels_for_multimodal`` 352-386). What the code does, which we follow:

* **features**: the projected visual tokens, i.e. the language model's input embeddings of the image
  (``new_input_embeds[0][35 : 35 + N]``, 366-374);
* **distance**: ``D = 1 - cos`` with rows L2-normalised, the full ``N x N`` matrix (148-150, 155);
* **first pick**: the most isolated token, ``argmax`` over tokens of the distance to their nearest
  *other* token (the second smallest entry of each column, ``topk(D, 2, largest=False).values[1]``,
  165);
* **each further pick**: ``argmax`` over tokens of the distance to the nearest chosen token
  (``min`` over the chosen rows, 163 and 167); ``torch.argmax`` takes the first maximum, so ties go
  to the lowest index;
* **budget**: ``k = int(round(ratio * N))`` (153), Python's rounding (half to even);
  ``SUBSET_RATIO = 0.098`` in ``run_Divprune.sh`` (56 of 576 tokens);
* the kept tokens are sorted back into sequence order (379).

Where tokred's contract forces a difference, :func:`divprune_select` reproduces the authors' output
with ``exclude_chosen=False`` and the registered selector uses ``exclude_chosen=True``:

* the authors' loop does not exclude chosen tokens: a chosen token scores ``1 - cos(x, x) = 0``, so
  when ``k`` exceeds the number of distinct rows it is chosen again and the output repeats indices.
  tokred keeps exactly ``k`` distinct tokens, so the selector never re-picks (**ours**); on inputs
  with more than ``k`` distinct directions both choose the same tokens.

Choices neither the paper nor the code fixes (**ours**):

* distances are computed in float32 (float64 inputs stay float64); the code uses the model's dtype;
* a row of zero norm is treated as having norm ``1e-12`` (the code divides by zero and gets NaN);
* tiled images (LLaVA-NeXT, InternVL) are one candidate pool, as the code pools LLaVA-NeXT's base
  and tile tokens together; with tokred's default ``newline_tokens="keep"`` LLaVA-NeXT's newline
  tokens are not candidates (the code counts them in ``N`` and may drop them);
* ``k == N`` keeps every token without running the loop.

Cost: the ``N x N`` distance matrix, ``O(N^2 D)`` time and ``O(N^2)`` memory, then ``O(k N)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: `tokred list` starts without it
    import torch
from pydantic import Field
from tokred import BudgetOptions, Method, Schedule, Selector, SelectorStage, VisualTokens
from tokred.budget import Budget

from ._common import PositionsOption, Rounding, RoundingOption

__all__ = ["cosine_distances", "divprune_select", "divprune_budget", "DivPruneSelector", "DivPruneMethod"]


def divprune_budget(ratio: float, num_tokens: int) -> int:
    """The authors' budget ``int(round(ratio * N))`` (``llava_arch.py`` 153): Python's ``round``,
    half to even (``0.1953125 * 64 = 12.5 -> 12``). tokred's ``rounding="half_even"`` is the same."""
    return int(round(ratio * num_tokens))


def cosine_distances(features: torch.Tensor) -> torch.Tensor:
    """``[N, N]`` cosine distances ``1 - cos`` between the rows of ``features`` ``[N, D]``.

    Rows are divided by their L2 norm (clamped to ``1e-12``, ours) and multiplied, as
    ``pairwise_cosine_similarity`` does (``llava_arch.py`` 147-150), in float32 or wider."""
    import torch

    x = features.detach().to(torch.promote_types(features.dtype, torch.float32))
    normalised = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return 1.0 - torch.mm(normalised, normalised.t())


def divprune_select(features: torch.Tensor, k: int, *, exclude_chosen: bool = False) -> torch.Tensor:
    """DivPrune's greedy max-min selection (``llava_arch.py`` 152-171) on ``features`` ``[N, D]``.

    Args:
        features: ``[N, D]`` the projected visual tokens of one image.
        k: how many tokens to choose, ``0 <= k <= N``.
        exclude_chosen: ``False`` reproduces the authors' loop exactly, which may choose a token
            again once every distinct row is chosen; ``True`` (tokred's selector) never does.

    Returns:
        ``[k]`` long, the chosen indices in the order they were chosen. The first is the token
        whose nearest other token is farthest; each next one maximises the distance to its nearest
        chosen token. Ties go to the lowest index (``torch.argmax``).
    """
    import torch

    if features.dim() != 2:
        raise ValueError(f"features must be [N, D], got shape {tuple(features.shape)}")
    n = int(features.shape[0])
    if not 0 <= k <= n:
        raise ValueError(f"k must lie in 0..{n} for {n} tokens, got {k}")
    chosen = torch.empty(k, dtype=torch.long, device=features.device)
    if k == 0:
        return chosen
    if n == 1:
        return chosen.fill_(0)
    distances = cosine_distances(features)                                     # [N, N]
    # Step 0: each column's second smallest distance is the distance to the nearest other token.
    scores = torch.topk(distances, 2, dim=0, largest=False).values[1]          # [N]
    nearest_chosen = torch.empty(0)
    for step in range(k):
        if step > 0:
            # The minimum over the chosen rows, kept as a running minimum: the same values the
            # authors' min over index_select(D, 0, s[:i]) gives, in O(N) per step.
            row = distances[chosen[step - 1]]
            nearest_chosen = row if step == 1 else torch.minimum(nearest_chosen, row)
            scores = nearest_chosen.clone()
            if exclude_chosen:
                scores[chosen[:step]] = float("-inf")
        chosen[step] = torch.argmax(scores)
    return chosen


class DivPruneSelector(Selector):
    """DivPrune (Alvar et al., CVPR 2025): keep the ``k`` projected tokens of an image that
    greedily maximise the minimum pairwise cosine distance.

    ``select(tokens, k)`` runs :func:`divprune_select` on ``tokens.features`` ``[N, D]`` with
    ``exclude_chosen=True`` (exactly ``k`` distinct tokens) and returns them in selection order;
    the runtime restores spatial order. See the module documentation for what follows the code and
    what is ours.
    """

    def select(self, tokens: VisualTokens, k: int) -> torch.Tensor:
        import torch

        if k == tokens.num_tokens:
            return torch.arange(k)
        return divprune_select(tokens.features, k, exclude_chosen=True)


class DivPruneMethod(RoundingOption, PositionsOption, BudgetOptions, Method):
    """DivPrune: max-min diversity selection of the projected visual tokens before the LLM (Alvar et al., CVPR 2025).

    Options: ``keep`` / ``keep_ratio`` (default ``keep_ratio=0.098``, the authors' ``SUBSET_RATIO``),
    ``rounding`` of ``keep_ratio * N`` (default ``"half_even"``, the code's ``round``), ``spread``
    and ``positions`` (default ``"original"``, ours; the code renumbers).
    """

    default_keep_ratio = 0.098

    rounding: Rounding = Field(
        "half_even",
        description="How keep_ratio * N becomes a count: 'half_even' (default: the authors' int(round(ratio * N))), "
        "'half_up' (tokred's rule) or 'down'.",
    )

    @property
    def budget(self) -> Budget:
        return self.rounded(super().budget)

    def schedule(self) -> Schedule:
        return Schedule(selector=SelectorStage(selector=DivPruneSelector(), budget=self.budget), positions=self.positions)
