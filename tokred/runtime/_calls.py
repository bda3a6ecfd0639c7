"""Which phase a call is: a prefill, a decoding step on this run's cache, or text-only passthrough.

The multimodal model's pre-hook classifies every forward before anything is reduced:

* a call without a cache, or with an empty one, starts sequences: a **prefill** (``passthrough``
  when it holds no image, decided once the images are located);
* a call with the cache this run's latest prefill filled is a **decoding step**;
* anything else is refused: a cache filled outside the run, new images on a continued cache, and
  calls tokred cannot classify (:func:`check_starts_a_sequence`; :mod:`tokred.compat` refuses a cache
  under an unknown keyword or one it cannot read) raise instead of falling through as a prefill,
  which would reduce nothing and report zero visual tokens.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, Mapping

import torch

from .. import compat
from ..compat import Keyword
from ..errors import RuntimeStateError

if TYPE_CHECKING:
    import torch.nn as nn

    from ..adapters.base import Adapter
    from ._state import RunState

__all__ = ["classify_call", "finish_call", "check_starts_a_sequence", "check_dynamic_cache", "check_left_padded",
           "encoded_images"]


def classify_call(state: RunState, module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Set ``state.mode`` for the multimodal model's forward about to run (pre-hook)."""
    input_ids = kwargs.get(Keyword.INPUT_IDS, args[0] if args else None)
    cache = compat.find_cache(kwargs, call=f"{type(module).__name__}.forward")
    past = compat.cache_length(cache) if cache is not None else 0
    filled = state.cache
    if past == 0:
        if cache is not None and filled is not None and filled.cache() is cache:
            raise compat.interface_error("the KV cache this run filled at its prefill to hold its tokens",
                                         "the cache reads as empty on the next call")
        check_starts_a_sequence(state.adapter, kwargs, input_ids)
        state.mode = "prefill"
        check_dynamic_cache(cache)
        encoded = encoded_images(kwargs)
        if kwargs.get(Keyword.PIXEL_VALUES) is not None or kwargs.get(Keyword.PIXEL_VALUES_VIDEOS) is not None:
            # The vision tower runs inside this call: what it captures now is this prefill's.
            state.probes.clear()
        elif encoded is not None and state.consumed_probes is not None and state.consumed_probes[0]() is encoded:
            # generate(use_cache=False) feeds the same encoder outputs to every step without
            # running the tower again: the probes of its first step still describe these images.
            state.probes.restore(state.consumed_probes[1])
        state.input_ids = input_ids
        state.multimodal_inputs = kwargs
        return
    if filled is None or filled.cache() is not cache:
        raise RuntimeStateError(
            "this KV cache was not filled by the active tokred run; tokred can only continue decoding "
            "on a cache whose prefill it reduced"
        )
    if kwargs.get(Keyword.PIXEL_VALUES) is not None or kwargs.get(Keyword.PIXEL_VALUES_VIDEOS) is not None:
        raise RuntimeStateError("new images or videos on a continued cache are not supported; start a new prefill")
    # Position ids the caller did not give are the adapter's to compute: a model that derives
    # them itself before its language model (Qwen's M-RoPE) reads the pruned cache's length.
    state.caller_positions = kwargs.get(Keyword.POSITION_IDS) is not None
    state.mode = "decode"


def finish_call(state: RunState, output: Any) -> None:
    """After the language model's forward: remember the cache it filled and where its outputs come
    from, and let nothing of this call reach another one."""
    cache = compat.output_cache(output)
    if state.mode in ("prefill", "passthrough") and state.cache is not None and cache is not None:
        state.cache.cache = weakref.ref(cache)
    if state.mode == "prefill" and state.prefill is not None:
        state.output_positions = state.prefill.current.origin.clone()
    elif state.mode == "passthrough" and state.input_ids is not None:
        batch, length = state.input_ids.shape
        state.output_positions = torch.arange(length).expand(batch, -1).clone()
    encoded = encoded_images(state.multimodal_inputs)
    if state.mode == "prefill" and encoded is not None:
        state.consumed_probes = (weakref.ref(encoded), state.probes.snapshot())
    elif state.mode == "prefill":
        state.consumed_probes = None
    state.prefill = None
    state.multimodal_inputs = {}
    state.probes.clear()  # consumed by this prefill; never let them reach another one
    state.mode = "idle"


def check_starts_a_sequence(adapter: Adapter, kwargs: Mapping[str, Any], input_ids: torch.Tensor | None) -> None:
    """A call without a (non-empty) cache must start its sequences: the first real token of every
    row sits at position 0. A call whose positions start later continues a sequence whose cache
    tokred did not see, which happens when transformers passes the cache under a name tokred does
    not know; taking it for a prefill would reduce nothing and report zero visual tokens."""
    positions = kwargs.get(Keyword.POSITION_IDS)
    if positions is None or input_ids is None or positions.shape[-1] == 0:
        return
    index = adapter.position_index(positions).cpu()                          # [B or 1, L]
    mask = kwargs.get(Keyword.ATTENTION_MASK)
    if mask is not None and mask.dim() == 2 and mask.shape[-1] == index.shape[-1]:
        real = mask.bool().cpu()
        if index.shape[0] == 1 and real.shape[0] > 1:
            index = index.expand(real.shape[0], -1)
        first = torch.where(real.any(dim=1), real.long().argmax(dim=1), 0)
        starts = index.gather(1, first[:, None])[:, 0]
    else:
        starts = index[:, 0]
    if bool((starts != 0).any()):
        raise compat.interface_error(
            "a call without a KV cache to start its sequences at position 0",
            f"its position ids start at {starts.tolist()}, so it continues a sequence whose cache tokred "
            f"did not find under {list(compat.CACHE_KEYWORDS)}",
        )


def check_dynamic_cache(cache: Any) -> None:
    """Refuse fixed-length caches: pruned layers keep shorter caches, which only a DynamicCache does."""
    if cache is not None and compat.is_static_cache(cache):
        raise RuntimeStateError(
            f"{type(cache).__name__} is not supported: pruned layers keep shorter caches, which needs a "
            "DynamicCache (do not pass cache_implementation='static')"
        )


def check_left_padded(real: torch.Tensor) -> None:
    """Refuse a batch whose attention mask ``[B, L]`` has padding after a real token.

    The reduced sequence is packed to the right (the last position of every row is a real token, as
    ``generate`` needs), so a right-padded prompt would be answered from its padding and decode at
    the wrong positions; the check runs before any decoder layer."""
    later_padding = (~real) & (torch.cumsum(real.long(), dim=1) > 0)
    rows = torch.nonzero(later_padding.any(dim=1)).flatten().tolist()
    if rows:
        raise RuntimeStateError(
            f"the attention mask of rows {rows} has padding after real tokens (right padding); tokred needs left "
            "padding: create the processor with padding_side='left' (or set processor.tokenizer.padding_side = 'left')"
        )


def encoded_images(kwargs: Mapping[str, Any]) -> Any | None:
    """The vision tower's outputs a call carries (``mm_encoder_outputs["image"]``, else
    ``mm_encoder_outputs["video"]``, 5.23+), or None: the object ``generate(use_cache=False)`` hands
    every step again, by which a step is recognised as reusing the first step's encoding."""
    encoded = kwargs.get(Keyword.ENCODER_OUTPUTS)
    if not isinstance(encoded, Mapping):
        return None
    image = encoded.get(Keyword.ENCODER_OUTPUTS_IMAGE)
    return image if image is not None else encoded.get(Keyword.ENCODER_OUTPUTS_VIDEO)
