"""What tokred's vLLM plugin needs from its environment, in one place.

vLLM 0.32 imports small helpers (``smart_resize``, ``_num_image_tokens``) from the torchvision-backed
image-processor modules of transformers 5.x (``transformers.models.<m>.image_processing_<m>``), which
``import torchvision`` at module level. The registry offers ``torchvision`` only as a CUDA build, which
cannot load next to the CPU build of torch (its ``_C.so`` links ``libtorch_cuda.so``), so a CPU vLLM
environment has no torchvision and ``vllm.model_executor.models.llava`` (through ``pixtral``) and
``...qwen2_vl`` fail to import. transformers ships a PIL twin of each of those modules,
``image_processing_pil_<m>``, with the same helpers. Where torchvision cannot be found,
:func:`alias_torchvision_free_processors` makes the torchvision module names resolve to their PIL
twins before vLLM imports them. Nothing on disk is changed, and with torchvision installed this does
nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

__all__ = ["TORCHVISION_ONLY_MODULES", "alias_torchvision_free_processors", "has_torchvision", "image_only"]

#: The torchvision-backed transformers modules that vLLM's LLaVA and Qwen-VL code imports at module
#: level (vLLM 0.32, transformers 5.19), each with a PIL twin that defines the helpers it takes.
TORCHVISION_ONLY_MODULES = (
    "transformers.models.pixtral.image_processing_pixtral",  # llava -> pixtral: _num_image_tokens
    "transformers.models.qwen2_vl.image_processing_qwen2_vl",  # qwen2_vl, qwen2_5_vl: smart_resize
)


def _pil_twin(name: str) -> str:
    package, _, module = name.rpartition(".")
    return f"{package}.{module.replace('image_processing_', 'image_processing_pil_', 1)}"


def alias_torchvision_free_processors() -> list[str]:
    """Resolve :data:`TORCHVISION_ONLY_MODULES` to their PIL twins when torchvision is absent.

    Returns the module names aliased (empty where torchvision is installed)."""
    if importlib.util.find_spec("torchvision") is not None:
        return []
    aliased = []
    for name in TORCHVISION_ONLY_MODULES:
        if name in sys.modules:
            continue
        sys.modules[name] = importlib.import_module(_pil_twin(name))
        aliased.append(name)
    return aliased


def has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


class _ImageOnlyProcessorMixin:
    """A Qwen-VL processor without its video processor: every transformers 5.x video processor needs
    torchvision, and ``Qwen2VLProcessor.from_pretrained`` fails without one. Refuses ``videos=``."""

    @classmethod
    def get_attributes(cls) -> list[str]:
        return [a for a in super().get_attributes() if a != "video_processor"]  # type: ignore[misc]

    def __call__(self, images=None, text=None, videos=None, **kwargs):  # type: ignore[no-untyped-def]
        if videos is not None:
            raise ValueError("videos need torchvision (transformers' Qwen-VL video processor); it is not installed")
        return super().__call__(images=images, text=text, **kwargs)  # type: ignore[misc]


_IMAGE_ONLY: dict[type, type] = {}


def image_only(processor_cls: type) -> type:
    """``processor_cls`` itself where torchvision is installed, else its image-only subclass."""
    if has_torchvision():
        return processor_cls
    if processor_cls not in _IMAGE_ONLY:
        _IMAGE_ONLY[processor_cls] = type(processor_cls.__name__, (_ImageOnlyProcessorMixin, processor_cls),
                                          {"__module__": __name__, "__qualname__": processor_cls.__name__})
    return _IMAGE_ONLY[processor_cls]
