"""Synthetic video clips and torch-only video processors for the tiny models.

Every ``transformers`` video processor needs torchvision, which tokred does not depend on (and whose
registry wheel does not import next to CPU torch). The tiny models' processors are the *real*
``transformers`` processor classes (``Qwen2VLProcessor``, ``LlavaOnevisionProcessor``, ...); only
their ``video_processor`` is one of the two small classes here, which compute, with torch and Pillow
alone, the tensors the model's own video processor returns for frames that are already sampled:

* :class:`TinyQwenVideoProcessor` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL): frames resized to a multiple of
  ``patch_size * merge_size`` (``smart_resize``), normalised, padded to a whole number of
  ``temporal_patch_size``-frame temporal patches by repeating the last frame, and flattened into
  ``pixel_values_videos`` ``[sum_i t_i * h_i * w_i, 3 * temporal_patch_size * patch_size**2]`` in the
  patch order of ``Qwen2VLVideoProcessor.patchify``; plus ``video_grid_thw`` ``[num_videos, 3]`` and
  the ``video_metadata`` the processors read (frame rate, frame indices: Qwen2.5-VL's
  ``second_per_grid_ts`` and Qwen3-VL's timestamps come from them).
* :class:`TinyFramesVideoProcessor` (LLaVA-OneVision, LLaVA-NeXT-Video, InternVL): every frame
  resized to the vision tower's square input and normalised, ``pixel_values_videos``
  ``[num_videos, frames, 3, size, size]``. All videos of one call need the same number of frames, as
  with the real processors (the tensor is stacked).

The processor around them expands each video placeholder exactly as it does with the real video
processor (``replace_video_token``), so the token layout the adapters see is the real one. With a
real checkpoint, use its own processor (``AutoProcessor``, torchvision installed); see
``docs/recipes/qwen2_5_vl_video.md``.

:func:`processor_free_video_inputs` builds the same inputs *without* the processor, as a program
that decodes and lays out frames itself does (for every family of
:data:`~tokred.testing.VIDEO_FAMILIES`; the tensors equal the processor's, and Qwen-VL may leave out
``mm_token_type_ids``, with which transformers computes no M-RoPE at all).
"""

from __future__ import annotations

import math
import random
from typing import Any, Sequence

import torch
from PIL import Image, ImageDraw
from transformers import BatchFeature
from transformers.video_processing_utils import BaseVideoProcessor
from transformers.video_utils import VideoMetadata

from ..errors import OptionsError, TokredError

__all__ = ["make_video", "TinyQwenVideoProcessor", "TinyFramesVideoProcessor", "with_tiny_video_processor",
           "processor_free_video_inputs", "ProcessorFreeVideoUnsupported", "PROCESSOR_FREE_VIDEO_FAMILIES",
           "qwen_video_patches"]

#: The frame rate the tiny video processors report for every clip (frames are taken as sampled at it).
DEFAULT_FPS = 2.0


