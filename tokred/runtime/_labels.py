"""Labels scored on the reduced sequence.

``labels`` ``[B, L]`` describe the full input, while the logits of a reduced prefill cover only the
surviving positions. The top-level model's pre-hook takes the labels out of the call (so the
model computes no loss on mismatched shapes), and its forward hook gathers them to the survivors
(``Run.output_positions``) and computes the model's own loss on them: dropped positions (visual
tokens, which carry no label in instruction tuning) do not count; text is never dropped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import compat
from ..compat import Keyword
from ..errors import RuntimeStateError

if TYPE_CHECKING:
    import torch.nn as nn

    from ._state import RunState

__all__ = ["take_labels", "score_labels"]


def take_labels(state: RunState, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Top-level pre-hook: move ``labels`` from the call into ``state``."""
    state.labels = None
    if kwargs.get(Keyword.LABELS) is None:
        return None
    new_kwargs = dict(kwargs)
    state.labels = new_kwargs.pop(Keyword.LABELS)
    return args, new_kwargs


def score_labels(state: RunState, model: nn.Module, output: Any) -> Any:
    """Top-level forward hook: the loss of the taken labels on the surviving positions."""
    labels, state.labels = state.labels, None
    if labels is None:
        return None
    positions = state.output_positions
    logits = getattr(output, "logits", None)
    if positions is None or logits is None or logits.shape[:2] != positions.shape or labels.shape[0] != positions.shape[0]:
        raise RuntimeStateError(
            "tokred scores labels on the reduced sequence of a prefill; this call's logits "
            f"{None if logits is None else tuple(logits.shape[:2])} do not match its reduced layout "
            f"{None if positions is None else tuple(positions.shape)} (logits_to_keep and labels on decoding "
            "steps are not supported under tokred)"
        )
    index = positions.to(labels.device)
    survivors = labels.gather(1, index.clamp(min=0)).masked_fill(index < 0, -100)     # [B, L']
    output.loss = compat.causal_lm_loss(model, logits, survivors, state.adapter.text_config.vocab_size)
    return output
