"""tokred-baselines: the methods recent visual-token reduction papers compare against, for tokred.

One module per method, each with its core selection function as a pure function of tensors (tested
against the outputs of the authors' own code), its component and its registered method:

* :mod:`~tokred_baselines.divprune`: DivPrune (Alvar et al., CVPR 2025), stage-I max-min diversity;
* :mod:`~tokred_baselines.visionzip`: VisionZip (Yang et al., CVPR 2025), stage-I dominant tokens by
  vision [CLS] attention plus merged contextual tokens;
* :mod:`~tokred_baselines.dart`: DART (Wen et al., EMNLP 2025), a gate by pivot tokens and
  duplication, without attention weights;
* :mod:`~tokred_baselines.pdrop`: PyramidDrop (Xing et al., CVPR 2025), gates at several layers with
  a shrinking budget;
* :mod:`~tokred_baselines.cdpruner`: CDPruner (Zhang et al., NeurIPS 2025), an instruction-conditioned
  DPP before the LLM;
* :mod:`~tokred_baselines.pool`: average pooling of the token grid to the budget, per tile.

Installing the distribution registers them all through the ``tokred`` entry-point group.
"""

from __future__ import annotations

from .cdpruner import CDPrunerMethod, CDPrunerSelector, cdpruner_kernel, cdpruner_relevance, dpp_greedy
from .dart import DARTGate, DARTMethod, DARTResult, dart_pivots, dart_retain, dart_token_topk, dart_visit_order, split_over_pivots
from .divprune import DivPruneMethod, DivPruneSelector, cosine_distances, divprune_budget, divprune_select
from .pdrop import PDropGate, PDropMethod, pdrop_scores
from .pool import PoolMethod, PoolSelector, band_cells, pool_2d, pool_grid
from .visionzip import VisionZipMethod, VisionZipResult, VisionZipSelector, contextual_count, visionzip_dominant, visionzip_merge

__version__ = "0.1.0"

__all__ = [
    "__version__",
    # divprune
    "divprune_select", "divprune_budget", "cosine_distances", "DivPruneSelector", "DivPruneMethod",
    # visionzip
    "visionzip_merge", "visionzip_dominant", "contextual_count", "VisionZipResult", "VisionZipSelector",
    "VisionZipMethod",
    # dart
    "dart_retain", "dart_pivots", "dart_visit_order", "dart_token_topk", "split_over_pivots", "DARTResult",
    "DARTGate", "DARTMethod",
    # pdrop
    "pdrop_scores", "PDropGate", "PDropMethod",
    # cdpruner
    "cdpruner_relevance", "cdpruner_kernel", "dpp_greedy", "CDPrunerSelector", "CDPrunerMethod",
    # pool
    "pool_2d", "band_cells", "pool_grid", "PoolSelector", "PoolMethod",
]
