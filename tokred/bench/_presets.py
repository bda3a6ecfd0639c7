"""Size presets: random-weight models of realistic shape, built offline for benchmarks and pictures,
and the trained SYNTHETIC PROXY.

A size preset is :func:`tokred.testing.tiny_model` with dimension overrides: the real ``transformers``
classes and processor, random weights, nothing downloaded. Timings of a random-weight model are
representative of a trained one of the same shape (the amount of work does not depend on the
values); the generated text is meaningless.

Every preset keeps the tiny tokenizer (a byte-level BPE of about 400 tokens), so embedding table and
``lm_head`` are much smaller than a real checkpoint's: ``llava-135m`` has SmolLM-135M's decoder
(hidden 576, 30 layers, 9 heads, 3 KV heads, intermediate 1536: 106M parameters in the decoder
layers) but not its 49,152 x 576 embedding (28M parameters). Prefill is barely affected (``generate``
computes the logits of the last position only); each decoding step is about 20% cheaper than with
the real vocabulary.

The ``proxy`` preset is different: the shipped, trained SYNTHETIC PROXY of :mod:`tokred.eval.proxy`
(its weights are package data), whose answers depend on the image, with its own task
(:func:`tokred.eval.proxy.proxy_task`), so that ``tokred eval --preset proxy`` needs no ``--task``.
Its figures rank methods on that synthetic task only; they are not the papers' benchmarks. Its
methods run at LLaVA-1.5's depth fractions of their absolute layer defaults (``layer_options``:
FastV's layer 2 of 32 becomes ``"2/32"``; :mod:`tokred.eval.proxy._depth`).

This module imports neither torch nor the modules a preset loads (``tokred --help`` reads it).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import transformers
    from PIL import Image

    from ..eval import Task
    from ..registry import Registry

__all__ = ["Preset", "PRESETS", "build_preset"]


@dataclass(frozen=True)
class Preset:
    """A named model built offline: a ``tiny_model`` family and its dimension overrides (random
    weights), or a ``loader`` of shipped trained weights.

    Attributes:
        name: what ``--preset`` takes.
        family: the ``tiny_model`` family (``""`` when ``loader`` is given).
        overrides: keyword overrides of the family's default dimensions.
        description: one line for ``--help`` and the benchmark page.
        loader: ``"module:function"``, a function ``(attn_implementation=...) -> (model, processor)``
            that loads trained weights; ``None`` for a random-weight ``tiny_model``.
        task: ``"module:function"``, a function ``() -> tokred.eval.Task``: the task the model was
            trained for, used by ``tokred eval`` when no ``--task`` is given; ``None`` for none.
        layer_options: ``"module:function"``, a function ``(registry, name) -> dict`` giving the
            layer options method ``name`` runs with on this model unless the user gives them (for
            ``proxy``: :func:`tokred.eval.proxy._depth.reference_depth_options`, LLaVA-1.5's
            absolute layer defaults as depth fractions); ``None`` for the methods' own defaults.
        video_frames: for a video preset, the frames of the synthetic clip its prompt holds
            (:meth:`video_prompt`), else ``None``.
        frame_size: ``(width, height)`` of the clip's frames.
    """

    name: str
    family: str
    description: str
    overrides: dict[str, Any] = field(default_factory=dict)
    loader: str | None = None
    task: str | None = None
    layer_options: str | None = None
    video_frames: int | None = None
    frame_size: tuple[int, int] = (336, 336)

    @property
    def trained(self) -> bool:
        """Whether the preset has trained weights (its answers mean something)."""
        return self.loader is not None

    def build(self, attn_implementation: str = "sdpa") -> tuple[transformers.PreTrainedModel, transformers.ProcessorMixin]:
        """``(model, processor)``; the model is float32, in eval mode, on the CPU."""
        if self.loader is not None:
            return _resolve(self.loader)(attn_implementation=attn_implementation)
        from ..testing import tiny_model

        return tiny_model(self.family, attn_implementation=attn_implementation, **self.overrides)

    def build_task(self) -> Task | None:
        """The preset's own task, or ``None`` when it has none."""
        return None if self.task is None else _resolve(self.task)()

    def method_layer_options(self, registry: Registry, name: str) -> dict[str, Any]:
        """The layer options method ``name`` runs with on this preset unless the user gives them
        (see ``layer_options``); ``{}`` when the preset has none."""
        return {} if self.layer_options is None else dict(_resolve(self.layer_options)(registry, name))

    def video_prompt(self, processor: Any, prompt: str) -> tuple[Any, list[Image.Image]]:
        """For a video preset: the processor's inputs (a ``BatchFeature``) of one user turn holding
        the synthetic clip (:func:`tokred.testing.make_video`) and ``prompt``, and the clip's frames.

        Raises:
            ValueError: the preset has no video.
        """
        from ..testing import make_video

        if self.video_frames is None:
            raise ValueError(f"preset {self.name!r} has no video")
        clip = make_video(self.video_frames, *self.frame_size)
        content = [{"type": "video"}, {"type": "text", "text": prompt}]
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(text=[text], videos=[clip], return_tensors="pt")
        inputs.pop("video_metadata", None)
        return inputs, clip


def _resolve(target: str) -> Any:
    """``"package.module:function"`` -> the function (imported now, not when presets are listed)."""
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


