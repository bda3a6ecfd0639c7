"""tokred's contract with ``transformers``: every internal name it reads, in one place.

tokred works through forward hooks, so it depends on more than the public API: the keyword
arguments ``transformers`` passes from its multimodal model to the language model and on to each
decoder layer, the field of the KV cache in model outputs, the cache classes, the attention
interface, and a few modeling functions adapters reuse. ``transformers`` renames such things now and
then (5.24 passes the cache as ``cache=`` where 5.23 passed ``past_key_values=``), and a hook that
reads the old name silently does the wrong thing. So:

* every such name is defined here, once; runtime and adapters read them through this module, and
  where releases spell a name differently every spelling is listed (newest first) and all work;
* :func:`check_transformers` verifies each of them against the installed release (the test suite
  and ``tokred doctor`` run it), so a future rename fails loudly on the first run;
* a call tokred cannot classify raises :class:`~tokred.errors.TransformersInterfaceError`, naming the
  installed release and what was expected, instead of reducing nothing and reporting zero tokens.

Importing this module does not import ``transformers``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import inspect
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from .errors import TransformersInterfaceError, UntestedReleaseWarning

__all__ = [
    "TESTED_TRANSFORMERS", "CACHE_KEYWORDS", "CACHE_OUTPUT_FIELDS", "ATTENTION_IMPLEMENTATION", "ROPE_DELTAS", "Keyword", "Requirement", "REQUIREMENTS",
    "transformers_version", "torch_version", "in_tested_range", "tested_requirement", "warn_if_untested", "find_cache", "output_cache", "cache_length",
    "cache_keyword", "is_cache", "is_static_cache", "attention_functions", "install_attention", "uninstall_attention", "eager_attention",
    "modeling_function", "causal_lm_loss", "check_transformers", "check_requirements", "interface_error",
]

#: The oldest and the newest ``transformers`` release CI tests, and exactly the bounds
#: ``pyproject.toml`` declares (``transformers>=OLDEST,<=NEWEST``), so that ``pip install tokred``
#: never resolves an untested release. ``tests/test_release_range.py`` fails when the two, or a
#: statement of the range in the docs, disagree; ``bash .ci/next-release.sh transformers --move``
#: tests the newest release on the package index and moves all of them together.
TESTED_TRANSFORMERS: tuple[str, str] = ("5.17.0", "5.25.0")

#: The keyword a KV cache travels under in forward calls, newest spelling first (``cache`` since
#: 5.24; ``past_key_values`` before, still accepted with a deprecation warning in 5.24).
CACHE_KEYWORDS: tuple[str, ...] = ("cache", "past_key_values")

#: The field of a model output that holds the KV cache, newest spelling first.
CACHE_OUTPUT_FIELDS: tuple[str, ...] = ("cache", "past_key_values")

#: The config attribute naming a module's attention implementation (``"sdpa"``, ``"eager"``, ...);
#: setting it to ``{"": name}`` on a config copy changes that config alone, not its sub-configs.
ATTENTION_IMPLEMENTATION = "_attn_implementation"

#: The Qwen-VL multimodal models' attribute holding the latest prefill's M-RoPE offsets ``[B, 1]``
#: (``max position + 1 - real tokens``), from which decoding positions continue.
ROPE_DELTAS = "rope_deltas"


class Keyword:
    """Keyword arguments of the calls tokred's hooks read or rewrite.

    Multimodal model (``model.model``): ``INPUT_IDS``, ``PIXEL_VALUES``, ``ATTENTION_MASK``,
    ``POSITION_IDS``, ``ENCODER_OUTPUTS`` (5.23+: ``generate`` runs the vision tower once, before the
    first step, and passes its outputs; ``ENCODER_OUTPUTS_IMAGE`` / ``ENCODER_OUTPUTS_VIDEO`` are its
    keys, each a ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds one ``[N_i, D]`` per
    image), ``USE_CACHE``, and per family ``IMAGE_SIZES`` (LLaVA-NeXT, LLaVA-OneVision),
    ``BATCH_NUM_IMAGES`` and ``VISION_ASPECT_RATIO`` (LLaVA-OneVision), ``IMAGE_GRID_THW`` and
    ``VIDEO_GRID_THW`` (Qwen-VL), ``PIXEL_VALUES_VIDEOS`` (every family with videos but InternVL, which
    passes frames as images). Language model: ``INPUTS_EMBEDS``, ``ATTENTION_MASK``, ``POSITION_IDS``,
    Qwen3-VL's ``VISUAL_POS_MASKS`` and ``DEEPSTACK_VISUAL_EMBEDS``. Decoder layers:
    ``HIDDEN_STATES`` (or the first positional argument), ``POSITION_EMBEDDINGS`` (``(cos, sin)``),
    ``ATTENTION_MASK``, ``POSITION_IDS``. Attention functions: ``SCALING``.
    """

    INPUT_IDS = "input_ids"
    INPUTS_EMBEDS = "inputs_embeds"
    PIXEL_VALUES = "pixel_values"
    ATTENTION_MASK = "attention_mask"
    POSITION_IDS = "position_ids"
    USE_CACHE = "use_cache"
    ENCODER_OUTPUTS = "mm_encoder_outputs"
    ENCODER_OUTPUTS_IMAGE = "image"
    ENCODER_OUTPUTS_VIDEO = "video"
    IMAGE_SIZES = "image_sizes"
    BATCH_NUM_IMAGES = "batch_num_images"
    VISION_ASPECT_RATIO = "vision_aspect_ratio"
    IMAGE_GRID_THW = "image_grid_thw"
    PIXEL_VALUES_VIDEOS = "pixel_values_videos"
    VIDEO_GRID_THW = "video_grid_thw"
    VISUAL_POS_MASKS = "visual_pos_masks"
    DEEPSTACK_VISUAL_EMBEDS = "deepstack_visual_embeds"
    HIDDEN_STATES = "hidden_states"
    POSITION_EMBEDDINGS = "position_embeddings"
    SCALING = "scaling"
    LABELS = "labels"


# ------------------------------------------------------------------------------- versions


def transformers_version() -> str:
    """The installed ``transformers`` version, read from its metadata (no import)."""
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def torch_version() -> str:
    """The installed ``torch`` version, read from its metadata (no import)."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _release(version: str) -> tuple[int, int, int] | None:
    """``"5.20.2"`` -> ``(5, 20, 2)``; local and pre-release tails are ignored (``"5.24.0.dev0"`` and
    ``"5.17.0rc1"`` count as their release), missing parts are 0; ``None`` when unparsable."""
    parts: list[int] = []
    for piece in version.split("+")[0].split(".")[:3]:
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
        if digits != piece:
            break
    if not parts:
        return None
    return tuple((parts + [0, 0])[:3])  # type: ignore[return-value]


