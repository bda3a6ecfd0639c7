"""STAR stage II: the cross-modal attention Gate.

Guo et al., "STAR: Stage-Wise Attention-Guided Token Reduction for Efficient Large Vision-Language
Models Inference", arXiv 2505.12359. At a later decoder layer ``K`` every visual token still alive
is scored by the attention the instruction-text queries give it, averaged over heads and queries,
and only the top tokens up to the final budget stay.

Where the numbers come from: tokred's gate convention (see :mod:`tokred.schedule`) is that a gate
at layer ``K`` decides from the attention probabilities of layer ``K - 1`` and layers ``K, K+1, ...``
see only the survivors. ``state.attention("instruction", "visual")`` is that layer's real softmax
attention (``[heads, T, V]``, normalised over every key each query can see), recomputed for these
rows and columns from the layer's own query and key states while the model keeps its attention
kernel (sdpa, eager); no full attention matrix is formed.

Choices the paper leaves open (ours):

* **no instruction text**: when a sample has no instruction-text position (the adapter found no
  text after the image), the last position of the prompt is the only query (FastV's query).
* **decoding**: the gate decides once, at prefill, from the prompt's instruction text; tokred gates
  do not run again while decoding, so generated tokens never act as queries and the prefill
  decision holds for every generated token.
* **per-image budgets**: with several images in a sample, each keeps its own top tokens (tokred's
  per-image budget rule), ranked by the same sample-wide instruction queries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from tokred import Gate, GateState

if TYPE_CHECKING:
    import torch

__all__ = ["CrossAttentionGate"]


class CrossAttentionGate(Gate):
    """STAR stage II (Guo et al., arXiv 2505.12359): keep the visual tokens the instruction text
    attends to most.

    Shapes: ``state.attention("instruction", "visual")`` is ``[heads, T, V]``; the score is its mean
    over heads and the ``T`` instruction queries, ``[V]``. With ``T == 0`` the query is the prompt's
    last position (``[heads, 1, V]``; our fallback). The base class keeps the top
    ``state.keep_per_image[i]`` tokens of each image ``i``.
    """

    def score(self, state: GateState) -> torch.Tensor:
        """``[V]`` float32: mean attention from the instruction text to each alive visual token."""
        queries = "instruction" if state.num_instruction > 0 else "last"
        return state.attention(queries, "visual").mean(dim=(0, 1))
