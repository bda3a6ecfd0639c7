"""Qwen2-VL and Qwen2.5-VL in vLLM with a tokred Selector before the language model.

Positions (M-RoPE): the kept tokens keep their original (t, h, w) positions and the text after an
image keeps the positions it has in the unreduced sequence, as in tokred's transformers runtime. vLLM
computes a request's positions before the encoder runs (``get_mrope_input_positions``: here
provisional ones for the shortened placeholder runs) and corrects them after it through
``recompute_mrope_positions``, the mechanism of EVS (``vllm/multimodal/video_prune/evs.py``): each
kept embedding carries 4 extra channels ``(t, h, w, next)`` that the correction strips. vLLM's model
runner calls the correction only when the engine's ``video_pruning_rate`` is above 0, so a tokred
method on these models requires it (any value; on Qwen2.5-VL it also turns on EVS for videos).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor
from vllm.model_executor.models.interfaces import SupportsMultiModalPruning
from vllm.model_executor.models.qwen2_5_vl import (
    Qwen2_5_VLDummyInputsBuilder,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLMultiModalProcessor,
    Qwen2_5_VLProcessingInfo,
)
from vllm.model_executor.models.qwen2_vl import (
    Qwen2VLDummyInputsBuilder,
    Qwen2VLForConditionalGeneration,
    Qwen2VLMultiModalProcessor,
    Qwen2VLProcessingInfo,
)
from vllm.logger import init_logger
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.video_prune import evs

from ._compat import has_torchvision, image_only
from ._config import engine_choice, split_request_kwargs
from ._processing import TokredInfoMixin, TokredProcessorMixin, keep_counts
from ._stage1 import select_image

logger = init_logger(__name__)

__all__ = ["TokredQwen2VLForConditionalGeneration", "TokredQwen2_5_VLForConditionalGeneration"]


class _QwenInfoMixin(TokredInfoMixin):
    def get_supported_mm_limits(self):  # type: ignore[no-untyped-def]
        limits = dict(super().get_supported_mm_limits())  # type: ignore[misc]
        if not has_torchvision():  # no video processor: see _compat.image_only
            limits.pop("video", None)
        return limits

    def get_image_processor(self, **kwargs: object):  # type: ignore[no-untyped-def]
        return super().get_image_processor(**split_request_kwargs(kwargs)[1])  # type: ignore[misc]


class _QwenProcessorMixin(TokredProcessorMixin):
    def _tokred_num_tokens(self, processed):  # type: ignore[no-untyped-def]
        grid_thw = processed.get("image_grid_thw")
        if grid_thw is None:
            return None
        merge = self.info.get_hf_config().vision_config.spatial_merge_size
        return [int(g.prod()) // merge**2 for g in grid_thw]


class TokredQwen2VLProcessingInfo(_QwenInfoMixin, Qwen2VLProcessingInfo):
    def get_hf_processor(self, **kwargs: object):  # type: ignore[no-untyped-def]
        return self.ctx.get_hf_processor(image_only(Qwen2VLProcessor), **split_request_kwargs(kwargs)[1])


class TokredQwen2VLMultiModalProcessor(_QwenProcessorMixin, Qwen2VLMultiModalProcessor):
    pass


class TokredQwen2_5_VLProcessingInfo(_QwenInfoMixin, Qwen2_5_VLProcessingInfo):
    def get_hf_processor(self, **kwargs: object):  # type: ignore[no-untyped-def]
        return self.ctx.get_hf_processor(image_only(Qwen2_5_VLProcessor), **split_request_kwargs(kwargs)[1])


class TokredQwen2_5_VLMultiModalProcessor(_QwenProcessorMixin, Qwen2_5_VLMultiModalProcessor):
    pass


def _media_positions(grid_thw: torch.Tensor, merge: int, tokens_per_second: float = 1.0,
                     second_per_grid: float = 1.0) -> torch.Tensor:
    """``[T*H*W, 4]``: each token's (t, h, w) relative to the media start, and where the text after
    the media starts (``max`` over the grid + 1, as in the unreduced sequence)."""
    positions = evs.compute_mrope_for_media(grid_thw, merge, tokens_per_second, second_per_grid)
    positions[:, 3] = positions[:, :3].max() + 1
    return positions


class _TokredQwenMixin:
    """What Qwen2-VL and Qwen2.5-VL share: selection, provisional and recomputed positions.

    Implements ``SupportsMultiModalPruning`` by its flags (inheriting the Protocol class would put
    ``Protocol.__init__`` before the model's own in the MRO)."""

    supports_multimodal_pruning = SupportsMultiModalPruning.supports_multimodal_pruning
    supported_video_pruning_methods = SupportsMultiModalPruning.supported_video_pruning_methods

    def _tokred_init(self, vllm_config) -> None:  # type: ignore[no-untyped-def]
        self.tokred_choice = engine_choice(self.config)
        mm_config = vllm_config.model_config.get_multimodal_config()
        self.is_multimodal_pruning_enabled = mm_config.is_multimodal_pruning_enabled()
        if self.tokred_choice is not None and not self.is_multimodal_pruning_enabled:
            raise ValueError(
                "tokred on an M-RoPE model (Qwen-VL) needs the engine argument video_pruning_rate > 0 "
                "(e.g. 0.5): only then does vLLM hand the kept tokens their original positions "
                "(recompute_mrope_positions); on Qwen2.5-VL it also prunes videos with EVS"
            )
        # vLLM 0.32's CPUModelRunner.load_model never sets is_multimodal_pruning_enabled (the GPU
        # runner's does), so on CPU recompute_mrope_positions is never called: appended position
        # channels would reach the LLM. There the survivors keep the provisional positions.
        from vllm.platforms import current_platform

        self.tokred_recomputes_positions = self.is_multimodal_pruning_enabled and not current_platform.is_cpu()
        if self.tokred_choice is not None and not self.tokred_recomputes_positions:
            logger.warning(
                "tokred: vLLM's CPU runner does not call recompute_mrope_positions; kept image tokens get "
                "provisional M-RoPE positions (the first k cells of their grid), not their original ones"
            )

    # ------------------------------------------------------------------ stage I

    def _tokred_images(self, image_input, keep: list[int] | None) -> tuple[torch.Tensor, ...]:  # type: ignore[no-untyped-def]
        import tokred

        embeddings = self._process_image_input(image_input)
        merge = self.visual.spatial_merge_size
        grids = image_input["image_grid_thw"]
        stage = self.tokred_choice.stage() if self.tokred_choice is not None else None
        out = []
        for i, image in enumerate(embeddings):
            t, h, w = (int(v) for v in grids[i])
            k = keep[i] if keep is not None else image.shape[0]
            if stage is not None and k < image.shape[0]:
                layout = tokred.ImageLayout.grid(h // merge, w // merge) if t == 1 else None
                if layout is None:
                    raise NotImplementedError("tokred in vLLM: images with more than one temporal patch")
                indices, image = select_image(stage, image, layout, k)
            else:
                indices = torch.arange(image.shape[0])
            if self.tokred_recomputes_positions:
                positions = _media_positions(grids[i].cpu(), merge)[indices]
                image = torch.cat([image, positions.to(device=image.device, dtype=image.dtype)], dim=1)
            out.append(image)
        return tuple(out)

    def _tokred_videos(self, video_input) -> tuple[torch.Tensor, ...]:  # type: ignore[no-untyped-def]
        videos = self._process_video_input(video_input)
        if not self.tokred_recomputes_positions:
            return tuple(videos)
        if hasattr(self, "_postprocess_video_embeds_evs"):  # Qwen2.5-VL: its processor pruned them with EVS
            return self._postprocess_video_embeds_evs(videos, video_input)
        merge = self.visual.spatial_merge_size
        return tuple(
            torch.cat([v, _media_positions(g.cpu(), merge).to(device=v.device, dtype=v.dtype)], dim=1)
            for v, g in zip(videos, video_input["video_grid_thw"])
        )

    def embed_multimodal(self, **kwargs: object):  # type: ignore[no-untyped-def]
        keep = keep_counts(kwargs)
        if self.tokred_choice is None:
            return super().embed_multimodal(**kwargs)  # type: ignore[misc]
        embeddings: tuple[torch.Tensor, ...] = ()
        for modality, parsed in self._parse_and_validate_multimodal_inputs(**kwargs).items():
            if parsed is None:
                continue
            if modality.startswith("image"):
                embeddings += self._tokred_images(parsed, keep)
            else:
                embeddings += self._tokred_videos(parsed)
        return embeddings

    # ------------------------------------------------------------------ positions

    def get_mrope_input_positions(self, input_tokens: list[int], mm_features):  # type: ignore[no-untyped-def]
        """Positions of the shortened prompt: text and any unreduced media exact; a reduced image's
        tokens provisionally the first ``k`` cells of its grid (``recompute_mrope_positions`` puts the
        survivors' own there); text after an image where it sits in the unreduced sequence."""
        if self.tokred_choice is None:
            return super().get_mrope_input_positions(input_tokens, mm_features)  # type: ignore[misc]
        features = sorted(mm_features, key=lambda f: f.mm_position.offset)
        pieces: list[np.ndarray] = []
        start = next_position = 0
        for feature, (offset, t, h, w, t_factor) in zip(features, self.iter_mm_grid_thw(mm_features)):
            text_len = offset - start
            pieces.append(np.broadcast_to(np.arange(text_len), (3, text_len)) + next_position)
            grid = np.indices((t, h, w))
            if t_factor != 1.0:
                grid[0] = (grid[0] * t_factor).astype(np.int64)
            grid = grid.reshape(3, -1) + text_len + next_position
            length = feature.mm_position.length
            pieces.append(grid[:, :length])
            next_position = int(grid.max()) + 1
            start = offset + length
        tail = len(input_tokens) - start
        pieces.append(np.broadcast_to(np.arange(tail), (3, tail)) + next_position)
        positions = np.concatenate(pieces, axis=1)
        return torch.from_numpy(positions), int(positions.max()) + 1 - len(input_tokens)

    def recompute_mrope_positions(self, input_ids, multimodal_embeddings: Sequence[torch.Tensor],
                                  mrope_positions: torch.LongTensor, num_computed_tokens: int):  # type: ignore[no-untyped-def]
        device = multimodal_embeddings[0].device if len(multimodal_embeddings) else mrope_positions.device
        ids = input_ids.to(torch.long) if isinstance(input_ids, torch.Tensor) else torch.tensor(input_ids, device=device)
        stripped = [mm[:, :-4] for mm in multimodal_embeddings]
        media = [mm[:, -4:].permute(1, 0).long() for mm in multimodal_embeddings]
        positions, delta = evs.recompute_mrope_positions(
            ids, media, mrope_positions, num_computed_tokens,
            self.config.vision_start_token_id, self.config.image_token_id, self.config.video_token_id,
        )
        return stripped, positions, delta


@MULTIMODAL_REGISTRY.register_processor(
    TokredQwen2VLMultiModalProcessor, info=TokredQwen2VLProcessingInfo, dummy_inputs=Qwen2VLDummyInputsBuilder
)
class TokredQwen2VLForConditionalGeneration(_TokredQwenMixin, Qwen2VLForConditionalGeneration):
    """vLLM's Qwen2-VL with stage I of the tokred method chosen in ``hf_overrides["tokred"]``."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:  # type: ignore[no-untyped-def]
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._tokred_init(vllm_config)


@MULTIMODAL_REGISTRY.register_processor(
    TokredQwen2_5_VLMultiModalProcessor, info=TokredQwen2_5_VLProcessingInfo,
    dummy_inputs=Qwen2_5_VLDummyInputsBuilder,
)
class TokredQwen2_5_VLForConditionalGeneration(_TokredQwenMixin, Qwen2_5_VLForConditionalGeneration):
    """vLLM's Qwen2.5-VL with stage I of the tokred method chosen in ``hf_overrides["tokred"]``.

    Videos are not touched by tokred: with ``video_pruning_rate > 0`` the stock EVS prunes them."""

    def __init__(self, *, vllm_config, prefix: str = "") -> None:  # type: ignore[no-untyped-def]
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._tokred_init(vllm_config)