def in_tested_range(version: str | None = None) -> bool:
    """Whether ``version`` (default: the installed one) lies within :data:`TESTED_TRANSFORMERS`,
    comparing release numbers only (``5.20.2`` lies within ``5.17.0 .. 5.24.0``)."""
    release = _release(version or transformers_version())
    oldest, newest = (_release(v) for v in TESTED_TRANSFORMERS)
    return release is not None and oldest is not None and newest is not None and oldest <= release <= newest


def tested_requirement() -> str:
    """The pip requirement that installs a tested release, ``"transformers>=5.17.0,<=5.24.0"``: the
    one ``pyproject.toml`` declares."""
    oldest, newest = TESTED_TRANSFORMERS
    return f"transformers>={oldest},<={newest}"


#: Releases :func:`warn_if_untested` has warned about in this process.
_warned_releases: set[str] = set()


def warn_if_untested(version: str | None = None, *, stacklevel: int = 2) -> bool:
    """Warn (:class:`~tokred.errors.UntestedReleaseWarning`, once per process and release) when
    ``version`` (default: the installed one) lies outside :data:`TESTED_TRANSFORMERS`; returns
    whether it does. :func:`tokred.apply` calls it: pip never resolves such a release, so a user
    who installed one on purpose is told once, and tokred goes on (its interface checks still raise
    :class:`~tokred.errors.TransformersInterfaceError` where a name it reads is gone)."""
    version = version or transformers_version()
    if in_tested_range(version):
        return False
    if version not in _warned_releases:
        _warned_releases.add(version)
        oldest, newest = TESTED_TRANSFORMERS
        warnings.warn(
            f"transformers {version} is outside the releases tokred is tested with ({oldest} to {newest}); "
            f"reductions may be wrong or fail. `tokred doctor` checks the names tokred reads; "
            f"`pip install '{tested_requirement()}'` installs a tested release",
            UntestedReleaseWarning, stacklevel=stacklevel + 1,
        )
    return True


