"""The front end: how many placeholder tokens each image keeps, and what travels to the model.

vLLM fixes an image's placeholder count in the multimodal processor, before the vision encoder
runs, so the kept count may depend only on the image's token count and the budget
(``Budget.tokens_for``), which holds for every tokred budget. For each image the processor

* computes the request's :class:`~tokred.integrations.vllm._config.TokredConfig` (the engine's,
  with the request's ``mm_processor_kwargs["tokred"]`` applied) and checks its budget against the
  image (``tokred.decisions.check_image_budgets``), so a bad request fails before the engine;
* shortens the image's placeholder run to the kept count (kept candidates plus the tokens that
  always stay, such as LLaVA-NeXT's row newlines);
* ships three multimodal fields to the model: :data:`KEEP_FIELD` (the kept placeholders),
  :data:`RUN_FIELD` (the unreduced run length) and :data:`CONFIG_FIELD` (the config as UTF-8 JSON),
  so that the model runs exactly the selection the processor counted, whatever the request chose.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from ...decisions import check_image_budgets
from ...errors import TokredError
from ._config import (
    CONFIG_KEY,
    TokredConfig,
    TokredRequestError,
    engine_config,
    request_config,
    split_request_kwargs,
)

__all__ = [
    "KEEP_FIELD", "RUN_FIELD", "CONFIG_FIELD", "FIELDS", "ImageRun", "ImageFields", "TokredInfoMixin",
    "TokredProcessorMixin", "pop_image_fields",
]

#: Multimodal fields the processor adds per image (batched over the request's images).
KEEP_FIELD = "tokred_keep"
RUN_FIELD = "tokred_run"
CONFIG_FIELD = "tokred_config"
FIELDS = (KEEP_FIELD, RUN_FIELD, CONFIG_FIELD)


@dataclass(frozen=True)
class ImageRun:
    """One image's placeholder run as the processor sees it: ``run`` placeholder tokens, of which
    ``candidates`` are visual tokens a selector may drop (the rest always stay)."""

    run: int
    candidates: int


class TokredInfoMixin:
    """Processing info: keeps tokred's request key away from the HF processor."""

    def get_hf_processor(self, **kwargs: object) -> Any:
        return super().get_hf_processor(**split_request_kwargs(kwargs)[1])  # type: ignore[misc]

    def tokred_engine_config(self) -> TokredConfig | None:
        return engine_config(self.get_hf_config())  # type: ignore[attr-defined]


