"""The ideal of a stage-I reduction: the same model fed only the kept tokens from the start.

A stage-I-only run (a Selector, no Gates) claims to equal "the language model sees only the kept
tokens, at the positions they had in the full sequence". :class:`Ideal` builds exactly that without
tokred: it computes the image features with the model's own vision tower and projector, writes them
into the embedded prompt, keeps the kept positions, and calls the model with ``inputs_embeds``, the
original position ids and an explicit all-ones attention mask (with no mask, non-contiguous position
ids would be read as packed sequences). No hook is installed. The time between a tokred run and this
is what the framework costs: selection, bookkeeping, hooks.

Schedules with Gates have no such ideal: tokens leave in the middle of the decoder, which no plain
call of the model can express without hooks, i.e. without doing what tokred does. The benchmark
gives them no ideal column and compares them with the unreduced model only.

The ideal is built from the kept indices alone, so it cannot stand for merging selectors (which
replace features): the benchmark compares its logits and generated tokens with the tokred run's and
reports both, so a mismatch shows instead of passing silently.

Implemented for models whose multimodal module has LLaVA's ``get_image_features(pixel_values, ...)``
and scatters one feature row per image token (LLaVA-1.5).
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch
import torch.nn as nn

from ..adapters.base import Adapter, VisionProbes
from ..errors import UnsupportedModelError
from ..runtime import RunReport

__all__ = ["Ideal", "unsupported_reason"]


def unsupported_reason(adapter: Adapter) -> str | None:
    """Why :class:`Ideal` cannot be built for the adapter's model, or ``None`` when it can."""
    get_features = getattr(adapter.multimodal_model(), "get_image_features", None)
    if get_features is None or "vision_feature_select_strategy" not in inspect.signature(get_features).parameters:
        return (f"no ideal for {type(adapter.model).__name__}: it is built from LLaVA's and LLaVA-NeXT's "
                "get_image_features(pixel_values, [image_sizes,] vision_feature_layer, vision_feature_select_strategy)")
    return None


class Ideal:
    """The model fed only the tokens a stage-I run kept (one prompt, batch size 1).

    Args:
        model: the vision-language model (no tokred run active on it when called).
        adapter: its adapter, to locate each image's tokens.
        inputs: the processor's outputs (``input_ids``, ``attention_mask``, ``pixel_values``), on
            the model's device.
        report: the report of a stage-I-only prefill of these inputs; ``images[i].kept_stage1``
            are the kept indices of image ``i``.

    Raises:
        UnsupportedModelError: :func:`unsupported_reason` gives a reason, or the batch holds more
            than one prompt.
    """

    def __init__(self, model: nn.Module, adapter: Adapter, inputs: Mapping[str, Any], report: RunReport) -> None:
        reason = unsupported_reason(adapter)
        if reason is not None:
            raise UnsupportedModelError(reason)
        self.model = model
        self.multimodal = adapter.multimodal_model()
        input_ids = inputs["input_ids"]
        if input_ids.shape[0] != 1:
            raise UnsupportedModelError(f"the ideal is defined for one prompt; got a batch of {input_ids.shape[0]}")
        self.input_ids = input_ids
        self.pixel_values = inputs["pixel_values"]
        # Inputs the encoder needs beyond the pixels, when the model asks for them (LLaVA-NeXT: image_sizes).
        parameters = inspect.signature(self.multimodal.get_image_features).parameters
        self.encoder_inputs = {name: inputs[name] for name in ("image_sizes",) if name in parameters and name in inputs}
        mask = inputs.get("attention_mask")
        keep = mask.bool().cpu() if mask is not None else torch.ones_like(input_ids, dtype=torch.bool).cpu()
        self.image_mask = input_ids == adapter.image_token_id()                          # [1, L]
        kept = {(r.sample, r.image): r.kept_stage1 for r in report.images}
        for span in adapter.image_spans(input_ids, VisionProbes(), inputs):
            dropped = torch.ones(span.positions.numel(), dtype=torch.bool)
            dropped[torch.tensor(kept[(span.sample, span.image)], dtype=torch.long)] = False
            keep[span.sample, span.positions[dropped]] = False
        self.kept_positions = torch.nonzero(keep[0]).flatten().to(input_ids.device)     # [L']
        full = adapter.full_position_ids(None, input_ids, mask, past_length=0)           # [1, L] or [k, 1, L]
        self.position_ids = full[..., self.kept_positions]
        self.attention_mask = torch.ones(1, self.kept_positions.numel(), dtype=torch.long, device=input_ids.device)

    @property
    def num_tokens(self) -> int:
        """Tokens the language model receives: the kept visual tokens plus the text."""
        return int(self.kept_positions.numel())

    def embeddings(self) -> torch.Tensor:
        """``[1, L', D]`` the language model's input: vision tower and projector on the image,
        features written at the image tokens, kept positions gathered."""
        config = self.model.config
        features = self.multimodal.get_image_features(
            pixel_values=self.pixel_values,
            **self.encoder_inputs,
            vision_feature_layer=config.vision_feature_layer,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
        ).pooler_output
        features = torch.cat(list(features)) if isinstance(features, (list, tuple)) else features.reshape(-1, features.shape[-1])
        embeds = self.multimodal.get_input_embeddings()(self.input_ids)
        embeds = embeds.masked_scatter(self.image_mask[..., None].to(embeds.device), features.to(embeds.dtype))
        return embeds[:, self.kept_positions]

    def prefill(self) -> Any:
        """One prefill as ``generate`` runs it (KV cache filled, last position's logits only)."""
        return self.model(inputs_embeds=self.embeddings(), attention_mask=self.attention_mask,
                          position_ids=self.position_ids, logits_to_keep=1, use_cache=True)

    def generate(self, new_tokens: int) -> torch.Tensor:
        """``[1, new_tokens]``: greedy decoding of exactly ``new_tokens`` tokens; positions continue
        from the full sequence's, as in the tokred run."""
        return self.model.generate(inputs_embeds=self.embeddings(), attention_mask=self.attention_mask,
                                   position_ids=self.position_ids, max_new_tokens=new_tokens,
                                   min_new_tokens=new_tokens, do_sample=False)