def interface_error(expected: str, seen: str) -> TransformersInterfaceError:
    """A :class:`TransformersInterfaceError` naming the installed release, what tokred expected and
    what it saw."""
    range_note = "" if in_tested_range() else (
        f" (tokred is tested with transformers {TESTED_TRANSFORMERS[0]} to {TESTED_TRANSFORMERS[1]})"
    )
    return TransformersInterfaceError(
        f"transformers {transformers_version()}{range_note}: tokred expected {expected}, but {seen}. "
        "tokred stops here rather than reduce nothing and report wrong counts; `tokred doctor` lists the "
        "transformers names tokred depends on and which ones this release lacks"
    )


# ---------------------------------------------------------------------------------- caches


def is_cache(value: Any) -> bool:
    """Whether ``value`` is a ``transformers`` KV cache (an instance of ``transformers.Cache``)."""
    if value is None or isinstance(value, (int, float, bool, str)):
        return False
    from transformers import Cache

    return isinstance(value, Cache)


def find_cache(kwargs: Mapping[str, Any], *, call: str) -> Any | None:
    """The KV cache of a forward call's keyword arguments, under any spelling of
    :data:`CACHE_KEYWORDS`, or ``None`` when the call carries none.

    Raises :class:`~tokred.errors.TransformersInterfaceError` when a cache travels under a keyword
    tokred does not know (a future rename) or under two spellings at once: in either case tokred
    could not tell a prefill from a decoding step. ``call`` names the call for the message.
    """
    found = [(name, kwargs[name]) for name in CACHE_KEYWORDS if kwargs.get(name) is not None]
    if len(found) > 1:
        raise interface_error(f"one KV cache keyword in the {call} call", f"it carries {[n for n, _ in found]}")
    if not found:
        unknown = [name for name, value in kwargs.items() if name not in CACHE_KEYWORDS and is_cache(value)]
        if unknown:
            raise interface_error(
                f"the KV cache under one of the keywords {list(CACHE_KEYWORDS)} of the {call} call",
                f"a cache came as {unknown[0]!r}",
            )
        return None
    return found[0][1]


def output_cache(output: Any) -> Any | None:
    """The KV cache a model output carries (field :data:`CACHE_OUTPUT_FIELDS`), or ``None``.

    Reads the dataclass field itself, so that 5.24's deprecated ``past_key_values`` property (which
    logs a warning) is never touched."""
    if output is None:
        return None
    names = {f.name for f in dataclasses.fields(output)} if dataclasses.is_dataclass(output) else set()
    for name in CACHE_OUTPUT_FIELDS:
        if name in names:
            return getattr(output, name)
    unknown = [name for name in names if is_cache(getattr(output, name, None))]
    if unknown:
        raise interface_error(
            f"the KV cache in one of the output fields {list(CACHE_OUTPUT_FIELDS)} of {type(output).__name__}",
            f"it is in {unknown[0]!r}",
        )
    return None


