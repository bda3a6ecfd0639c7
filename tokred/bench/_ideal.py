"""The ideal of a stage-I reduction: the same model fed only the kept tokens from the start.

A stage-I-only run (a Selector, no Gates) claims to equal "the language model sees only the kept
tokens, at the positions they had in the full sequence". :class:`Ideal` builds exactly that without
tokred: the model's own forward computes its language model's input (vision tower and projector on
the images and videos, features written into the embedded prompt, position ids: M-RoPE for Qwen-VL)
and is stopped at the language model's entry by a temporary hook; the kept positions are gathered,
and the model is called with ``inputs_embeds``, those positions and an explicit all-ones attention
mask (with no mask, non-contiguous position ids would be read as packed sequences). No tokred run
is active; the stopping hook is removed before the call. The time between a tokred run and this is
what the framework costs: selection, bookkeeping, hooks.

Schedules with Gates have no such ideal: tokens leave in the middle of the decoder, which no plain
call of the model can express without hooks, i.e. without doing what tokred does. The benchmark
gives them no ideal column and compares them with the unreduced model only. Neither have models
whose language model takes per-position inputs besides the embeddings (Qwen3-VL's deepstack
features, which its forward computes from pixels and cannot be handed), nor, since the ideal is
built from the kept indices alone, merging selectors (which replace features): the benchmark
compares the ideal's logits and generated tokens with the tokred run's and reports both, so a
mismatch shows instead of passing silently.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn

from ..adapters.base import Adapter, VisionProbes
from ..compat import Keyword
from ..errors import UnsupportedModelError
from ..runtime import RunReport

__all__ = ["Ideal", "unsupported_reason"]


def unsupported_reason(adapter: Adapter) -> str | None:
    """Why :class:`Ideal` cannot be built for the adapter's model, or ``None`` when it can: the
    model must take ``inputs_embeds`` and ``position_ids``, and its language model nothing per
    position beyond them (Qwen3-VL's deepstack features are computed inside its forward)."""
    if type(adapter).reduce_language_model_kwargs is not Adapter.reduce_language_model_kwargs:
        return (f"no ideal for {type(adapter.model).__name__}: its language model takes per-position inputs beyond the "
                "embeddings (deepstack features) that a plain model call cannot pass")
    return None


class _Reached(Exception):
    """Raised by the capturing hook: the model's forward has computed its language model's input."""


def language_model_inputs(model: nn.Module, adapter: Adapter, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments the model's forward hands its language model for ``inputs``
    (``inputs_embeds`` ``[B, L, D]``, ``position_ids``, ``attention_mask``, ...), computed by the
    model itself and stopped there: the language model does not run."""
    captured: dict[str, Any] = {}

    def reach(module: nn.Module, args: tuple, kwargs: dict) -> None:
        captured.update(kwargs)
        raise _Reached

    handle = adapter.language_model().register_forward_pre_hook(reach, with_kwargs=True, prepend=True)
    try:
        model(**inputs, use_cache=False)
    except _Reached:
        pass
    finally:
        handle.remove()
    if Keyword.INPUTS_EMBEDS not in captured:
        raise UnsupportedModelError(f"{type(model).__name__} did not reach its language model with inputs_embeds")
    return captured


class Ideal:
    """The model fed only the tokens a stage-I run kept (one prompt, batch size 1).

    Args:
        model: the vision-language model (no tokred run active on it when called).
        adapter: its adapter, to locate each image's and video's tokens.
        inputs: the processor's outputs (``input_ids``, ``attention_mask``, pixels), on the model's
            device.
        report: the report of a stage-I-only prefill of these inputs; ``images[i].kept_stage1``
            are the kept indices of image (or video) ``i``.

    Raises:
        UnsupportedModelError: :func:`unsupported_reason` gives a reason, or the batch holds more
            than one prompt.
    """

    def __init__(self, model: nn.Module, adapter: Adapter, inputs: Mapping[str, Any], report: RunReport) -> None:
        reason = unsupported_reason(adapter)
        if reason is not None:
            raise UnsupportedModelError(reason)
        self.model = model
        self.adapter = adapter
        self.inputs = dict(inputs)
        input_ids = inputs["input_ids"]
        if input_ids.shape[0] != 1:
            raise UnsupportedModelError(f"the ideal is defined for one prompt; got a batch of {input_ids.shape[0]}")
        mask = inputs.get("attention_mask")
        keep = mask.bool().cpu() if mask is not None else torch.ones_like(input_ids, dtype=torch.bool).cpu()
        kept = {(r.sample, r.image): r.kept_stage1 for r in report.images}
        for span in adapter.image_spans(input_ids, VisionProbes(), inputs):
            dropped = torch.ones(span.positions.numel(), dtype=torch.bool)
            dropped[torch.tensor(kept[(span.sample, span.image)], dtype=torch.long)] = False
            keep[span.sample, span.positions[dropped]] = False
        self.kept_positions = torch.nonzero(keep[0]).flatten().to(input_ids.device)     # [L']
        with torch.no_grad():
            captured = language_model_inputs(model, adapter, inputs)
        full = adapter.full_position_ids(captured.get(Keyword.POSITION_IDS), input_ids, mask, past_length=0)
        if full.dim() == 3 and full.shape[0] == 4:  # generate's layout: a plain text row first
            full = full[1:]
        self.position_ids = full[..., self.kept_positions]                               # [1, L'] or [3, 1, L']
        self.attention_mask = torch.ones(1, self.kept_positions.numel(), dtype=torch.long, device=input_ids.device)

    @property
    def num_tokens(self) -> int:
        """Tokens the language model receives: the kept visual tokens plus the text."""
        return int(self.kept_positions.numel())

    def embeddings(self) -> torch.Tensor:
        """``[1, L', D]`` the language model's input: the model's own forward up to its language
        model (vision tower, projector, features written at the image and video tokens), the kept
        positions gathered."""
        return language_model_inputs(self.model, self.adapter, self.inputs)[Keyword.INPUTS_EMBEDS][:, self.kept_positions]

    def prefill(self) -> Any:
        """One prefill as ``generate`` runs it (KV cache filled, last position's logits only)."""
        return self.model(inputs_embeds=self.embeddings(), attention_mask=self.attention_mask,
                          position_ids=self.position_ids, logits_to_keep=1, use_cache=True)

    def generate(self, new_tokens: int) -> torch.Tensor:
        """``[1, new_tokens]``: greedy decoding of exactly ``new_tokens`` tokens; positions continue
        from the full sequence's, as in the tokred run (every axis one past the last token's, which
        is text: for M-RoPE the unreduced model's ``cache length + rope_deltas``)."""
        return self.model.generate(inputs_embeds=self.embeddings(), attention_mask=self.attention_mask,
                                   position_ids=self.position_ids, max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False)
