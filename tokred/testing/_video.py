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

__all__ = ["make_video", "TinyQwenVideoProcessor", "TinyFramesVideoProcessor", "with_tiny_video_processor"]

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
            # Qwen2VLVideoProcessor.patchify's order: temporal patch, merged block row and column,
            # position within the block, then channels x frames x pixels of one patch.
            grid = pixels.view(t, tp, 3, h // m, m, p, w // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
            patches.append(grid.reshape(t * h * w, 3 * tp * p * p))
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
