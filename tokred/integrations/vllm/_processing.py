"""Multimodal-processor side of the integration: how many placeholder tokens each image gets.

vLLM fixes an image's placeholder count in the front end, before the vision encoder runs, so the
kept count ``k`` may depend only on the image's token count and the budget. The processor computes
``k`` once per image, shrinks the image's placeholder run to ``k`` and ships ``k`` to the model as a
multimodal field (``tokred_keep``), so the model keeps exactly as many embeddings as there are
placeholders, whatever budget the request asked for.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ._config import engine_choice, request_budget, split_request_kwargs

__all__ = ["KEEP_FIELD", "TokredInfoMixin", "TokredProcessorMixin"]

#: The multimodal field that carries each image's kept count from the processor to the model.
KEEP_FIELD = "tokred_keep"


class TokredInfoMixin:
    """Processing info: keeps tokred's request keys away from the HF processor."""

    def get_hf_processor(self, **kwargs: object) -> Any:
        return super().get_hf_processor(**split_request_kwargs(kwargs)[1])  # type: ignore[misc]


class TokredProcessorMixin:
    """Multimodal processor: adds ``tokred_keep`` per image and shortens the placeholder runs."""

    def _tokred_num_tokens(self, processed: Any) -> list[int] | None:
        """Visual tokens of each image in the HF processor's output (``None``: no images)."""
        raise NotImplementedError

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> Any:
        _, rest = split_request_kwargs(hf_kwargs)
        processed = super()._call_hf_processor(hf_data, rest)  # type: ignore[misc]
        budget = request_budget(engine_choice(self.info.get_hf_config()), hf_kwargs)  # type: ignore[attr-defined]
        counts = self._tokred_num_tokens(processed)
        if budget is not None and counts:
            processed[KEEP_FIELD] = torch.tensor([budget.tokens_for(n) for n in counts], dtype=torch.long)
        return processed

    def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, Any]:
        from vllm.multimodal.inputs import MultiModalFieldConfig

        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))  # type: ignore[misc]
        if KEEP_FIELD in hf_inputs:
            fields[KEEP_FIELD] = MultiModalFieldConfig.batched("image")
        return fields

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: Any) -> Sequence[Any]:
        from vllm.multimodal.processing import PromptReplacement

        updates = super()._get_prompt_updates(  # type: ignore[misc]
            mm_items, split_request_kwargs(hf_processor_mm_kwargs)[1], out_mm_kwargs)
        items = out_mm_kwargs.get("image", []) if hasattr(out_mm_kwargs, "get") else []
        if not items or KEEP_FIELD not in items[0]:
            return updates

        def shortened(update: Any) -> Any:
            full = update.replacement

            def replacement(item_idx: int) -> list[int]:
                tokens = full(item_idx) if callable(full) else full
                if not isinstance(tokens, list) or len(set(tokens)) != 1:
                    raise NotImplementedError("tokred in vLLM: image placeholders that are not one repeated token")
                k = int(items[item_idx][KEEP_FIELD].data)
                return tokens[:k]

            return PromptReplacement(modality=update.modality, target=update.target, replacement=replacement)

        return [shortened(u) if u.modality == "image" else u for u in updates]


def keep_counts(kwargs: dict[str, object]) -> list[int] | None:
    """Pop ``tokred_keep`` from ``embed_multimodal``'s kwargs: one count per image, or ``None``."""
    keep = kwargs.pop(KEEP_FIELD, None)
    if keep is None:
        return None
    if isinstance(keep, torch.Tensor):
        return [int(v) for v in keep.flatten().tolist()]
    return [int(torch.as_tensor(v).item()) for v in keep]  # type: ignore[union-attr]
