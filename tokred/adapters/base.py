"""The adapter interface: everything model-specific, in one place per model family.

An adapter tells the runtime where things are in a ``transformers`` model: the module that
receives ``input_ids`` and pixels, the language model (the stage-I point), its decoder layers and
their attention modules, where each image's tokens sit in the sequence and how they are laid out,
which positions are instruction text, and how position ids are computed. Methods never see any of
this; they get tensors (:class:`~tokred.tokens.VisualTokens`, :class:`~tokred.tokens.GateState`).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Mapping, Sequence

from .. import compat
from ..compat import Keyword
from ..errors import RuntimeStateError
from ..tokens import ImageLayout

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

__all__ = [
    "Adapter", "ImageSpan", "VisionProbes", "capture_projector_inputs", "cls_attention_rows", "encoder_layer_of", "key_rows",
    "order_spans", "split_image_tokens", "stacked_video_frames",
    "split_runs",
]


_FEWER_ENCODER_IMAGES = (
    "The sequence holds more images than the vision tower encoded: generate() with num_beams > 1 or "
    "num_return_sequences > 1 repeats each prompt's image features after encoding them once, and selectors "
    "that read vision-encoder inputs ([CLS] attention, pre-projector features) do not support that yet; "
    "use greedy or sampled generation with one sequence per prompt, or a selector without those inputs. "
    "Otherwise the vision tower was called outside the model's forward."
)


@dataclass
class ImageSpan:
    """One image's visual tokens in the language model's input sequence.

    A video is one span too (its layout knows the frames, :attr:`ImageLayout.frame`); images and
    videos of a row are numbered together, in sequence order.

    Attributes:
        sample: the batch row.
        image: the image's (or video's) number within its row.
        positions: ``[N]`` long, the sequence positions of its tokens, increasing.
        layout: the spatial layout of those tokens.
        encoder_index: the image's index in the vision encoder's batch (for probes); a video's index
            among the call's videos.
        probe_rows: ``[N]`` long or ``None``. For images the vision encoder saw as several rows
            (tiles, a video's frames), where each token's probe values sit in the concatenation of
            the captured per-row values (row ``r``, cell ``c`` -> ``r * cells + c`` when every row has
            ``cells`` values); -1 for tokens with no vision-side source (LLaVA-NeXT newline tokens).
            ``None``: the image is encoder row ``encoder_index`` and its tokens are that row's cells
            in order.
    """

    sample: int
    image: int
    positions: torch.Tensor
    layout: ImageLayout
    encoder_index: int
    probe_rows: torch.Tensor | None = None


class VisionProbes:
    """What an adapter captured from the vision side during one prefill, per encoder image.

    ``pre_projector[i]``: ``[N, D_v]``; ``cls_attention[i]``: ``[N]``; ``vision_keys[i]``:
    ``[N, D_k]`` (the feature layer's key states, head mean), for encoder image ``i``.
    """

    #: The captured inputs, each a list with one entry per encoder row.
    NAMES: tuple[str, ...] = ("pre_projector", "cls_attention", "vision_keys")

    def __init__(self) -> None:
        self.pre_projector: list[torch.Tensor] = []
        self.cls_attention: list[torch.Tensor] = []
        self.vision_keys: list[torch.Tensor] = []
        #: ``False`` while :meth:`paused`: capture hooks must then record nothing.
        self.capturing = True
        self._flat: dict[str, tuple[int, torch.Tensor]] = {}

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Within this block capture hooks record nothing: the runtime calls the model's projector
        for a merging selector (:attr:`VisualTokens.project`), and those rows are not encoder
        outputs. Capture hooks of adapters check :attr:`capturing`."""
        previous, self.capturing = self.capturing, False
        try:
            yield
        finally:
            self.capturing = previous

    def clear(self) -> None:
        for name in self.NAMES:
            getattr(self, name).clear()
        self._flat.clear()

    def snapshot(self) -> VisionProbes:
        """A copy holding the same captured tensors (not copied), for :meth:`restore`."""
        copy = VisionProbes()
        for name in self.NAMES:
            setattr(copy, name, list(getattr(self, name)))
        return copy

    def restore(self, snapshot: VisionProbes) -> None:
        """Replace what is captured with ``snapshot``'s captures, in place (capture hooks keep
        writing into this object)."""
        self.clear()
        for name in self.NAMES:
            getattr(self, name).extend(getattr(snapshot, name))

    def flat(self, name: str) -> torch.Tensor:
        """The captured rows of ``name`` concatenated (``[rows * cells, ...]``), computed once per
        capture rather than once per image."""
        import torch

        values: list[torch.Tensor] = getattr(self, name)
        cached = self._flat.get(name)
        if cached is None or cached[0] != len(values):
            cached = (len(values), torch.cat(values, dim=0))
            self._flat[name] = cached
        return cached[1]


class Adapter:
    """Base class of model adapters. Subclasses set ``model_classes`` and override what differs.

    Adapters with options (LLaVA-NeXT's newline tokens, say) take them as keyword arguments of
    ``__init__``; users pass them through ``tokred.apply(model, method, adapter_options={...})``.

    Args:
        model: the ``transformers`` model instance the adapter serves.
        family: the registered family name.
    """

    #: ``transformers`` class names this adapter handles (matched against the model's MRO).
    model_classes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module, family: str | None = None) -> None:
        self.model = model
        #: The registered family name (``"llava"``); the registry passes it.
        self.family = family or type(self).__name__

    # ---------------------------------------------------------------- structure

    def multimodal_model(self) -> nn.Module:
        """The module whose forward receives ``input_ids``, ``attention_mask`` and pixels."""
        return self.model.model  # type: ignore[return-value]

    def language_model(self) -> nn.Module:
        """The decoder stack called with ``inputs_embeds`` after the image features are merged."""
        return self.multimodal_model().language_model  # type: ignore[return-value]

    def decoder_layers(self) -> Sequence[nn.Module]:
        return self.language_model().layers  # type: ignore[return-value]

    def self_attention(self, layer: nn.Module) -> nn.Module:
        """The attention module of a decoder layer (its ``config`` selects the attention kernel)."""
        return layer.self_attn  # type: ignore[return-value]

    @property
    def text_config(self) -> Any:
        return self.model.config.get_text_config()  # type: ignore[union-attr]

    @property
    def num_layers(self) -> int:
        return len(self.decoder_layers())

    def image_token_id(self) -> int:
        config = self.model.config  # type: ignore[union-attr]
        return int(getattr(config, "image_token_id", None) or config.image_token_index)

    def video_token_id(self) -> int | None:
        """The token id the processor expands for each video's tokens, or ``None`` when the family
        has none (InternVL writes a video's frames as images)."""
        config = self.model.config  # type: ignore[union-attr]
        value = getattr(config, "video_token_id", None)
        if value is None:
            value = getattr(config, "video_token_index", None)
        return None if value is None else int(value)

    def visual_token_ids(self) -> tuple[int, ...]:
        """Every placeholder token id that visual features are scattered into (images, videos)."""
        video = self.video_token_id()
        return (self.image_token_id(),) if video is None else (self.image_token_id(), video)

    def visual_tokens_per_image(self) -> int | None:
        """``N`` when the config fixes the number of visual tokens per image, else ``None``."""
        return None

    # ---------------------------------------------------------------- prefill

    def probe_values(self, probes: VisionProbes, name: str, span: ImageSpan) -> torch.Tensor:
        """What the probes captured under ``name`` for one image: ``[N]`` (``cls_attention``),
        ``[N, D_v]`` (``pre_projector``) or ``[N, D_k]`` (``vision_keys``), aligned with the
        image's tokens.

        Images seen as one encoder row take that row; tiled images gather their tokens' cells
        through :attr:`ImageSpan.probe_rows` (tokens without a source get zeros: no [CLS] attention
        reaches a token the vision encoder never saw). Missing captures are a bug, never a fallback.
        """
        values: list[torch.Tensor] = getattr(probes, name)
        if span.probe_rows is None:
            if span.encoder_index >= len(values):
                raise RuntimeStateError(
                    f"the {self.family} adapter promised {name} but captured {len(values)} values for image "
                    f"{span.encoder_index}. {_FEWER_ENCODER_IMAGES}"
                )
            return values[span.encoder_index]
        needed = int(span.probe_rows.max()) + 1 if span.probe_rows.numel() else 0
        if not values or needed > sum(int(v.shape[0]) for v in values):
            raise RuntimeStateError(
                f"the {self.family} adapter promised {name} but captured {len(values)} encoder rows, fewer than "
                f"image {span.image} of sample {span.sample} needs. {_FEWER_ENCODER_IMAGES}"
            )
        flat = probes.flat(name)                                               # [sum of cells over rows, ...]
        rows = span.probe_rows.to(flat.device)
        gathered = flat[rows.clamp(min=0)]
        missing = (rows < 0).view(-1, *([1] * (gathered.dim() - 1)))
        return gathered.masked_fill(missing, 0)

    def available_inputs(self) -> frozenset[str]:
        """The optional selector inputs this model can provide (``"cls_attention"``,
        ``"pre_projector"``, ``"vision_keys"``; ``"instruction_embeddings"`` is always provided and
        not listed). Selectors asking for others get ``None`` and must fall back."""
        return frozenset()

    def install_vision_probes(self, probes: VisionProbes, wanted: frozenset[str]) -> list[Callable[[], None]]:
        """Install hooks that fill ``probes`` with what ``wanted`` names (``"pre_projector"``,
        ``"cls_attention"``, ``"vision_keys"``); return the callables that remove them. Default:
        nothing available."""
        return []

    def projector(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """The model's multimodal projector as a function of pre-projector rows, ``[n, D_v] ->
        [n, D]`` (the features :attr:`VisionProbes.pre_projector` captures, in the same format), for
        selectors that merge tokens before projecting them (:attr:`VisualTokens.project`); ``None``
        when the model has none that maps single tokens (default)."""
        return None

    def final_norm(self) -> nn.Module:
        """The language model's normalisation after its last decoder layer (before the LM head),
        which :meth:`GateState.normed_hidden_states` applies. Default: ``language_model().norm``."""
        import torch.nn as nn

        norm = getattr(self.language_model(), "norm", None)
        if not isinstance(norm, nn.Module):
            raise RuntimeStateError(f"the {self.family} adapter finds no final norm at language_model().norm")
        return norm

    def attention_input_norm(self, layer: nn.Module) -> nn.Module:
        """The normalisation a decoder layer applies to its input before its attention module
        (``input_layernorm`` in Llama, Qwen2/2.5/3): with :meth:`self_attention` what a gate with
        ``attention_layer = "own"`` runs to compute its layer's attention."""
        import torch.nn as nn

        norm = getattr(layer, "input_layernorm", None)
        if not isinstance(norm, nn.Module):
            raise RuntimeStateError(f"the {self.family} adapter finds no input_layernorm on {type(layer).__name__}")
        return norm

    def image_spans(self, input_ids: torch.Tensor, probes: VisionProbes, inputs: Mapping[str, Any]) -> list[ImageSpan]:
        """Every image's tokens in ``input_ids`` (``[B, L]``), in the order the encoder saw them.

        ``inputs`` are the keyword arguments of the multimodal model's forward (``pixel_values``,
        ``image_sizes``, ``image_grid_thw``, ...), for layouts that depend on the image."""
        raise NotImplementedError

    def count_visual_tokens(self, inputs: Mapping[str, Any]) -> int:
        """The visual tokens of a processor output ``inputs`` (every image of every sample) that are
        candidates for reduction: what budgets and run reports count. Image-token positions that
        always stay (LLaVA-NeXT's newline tokens, by default) are not included."""
        spans = self.image_spans(inputs[Keyword.INPUT_IDS], VisionProbes(), inputs)
        return sum(int(span.positions.numel()) for span in spans)

    def full_position_ids(self, position_ids: torch.Tensor | None, input_ids: torch.Tensor,
                          attention_mask: torch.Tensor | None, past_length: int) -> torch.Tensor:
        """Position ids the unmodified model would use for the whole input, ``[B, L]`` (1-D RoPE)
        or ``[k, B, L]`` (M-RoPE). Default: the given ones, else ``arange`` after the cache."""
        import torch

        if position_ids is not None:
            if position_ids.shape[-2] != input_ids.shape[0]:
                position_ids = position_ids.expand(*position_ids.shape[:-2], input_ids.shape[0], position_ids.shape[-1])
            return position_ids
        length = input_ids.shape[1]
        return (torch.arange(length, device=input_ids.device) + past_length).unsqueeze(0).expand(input_ids.shape[0], -1)

    def decode_position_ids(self, batch: int, num_new: int, logical_length: int, device: torch.device,
                            attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Position ids of ``num_new`` decoded tokens when the caller passed none: what the
        unmodified model would compute from a cache holding ``logical_length`` tokens, given the
        caller's 2-D ``attention_mask`` ``[B, logical_length + num_new]`` (or ``None``). Default: the
        Llama-style ``arange`` after the cache, which ignores the mask.

        The runtime uses these instead of whatever the model derived from its (pruned, shorter)
        cache itself; models that compute positions before their language model (M-RoPE) would
        otherwise start from the wrong length."""
        import torch

        return (torch.arange(num_new, device=device) + logical_length).unsqueeze(0).expand(batch, -1)

    def position_index(self, position_ids: torch.Tensor) -> torch.Tensor:
        """``[B, L]``: one number per token that grows along the sequence, from position ids ``[B, L]``
        or ``[k, B, L]``. The runtime compares it at decode steps with where the prefill ended, to
        catch ``generate`` re-feeding tokens into a pruned cache. Default: the largest over any
        leading axes (M-RoPE's text tokens advance all axes alike)."""
        return position_ids.reshape(-1, *position_ids.shape[-2:]).amax(dim=0)

    def reduce_language_model_kwargs(self, kwargs: dict[str, Any], origin: torch.Tensor) -> dict[str, Any]:
        """Per-position language-model inputs beyond ``inputs_embeds``, ``attention_mask`` and
        ``position_ids`` (e.g. Qwen3-VL's deepstack features), reduced to ``origin`` ``[B, L']``
        (full-sequence positions, -1 padding). Return only what changed. Default: none.

        Called on every prefill with images, also when no selector runs (``origin`` then keeps
        every real position), so that what the language model holds is the adapter's own objects,
        which :meth:`follow_reduction` may shrink in place at gates."""
        return {}

    def follow_reduction(self, held: dict[str, Any], local: torch.Tensor) -> None:
        """A gate shrank the sequence inside the language model: reduce, *in place*, the inputs
        that the language model applies between its layers (``held``: what
        :meth:`reduce_language_model_kwargs` returned for this prefill, the very objects the
        language model's forward holds) to the positions ``local`` ``[B, L'']`` of the previous
        layout (-1 padding). Default: nothing such exists (LLaVA)."""

    def reduce_layer_kwargs(self, kwargs: dict[str, Any], entry_index: torch.Tensor) -> dict[str, Any]:
        """Per-position decoder-layer inputs beyond hidden states, position embeddings, position ids
        and the mask, reduced to ``entry_index`` ``[B, L']`` (positions in the sequence that entered
        the language model). Default: none."""
        return {}

    def text_roles(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(instruction, system)`` bool masks ``[B, L]`` over the input.

        Default rule, which holds for chat templates that put images before the question
        (LLaVA, Qwen-VL, InternVL): system text is every real text token before a row's first
        visual token; instruction text is every real text token after it. Rows without images
        have neither. Image- and video-token positions that are not candidates for pruning
        (LLaVA-NeXT's and LLaVA-OneVision's newline tokens, by default) are text of neither kind. Adapters whose templates differ
        override this.
        """
        import torch

        visual_ids = torch.tensor(self.visual_token_ids(), device=input_ids.device)
        text = attention_mask.bool() & ~visual & ~torch.isin(input_ids, visual_ids)
        seen_visual = torch.cumsum(visual.long(), dim=1) > 0
        has_visual = visual.any(dim=1, keepdim=True)
        return text & seen_visual & has_visual, text & ~seen_visual & has_visual

    def validate(self, gate_layers: Sequence[int], schedule: Any = None) -> None:
        """Refuse schedules this model cannot run (clear :class:`ScheduleError`), given the gates'
        resolved layers and the :class:`~tokred.Schedule` itself. Default: accept."""

    def check_model_state(self) -> None:
        """Refuse models in a state the runtime cannot handle (before any forward)."""
        impl = getattr(self.text_config, compat.ATTENTION_IMPLEMENTATION, None)
        if impl not in ("sdpa", "eager"):
            raise RuntimeStateError(
                f"attention implementation {impl!r} is not supported yet; load the model with "
                "attn_implementation='sdpa' (uses PyTorch's flash kernel on GPU) or 'eager'"
            )


def split_runs(input_ids: torch.Tensor, token_id: int, tokens_per_image: int) -> list[tuple[int, torch.Tensor]]:
    """``(row, positions [N])`` for every block of ``tokens_per_image`` consecutive ``token_id``
    tokens, row-major: the order in which LLaVA-style models scatter image features."""
    import torch

    spans = []
    for row in range(input_ids.shape[0]):
        positions = torch.nonzero(input_ids[row] == token_id).flatten().cpu()
        if positions.numel() == 0:
            continue
        if positions.numel() % tokens_per_image:
            raise RuntimeStateError(
                f"row {row} has {positions.numel()} image tokens, not a multiple of {tokens_per_image} per image"
            )
        for chunk in positions.split(tokens_per_image):
            spans.append((row, chunk))
    return spans


def split_image_tokens(input_ids: torch.Tensor, token_id: int, counts: Sequence[int] | None) -> list[tuple[int, torch.Tensor]]:
    """``(row, positions [N_i])`` per image, row-major over the batch (the order in which models
    scatter image features). With ``counts``, each row's ``token_id`` positions are cut into images
    of those sizes in order; without, each contiguous run is one image."""
    import torch

    chunks: list[tuple[int, torch.Tensor]] = []
    sizes = iter(counts) if counts is not None else None
    for row in range(input_ids.shape[0]):
        positions = torch.nonzero(input_ids[row] == token_id).flatten().cpu()
        if positions.numel() == 0:
            continue
        if sizes is None:
            breaks = torch.nonzero(positions[1:] - positions[:-1] != 1).flatten() + 1
            chunks += [(row, p) for p in torch.tensor_split(positions, breaks)]
            continue
        start = 0
        while start < positions.numel():
            n = next(sizes, None)
            if n is None or start + n > positions.numel():
                raise RuntimeStateError(
                    f"row {row} has {positions.numel()} image tokens, which do not split into the images' "
                    f"token counts {list(counts or [])}"
                )
            chunks.append((row, positions[start:start + n]))
            start += n
    if sizes is not None and next(sizes, None) is not None:
        raise RuntimeStateError(f"the input holds fewer image tokens than the images' token counts {list(counts or [])}")
    return chunks


def order_spans(spans: Sequence[ImageSpan]) -> list[ImageSpan]:
    """``spans`` (images and videos, in any order) sorted row-major by their first position, each
    renumbered as the ``image``-th visual item of its row: the numbering budgets, gates and reports use."""
    ordered = sorted(spans, key=lambda span: (span.sample, int(span.positions[0]) if span.positions.numel() else -1))
    per_row: dict[int, int] = {}
    result = []
    for span in ordered:
        number = per_row.get(span.sample, 0)
        per_row[span.sample] = number + 1
        result.append(dataclasses.replace(span, image=number))
    return result


def capture_projector_inputs(projector: nn.Module, probes: VisionProbes) -> Callable[[], None]:
    """Record the multimodal projector's input, one ``[cells, D_v]`` entry per encoder row, in
    ``probes.pre_projector``; return the remover."""
    def on_projector(module: nn.Module, args: tuple) -> None:
        if probes.capturing:
            probes.pre_projector.extend(args[0].detach().unbind(0))

    return projector.register_forward_pre_hook(on_projector).remove


def cls_attention_rows(query: torch.Tensor, key: torch.Tensor, scaling: float) -> torch.Tensor:
    """``[B, L]``: the attention the first position ([CLS]) pays every position, averaged over
    heads, from a vision attention layer's ``query`` ``[B, H, L, d]`` and ``key`` ``[B, H, L, d]``."""
    import torch

    row = torch.softmax((query[:, :, :1].float() @ key.float().transpose(-1, -2)) * scaling, dim=-1)   # [B, H, 1, L]
    return row.mean(dim=1)[:, 0]


def key_rows(key: torch.Tensor) -> torch.Tensor:
    """``[B, L, d]``: a vision attention layer's key states ``[B, H, L, d]`` averaged over heads
    (VisionZip's metric: Yang et al., CVPR 2025, dvlab-research/VisionZip@3151f6d
    ``visionzip/utils.py`` 24 and 89, ``raw_key_states.mean(1)``)."""
    return key.detach().float().mean(dim=1)


def encoder_layer_of(feature_layer: int | Sequence[int], num_layers: int) -> int | None:
    """The vision encoder layer whose output ``hidden_states[feature_layer]`` is (``vision_feature_layer``
    of LLaVA-style configs): ``hidden_states[0]`` is the embedding output, ``hidden_states[i]`` the
    output of layer ``i - 1``; ``None`` for the embeddings. With several feature layers the deepest is
    used: our assumption for [CLS] attention, whose row is defined per layer."""
    if not isinstance(feature_layer, int):
        feature_layer = max(feature_layer, key=lambda i: i % (num_layers + 1))
    hidden_index = feature_layer % (num_layers + 1)
    return hidden_index - 1 if hidden_index >= 1 else None


def stacked_video_frames(inputs: Mapping[str, Any], per_frame: int) -> list[int] | None:
    """Frames of every video in encoder order, for models whose processor stacks the clips of a call
    (LLaVA-OneVision, LLaVA-NeXT-Video): from ``pixel_values_videos`` ``[videos, F, ...]``, or from the
    video features ``generate`` computed (``[videos, F * per_frame (+ 1), D]``; ``per_frame`` tokens a
    frame); ``None`` without videos. LLaVA-OneVision 5.23+ appends the video's newline token to these
    features, earlier releases in the forward: either way a whole number of frames and at most one
    token more, so the floor division is exact."""
    pixels = inputs.get(Keyword.PIXEL_VALUES_VIDEOS)
    if pixels is not None:
        return [int(pixels.shape[1])] * int(pixels.shape[0])
    encoded = (inputs.get(Keyword.ENCODER_OUTPUTS) or {}).get(Keyword.ENCODER_OUTPUTS_VIDEO)
    features = getattr(encoded, "pooler_output", None)
    if features is None:
        return None
    return [(f.numel() // int(f.shape[-1])) // per_frame for f in features]  # tokens, whatever the nesting
