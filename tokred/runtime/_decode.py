"""Decoding on the cache a reduced prefill filled: key masks per layer group, and positions.

Layers that a gate shortened keep a shorter KV cache (``DynamicCache`` stores each layer on its
own), so the layers are grouped by what their cache holds: group 0 is every layer before the first
gate (what entered the language model), group ``g`` the layers from gate ``g`` on. Each group keeps
a key-padding mask ``[B, K_g]`` of which cached keys are real; every decoding step appends the new
tokens to all of them. The language model gets group 0's mask; layers of a later group get a 4-D
mask built from theirs (:func:`decode_layer_inputs`). Positions continue from the full sequence:
the caller's (checked against where the prefill ended), or the adapter's when the caller gave none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

from ..compat import Keyword
from ..errors import RuntimeStateError
from ._sequence import causal_key_mask, format_mask

if TYPE_CHECKING:
    from ..adapters.base import Adapter

__all__ = ["CacheState", "decode_inputs", "decode_layer_inputs", "next_position"]

_CONTINUING = (
    "Continuing a conversation on a cache that tokred pruned is not supported through generate(), which "
    "re-feeds tokens it believes are missing from the shorter cache; run the whole conversation again instead"
)


@dataclass
class CacheState:
    """What decoding on a cache filled by a run's prefill needs.

    Attributes:
        cache: a weak reference to the cache the prefill filled (a call that returns ``None``
            until the prefill's output is seen).
        group_of_layer: the cache group of every decoder layer (empty for passthrough).
        key_valid: per group, ``[B, K_g]`` bool: which cached keys are real tokens.
        logical_length: tokens the cache stands for in the full (unreduced) sequence.
        position_shift: ``[B]`` tokens dropped before the end of the prefill, when positions are
            renumbered (``Schedule(positions="renumber")``), else ``None``.
        next_position: ``[B]`` where each row's next token goes (checked against caller positions).
        passthrough: the prefill held no image: decoding is left alone.
    """

    cache: Callable[[], Any]
    group_of_layer: list[int]
    key_valid: list[torch.Tensor]
    logical_length: int
    position_shift: torch.Tensor | None
    next_position: torch.Tensor | None = None
    passthrough: bool = False

    def add_group(self, first_layer: int, valid: torch.Tensor) -> None:
        """A gate at ``first_layer`` left ``valid`` ``[B, L']``: that layer and the later ones form
        a new group."""
        self.key_valid.append(valid)
        group = len(self.key_valid) - 1
        self.group_of_layer[first_layer:] = [group] * (len(self.group_of_layer) - first_layer)


def decode_inputs(state: CacheState, adapter: Adapter, caller_positions: bool, args: tuple,
                  kwargs: dict) -> tuple[tuple, dict] | None:
    """The language model's inputs for one decoding step: group 0's key mask extended by the new
    tokens and the positions they have in the full sequence."""
    embeds = kwargs.get(Keyword.INPUTS_EMBEDS)
    num_new = embeds.shape[1]
    mask = kwargs.get(Keyword.ATTENTION_MASK)
    if mask is not None and mask.shape[-1] != state.logical_length + num_new:
        raise RuntimeStateError(
            f"the attention mask covers {mask.shape[-1]} positions but this pruned cache stands for "
            f"{state.logical_length} tokens plus {num_new} new ones. {_CONTINUING}"
        )
    if state.passthrough:
        state.logical_length += num_new
        return None
    device = embeds.device
    positions = kwargs.get(Keyword.POSITION_IDS) if caller_positions else None
    if positions is None:
        positions = adapter.decode_position_ids(embeds.shape[0], num_new, state.logical_length, device,
                                                attention_mask=mask)
    elif state.next_position is not None:
        first = adapter.position_index(positions)[:, 0]
        if not torch.equal(first.cpu(), state.next_position):
            raise RuntimeStateError(
                f"decoding resumes at position {first.tolist()} but this pruned cache ends before position "
                f"{state.next_position.tolist()}. {_CONTINUING}"
            )
    state.next_position = adapter.position_index(positions)[:, -1].cpu() + 1
    new_valid = mask[:, -num_new:].bool() if mask is not None else torch.ones(embeds.shape[0], num_new, dtype=torch.bool, device=device)
    state.key_valid = [torch.cat([kv.to(device), new_valid], dim=1) for kv in state.key_valid]
    if state.position_shift is not None:
        positions = positions - state.position_shift.to(positions.device)[:, None]
    state.logical_length += num_new
    new_kwargs = dict(kwargs)
    new_kwargs[Keyword.ATTENTION_MASK] = state.key_valid[0].to(dtype=mask.dtype if mask is not None else torch.long)
    new_kwargs[Keyword.POSITION_IDS] = positions
    return args, new_kwargs


def decode_layer_inputs(state: CacheState | None, index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """Decoder layer ``index``'s 4-D mask for a decoding step, when its cache group differs from
    group 0 (whose mask the language model already builds from its inputs)."""
    if state is None or state.passthrough or not state.group_of_layer or state.group_of_layer[index] == 0:
        return None
    valid = state.key_valid[state.group_of_layer[index]]
    hidden = args[0] if args else kwargs[Keyword.HIDDEN_STATES]
    new_kwargs = dict(kwargs)
    new_kwargs[Keyword.ATTENTION_MASK] = format_mask(causal_key_mask(valid, hidden.shape[1]),
                                                     kwargs.get(Keyword.ATTENTION_MASK), hidden.dtype)
    return args, new_kwargs


def next_position(index: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """``[B]``: one past the largest position index (``[B, L]``, :meth:`Adapter.position_index`) of
    each row's real tokens, where the unmodified model's next token goes."""
    return index.cpu().masked_fill(~real.cpu(), -1).amax(dim=1) + 1
