"""tokred-example-plugin: the smallest complete tokred plugin.

* :class:`NormSelector` (registered as ``example.norm``): keeps each image's visual tokens whose
  projected features have the largest L2 norm;
* :class:`NormMethod` (``example-norm``): that selector before the language model, as a named method,
  ``tokred.create("example-norm", keep=64)``.

Installing the distribution registers both through the ``tokred`` entry-point group
(:mod:`tokred_example.plugin`).
"""

from __future__ import annotations

from .norm import NormMethod, NormSelector

__version__ = "0.1.0"

__all__ = ["__version__", "NormSelector", "NormMethod"]
