"""LLaVA-NeXT (``LlavaNextForConditionalGeneration``, "anyres") in vLLM with a tokred Selector.

An image's placeholder run is the thumbnail's ``s * s`` tokens, then the tiles merged into one grid
cropped to the image's aspect ratio with a newline token after every row, exactly as tokred's
``LlavaNextAdapter`` lays it out (:func:`tokred.adapters.llava_next.anyres_layout`, computed from
the image size with transformers' own ``unpad_image``). As with the adapter's default
``newline_tokens="keep"``, newline tokens are not candidates: they always stay and are not counted
in the budget, so an image keeps ``newlines + k`` placeholders. ``Budget(spread="tiles")`` splits
``k`` over the thumbnail and the tiles (``tokred.decisions.select_image_tokens``).

Selector inputs as in the adapter: ``cls_attention`` per encoder row (each token gets the attention
its own tile's [CLS] paid it; CLIP towers only) and ``pre_projector``. Positions and the engine
arguments they need: as for LLaVA-1.5 (:mod:`.llava`).
"""

from __future__ import annotations

from typing import Any

import torch

from ... import compat
from ...adapters.llava_next import anyres_layout
from ...tokens import ImageLayout
from ._compat import (  # vLLM's names, through the one module that knows each release's spelling
    MULTIMODAL_REGISTRY,
    LlavaDummyInputsBuilder,
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)
from ._model import EncodedImage, TokredModelMixin
from ._probes import Probes, capture
from ._processing import ImageRun, TokredInfoMixin, TokredProcessorMixin
from .llava import FLAT_TOWER, LlavaLineMixin, cls_probe_target

__all__ = ["TokredLlavaNextForConditionalGeneration", "image_layout"]


def image_layout(config: Any, height: int, width: int) -> tuple[ImageLayout, torch.Tensor, torch.Tensor, int]:
    """One image's layout for a LLaVA-NeXT ``config`` and its original ``height x width``.

    Returns ``(candidate layout, candidates [N] (indices into the run), probe cells [N] (each
    candidate's cell in the image's encoder rows), run length R)``."""
    get_anyres_image_grid_shape = compat.modeling_function("llava_next.modeling_llava_next", "get_anyres_image_grid_shape")
    tile_px = int(config.vision_config.image_size)
    side = tile_px // int(config.vision_config.patch_size)
    high, wide = get_anyres_image_grid_shape((height, width), config.image_grid_pinpoints, tile_px)
    full, cells = anyres_layout(int(high), int(wide), side, (height, width))
    patches = ~full.extra  # type: ignore[operator]
    layout = ImageLayout(full.tile[patches], full.row[patches], full.col[patches], full.grids, full.thumbnail_tile)
    return layout, torch.nonzero(patches).flatten(), cells[patches], full.num_tokens


class TokredLlavaNextProcessingInfo(TokredInfoMixin, LlavaNextProcessingInfo):
    pass


class TokredLlavaNextMultiModalProcessor(TokredProcessorMixin, LlavaNextMultiModalProcessor):
    def _tokred_image_runs(self, processed: Any) -> list[ImageRun]:
        sizes = processed.get("image_sizes")
        if sizes is None:
            return []
        config = self.info.get_hf_config()
        runs = []
        for height, width in sizes.tolist():
            layout, _, _, run = image_layout(config, int(height), int(width))
            expected = self.info.get_num_image_tokens(image_width=int(width), image_height=int(height))
            if run != expected:
                raise RuntimeError(f"tokred: a {height}x{width} LLaVA-NeXT image has {run} tokens by transformers' layout "
                                   f"but {expected} by vLLM's count")
            runs.append(ImageRun(run, layout.num_tokens))
        return runs


@MULTIMODAL_REGISTRY.register_processor(
    TokredLlavaNextMultiModalProcessor, info=TokredLlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class TokredLlavaNextForConditionalGeneration(LlavaLineMixin, TokredModelMixin, LlavaNextForConditionalGeneration):
    """vLLM's LLaVA-NeXT with stage I of the tokred config; the stock model where none is chosen."""

    tokred_family = "llava_next"
    hf_to_vllm_mapper = FLAT_TOWER | LlavaNextForConditionalGeneration.hf_to_vllm_mapper

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self._tokred_init(vllm_config, [self.config.image_token_index])
        if self.tokred_config is not None and self.config.vision_feature_select_strategy == "full":
            raise ValueError("tokred: LLaVA-NeXT with vision_feature_select_strategy='full' is not supported "
                             "(as in the transformers adapter: the packing assumes the [CLS] token was dropped)")

    def _tokred_encode(self, kwargs: dict[str, object], wants: frozenset[str]) -> list[EncodedImage]:
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":
            raise RuntimeError("tokred: image embeddings reached a tokred engine (refused at start)")
        pixel_values = image_input["pixel_values"]
        rows = [int(v.shape[0]) for v in pixel_values]  # encoder rows per image (tiles, padding included)
        probes = Probes()
        target = cls_probe_target(self.vision_tower, self.config.vision_config) if "cls_attention" in wants else None
        with capture(probes, attention=target[0] if target else None, total_heads=target[1] if target else 0,
                     projector=self.multi_modal_projector if "pre_projector" in wants else None):
            embeddings = self._process_image_input(image_input)
        cls_rows = torch.stack(probes.cls_attention)[:, 1:] if probes.cls_attention else None     # [rows, s*s]
        pre_rows = torch.cat([p.reshape(-1, *p.shape[-2:]) for p in probes.pre_projector]) if probes.pre_projector else None
        images, first = [], 0
        for run, (height, width), count in zip(embeddings, image_input["image_sizes"].tolist(), rows, strict=True):
            layout, candidates, cells, _ = image_layout(self.config, int(height), int(width))
            cls = None if cls_rows is None else cls_rows[first:first + count].flatten()[cells.to(cls_rows.device)]
            pre = None
            if pre_rows is not None:
                flat = pre_rows[first:first + count].reshape(-1, pre_rows.shape[-1])
                pre = flat[cells.to(flat.device)]
            images.append(EncodedImage(run=run, layout=layout, candidates=candidates, cls_attention=cls, pre_projector=pre))
            first += count
        return images