class TokredProcessorMixin:
    """Multimodal processor: the kept count per image and the fields of the module notes."""

    def _tokred_image_runs(self, processed: Any) -> list[ImageRun]:
        """Every image's :class:`ImageRun`, in the order of the HF processor's output."""
        raise NotImplementedError(f"{type(self).__name__} must say how long each image's placeholder run is")

    def get_dummy_inputs(self, *args: Any, **kwargs: Any) -> Any:
        """vLLM's profiling inputs, which "after processing result in the maximum possible number of
        placeholder tokens": with a tokred engine, that is every token of the image, since a request
        may ask for a larger budget than the engine's (``{"keep_ratio": 1.0}``). vLLM sizes the
        encoder cache and profiles memory from these, so a larger per-request budget fits them
        (sized from the engine's reduced count, it was refused with a message about
        ``--limit-mm-per-prompt``)."""
        inputs = super().get_dummy_inputs(*args, **kwargs)  # type: ignore[misc]
        if self.info.tokred_engine_config() is not None:  # type: ignore[attr-defined]
            inputs.hf_processor_mm_kwargs = {**inputs.hf_processor_mm_kwargs, CONFIG_KEY: {"keep_ratio": 1.0}}
        return inputs

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> Any:
        _, rest = split_request_kwargs(hf_kwargs)
        config = request_config(self.info.tokred_engine_config(), hf_kwargs)  # type: ignore[attr-defined]
        if config is not None and hf_data.get("videos"):
            raise TokredRequestError(
                "tokred reduces images only (as its transformers adapters do); this request has videos. Serve videos "
                "from an engine without a tokred method"
            )
        processed = super()._call_hf_processor(hf_data, rest)  # type: ignore[misc]
        if config is None:
            return processed
        runs = self._tokred_image_runs(processed)
        if not runs:
            return processed
        keep = []
        for index, image in enumerate(runs):
            try:
                check_image_budgets(config.schedule(), [], image.candidates,
                                    f"image {index} of the request has {image.candidates} visual tokens")
                kept = config.stage().budget.tokens_for(image.candidates, what=f"image {index} of the request")
            except TokredError as exc:
                raise TokredRequestError(str(exc)) from exc
            keep.append(image.run - image.candidates + kept)
        text = config.to_json().encode()
        processed[KEEP_FIELD] = torch.tensor(keep, dtype=torch.long)
        processed[RUN_FIELD] = torch.tensor([image.run for image in runs], dtype=torch.long)
        processed[CONFIG_FIELD] = torch.tensor(list(text), dtype=torch.uint8).expand(len(runs), -1).clone()
        return processed

    def _get_mm_fields_config(self, hf_inputs: Any, hf_processor_mm_kwargs: Mapping[str, object]) -> Mapping[str, Any]:
        from ._compat import MultiModalFieldConfig

        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))  # type: ignore[misc]
        for name in FIELDS:
            if name in hf_inputs:
                # kept on the CPU: a prefix-cache hit that covers the image drops every field that is not
                # (vLLM's strip_covered_mm_data), and the model reads these back at every step
                fields[name] = MultiModalFieldConfig.batched("image", keep_on_cpu=True)
        return fields

    def _get_prompt_updates(self, mm_items: Any, hf_processor_mm_kwargs: Mapping[str, object],
                            out_mm_kwargs: Any) -> Sequence[Any]:
        updates = super()._get_prompt_updates(  # type: ignore[misc]
            mm_items, split_request_kwargs(hf_processor_mm_kwargs)[1], out_mm_kwargs)
        items = out_mm_kwargs.get("image", []) if hasattr(out_mm_kwargs, "get") else []
        if not items or KEEP_FIELD not in items[0]:
            return updates

        def shortened(update: Any) -> Any:
            full = update.replacement

            def replacement(item_idx: int) -> list[int]:
                tokens = full(item_idx) if callable(full) else full
                tokens = getattr(tokens, "full", tokens)  # PromptUpdateDetails
                if not isinstance(tokens, list) or len(set(tokens)) != 1:
                    raise TokredRequestError(
                        "tokred in vLLM: this model's image placeholders are not one repeated token, so they cannot "
                        "be shortened to the kept count"
                    )
                run = int(items[item_idx][RUN_FIELD].data)
                if len(tokens) != run:
                    raise RuntimeError(f"tokred: vLLM expands an image into {len(tokens)} placeholders but tokred "
                                       f"counted {run}; the family module reads the image size wrong")
                return tokens[:int(items[item_idx][KEEP_FIELD].data)]

            return type(update)(modality=update.modality, target=update.target, replacement=replacement)

        return [shortened(u) if u.modality == "image" else u for u in updates]


@dataclass(frozen=True)
class ImageFields:
    """What the processor shipped for one image: the kept placeholders, the unreduced run, the config."""

    keep: int
    run: int
    config: TokredConfig


def _rows(value: object) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return list(value.unbind(0)) if value.dim() >= 1 else [value]
    return [torch.as_tensor(v) for v in value]  # type: ignore[union-attr]


def pop_image_fields(kwargs: dict[str, object]) -> list[ImageFields] | None:
    """Pop the tokred fields from ``embed_multimodal``'s kwargs: one :class:`ImageFields` per image
    of the batch, in batch order, or ``None`` when the batch carries none (tokred off)."""
    values = {name: kwargs.pop(name, None) for name in FIELDS}
    if values[KEEP_FIELD] is None:
        return None
    keep, run, configs = (_rows(values[name]) for name in FIELDS)
    return [
        ImageFields(int(k.item()), int(r.item()), _config_from_bytes(bytes(c.flatten().cpu().tolist())))
        for k, r, c in zip(keep, run, configs, strict=True)
    ]


@lru_cache(maxsize=256)
def _config_from_bytes(raw: bytes) -> TokredConfig:
    return TokredConfig.from_json(raw.decode())