def cache_length(cache: Any) -> int:
    """Tokens a KV cache holds (``cache.get_seq_length()``); raises
    :class:`~tokred.errors.TransformersInterfaceError` for a cache tokred cannot read."""
    reader = getattr(cache, "get_seq_length", None)
    if reader is None:
        raise interface_error("a KV cache with get_seq_length()", f"got a {type(cache).__name__} without it")
    try:
        return int(reader())
    except Exception as exc:  # a changed signature or cache layout: never guess the length
        raise interface_error("get_seq_length() to return the cache length",
                              f"it raised {type(exc).__name__}: {exc}") from exc


def is_static_cache(cache: Any) -> bool:
    """Whether a cache has a fixed length (static, sliding-window or compile-friendly caches): pruned
    layers need per-layer lengths, which only a ``DynamicCache`` keeps."""
    from transformers import DynamicCache

    return not isinstance(cache, DynamicCache) or bool(getattr(cache, "is_compileable", False))


_cache_keyword: str | None = None


def cache_keyword() -> str:
    """The spelling of :data:`CACHE_KEYWORDS` the installed release's language models take
    (the first one found in ``LlamaModel.forward``'s signature); for code that passes a cache."""
    global _cache_keyword
    if _cache_keyword is None:
        from transformers import LlamaModel

        parameters = inspect.signature(LlamaModel.forward).parameters
        found = next((name for name in CACHE_KEYWORDS if name in parameters), None)
        if found is None:
            raise interface_error(f"LlamaModel.forward to take one of {list(CACHE_KEYWORDS)}",
                                  f"its parameters are {list(parameters)}")
        _cache_keyword = found
    return _cache_keyword


# ------------------------------------------------------------------------------- attention


