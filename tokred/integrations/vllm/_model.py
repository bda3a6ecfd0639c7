"""What the model subclasses of every family share: engine checks, stage I in ``embed_multimodal``,
positions through ``get_mrope_input_positions`` and ``recompute_mrope_positions``.

A family module subclasses vLLM's model class with :class:`TokredModelMixin` first in the bases and
implements :meth:`TokredModelMixin._tokred_encode` (the image embeddings and the selector inputs)
and :meth:`TokredModelMixin._tokred_cells` (the unreduced positions of an image's tokens). Without
an engine-wide tokred method (``hf_overrides={"tokred": ...}``) every method falls through to
vLLM's own, so the subclass is the stock model.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ...errors import ScheduleError
from ...tokens import ImageLayout
from ._config import TokredConfig, engine_config
from ._positions import CHANNELS, Media, encode_shifts, prompt_positions, recompute_positions
from ._processing import RUN_FIELD, ImageFields, pop_image_fields
from ._stage1 import ReductionLog, reduce_image

__all__ = ["EncodedImage", "TokredModelMixin", "CPU_WORKER"]

#: The worker class a CPU engine needs for original positions (see :mod:`.workers`).
CPU_WORKER = "tokred.integrations.vllm.workers.TokredCPUWorker"


@dataclass
class EncodedImage:
    """One image after vLLM's vision encoder and projector, as stage I needs it.

    Attributes:
        run: ``[R, D]`` the embeddings of the image's whole placeholder run.
        layout: the layout of its ``N`` candidate tokens.
        candidates: ``[N]`` indices of the candidates in the run, or ``None`` (all ``R``).
        cls_attention: ``[N]`` or ``None``; pre_projector: ``[N, D_v]`` or ``None``.
    """

    run: torch.Tensor
    layout: ImageLayout
    candidates: torch.Tensor | None = None
    cls_attention: torch.Tensor | None = None
    pre_projector: torch.Tensor | None = None


def _worker_class(qualname: str) -> type | None:
    module, _, name = qualname.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)  # type: ignore[no-any-return]
    except (ImportError, AttributeError, ValueError):
        return None


class TokredModelMixin:
    """Stage I of the engine's (or the request's) tokred config in a vLLM multimodal model."""

    #: Family name for messages.
    tokred_family: str = ""
    #: Whether the model itself uses M-RoPE (Qwen-VL), as opposed to tokred giving a 1-D RoPE model
    #: three equal rows to get per-request positions (LLaVA).
    tokred_native_mrope: bool = False

    # ------------------------------------------------------------------ set-up

    def _tokred_init(self, vllm_config: Any, placeholder_ids: Sequence[int]) -> None:
        """Read the engine's tokred config and refuse engines that cannot run it correctly."""
        self.tokred_config: TokredConfig | None = engine_config(self.config)  # type: ignore[attr-defined]
        self.tokred_placeholder_ids = tuple(int(i) for i in placeholder_ids)
        self.tokred_log = ReductionLog()
        self.tokred_recompute = False
        if self.tokred_config is None:
            return
        model_config = vllm_config.model_config
        mm_config = model_config.get_multimodal_config()
        family = self.tokred_family
        if getattr(mm_config, "enable_mm_embeds", False):
            raise ValueError(
                f"tokred on {family}: precomputed image embeddings (enable_mm_embeds) bypass the vision encoder "
                "and the processor's token counts; start the engine without enable_mm_embeds"
            )
        if self.tokred_native_mrope and self.tokred_config.positions == "renumber":
            raise ScheduleError(
                f"{family}: positions='renumber' is not supported for M-RoPE models (3-axis positions of an image "
                "grid have no established renumbering after pruning; tokred's transformers adapter refuses it too); "
                "use positions='original'"
            )
        if self.tokred_config.positions == "renumber":
            return  # vLLM's own contiguous positions are the renumbered ones
        if not model_config.uses_mrope:
            raise ValueError(
                f"tokred on {family} with positions='original' (the default) needs vLLM's per-request positions: add "
                '"mrope_section": [1, 1, 1] to hf_overrides next to "tokred" (tokred then gives the 1-D RoPE model '
                "three equal position rows and the language model reads the first), or choose "
                '"positions": "renumber" (contiguous positions, no extra engine arguments)'
            )
        if not mm_config.is_multimodal_pruning_enabled():
            raise ValueError(
                f"tokred on {family} with positions='original' needs the engine argument video_pruning_rate > 0 "
                "(--video-pruning-rate 0.5): it is vLLM's switch for recompute_mrope_positions, which gives the kept "
                "tokens their original positions once the selector has run. tokred refuses videos while it is on, "
                "so the rate prunes nothing else"
            )
        from ._compat import current_platform

        if current_platform.is_cpu():
            from .workers import TokredCPUWorker

            worker = _worker_class(str(vllm_config.parallel_config.worker_cls))
            if worker is None or not issubclass(worker, TokredCPUWorker):
                raise ValueError(
                    f"tokred on {family} with positions='original' on CPU needs the engine argument "
                    f"worker_cls={CPU_WORKER!r} (--worker-cls {CPU_WORKER}): vLLM 0.32's CPU model runner never "
                    "enables recompute_mrope_positions (its GPU runner does), and that worker enables it the way the "
                    "GPU runner does"
                )
        # Instance attribute: the runner asks the model (supports_multimodal_pruning(model)) after loading it.
        self.supports_multimodal_pruning = True
        self.tokred_recompute = True

    # ------------------------------------------------------------------ family hooks

    def _tokred_encode(self, kwargs: dict[str, object], wants: frozenset[str]) -> list[EncodedImage]:
        """Run vLLM's vision path on the batch's images (``kwargs`` as ``embed_multimodal`` got them,
        tokred's fields removed); capture the selector inputs in ``wants``."""
        raise NotImplementedError

    def _tokred_cells(self, feature: Any) -> torch.Tensor:
        """``[3, R]``: the unreduced positions of an image's placeholder run relative to its start,
        from its ``MultiModalFeatureSpec``."""
        raise NotImplementedError

    def _tokred_embed_other(self, kwargs: dict[str, object]) -> Any:
        """``embed_multimodal`` of a batch that carries no tokred fields (stock behaviour)."""
        return super().embed_multimodal(**kwargs)  # type: ignore[misc]

    # ------------------------------------------------------------------ stage I

    def embed_multimodal(self, **kwargs: object) -> Any:
        fields = pop_image_fields(kwargs)  # type: ignore[arg-type]
        if fields is None:
            embeddings = self._tokred_embed_other(kwargs)  # type: ignore[arg-type]
            if self.tokred_config is not None and len(embeddings):
                # The processor gives every image of a tokred engine its fields and refuses videos.
                raise RuntimeError("tokred: media without tokred fields reached a tokred engine")
            return embeddings
        wants: frozenset[str] = frozenset().union(*(f.config.stage().selector.inputs for f in fields))
        images = self._tokred_encode(kwargs, wants)  # type: ignore[arg-type]
        if len(images) != len(fields):
            raise RuntimeError(f"tokred: {len(images)} images encoded but {len(fields)} carry tokred fields")
        return [self._reduce(image, field) for image, field in zip(images, fields)]

    def _reduce(self, image: EncodedImage, fields: ImageFields) -> torch.Tensor:
        if image.run.shape[0] != fields.run:
            raise RuntimeError(f"tokred: the encoder gave {image.run.shape[0]} embeddings for an image the processor "
                               f"counted {fields.run} placeholders for")
        kept, reduction = reduce_image(fields.config.schedule(), image.run, keep=fields.keep, layout=image.layout,
                                       candidates=image.candidates, cls_attention=image.cls_attention,
                                       pre_projector=image.pre_projector, label=fields.config.to_json())
        self.tokred_log.append(reduction)
        if not self.tokred_recompute:
            return kept
        cells = self._tokred_run_cells(image, fields)                                   # [3, R]
        kept_in_run = torch.tensor(reduction.kept_in_run, dtype=torch.long)
        return self._with_shifts(kept, (cells[:, kept_in_run] - cells[:, :fields.keep]).T)

    def _tokred_run_cells(self, image: EncodedImage, fields: ImageFields) -> torch.Tensor:
        """``[3, R]`` unreduced positions of the run, for the shift columns (1-D by default)."""
        from ._positions import line_cells

        return line_cells(fields.run)

    @staticmethod
    def _with_shifts(embeddings: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
        return torch.cat([embeddings, encode_shifts(shifts, embeddings.dtype, embeddings.device)], dim=1)

    # ------------------------------------------------------------------ positions

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features: list[Any]) -> tuple[torch.Tensor, int]:
        """Per-request positions (vLLM's M-RoPE hook): text exact, reduced images provisional until
        :meth:`recompute_mrope_positions` (see :mod:`._positions`)."""
        if self.tokred_config is None:
            if self.tokred_native_mrope:
                return super().get_mrope_input_positions(input_tokens, mm_features)  # type: ignore[misc]
            return prompt_positions(len(input_tokens), [])  # a 1-D model run as M-RoPE without tokred
        media = []
        for feature in mm_features:
            if feature.modality != "image":
                raise RuntimeError(f"tokred: a {feature.modality} input reached a tokred engine (the processor refuses them)")
            media.append(Media(int(feature.mm_position.offset), int(feature.mm_position.length), self._tokred_cells(feature)))
        return prompt_positions(len(input_tokens), media, renumber=self.tokred_config.positions == "renumber")

    def recompute_mrope_positions(self, input_ids: Any, multimodal_embeddings: Sequence[torch.Tensor],
                                  mrope_positions: torch.Tensor, num_computed_tokens: int) -> tuple[Any, torch.Tensor, int]:
        """vLLM's pruning hook: strip the shift columns and put the kept tokens at their original positions."""
        if not self.tokred_recompute:
            return super().recompute_mrope_positions(  # type: ignore[misc]
                input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens)
        return recompute_positions(input_ids, multimodal_embeddings, mrope_positions, num_computed_tokens,
                                   self.tokred_placeholder_ids)


def feature_run(feature: Any) -> int:
    """The unreduced placeholder count of an image from its ``MultiModalFeatureSpec`` (tokred's
    :data:`RUN_FIELD`), or its placeholder length where tokred did not touch it."""
    data = feature.data
    if data is not None and RUN_FIELD in data:
        return int(data[RUN_FIELD].data)
    return int(feature.mm_position.length)


__all__ += ["feature_run", "CHANNELS"]