def make_video(frames: int = 4, width: int = 112, height: int = 112, seed: int = 0) -> list[Image.Image]:
    """A deterministic synthetic clip: ``frames`` RGB frames of a still gradient background with
    three filled shapes that move in straight lines, one step per frame, so that consecutive frames
    differ where the shapes are and match elsewhere (what temporal reduction rules look for)."""
    rng = random.Random(seed)
    vertical = Image.linear_gradient("L")
    background = Image.merge("RGB", (vertical.transpose(Image.Transpose.TRANSPOSE).resize((width, height)),
                                     vertical.resize((width, height)), Image.new("L", (width, height), 96)))
    shapes = []
    for _ in range(3):
        size = rng.randint(max(min(width, height) // 6, 2), max(min(width, height) // 3, 3))
        x, y = rng.randrange(width - size + 1), rng.randrange(height - size + 1)
        step = (rng.choice((-1, 1)) * rng.randint(size // 4 + 1, size // 2 + 1), rng.choice((-1, 1)) * rng.randint(1, size // 3 + 1))
        fill = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        shapes.append((size, x, y, step, fill, rng.random() < 0.5))
    clip = []
    for index in range(frames):
        frame = background.copy()
        draw = ImageDraw.Draw(frame)
        for size, x, y, (dx, dy), fill, round_shape in shapes:
            # Bounce off the borders so every shape stays inside every frame.
            px = _bounce(x + dx * index, width - size)
            py = _bounce(y + dy * index, height - size)
            box = (px, py, px + size - 1, py + size - 1)
            (draw.ellipse if round_shape else draw.rectangle)(box, fill=fill)
        clip.append(frame)
    return clip


def _bounce(value: int, limit: int) -> int:
    if limit <= 0:
        return 0
    period = 2 * limit
    value %= period
    return value if value <= limit else period - value


def _frames(video: Any) -> list[Image.Image]:
    """One video as a list of RGB PIL frames: a list of PIL images, or a ``[F, H, W, 3]`` uint8
    array or tensor."""
    if isinstance(video, (list, tuple)):
        return [frame.convert("RGB") if isinstance(frame, Image.Image) else Image.fromarray(_array(frame)) for frame in video]
    array = _array(video)
    return [Image.fromarray(frame) for frame in array]


def _array(value: Any) -> Any:
    import numpy as np

    if isinstance(value, torch.Tensor):
        value = value.numpy()
    return np.asarray(value, dtype=np.uint8)


def _normalised(frames: Sequence[Image.Image], size: tuple[int, int], mean: Sequence[float],
                std: Sequence[float]) -> torch.Tensor:
    """``[F, 3, H, W]`` float32: frames resized (bicubic, ``size`` = ``(height, width)``), scaled to
    0..1 and normalised."""
    import numpy as np

    height, width = size
    stacked = np.stack([np.asarray(frame.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
                        for frame in frames])                                      # [F, H, W, 3]
    pixels = torch.from_numpy(stacked).permute(0, 3, 1, 2) / 255.0
    return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def qwen_video_patches(pixels: torch.Tensor, patch_size: int, temporal_patch_size: int, merge_size: int) -> torch.Tensor:
    """``[t * h * w, 3 * temporal_patch_size * patch_size**2]``: the rows of ``pixel_values_videos``
    for one clip of ``[F, 3, H, W]`` normalised frames (``F`` a multiple of ``temporal_patch_size``,
    ``H`` and ``W`` multiples of ``patch_size * merge_size``), ``t = F / temporal_patch_size``,
    ``h = H / patch_size``, ``w = W / patch_size``, in the order of ``Qwen2VLVideoProcessor``'s
    patchify: temporal patch, merged block row and column, position within the block, then
    channels x frames x pixels of one patch."""
    p, tp, m = patch_size, temporal_patch_size, merge_size
    frames, _, height, width = pixels.shape
    t, h, w = frames // tp, height // p, width // p
    grid = pixels.reshape(t, tp, 3, h // m, m, p, w // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return grid.reshape(t * h * w, 3 * tp * p * p)


def _metadata(frames: int, size: tuple[int, int], fps: float) -> VideoMetadata:
    return VideoMetadata(total_num_frames=frames, fps=fps, width=size[1], height=size[0], duration=frames / fps,
                         frames_indices=list(range(frames)))


class TinyQwenVideoProcessor(BaseVideoProcessor):
    """The tensors ``Qwen2VLVideoProcessor`` computes (see the module documentation), without
    torchvision.

    Args:
        patch_size: vision patch side in pixels (14; 16 for Qwen3-VL).
        temporal_patch_size: frames per temporal patch (2).
        merge_size: the vision merger's block side (2).
        image_mean, image_std: normalisation, the image processor's.
        min_pixels, max_pixels: bounds of ``smart_resize``.
        fps: the frame rate reported in ``video_metadata``.
    """

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, *, patch_size: int, temporal_patch_size: int = 2, merge_size: int = 2,
                 image_mean: Sequence[float], image_std: Sequence[float], min_pixels: int = 28 * 28,
                 max_pixels: int = 336 * 336, fps: float = DEFAULT_FPS) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.temporal_patch_size = temporal_patch_size
        self.merge_size = merge_size
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.min_pixels = min_pixels
        self.max_pixels = max_pixels
        self.fps = fps

    def __call__(self, videos: Any, **kwargs: Any) -> BatchFeature:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        videos = [videos] if not isinstance(videos, (list, tuple)) or isinstance(videos[0], Image.Image) else videos
        patches, grids, metadata = [], [], []
        p, tp, m = self.patch_size, self.temporal_patch_size, self.merge_size
        for video in videos:
            frames = _frames(video)
            size = smart_resize(frames[0].height, frames[0].width, factor=p * m, min_pixels=self.min_pixels,
                                max_pixels=self.max_pixels)
            pixels = _normalised(frames, size, self.image_mean, self.image_std)     # [F, 3, H, W]
            if pad := -pixels.shape[0] % tp:
                pixels = torch.cat([pixels, pixels[-1:].expand(pad, -1, -1, -1)])
            t, h, w = pixels.shape[0] // tp, size[0] // p, size[1] // p
            patches.append(qwen_video_patches(pixels, p, tp, m))
            grids.append([t, h, w])
            metadata.append(_metadata(len(frames), size, self.fps))
        return BatchFeature({"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids),
                             "video_metadata": metadata})

    def get_num_of_video_patches(self, num_frames: int, height: int, width: int, videos_kwargs: Any = None) -> int:
        """Patches of a ``num_frames x height x width`` video before merging (what processors ask)."""
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

        h, w = smart_resize(height, width, factor=self.patch_size * self.merge_size, min_pixels=self.min_pixels,
                            max_pixels=self.max_pixels)
        return math.ceil(num_frames / self.temporal_patch_size) * (h // self.patch_size) * (w // self.patch_size)

    get_number_of_video_patches = get_num_of_video_patches


class TinyFramesVideoProcessor(BaseVideoProcessor):
    """Frames resized to ``size x size`` and normalised: ``pixel_values_videos``
    ``[num_videos, frames, 3, size, size]`` as the LLaVA-OneVision, LLaVA-NeXT-Video and InternVL
    video processors return it, without torchvision.

    Args:
        size: the vision tower's input side in pixels.
        image_mean, image_std: normalisation, the image processor's.
        fps: the frame rate reported in ``video_metadata``.
    """

    model_input_names = ["pixel_values_videos"]
    #: The videos of one call are stacked into one tensor, so they need equal frame counts.
    stacks_frames = True

    def __init__(self, *, size: int, image_mean: Sequence[float], image_std: Sequence[float],
                 fps: float = DEFAULT_FPS) -> None:
        super().__init__()
        self.frame_size = size
        self.image_mean = list(image_mean)
        self.image_std = list(image_std)
        self.fps = fps

    def __call__(self, videos: Any, **kwargs: Any) -> BatchFeature:
        videos = [videos] if not isinstance(videos, (list, tuple)) or isinstance(videos[0], Image.Image) else videos
        clips = [_normalised(_frames(video), (self.frame_size, self.frame_size), self.image_mean, self.image_std)
                 for video in videos]
        lengths = sorted({clip.shape[0] for clip in clips})
        if len(lengths) > 1:
            raise ValueError(f"the videos of one call have {lengths} frames; this processor (like the model's own) "
                             "stacks them, so give every video the same number of frames")
        metadata = [_metadata(clip.shape[0], (self.frame_size, self.frame_size), self.fps) for clip in clips]
        return BatchFeature({"pixel_values_videos": torch.stack(clips), "video_metadata": metadata})


class _AcceptsTinyVideoProcessor:
    """Lets a ``transformers`` processor take one of the video processors above.

    ``ProcessorMixin`` checks each sub-processor's class by name; for ``video_processor`` it looks the
    expected base class up among the video processor classes, every one of which is a placeholder that
    raises without torchvision (5.24: ``VideoProcessorMixin``). This accepts the tiny ones, which
    subclass ``BaseVideoProcessor``, and leaves every other check to the processor."""

    def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
        if argument_name == "video_processor" and isinstance(argument, (TinyQwenVideoProcessor, TinyFramesVideoProcessor)):
            return type(argument)
        return super().check_argument_for_proper_class(argument_name, argument)  # type: ignore[misc]


_WITH_TINY: dict[type, type] = {}


def with_tiny_video_processor(processor_class: type) -> type:
    """``processor_class`` (a ``transformers`` processor) as a subclass that accepts a tiny video
    processor (one class per processor class, so instances of the same family share a type)."""
    if processor_class not in _WITH_TINY:
        _WITH_TINY[processor_class] = type(processor_class.__name__, (_AcceptsTinyVideoProcessor, processor_class),
                                           {"__module__": __name__, "__doc__": f"``{processor_class.__name__}`` "
                                            "whose video processor is a torch-only tiny one (tokred.testing)."})
    return _WITH_TINY[processor_class]


# ----------------------------------------------------------- inputs without the processor


class ProcessorFreeVideoUnsupported(TokredError, NotImplementedError):
    """:func:`processor_free_video_inputs` does not know how to assemble video inputs for this model
    (a family it does not describe); the message says why. A ``NotImplementedError``, so callers
    that treat "not applicable" as such (the conformance suite) can catch it as one."""


#: The ``model_type`` of every family :func:`processor_free_video_inputs` assembles video inputs for.
PROCESSOR_FREE_VIDEO_FAMILIES: tuple[str, ...] = (
    "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "llava_next_video", "internvl")

_QWEN = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def processor_free_video_inputs(model: Any, processor: Any, prompts: Sequence[str], *, frames: int | Sequence[int] = 4,
                                videos_per_prompt: int = 1, size: tuple[int, int] | None = None, first_prompt: int = 0,
                                fps: float = DEFAULT_FPS, mm_token_type_ids: bool = True) -> dict[str, torch.Tensor]:
    """Video inputs for ``prompts`` assembled by hand, as a program that feeds decoded frames to the
    model without calling its processor does: synthetic clips (:func:`make_video`) normalised and laid
    out in the tensor the model's video tower reads, every video placeholder expanded in the token
    ids by hand to the number of tokens the model's video features have, left padding and the
    attention mask.

    Only two things are taken from ``processor``: the text of each prompt, rendered by its chat
    template (``{"type": "video"}`` items, as :func:`~tokred.testing.tiny_video_inputs` writes it,
    so the placeholders sit where the template puts them), and its tokenizer, which turns that text
    into ids; normalisation uses the video (else image) processor's ``image_mean`` / ``image_std``.
    Everything else (token counts, grids, pixel layout, frame markers) is computed here from the
    model's config. With the tiny models (:data:`~tokred.testing.VIDEO_FAMILIES`) the result equals
    ``tiny_video_inputs(processor, prompts, ..., size=size)`` tensor for tensor (less
    ``mm_token_type_ids`` and ``second_per_grid_ts`` when ``mm_token_type_ids=False``).

    Per family (``model.config.model_type``):

    * ``qwen2_vl``, ``qwen2_5_vl``, ``qwen3_vl``: frames of ``size`` (default 12 x 12 patches:
      168 px, Qwen3-VL 192 px; multiples of ``patch_size * spatial_merge_size``), padded to whole
      temporal patches by repeating the last frame; ``pixel_values_videos``
      ``[sum t*h*w, 3 * temporal_patch_size * patch_size**2]`` (:func:`qwen_video_patches`),
      ``video_grid_thw`` ``[num_videos, 3]``; each ``<|video_pad|>`` becomes ``t*h*w / merge**2``
      of them (Qwen3-VL: the processor's layout, one ``<T seconds><|vision_start|>
      <|video_pad|>... <|vision_end|>`` per temporal patch, ``T`` the mean time of its frames at
      ``fps``). With ``mm_token_type_ids`` (default) also ``mm_token_type_ids`` (2 on video tokens,
      else 0: transformers computes M-RoPE only with it, and the plain forward refuses video without
      it) and, for Qwen2.5-VL, ``second_per_grid_ts`` (``temporal_patch_size / fps`` per video).
      ``mm_token_type_ids=False`` gives the bare inputs that ``generate`` accepts (every token then
      gets text positions on all three M-RoPE axes); the plain forward of Qwen2-VL and Qwen3-VL
      raises on them (Qwen2.5-VL's takes them, with text positions too).
    * ``llava_onevision``: ``pixel_values_videos`` ``[num_videos, frames, 3, S, S]`` (``S`` the vision
      tower's ``image_size``; ``size`` must be ``None`` or ``(S, S)``); each ``<video>`` becomes
      ``frames * ceil(side / 2)**2 + 1`` tokens, ``side = image_size // patch_size`` (the 2x2 bilinear
      pooling of every frame, plus one newline token).
    * ``llava_next_video``: the same tensor; ``frames * (side // spatial_pool_stride)**2`` tokens.
    * ``internvl``: every frame a one-tile image, ``pixel_values`` ``[num_videos * frames, 3, S, S]``;
      each ``<video>`` becomes ``Frame1: <img><IMG_CONTEXT>*n</img>\\nFrame2: ...``, ``n =
      (side * downsample_ratio)**2`` (apply with ``adapter_options={"frames_as_video": True}``, see
      :data:`~tokred.testing.VIDEO_ADAPTER_OPTIONS`).

    The stacked families (all but Qwen) need the same number of frames for every video of a call.

    Args:
        model: the model the inputs are for (its config decides the family and every count).
        processor: its processor, for the chat template and the tokenizer only.
        prompts: the questions, one row each.
        frames: frames of every clip, or per prompt number (``frames[first_prompt + i]``).
        videos_per_prompt: clips per prompt, before the question.
        size: ``(width, height)`` of the frames in pixels (see above).
        first_prompt: the number of the first prompt: clip ``j`` of prompt ``i`` is seeded
            ``10 * (first_prompt + i) + j``, as in :func:`~tokred.testing.tiny_video_inputs`.
        fps: the frame rate the frames are taken as sampled at (Qwen2.5-VL, Qwen3-VL).
        mm_token_type_ids: Qwen-VL only: whether to include ``mm_token_type_ids`` (and Qwen2.5-VL's
            ``second_per_grid_ts``).

    Raises:
        ProcessorFreeVideoUnsupported: (a ``NotImplementedError``) the model is of no family above.
        OptionsError: a ``size`` or frame counts the family cannot take.
    """
    config = model.config
    family = getattr(config, "model_type", None)
    if family not in PROCESSOR_FREE_VIDEO_FAMILIES:
        raise ProcessorFreeVideoUnsupported(
            f"processor_free_video_inputs does not know how {type(model).__name__} (model_type {family!r}) lays out "
            f"video inputs; it assembles them for {', '.join(PROCESSOR_FREE_VIDEO_FAMILIES)}. Build this model's "
            "video inputs with its processor")
    if videos_per_prompt < 1 or not prompts:
        raise OptionsError("processor_free_video_inputs needs at least one prompt and one video per prompt")
    tokenizer = getattr(processor, "tokenizer", processor)
    source = getattr(processor, "video_processor", None) or getattr(processor, "image_processor", None)
    mean = getattr(source, "image_mean", None) or _CLIP_MEAN
    std = getattr(source, "image_std", None) or _CLIP_STD
    counts = [frames if isinstance(frames, int) else frames[i] for i in range(first_prompt, first_prompt + len(prompts))]
    if min(counts) < 1:
        raise OptionsError(f"every video needs at least one frame, got {counts}")
    build = _qwen_video if family in _QWEN else _stacked_video
    rows, extra = build(config, family, tokenizer, prompts, counts, videos_per_prompt, size, first_prompt, fps, mean, std,
                        processor)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    length = max(len(ids) for ids in rows)
    input_ids = torch.tensor([[pad] * (length - len(ids)) + ids for ids in rows])
    attention_mask = torch.tensor([[0] * (length - len(ids)) + [1] * len(ids) for ids in rows])
    inputs: dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if family in _QWEN and mm_token_type_ids:
        types = torch.zeros_like(input_ids)
        types[input_ids == config.video_token_id] = 2
        inputs["mm_token_type_ids"] = types.masked_fill(attention_mask == 0, 0)
    inputs.update(extra)
    if family == "qwen2_5_vl" and not mm_token_type_ids:
        inputs.pop("second_per_grid_ts")
    return inputs


def _templated_ids(processor: Any, tokenizer: Any, prompt: str, videos: int) -> list[int]:
    """The prompt's chat-template text with ``videos`` video items, tokenized, placeholders unexpanded."""
    content = [{"type": "video"}] * videos + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    return list(tokenizer(text).input_ids)


def _expand(ids: list[int], pattern: list[int], expansions: list[list[int]], what: str) -> list[int]:
    """``ids`` with each occurrence of ``pattern`` replaced by the next of ``expansions``."""
    out, i, done = [], 0, 0
    while i < len(ids):
        if ids[i:i + len(pattern)] == pattern and done < len(expansions):
            out += expansions[done]
            done += 1
            i += len(pattern)
        else:
            out.append(ids[i])
            i += 1
    if done != len(expansions):
        raise ProcessorFreeVideoUnsupported(
            f"the chat template's text holds {done} video placeholders ({what}) for {len(expansions)} videos; "
            "processor_free_video_inputs expands the placeholders the template writes for {'type': 'video'} items")
    return out


def _single_token(tokenizer: Any, token: str) -> int:
    ids = tokenizer(token, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ProcessorFreeVideoUnsupported(f"the tokenizer has no single token {token!r} (it reads as {ids})")
    return int(ids[0])


def _qwen_video(config: Any, family: str, tokenizer: Any, prompts: Sequence[str], counts: list[int], per_prompt: int,
                size: tuple[int, int] | None, first: int, fps: float, mean: Any, std: Any,
                processor: Any) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
    vision = config.vision_config
    p, tp, m = int(vision.patch_size), int(vision.temporal_patch_size), int(vision.spatial_merge_size)
    width, height = size if size is not None else (12 * p, 12 * p)
    if width % (p * m) or height % (p * m):
        raise OptionsError(f"{family} frames must be multiples of patch_size * spatial_merge_size = {p * m} px on "
                           f"each side (the video tower's merged patches), got {width} x {height}")
    vs, vp, ve = int(config.vision_start_token_id), int(config.video_token_id), int(config.vision_end_token_id)
    rows, patches, grids, seconds = [], [], [], []
    for i, prompt in enumerate(prompts, start=first):
        expansions = []
        for j in range(per_prompt):
            pixels = _normalised(make_video(counts[i - first], width, height, seed=10 * i + j), (height, width), mean, std)
            if pad := -pixels.shape[0] % tp:
                pixels = torch.cat([pixels, pixels[-1:].expand(pad, -1, -1, -1)])
            t, h, w = pixels.shape[0] // tp, height // p, width // p
            patches.append(qwen_video_patches(pixels, p, tp, m))
            grids.append([t, h, w])
            seconds.append(tp / fps)
            per_frame = (h // m) * (w // m)
            if family == "qwen3_vl":
                # Qwen3VLProcessor: the mean time of each temporal patch's first and last frame.
                times = [index / fps for index in range(counts[i - first])]
                times += times[-1:] * (-len(times) % tp)
                expansions.append([token for k in range(t) for token in (
                    list(tokenizer(f"<{(times[k * tp] + times[k * tp + tp - 1]) / 2:.1f} seconds>",
                                   add_special_tokens=False).input_ids) + [vs] + [vp] * per_frame + [ve])])
            else:
                expansions.append([vp] * (t * per_frame))
        ids = _templated_ids(processor, tokenizer, prompt, per_prompt)
        if family == "qwen3_vl":  # one <|vision_start|><|video_pad|><|vision_end|> per video becomes t runs
            rows.append(_expand(ids, [vs, vp, ve], expansions, "<|vision_start|><|video_pad|><|vision_end|>"))
        else:
            rows.append(_expand(ids, [vp], [[*e] for e in expansions], "<|video_pad|>"))
    extra = {"pixel_values_videos": torch.cat(patches), "video_grid_thw": torch.tensor(grids)}
    if family == "qwen2_5_vl":
        extra["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
    return rows, extra


def _stacked_video(config: Any, family: str, tokenizer: Any, prompts: Sequence[str], counts: list[int],
                   per_prompt: int, size: tuple[int, int] | None, first: int, fps: float, mean: Any, std: Any,
                   processor: Any) -> tuple[list[list[int]], dict[str, torch.Tensor]]:
    vision = config.vision_config
    side_px = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    patch = vision.patch_size if isinstance(vision.patch_size, int) else vision.patch_size[0]
    if size is not None and tuple(size) != (side_px, side_px):
        raise OptionsError(f"{family} frames go to the vision tower at its {side_px} x {side_px} px input; "
                           f"size must be None or {(side_px, side_px)}, got {tuple(size)}")
    if len(set(counts)) > 1:
        raise OptionsError(f"{family} stacks the videos of one call into one tensor, so every video needs the same "
                           f"number of frames; got {counts}")
    frame_count, side = counts[0], side_px // patch
    clips = [_normalised(make_video(frame_count, side_px, side_px, seed=10 * i + j), (side_px, side_px), mean, std)
             for i in range(first, first + len(prompts)) for j in range(per_prompt)]
    if family == "internvl":
        context = int(config.image_token_id)
        start, end = _single_token(tokenizer, "<img>"), _single_token(tokenizer, "</img>")
        per_frame = int(side * config.downsample_ratio) ** 2
        newline = list(tokenizer("\n", add_special_tokens=False).input_ids)
        expansion: list[int] = []
        for k in range(frame_count):
            expansion += (newline if k else []) + list(tokenizer(f"Frame{k + 1}: ", add_special_tokens=False).input_ids)
            expansion += [start] + [context] * per_frame + [end]
        placeholder = _single_token(tokenizer, "<video>")
        extra = {"pixel_values": torch.cat(clips)}
    else:
        if family == "llava_onevision":  # 2x2 bilinear pooling of every frame, then one newline token
            count = frame_count * math.ceil(side / 2) ** 2 + 1
        else:  # llava_next_video: spatial_pool_stride pooling, floor mode
            count = frame_count * (side // int(config.spatial_pool_stride)) ** 2
        placeholder = int(config.video_token_index)
        expansion = [placeholder] * count
        extra = {"pixel_values_videos": torch.stack(clips)}
    rows = [_expand(_templated_ids(processor, tokenizer, prompt, per_prompt), [placeholder], [expansion] * per_prompt,
                    "<video>") for prompt in prompts]
    return rows, extra