# SmolLM-135M's decoder shape (HuggingFaceTB/SmolLM-135M config.json).
_SMOLLM_135M = {
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "intermediate_size": 1536,
}

# The vision tower keeps LLaVA-1.5's grid (336 px in 14 px patches: 576 tokens) and is scaled so that
# its share of the parameters is LLaVA-1.5-7B's (CLIP ViT-L/14 0.30B : Llama 6.7B, about 1 : 22):
# 5.0M : 106M here. A full CLIP-L tower next to a 135M decoder would dominate every prefill and hide
# the part of the time token reduction acts on.
_SMALL_CLIP = {
    "vision_hidden_size": 256,
    "vision_num_hidden_layers": 6,
    "vision_num_attention_heads": 4,
    "vision_intermediate_size": 1024,
}

#: Named models ``--preset`` builds without a download: random-weight sizes, and the trained proxy.
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "tiny", "llava",
            "tokred.testing.tiny_model('llava'): CLIP 32 wide x 2 layers, Llama 64 wide x 8 layers, 576 visual "
            "tokens; milliseconds per forward, for tests and trying the commands",
        ),
        Preset(
            "llava-135m", "llava",
            "LLaVA-1.5 layout at small scale: CLIP tower 256 wide x 6 layers (5.0M parameters, 336 px, 576 visual "
            "tokens) and a Llama with SmolLM-135M's decoder (576 wide, 30 layers, 9 heads, 3 KV heads, "
            "intermediate 1536: 106M parameters); tiny vocabulary, random weights",
            # Real checkpoints' initialiser scale: the tiny default (0.2) is meant for 8 layers.
            {**_SMOLLM_135M, **_SMALL_CLIP, "initializer_range": 0.02},
        ),
        Preset(
            "tiny-llava_next", "llava_next",
            "tokred.testing.tiny_model('llava_next'): LLaVA-NeXT layout with 168 px tiles (a square image: "
            "thumbnail + 2 x 2 tiles, 720 visual tokens + 24 newlines), CLIP 32 wide x 2 layers, Llama 64 wide x 8",
        ),
        Preset(
            "tiny-internvl", "internvl",
            "tokred.testing.tiny_model('internvl'): InternVL layout with 224 px tiles (a square image: 2 x 2 tiles "
            "+ thumbnail, 320 visual tokens), InternViT 32 wide x 2 layers, Qwen2 64 wide x 8",
        ),
        Preset(
            "tiny-qwen2-vl-video", "qwen2_vl",
            "tokred.testing.tiny_model('qwen2_vl') prompted with a synthetic 8-frame clip at 112 x 112 px: 4 temporal "
            "patches of 4 x 4 tokens (64 visual tokens); for tests and trying the commands",
            video_frames=8, frame_size=(112, 112),
        ),
        Preset(
            "qwen2-vl-video-135m", "qwen2_vl",
            "a video prompt: a synthetic 32-frame clip at 224 x 224 px, which Qwen2-VL merges into 16 temporal "
            "patches of 8 x 8 tokens (1,024 visual tokens), through a Qwen2-VL vision tower 256 wide x 6 layers and "
            "SmolLM-135M's decoder (576 wide, 30 layers, 9 heads, 3 KV heads, intermediate 1536) with M-RoPE; "
            "random weights",
            {**_SMOLLM_135M, "initializer_range": 0.02, "mrope_section": (8, 12, 12), "max_video_pixels": 224 * 224,
             "vision_hidden_size": 256, "vision_depth": 6, "vision_num_heads": 4, "vision_intermediate_size": 1024},
            video_frames=32, frame_size=(224, 224),
        ),
        Preset(
            "llava-next-135m", "llava_next",
            "LLaVA-NeXT layout at its real token counts (336 px tiles, llava-v1.6 pinpoints: a square image is "
            "2,880 visual tokens + 48 newlines) with llava-135m's CLIP tower and SmolLM-135M's decoder; random weights",
            {**_SMOLLM_135M, **_SMALL_CLIP, "initializer_range": 0.02, "image_size": 336,
             "image_grid_pinpoints": ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))},
        ),
        Preset(
            "proxy", "",
            "TRAINED SYNTHETIC PROXY (tokred.eval.proxy, shipped weights): stock LLaVA, CLIP 64 wide x 2 layers, "
            "Llama 128 wide x 4, 256 visual tokens, trained on procedural cluttered scenes; brings its own task "
            "(tokred eval needs no --task); ranks methods on that task only, not the papers' benchmarks",
            loader="tokred.eval.proxy:load_proxy", task="tokred.eval.proxy:proxy_task",
            # FastV's layer 2, DART's gate layer 2, ... are LLaVA-1.5-7B's (32 layers): the same depth fractions here.
            layer_options="tokred.eval.proxy._depth:reference_depth_options",
        ),
    )
}


def build_preset(name: str, attn_implementation: str = "sdpa") -> tuple[transformers.PreTrainedModel, transformers.ProcessorMixin]:
    """Build the preset ``name`` (see :data:`PRESETS`): ``(model, processor)``, float32, CPU.

    Raises:
        KeyError: ``name`` is not a preset; the message lists the valid ones.
    """
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name].build(attn_implementation)