def attention_functions() -> Any:
    """``transformers``' registry of attention implementations (``ALL_ATTENTION_FUNCTIONS``)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    return ALL_ATTENTION_FUNCTIONS


def install_attention(name: str, function: Callable[..., Any]) -> None:
    """Make ``function`` the attention implementation called ``name``, in the shared registry
    instance every modeling file reads (``ALL_ATTENTION_FUNCTIONS[name] = function``: its local
    mapping, which :func:`uninstall_attention` can take back; ``AttentionInterface.register``
    writes a class-wide mapping that has no removal)."""
    attention_functions()[name] = function


def uninstall_attention(name: str) -> None:
    """Remove what :func:`install_attention` installed under ``name`` (no error if absent)."""
    try:
        del attention_functions()[name]
    except KeyError:
        pass


def eager_attention(module: Any) -> Callable[..., Any] | None:
    """The module-level ``eager_attention_forward`` of the modeling file that defines ``module``'s
    class, which its attention falls back to; ``None`` when that file has none."""
    return getattr(importlib.import_module(type(module).__module__), "eager_attention_forward", None)


def causal_lm_loss(model: Any, logits: Any, labels: Any, vocab_size: int) -> Any:
    """The model's own causal-LM loss (``model.loss_function``: labels shifted left by one,
    ``-100`` ignored, mean over the counted tokens) of ``logits`` ``[B, L, V]`` against ``labels``
    ``[B, L]``."""
    loss_function = getattr(model, "loss_function", None)
    if loss_function is None:
        raise interface_error(f"{type(model).__name__}.loss_function", "the model has none")
    return loss_function(logits=logits, labels=labels, vocab_size=vocab_size)


def modeling_function(module: str, name: str) -> Callable[..., Any]:
    """``transformers.models.<module>.<name>``, e.g. ``("llava_next.modeling_llava_next", "unpad_image")``;
    raises :class:`~tokred.errors.TransformersInterfaceError` when the release lacks it."""
    path = f"transformers.models.{module}"
    try:
        return getattr(importlib.import_module(path), name)  # type: ignore[no-any-return]
    except (ImportError, AttributeError) as exc:
        raise interface_error(f"{path}.{name}", "it is missing") from exc


# ---------------------------------------------------------------------------- requirements


@dataclass(frozen=True)
class Requirement:
    """One thing tokred needs from ``transformers``; :meth:`check` returns ``None`` when the
    installed release has it, else what is missing."""

    name: str
    check: Callable[[], str | None]


#: Model classes per family: (multimodal model, language model, decoder layer); decoder layers are
#: not exported at the top level, so they are named ``"<modeling module>.<class>"``.
_FAMILY_CLASSES: dict[str, tuple[str, str, str]] = {
    "llava": ("LlavaModel", "LlamaModel", "llama.LlamaDecoderLayer"),
    "llava_next": ("LlavaNextModel", "LlamaModel", "llama.LlamaDecoderLayer"),
    "internvl": ("InternVLModel", "Qwen2Model", "qwen2.Qwen2DecoderLayer"),
    "qwen2_vl": ("Qwen2VLModel", "Qwen2VLTextModel", "qwen2_vl.Qwen2VLDecoderLayer"),
    "qwen2_5_vl": ("Qwen2_5_VLModel", "Qwen2_5_VLTextModel", "qwen2_5_vl.Qwen2_5_VLDecoderLayer"),
    "qwen3_vl": ("Qwen3VLModel", "Qwen3VLTextModel", "qwen3_vl.Qwen3VLTextDecoderLayer"),
    # The released checkpoints' language models: Qwen2 (llava-onevision-qwen2-*), Vicuna/Llama (LLaVA-NeXT-Video-*).
    "llava_onevision": ("LlavaOnevisionModel", "Qwen2Model", "qwen2.Qwen2DecoderLayer"),
    "llava_next_video": ("LlavaNextVideoModel", "LlamaModel", "llama.LlamaDecoderLayer"),
}

#: The families whose multimodal model takes ``pixel_values_videos``.
_VIDEO_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "llava_onevision", "llava_next_video")

#: Modeling files whose attention functions the observer wraps: their ``eager_attention_forward``.
_EAGER_MODULES = ("llama", "qwen2", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "clip", "internvl")


def _transformers_class(name: str) -> Any:
    """``transformers.<name>``, or for ``"<module>.<class>"`` the class of
    ``transformers.models.<module>.modeling_<module>``; ``None`` when missing."""
    import transformers

    module, _, cls = name.rpartition(".")
    try:
        if module:
            return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), cls)
        return getattr(transformers, name)
    except (ImportError, AttributeError):
        return None


def _takes(class_name: str, names: Iterable[str], *, any_of: bool = False) -> str | None:
    cls = _transformers_class(class_name)
    if cls is None:
        return f"transformers has no {class_name}"
    parameters = inspect.signature(cls.forward).parameters
    names = list(names)
    if any_of:
        return None if any(n in parameters for n in names) else f"{class_name}.forward takes none of {names}"
    missing = [n for n in names if n not in parameters]
    return f"{class_name}.forward lacks {missing}" if missing else None


def _all(problems: Iterable[str | None]) -> str | None:
    found = [p for p in problems if p]
    return "; ".join(found) if found else None


def _output_field() -> str | None:
    from transformers.modeling_outputs import BaseModelOutputWithPast

    names = {f.name for f in dataclasses.fields(BaseModelOutputWithPast)}
    return None if names & set(CACHE_OUTPUT_FIELDS) else f"BaseModelOutputWithPast has none of {list(CACHE_OUTPUT_FIELDS)}"


def _dynamic_cache() -> str | None:
    import transformers

    for name in ("Cache", "DynamicCache"):
        if not hasattr(transformers, name):
            return f"transformers has no {name}"
    return None if hasattr(transformers.DynamicCache, "get_seq_length") else "DynamicCache has no get_seq_length"


def _attention_interface() -> str | None:
    import transformers

    if not hasattr(transformers, "AttentionInterface"):
        return "transformers has no AttentionInterface"
    registry = attention_functions()
    missing = [name for name in ("get_interface", "__setitem__", "__delitem__") if not hasattr(registry, name)]
    return f"ALL_ATTENTION_FUNCTIONS has no {missing}" if missing else None


def _eager_functions() -> str | None:
    missing = []
    for name in _EAGER_MODULES:
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
        if not hasattr(module, "eager_attention_forward"):
            missing.append(name)
    return f"no eager_attention_forward in modeling files {missing}" if missing else None


def _has_function(module: str, name: str) -> Callable[[], str | None]:
    def check() -> str | None:
        try:
            modeling_function(module, name)
        except TransformersInterfaceError:
            return f"transformers.models.{module} has no {name}"
        return None

    return check


def _has_method(class_name: str, name: str) -> Callable[[], str | None]:
    def check() -> str | None:
        cls = _transformers_class(class_name)
        return None if cls is not None and hasattr(cls, name) else f"{class_name} has no {name}"

    return check


def _sets_attribute(class_name: str, attribute: str) -> str | None:
    """Whether ``class_name.__init__`` assigns ``self.<attribute>`` (instance attributes are not
    visible on the class; their assignment in the constructor's source is)."""
    cls = _transformers_class(class_name)
    if cls is None:
        return f"transformers has no {class_name}"
    try:
        source = inspect.getsource(cls.__init__)
    except (OSError, TypeError):
        return f"the source of {class_name}.__init__ is not available to check {attribute}"
    return None if f"self.{attribute}" in source else f"{class_name}.__init__ does not set {attribute}"


K = Keyword

#: Everything tokred needs from ``transformers``; :func:`check_transformers` checks each one.
REQUIREMENTS: tuple[Requirement, ...] = (
    Requirement(
        f"the KV cache keyword ({' or '.join(CACHE_KEYWORDS)}) of every supported multimodal and language model",
        lambda: _all(_takes(c, CACHE_KEYWORDS, any_of=True) for classes in _FAMILY_CLASSES.values() for c in classes[:2]),
    ),
    Requirement(
        f"the KV cache field ({' or '.join(CACHE_OUTPUT_FIELDS)}) of model outputs", _output_field,
    ),
    Requirement(
        "multimodal model keywords: " + ", ".join((K.INPUT_IDS, K.PIXEL_VALUES, K.ATTENTION_MASK, K.POSITION_IDS)),
        lambda: _all(_takes(classes[0], (K.INPUT_IDS, K.PIXEL_VALUES, K.ATTENTION_MASK, K.POSITION_IDS))
                     for classes in _FAMILY_CLASSES.values()),
    ),
    Requirement(
        "language model keywords: " + ", ".join((K.INPUTS_EMBEDS, K.ATTENTION_MASK, K.POSITION_IDS)),
        lambda: _all(_takes(classes[1], (K.INPUTS_EMBEDS, K.ATTENTION_MASK, K.POSITION_IDS))
                     for classes in _FAMILY_CLASSES.values()),
    ),
    Requirement(
        f"Qwen3-VL language model keywords: {K.VISUAL_POS_MASKS}, {K.DEEPSTACK_VISUAL_EMBEDS}",
        lambda: _takes("Qwen3VLTextModel", (K.VISUAL_POS_MASKS, K.DEEPSTACK_VISUAL_EMBEDS)),
    ),
    Requirement(
        "Qwen-VL multimodal model keywords: " + ", ".join((K.IMAGE_GRID_THW, K.VIDEO_GRID_THW)),
        lambda: _all(_takes(_FAMILY_CLASSES[f][0], (K.IMAGE_GRID_THW, K.VIDEO_GRID_THW))
                     for f in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")),
    ),
    Requirement(
        f"video keyword {K.PIXEL_VALUES_VIDEOS} of the multimodal models of " + ", ".join(_VIDEO_FAMILIES),
        lambda: _all(_takes(_FAMILY_CLASSES[f][0], (K.PIXEL_VALUES_VIDEOS,)) for f in _VIDEO_FAMILIES),
    ),
    Requirement(
        f"LLaVA-OneVision multimodal model keywords: {K.IMAGE_SIZES}, {K.BATCH_NUM_IMAGES}",
        lambda: _takes("LlavaOnevisionModel", (K.IMAGE_SIZES, K.BATCH_NUM_IMAGES)),
    ),
    Requirement("LlavaOnevisionModel.pack_image_features, apply_pooling and image_newline (the image and video layouts)",
                lambda: _all((_has_method("LlavaOnevisionModel", "pack_image_features")(),
                              _has_method("LlavaOnevisionModel", "apply_pooling")(),
                              _sets_attribute("LlavaOnevisionModel", "image_newline")))),
    Requirement("llava_onevision.modeling_llava_onevision.image_size_to_num_patches",
                _has_function("llava_onevision.modeling_llava_onevision", "image_size_to_num_patches")),
    Requirement(
        f"LLaVA-NeXT multimodal model keyword: {K.IMAGE_SIZES}", lambda: _takes("LlavaNextModel", (K.IMAGE_SIZES,)),
    ),
    Requirement(
        "decoder layer keywords: " + ", ".join((K.HIDDEN_STATES, K.POSITION_EMBEDDINGS, K.ATTENTION_MASK, K.POSITION_IDS)),
        lambda: _all(_takes(classes[2], (K.HIDDEN_STATES, K.POSITION_EMBEDDINGS, K.ATTENTION_MASK, K.POSITION_IDS))
                     for classes in _FAMILY_CLASSES.values()),
    ),
    Requirement("transformers.Cache and DynamicCache.get_seq_length", _dynamic_cache),
    Requirement("transformers.AttentionInterface; ALL_ATTENTION_FUNCTIONS.get_interface, item assignment and deletion",
                _attention_interface),
    Requirement("eager_attention_forward in the modeling files of " + ", ".join(_EAGER_MODULES), _eager_functions),
    Requirement("llava_next.modeling_llava_next.unpad_image", _has_function("llava_next.modeling_llava_next", "unpad_image")),
    Requirement("llava_next.modeling_llava_next.get_anyres_image_grid_shape",
                _has_function("llava_next.modeling_llava_next", "get_anyres_image_grid_shape")),
    Requirement("InternVLModel.pixel_shuffle", _has_method("InternVLModel", "pixel_shuffle")),
    Requirement("PreTrainedModel.loss_function (labels scored on the reduced sequence)",
                _has_method("PreTrainedModel", "loss_function")),
    Requirement(f"the {K.LABELS} keyword of every supported model's forward",
                lambda: _all(_takes(c, (K.LABELS,)) for c in ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                                                             "InternVLForConditionalGeneration", "Qwen2VLForConditionalGeneration",
                                                             "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration",
                                                             "LlavaOnevisionForConditionalGeneration",
                                                             "LlavaNextVideoForConditionalGeneration"))),
    Requirement("Qwen2VLModel.get_rope_index (M-RoPE positions on the full sequence)",
                _has_method("Qwen2VLModel", "get_rope_index")),
    Requirement(f"Qwen-VL multimodal models keep {ROPE_DELTAS} (M-RoPE offsets of the latest prefill)",
                lambda: _all(_sets_attribute(_FAMILY_CLASSES[f][0], ROPE_DELTAS) for f in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"))),
)


def check_transformers() -> list[tuple[Requirement, str | None]]:
    """Check every :data:`REQUIREMENTS` entry against the installed ``transformers``:
    ``(requirement, problem or None)`` per entry, in order."""
    return check_requirements(REQUIREMENTS)


def check_requirements(requirements: Iterable[Requirement]) -> list[tuple[Requirement, str | None]]:
    """``(requirement, problem or None)`` for each of ``requirements``, in order; a check that raises
    reports the exception as its problem (also used for vLLM's, :mod:`tokred.integrations.vllm._compat`)."""
    results = []
    for requirement in requirements:
        try:
            problem = requirement.check()
        except Exception as exc:  # an import that fails is itself the finding
            problem = f"{type(exc).__name__}: {exc}"
        results.append((requirement, problem))
    return results
