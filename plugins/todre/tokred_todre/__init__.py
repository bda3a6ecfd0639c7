"""tokred-todre: ToDRE for tokred (Li, Yang, Lu, "ToDRE: Effective Visual Token Pruning via Token
Diversity and Task Relevance", arXiv 2505.18757 v2).

* ``todre.diversity`` (:class:`DiversitySelector`): stage I, greedy max-sum diversification
  (:func:`max_sum_diversity`, default) or k-center (:func:`k_center`, the v1 rule) on the projected
  visual tokens, starting from the token with the highest [CLS] attention.
* ``todre.migration`` (:class:`InformationMigrationGate`): stage II, drops all visual tokens of a
  sample at a late layer when text and image no longer attend to each other.
* ``todre`` (:class:`ToDREMethod`): the two together, ``tokred.create("todre", keep_ratio=0.1)``.
"""

from __future__ import annotations

from ._gate import InformationMigrationGate, MigrationRatios, migration_ratios
from ._greedy import k_center, max_sum_diversity
from ._method import ToDREMethod
from ._selector import DiversitySelector, pivot_index

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "max_sum_diversity",
    "k_center",
    "pivot_index",
    "migration_ratios",
    "MigrationRatios",
    "DiversitySelector",
    "InformationMigrationGate",
    "ToDREMethod",
]
