"""The transformers runtime: applying a schedule to a model through removable hooks.

``_run`` installs and removes the hooks (the scoped :class:`Run`); one module per phase of a forward
does the work: ``_calls`` (which phase a call is), ``_prefill`` (stage I and the packed sequence),
``_gating`` (gates at decoder layers), ``_decode`` (decoding-step key masks and positions),
``_frozen`` (decisions replayed while frozen), ``_labels`` (labels on the survivors); ``_state`` is
the record they share, ``_attention`` the attention observer, ``_sequence`` the index bookkeeping.
What to keep is decided by the engine-neutral :mod:`tokred.decisions`.
"""

from ..report import ImageRecord, RunReport
from ._run import Run, apply

__all__ = ["Run", "apply", "RunReport", "ImageRecord"]
