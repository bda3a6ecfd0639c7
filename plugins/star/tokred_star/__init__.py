"""tokred-star: STAR for tokred.

Guo et al., "STAR: Stage-Wise Attention-Guided Token Reduction for Efficient Large Vision-Language
Models Inference", arXiv 2505.12359. Two training-free, attention-guided stages:

* stage I, :class:`SelfAttentionSelector` (registered as ``star.self_attention``): before the
  language model, keep each image's visual tokens that receive the most visual self-attention
  (:func:`self_attention_scores`);
* stage II, :class:`CrossAttentionGate` (``star.cross_attention``): at decoder layer ``K``, keep the
  visual tokens the instruction text attends to most;
* :class:`StarMethod` (``star``): both stages as one method, ``tokred.create("star", keep=64)``.

Installing the distribution registers all three through the ``tokred`` entry-point group.
"""

from __future__ import annotations

from ._cross_attention import CrossAttentionGate
from ._method import StarMethod
from ._self_attention import DEFAULT_BLOCK_SIZE, SelfAttentionSelector, self_attention_scores

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "self_attention_scores",
    "DEFAULT_BLOCK_SIZE",
    "SelfAttentionSelector",
    "CrossAttentionGate",
    "StarMethod",
]
