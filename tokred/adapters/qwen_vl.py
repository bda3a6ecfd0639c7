"""Qwen2-VL, Qwen2.5-VL and Qwen3-VL (``Qwen2VLForConditionalGeneration``,
``Qwen2_5_VLForConditionalGeneration``, ``Qwen3VLForConditionalGeneration``).

The three share what matters to token reduction, measured on ``transformers`` 5.23 (the tests
also pass on 5.17):

* **Visual tokens.** The vision tower cuts an image into ``patch_size`` patches (14 px; 16 px for
  Qwen3-VL) on a grid of ``(t, h, w)`` patches (``image_grid_thw``; ``t = 1`` for images) and merges
  each ``2 x 2`` block (``spatial_merge_size``) into one token, so an image becomes
  ``t * (h / 2) * (w / 2)`` tokens in row-major order of the merged grid (144 for 336 px with 14 px
  patches). They sit where the processor expanded ``<|image_pad|>``, between ``<|vision_start|>`` and
  ``<|vision_end|>``. There is no [CLS] token, so no [CLS] attention: selectors get
  ``cls_attention=None`` and fall back as they document.
* **M-RoPE.** Position ids have three axes (temporal, height, width): text tokens advance all three
  together, an image's tokens take ``(start, start + row, start + col)``, and the text after an image
  resumes at ``start + max(h, w) / 2``. The multimodal model computes them with ``get_rope_index`` on
  the full sequence before calling its language model (``[3, B, L]``; ``generate`` passes
  ``[4, B, L]``, a plain text row first that transformers uses only to build masks) and stores
  ``rope_deltas = max position + 1 - real tokens`` per row. Decoding continues at
  ``cache length + rope_deltas``. tokred keeps the full sequence's positions for surviving tokens;
  renumbering them is refused (:meth:`QwenVLAdapter.validate`), because no rule for re-laying a 3-axis
  grid after pruning is established.
* **Qwen3-VL deepstack.** Features of intermediate vision layers are added to the visual positions
  of the outputs of the first ``len(deepstack_visual_indexes)`` decoder layers
  (``visual_pos_masks`` ``[B, L]``, ``deepstack_visual_embeds``: one ``[V, D]`` per layer, rows in
  row-major order of the mask). They are reduced with the sequence at stage I and, for gates inside
  those layers, at each gate (:class:`Qwen3VLAdapter`).

* **Videos.** The video processor samples frames and merges every 2 consecutive frames into one
  temporal patch (``temporal_patch_size``), so a video of ``F`` frames has ``t = ceil(F / 2)``
  temporal patches on a ``(t, h, w)`` grid (``video_grid_thw``) and becomes ``t * (h / 2) * (w / 2)``
  tokens, temporal patch after temporal patch, each row-major, where the processor expanded
  ``<|video_pad|>`` (32 frames at 448 x 448 px: 16 x 256 = 4,096 tokens). Qwen2-VL and Qwen2.5-VL
  place them in one run; their M-RoPE temporal axis advances by 1 per temporal patch (Qwen2.5-VL:
  by ``tokens_per_second * second_per_grid_ts``, i.e. in absolute time). Qwen3-VL writes every
  temporal patch as its own run, ``<t seconds><|vision_start|> ... <|vision_end|>``, whose temporal
  position is that of a still image: the timestamps carry the time; its deepstack features cover the
  video tokens too (``visual_pos_masks`` marks images and videos together). tokred sees each video as
  one span whose layout (:meth:`ImageLayout.video`) has one frame per temporal patch; budgets count
  over the whole video (``spread="tiles"``: per temporal patch). Ours: Qwen3-VL's timestamps and
  frame markers after the first frame are instruction text under the default rule of
  :meth:`Adapter.text_roles` (every text token after a row's first visual token).

* **Inputs without the processor.** A program may build ``pixel_values_videos`` /
  ``video_grid_thw`` and expand ``<|video_pad|>`` (or ``<|image_pad|>``) itself, leaving out
  ``mm_token_type_ids``. ``generate`` accepts that (measured on 5.17 and 5.25) but computes no M-RoPE
  then: every token, visual or not, gets plain text positions on all three axes and
  ``rope_deltas`` is 0 (the plain forward of Qwen2-VL and Qwen3-VL refuses such a call;
  Qwen2.5-VL's takes it, with text positions too). The positions then say nothing
  about the grid, so the adapter never reads a grid from them when it can know it otherwise: it
  takes the grids from ``*_grid_thw`` when the call carries them and, when ``generate`` dropped
  them (5.23+), from the vision tower's own call (:meth:`QwenVLAdapter.image_grids`). The
  positions themselves are kept as transformers computed them, so nothing dropped gives the
  unmodified model's outputs. ``tokred.testing.processor_free_video_inputs`` builds such
  inputs for the tests.

Not supported: pre-projector features (not captured; selectors that need them say so).
"""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from .. import compat
from ..compat import Keyword
from ..errors import RuntimeStateError, ScheduleError
from ..tokens import ImageLayout
from .base import Adapter, ImageSpan, VisionProbes, order_spans, split_image_tokens

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

__all__ = ["QwenVLAdapter", "Qwen2VLAdapter", "Qwen2_5_VLAdapter", "Qwen3VLAdapter", "merged_layout"]


def merged_layout(t: int, h: int, w: int, *, video: bool = False) -> ImageLayout:
    """Layout of one image's ``h * w`` merged tokens (``h``, ``w`` after the 2x2 merge), row-major,
    as the model emits them; or, with ``video``, of a video's ``t`` temporal patches of ``h x w``
    tokens each, one after the other (each temporal patch is one frame of the layout). Images have
    one temporal slice (``t = 1``): the processor repeats a still image to fill the 2-frame temporal
    patch."""
    if video:
        return ImageLayout.video(t, h, w)
    if t != 1:
        raise RuntimeStateError(f"an image with {t} temporal slices: only videos have more than one")
    return ImageLayout.grid(h, w)


class QwenVLAdapter(Adapter):
    """What the three Qwen-VL families share. Subclasses only name their model classes, except
    Qwen3-VL, which also carries deepstack features."""

    model_classes = ()

    def _merge(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)  # type: ignore[union-attr]

    def available_inputs(self) -> frozenset[str]:
        """None: Qwen's vision towers have no [CLS] token, so there is no [CLS] attention (nor the
        vision keys of a [CLS]-attention layer), and pre-projector features are not captured (the
        2x2 merger sees four patches per token, in window order on Qwen2.5-VL), so there is no
        projector of single tokens either. Selectors get ``None`` for these and fall back as they
        document, or refuse the model through :meth:`~tokred.Selector.required_inputs`."""
        return frozenset()

    # ------------------------------------------------------------------ images

    def image_grids(self, inputs: Mapping[str, Any], kind: str = "image") -> list[tuple[int, int, int]] | None:
        """``(t, h, w)`` of every image (``kind="video"``: every video) *after* the 2x2 merge, in
        encoder order, from ``image_grid_thw`` / ``video_grid_thw`` (``[num, 3]``, before merging).

        The call carries the grids when it runs the vision tower itself. ``generate`` (transformers
        5.23+) runs the tower before the first step and drops the grids from the model's inputs,
        passing the tower's outputs instead (``mm_encoder_outputs``); the grids are then the ones the
        tower was called with, which :meth:`install_vision_probes` records for each output it
        produces. ``None`` when neither is known (encoder outputs computed outside the run).
        """
        grid = inputs.get(Keyword.VIDEO_GRID_THW if kind == "video" else Keyword.IMAGE_GRID_THW)
        if grid is None:
            return self._encoded_grids(inputs, kind)
        m = self._merge()
        return [(int(t), int(h) // m, int(w) // m) for t, h, w in grid.tolist()]

    # The grids the vision tower was called with, per output: generate drops ``*_grid_thw`` from the
    # model's inputs and hands the model the tower's outputs, split per image or video (views of the
    # tower's ``pooler_output``; generate may repeat them for beams or several sequences per prompt,
    # in place). Each record: (weak reference to the storage owner of the tower's ``pooler_output``,
    # its first row's address, bytes per row, first row of every image or video, their merged grids).
    # Records are looked up by tensor identity and address, never by order, so a record can only
    # describe the very rows the tower produced with it.

    def install_vision_probes(self, probes: VisionProbes, wanted: frozenset[str]) -> list[Callable[[], None]]:
        """Also records, for every call of the vision tower (``visual``), the ``grid_thw`` it was
        called with against the rows it returned (see :meth:`image_grids`)."""
        removers = super().install_vision_probes(probes, wanted)
        tower = getattr(self.multimodal_model(), "visual", None)
        if tower is None:
            return removers
        if not hasattr(self, "_tower_records"):  # records hold weak references only, pruned as they die
            self._tower_records: list[tuple[weakref.ref, int, int, list[int], list[tuple[int, int, int]]]] = []
            self._tower_lock = threading.Lock()
        handle = tower.register_forward_hook(self._record_tower_grids, with_kwargs=True)
        return [*removers, handle.remove]

    def _record_tower_grids(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        import torch

        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        pooled = getattr(output, "pooler_output", None)
        if not isinstance(grid, torch.Tensor) or not isinstance(pooled, torch.Tensor) or pooled.dim() != 2:
            return
        m = self._merge()
        grids = [(int(t), int(h) // m, int(w) // m) for t, h, w in grid.tolist()]
        starts, row = [], 0
        for t, h, w in grids:
            starts.append(row)
            row += t * h * w
        if row != pooled.shape[0]:
            return  # not one row per merged token: describe nothing rather than something wrong
        owner = pooled._base if pooled._base is not None else pooled
        record = (weakref.ref(owner), pooled.data_ptr(), pooled.stride(0) * pooled.element_size(), starts, grids)
        with self._tower_lock:
            self._tower_records[:] = [r for r in self._tower_records if r[0]() is not None] + [record]

    def _encoded_grids(self, inputs: Mapping[str, Any], kind: str) -> list[tuple[int, int, int]] | None:
        """The merged grid of every image (or video) of ``mm_encoder_outputs[kind].pooler_output``,
        from the records of the tower call that produced its rows; ``None`` if any is unknown."""
        key = Keyword.ENCODER_OUTPUTS_VIDEO if kind == "video" else Keyword.ENCODER_OUTPUTS_IMAGE
        features = getattr((inputs.get(Keyword.ENCODER_OUTPUTS) or {}).get(key), "pooler_output", None)
        records = getattr(self, "_tower_records", None)
        if not isinstance(features, (tuple, list)) or not features or not records:
            return None
        with self._tower_lock:
            records = list(records)
        grids = []
        for rows in features:
            owner = rows._base if rows._base is not None else rows
            found = None
            for ref, address, row_bytes, starts, record_grids in records:
                if ref() is not owner or (rows.data_ptr() - address) % row_bytes:
                    continue
                first = (rows.data_ptr() - address) // row_bytes
                for start, (t, h, w) in zip(starts, record_grids):
                    if start == first and t * h * w == rows.shape[0]:
                        found = (t, h, w)
            if found is None:
                return None
            grids.append(found)
        return grids

    def _image_token_counts(self, inputs: Mapping[str, Any], kind: str = "image") -> list[int] | None:
        """Visual tokens per image (or video) in encoder order, from the grids or from the features
        that ``generate`` computed ahead of the call (``mm_encoder_outputs[kind].pooler_output``, one
        ``[N_i, D]`` per image or video)."""
        grids = self.image_grids(inputs, kind)
        if grids is not None:
            return [t * h * w for t, h, w in grids]
        key = Keyword.ENCODER_OUTPUTS_VIDEO if kind == "video" else Keyword.ENCODER_OUTPUTS_IMAGE
        encoded = (inputs.get(Keyword.ENCODER_OUTPUTS) or {}).get(key)
        features = getattr(encoded, "pooler_output", None)
        if isinstance(features, (tuple, list)):
            return [int(f.shape[0]) for f in features]
        return None

    @staticmethod
    def _has_videos(inputs: Mapping[str, Any]) -> bool:
        """Whether the call carries video inputs: pixels or the features ``generate`` computed."""
        return (inputs.get(Keyword.PIXEL_VALUES_VIDEOS) is not None
                or (inputs.get(Keyword.ENCODER_OUTPUTS) or {}).get(Keyword.ENCODER_OUTPUTS_VIDEO) is not None)

    def image_spans(self, input_ids: torch.Tensor, probes: VisionProbes, inputs: Mapping[str, Any]) -> list[ImageSpan]:
        """Every image's and video's tokens, row-major over the batch and in sequence order within a
        row (images and videos numbered together).

        Images (``<|image_pad|>``) and videos (``<|video_pad|>``) are told apart by their token ids
        and from one another by their token counts (from the grids or the precomputed features), so
        two images with no text between them still split correctly, and a Qwen3-VL video, whose frames
        are separated by timestamp text, is still one video; without counts, each contiguous run of
        tokens is one image. Grids come from ``image_grid_thw`` / ``video_grid_thw`` or, when
        ``generate`` dropped them, from the grids the vision tower was called with
        (:meth:`image_grids`); only for encoder outputs computed outside the run, from the M-RoPE rows
        (height and width positions span ``h`` and ``w`` values within a frame), which describe a grid
        only when transformers computed M-RoPE: without ``mm_token_type_ids`` (inputs assembled
        without the processor) every token gets plain text positions, and such a call is refused
        before any decoder layer runs.

        Videos are located only when the call carries video inputs: a ``<|video_pad|>`` fed back
        without video features is plain text to the model, and to tokred.
        """
        spans = self._spans_of(input_ids, inputs, "image")
        if self._has_videos(inputs):
            spans += self._spans_of(input_ids, inputs, "video")
        return order_spans(spans)

    def _spans_of(self, input_ids: torch.Tensor, inputs: Mapping[str, Any], kind: str) -> list[ImageSpan]:
        token = self.video_token_id() if kind == "video" else self.image_token_id()
        if token is None:
            raise RuntimeStateError(f"{type(self.model).__name__}: the config names no video_token_id")
        counts = self._image_token_counts(inputs, kind)
        grids = self.image_grids(inputs, kind)
        spans: list[ImageSpan] = []
        for encoder_index, (row, positions) in enumerate(split_image_tokens(input_ids, token, counts)):
            if grids is not None:
                t, h, w = grids[encoder_index]
            else:
                t, h, w = self._grid_from_positions(inputs.get(Keyword.POSITION_IDS), row, positions)
                if t < 1 or t * h * w != positions.numel():
                    raise RuntimeStateError(
                        f"cannot tell the grid of {kind} {encoder_index} ({positions.numel()} tokens): the call "
                        f"carries no {kind}_grid_thw (generate passes the vision tower's outputs instead), the "
                        "vision tower did not run under this tokred run to show it, and its M-RoPE position ids "
                        f"describe no grid (they read as {t}x{h}x{w}; transformers gives every token plain text "
                        "positions when the call has no mm_token_type_ids). Let the tower run under the run "
                        f"(pass pixel_values{'_videos' if kind == 'video' else ''} and {kind}_grid_thw to the "
                        "applied model, not precomputed mm_encoder_outputs), or pass mm_token_type_ids as the "
                        "processor returns them (0 text, 1 image token, 2 video token)"
                    )
            if t * h * w != positions.numel():
                raise RuntimeStateError(
                    f"{kind} {encoder_index} has {positions.numel()} tokens but a {t}x{h}x{w} merged grid"
                )
            spans.append(ImageSpan(row, 0, positions, merged_layout(t, h, w, video=kind == "video"), encoder_index))
        return spans

    @staticmethod
    def _grid_from_positions(position_ids: torch.Tensor | None, row: int, positions: torch.Tensor) -> tuple[int, int, int]:
        """``(t, h, w)`` of one image or video from its M-RoPE positions ``[3 or 4, B, L]``: within a
        frame the height and width axes take ``h`` and ``w`` consecutive values (get_rope_index).
        A Qwen3-VL video is one contiguous run of tokens per frame (timestamps between them), so its
        frames are its runs; a Qwen2/2.5-VL video is one run of ``t * h * w`` tokens."""
        import torch

        if position_ids is None or position_ids.dim() != 3:
            raise RuntimeStateError(
                "cannot tell the image or video grid: the call carries neither image_grid_thw / video_grid_thw nor "
                "M-RoPE position ids; pass the processor's grids"
            )
        breaks = torch.nonzero(positions[1:] - positions[:-1] != 1).flatten() + 1
        runs = torch.tensor_split(positions, breaks)
        first = runs[0]
        axes = position_ids[-3:, row if position_ids.shape[1] > 1 else 0, first.to(position_ids.device)]
        h = int(axes[1].max() - axes[1].min()) + 1
        w = int(axes[2].max() - axes[2].min()) + 1
        return positions.numel() // (h * w), h, w

    # --------------------------------------------------------------- positions

    def position_index(self, position_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]``: the largest M-RoPE axis. The leading plain-text row of ``generate``'s
        ``[4, B, L]`` layout counts tokens, not rotary positions, and is left out."""
        if position_ids.dim() == 3 and position_ids.shape[0] == 4:
            position_ids = position_ids[1:]
        return super().position_index(position_ids)

    def decode_position_ids(self, batch: int, num_new: int, logical_length: int, device: torch.device,
                            attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[3, B, num_new]``, equal on the three axes: ``p + rope_deltas``, where ``p`` counts the
        real tokens before each new one (``cumsum(attention_mask) - 1``), or, without a mask, is
        ``logical_length + i``, as the unmodified model computes from an unpruned cache.
        ``rope_deltas`` ``[B, 1]`` comes from the latest prefill, which computed it on the full sequence.

        Measured on 5.23: the unmodified model takes the mask's cumsum over *all* columns and then
        fails on the shape mismatch; the last ``num_new`` columns are what it means to compute.
        """
        import torch

        if attention_mask is not None:
            counted = attention_mask.long().cumsum(-1) - 1
            steps = counted[:, -num_new:].masked_fill(attention_mask[:, -num_new:] == 0, 0).to(device)   # [B, n]
        else:
            steps = (torch.arange(num_new, device=device) + logical_length)[None].expand(batch, -1)
        model = self.multimodal_model()
        if not hasattr(model, compat.ROPE_DELTAS):  # a rename would otherwise decode at shifted positions
            raise compat.interface_error(f"{type(model).__name__}.{compat.ROPE_DELTAS} (M-RoPE offsets of the latest prefill)",
                                         "the model has no such attribute")
        deltas = getattr(model, compat.ROPE_DELTAS)
        if deltas is None:  # no prefill with images yet: text positions advance all axes alike
            deltas = torch.zeros(batch, 1, dtype=torch.long, device=device)
        deltas = deltas.to(device).repeat_interleave(batch // deltas.shape[0], dim=0)   # [B, 1]
        return (steps + deltas)[None].expand(3, batch, num_new)

    def validate(self, gate_layers: Sequence[int], schedule: Any = None) -> None:
        if schedule is not None and getattr(schedule, "positions", "original") == "renumber":
            raise ScheduleError(
                f"{self.family}: positions='renumber' is not supported for M-RoPE models (3-axis positions of "
                "an image grid have no established renumbering after pruning); use positions='original'"
            )


class Qwen2VLAdapter(QwenVLAdapter):
    """Qwen2-VL."""

    model_classes = ("Qwen2VLForConditionalGeneration",)


class Qwen2_5_VLAdapter(QwenVLAdapter):
    """Qwen2.5-VL. Its window-attention vision tower reorders patches internally and restores the
    order after the merger, so the language model sees the same row-major layout as Qwen2-VL."""

    model_classes = ("Qwen2_5_VLForConditionalGeneration",)


class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL: Qwen2-VL's layout plus deepstack features.

    Deepstack (``visual_pos_masks`` ``[B, L]`` bool, ``deepstack_visual_embeds``: list of ``[V, D]``,
    rows in row-major order of the mask) is added to the outputs of decoder layers
    ``0 .. len(deepstack) - 1``. Stage I gathers both to the surviving positions. A gate at a layer
    ``g`` inside that range shrinks the sequence before layer ``g``, whose output still receives
    deepstack features: the runtime hands the language model fresh copies at the start of every
    prefill with images (:meth:`reduce_language_model_kwargs`) and :meth:`follow_reduction` shrinks
    them in place at each gate, so every injection lands on the visual tokens still alive. (The
    language model reads the mask and the list anew for every layer and keeps no copy of its own,
    measured on 5.17 and 5.23. If a future version did, the shapes would disagree and the model
    would fail loudly, not silently.)

    Ours: a merging selector's replacement features replace the input embeddings only; the kept
    tokens' deepstack features stay as the vision tower computed them.
    """

    model_classes = ("Qwen3VLForConditionalGeneration",)

    def reduce_language_model_kwargs(self, kwargs: dict[str, Any], origin: torch.Tensor) -> dict[str, Any]:
        mask = kwargs.get(Keyword.VISUAL_POS_MASKS)
        embeds = kwargs.get(Keyword.DEEPSTACK_VISUAL_EMBEDS)
        if mask is None or embeds is None:
            return {}
        new_mask, rows = _reduce_visual_mask(mask, origin)
        return {Keyword.VISUAL_POS_MASKS: new_mask, Keyword.DEEPSTACK_VISUAL_EMBEDS: [e[rows.to(e.device)] for e in embeds]}

    def follow_reduction(self, held: dict[str, Any], local: torch.Tensor) -> None:
        mask = held.get(Keyword.VISUAL_POS_MASKS)
        embeds = held.get(Keyword.DEEPSTACK_VISUAL_EMBEDS)
        if mask is None or embeds is None:
            return
        new_mask, rows = _reduce_visual_mask(mask, local)
        # In place: the language model's forward holds these very objects for its remaining layers.
        mask.set_(new_mask)
        for i, e in enumerate(embeds):
            embeds[i] = e[rows.to(e.device)]


def _reduce_visual_mask(mask: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather a ``[B, L]`` visual mask at ``index`` ``[B, L']`` (-1: padding, never visual).

    Returns the new mask ``[B, L']`` and ``rows`` ``[V']``: for each ``True`` of the new mask in
    row-major order, the row of the old mask's row-major ``True`` list it came from (how per-visual
    tensors such as deepstack features are gathered alike)."""
    import torch

    index = index.to(mask.device)
    valid = index >= 0
    safe = index.clamp(min=0)
    new_mask = mask.gather(1, safe) & valid
    old_rank = (torch.cumsum(mask.flatten().long(), 0) - 1).view_as(mask)        # [B, L]
    rows = old_rank.gather(1, safe)[new_mask]
    return new_mask, rows
