"""Everything the commands load, checked before anything expensive happens.

* methods: :func:`create_method` refuses an unknown name or option (with the closest valid one and
  every valid option, one per line) before any model is touched;
* models: :func:`open_source` resolves ``--model`` (a directory or a Hub id) or ``--preset``, and
  turns every loading failure into one :class:`CommandError` that says what was tried and what to
  do. A Hub id that is not in the local cache fails at once when ``HF_HUB_OFFLINE`` is set or the
  Hub does not answer a quick check (:data:`HUB_CHECK_TIMEOUT` seconds), instead of after the Hub
  client's retries; a cached one is read from the cache when the Hub cannot be reached. A
  checkpoint's ``config.json`` and processor are read before its weights, so a text-only model
  or an impossible ``--keep`` (:func:`check_keep`) costs no weight loading;
* images, and output files (:func:`check_output_file`, before a long run rather than after it).

Only the argument definitions (:func:`add_model_source`, :func:`add_method`) run when the parser is
built; everything that imports torch or transformers does so inside the functions that need it.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ._common import DTYPES, CommandError, ListAction, number, parse_option, split_paths, suggest
from ._output import Output

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ..method import Method
    from ..registry import Kind, Registry

__all__ = [
    "preset_catalogue", "preset_layer_options", "layer_options_at_depth", "layer_options_line", "add_model_source",
    "add_method", "add_images", "method_options", "create_method", "check_options",
    "resolve_device", "open_image", "load_images", "check_output_file", "Source", "open_source", "prompt_inputs",
    "visual_token_counts", "check_keep", "video_preset", "preset_or_prompt_inputs",
]

# ---------------------------------------------------------------------------- presets


def preset_catalogue() -> dict[str, str]:
    """``name -> description`` of :data:`tokred.bench.PRESETS`, without importing torch.

    ``tokred.bench`` imports torch as it loads; the presets themselves live in a module that does not
    (``tokred/bench/_presets.py``), which is read on its own here so that ``--help`` and argument
    parsing stay light. Should that ever fail, the package is imported after all.
    """
    module = sys.modules.get("tokred.bench")
    if module is None:
        try:
            module = _presets_module()
        except Exception:  # the module changed shape: correctness over speed
            import tokred.bench as module
    return {name: preset.description for name, preset in module.PRESETS.items()}


def _presets_module() -> Any:
    spec = importlib.util.find_spec("tokred")
    assert spec is not None and spec.submodule_search_locations
    path = Path(list(spec.submodule_search_locations)[0]) / "bench" / "_presets.py"
    # A copy under a name of its own (dataclasses look their module up in sys.modules), one package
    # below tokred as the original, so the relative import inside Preset.build() still resolves;
    # tokred.bench, when imported, loads the original.
    name = "tokred.cli._presets_copy"
    if name in sys.modules:
        return sys.modules[name]
    loaded = importlib.util.spec_from_file_location(name, path)
    assert loaded is not None and loaded.loader is not None
    module = importlib.util.module_from_spec(loaded)
    sys.modules[name] = module
    try:
        loaded.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def preset_layer_options(preset: str | None, registry: Registry, names: Sequence[str],
                         given: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method of ``names``, the layer options preset ``preset`` runs it with (its ``layer_options``:
    for ``proxy``, LLaVA-1.5's absolute layer defaults as depth fractions,
    :func:`tokred.eval.proxy._depth.reference_depth_options`), less those in ``given`` (the user's
    options win); methods with none are left out, and so is every method for a preset without
    ``layer_options`` or no preset."""
    from ..bench._presets import PRESETS

    if preset is None or preset not in PRESETS:
        return {}
    found: dict[str, dict[str, Any]] = {}
    for name in names:
        options = {k: v for k, v in PRESETS[preset].method_layer_options(registry, name).items() if k not in given}
        if options:
            found[name] = options
    return found


def layer_options_at_depth(found: Mapping[str, Mapping[str, Any]], num_layers: int) -> dict[str, dict[str, Any]]:
    """:func:`preset_layer_options` for a ``num_layers``-layer decoder (a depth fraction that rounds
    down to layer 0 there becomes layer 1: :func:`tokred.eval.proxy._depth.at_depth`)."""
    from ..eval.proxy._depth import at_depth

    return {name: at_depth(options, num_layers) for name, options in found.items()}


def layer_options_line(found: Mapping[str, Mapping[str, Any]], num_layers: int) -> str:
    """One line naming the depth-matched options of :func:`preset_layer_options`, or ``""`` for none:
    ``depth-matched layers: fastv: layer=2/32 (LLaVA-1.5's layer 2 of 32 at this model's depth: ...)``."""
    from ..eval.proxy._depth import describe

    if not found:
        return ""
    return "depth-matched layers (docs/evaluation.md): " + "; ".join(
        describe(name, options, num_layers) for name, options in found.items())


# ---------------------------------------------------------------------------- arguments


def add_model_source(parser: argparse.ArgumentParser, *, required: bool) -> None:
    """``--model`` or ``--preset``, and how to load it (``--dtype``, ``--device``, ``--attn-implementation``)."""
    presets = preset_catalogue()
    source = parser.add_mutually_exclusive_group(required=required)
    source.add_argument("--model", metavar="PATH_OR_HUB_ID",
                        help="a saved model's directory or a Hugging Face Hub id (owner/name), passed to from_pretrained")
    source.add_argument("--preset", choices=tuple(presets), metavar="NAME",
                        help=f"a model built offline, no download: {', '.join(presets)} (see 'presets' below; "
                             "all have random weights except proxy, the trained synthetic proxy)")
    width = max(len(name) for name in presets)
    listed = [textwrap.fill(text, 96, initial_indent=f"  {name.ljust(width)}  ", subsequent_indent=" " * (width + 4))
              for name, text in presets.items()]
    parser.epilog = (parser.epilog or "") + "\n\npresets (built offline; random weights except proxy):\n" + "\n".join(listed)
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="weights dtype (default: auto: the checkpoint's own; presets: float32 on cpu, "
                             "bfloat16 on cuda)")
    parser.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                        help="where to run (default: auto, cuda when available)")
    parser.add_argument("--attn-implementation", choices=("sdpa", "eager", "flash_attention_2"), default="sdpa",
                        help="transformers attention implementation (default: sdpa; flash_attention_2 needs the "
                             "flash-attn package and a CUDA device)")


def add_method(parser: argparse.ArgumentParser) -> None:
    """``--method`` with one budget (``--keep`` or ``--keep-ratio``) and ``--option``."""
    parser.add_argument("--method", required=True, metavar="NAME", help="a registered method (see 'tokred list')")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--keep", type=int, metavar="K", help="visual tokens to keep per image")
    budget.add_argument("--keep-ratio", type=number, metavar="R",
                        help="fraction of each image's visual tokens to keep, in (0, 1]")
    parser.add_argument("--option", action="append", default=[], type=parse_option, metavar="KEY=VALUE",
                        help="a method option; the value is read as JSON when it parses (tau=0.1, layer=2, "
                             "flag=true), otherwise as a string (objective=k_center, layer=7/8). Repeatable; "
                             "'tokred list --json' shows every method's options.")


def add_images(parser: argparse.ArgumentParser, what: str) -> None:
    """``--image``: files in prompt order, as other list flags take them (spaces, commas, repeated);
    a value that is an existing file is one file, even with a comma in its name. ``what`` begins
    the help text."""
    parser.add_argument("--image", action=ListAction, element=Path, split=split_paths, metavar="FILE",
                        help=f"{what}; several after one --image, separated by commas or spaces, or repeated "
                             "(a value that is an existing file is one file, even with a comma in its name; "
                             "default: one synthetic test image)")


# ---------------------------------------------------------------------------- methods


def method_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method's options: every ``--option``, plus ``--keep`` / ``--keep-ratio`` when given."""
    options: dict[str, Any] = {}
    for key, value in args.option:
        if key in options:
            raise CommandError(f"option {key!r} is given twice")
        options[key] = value
    for key in ("keep", "keep_ratio"):
        value = getattr(args, key, None)
        if value is not None:
            if key in options:
                raise CommandError(f"{key} is given both as --{key.replace('_', '-')} and as --option {key}=...")
            options[key] = value
    return options


def check_options(registry: Registry, kind: Kind, name: str, options: dict[str, Any]) -> None:
    """Refuse options ``name`` does not have, suggesting the closest and listing the valid ones.

    The unknown options come first, each with its closest valid one, then the valid options one per
    line with their defaults and descriptions (:func:`tokred.registry.option_lines`, wrapped at 100
    columns). An unknown ``name`` is the registry's error, which names the closest registered one.
    """
    entry = registry.entry(kind, name)
    fields = getattr(entry.obj, "model_fields", {})
    valid = set(fields) | {f.alias for f in fields.values() if getattr(f, "alias", None)}
    unknown = [key for key in options if key not in valid]
    if not unknown:
        return
    hints = [(key, suggest(key, fields)) for key in unknown]
    names = ", ".join(repr(key) for key in unknown)
    message = f"unknown option{'s' if len(unknown) > 1 else ''} {names} for {kind} {name!r}"
    if len(hints) == 1 and hints[0][1] is not None:
        message += f"; did you mean {hints[0][1]!r}?"
    elif any(close for _, close in hints):
        message += "; did you mean " + ", ".join(f"{close!r} for {key!r}" for key, close in hints if close) + "?"
    raise CommandError(message, details=_option_lines(kind, name, fields))


def _option_lines(kind: str, name: str, fields: dict[str, Any]) -> list[str]:
    from ..registry import option_lines

    if not fields:
        return [f"{kind} {name!r} takes no options"]
    # Output.error indents these lines by two: the widest is 100 columns.
    return [f"valid options of {kind} {name!r}:", *option_lines(fields, width=98)]


def create_method(registry: Registry, name: str, options: dict[str, Any]) -> Method:
    """The method ``name`` with ``options``, checked as :func:`check_options` does."""
    check_options(registry, "method", name, options)
    return registry.create(name, **options)


# ---------------------------------------------------------------------------- devices, images, files


def resolve_device(name: str) -> torch.device:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` without a device is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda was requested but torch sees no CUDA device")
    return torch.device(name)


def open_image(path: Path) -> Image.Image:
    """The image at ``path`` in RGB; an unreadable file is a :class:`CommandError`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise CommandError(f"cannot read image {str(path)!r}: {exc}") from None


def load_images(paths: Sequence[Path] | None, output: Output) -> tuple[list[Image.Image], list[str]]:
    """The images at ``paths`` and their names, or one synthetic test image
    (:func:`tokred.testing.make_image`) when none is given."""
    if paths:
        return [open_image(path) for path in paths], [str(path) for path in paths]
    from ..testing import make_image

    image = make_image()
    output.note(f"no --image given: using a synthetic {image.width} x {image.height} test image")
    return [image], ["synthetic test image"]


def check_output_file(path: Path | None, flag: str) -> None:
    """Refuse an output file that cannot be written, before the work that produces it starts."""
    if path is None:
        return
    parent = path.parent
    if path.is_dir():
        raise CommandError(f"{flag} {str(path)!r} is a directory; give a file name inside it")
    if not parent.is_dir():
        what = f"{str(parent)!r} is not a directory" if parent.exists() else f"the directory {str(parent)!r} does not exist"
        raise CommandError(f"{flag} {str(path)!r}: {what}")
    writable = os.access(path, os.W_OK) if path.exists() else os.access(parent, os.W_OK | os.X_OK)
    if not writable:
        raise CommandError(f"{flag} {str(path)!r}: permission denied")


# ---------------------------------------------------------------------------- models

_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}$")
_EXAMPLE_MODEL = "LlavaForConditionalGeneration"


def _is_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and ".." not in text and "--" not in text and not text.endswith(".")


@dataclass
class Source:
    """A model about to be used: its processor is loaded, its weights are not yet (except for
    presets, which are built whole).

    Attributes:
        name: the ``--model`` or ``--preset`` given.
        device: where the model runs.
        processor: the model's processor.
        config: the model's configuration.
    """

    name: str
    device: torch.device
    processor: Any
    config: Any
    _load: Callable[[], Any]

    @property
    def image_token_id(self) -> int | None:
        """The id of the image placeholder token, as the adapters read it from the config."""
        value = getattr(self.config, "image_token_id", None)
        if value is None:
            value = getattr(self.config, "image_token_index", None)
        return None if value is None else int(value)

    def load_model(self) -> Any:
        """The model, in eval mode on :attr:`device` (loads the weights of a checkpoint)."""
        return self._load().eval()


def open_source(args: argparse.Namespace, registry: Registry, output: Output) -> Source:
    """The ``--model`` or ``--preset`` of ``args``, checked and with its processor loaded."""
    device = resolve_device(args.device)
    attn = args.attn_implementation
    if attn == "flash_attention_2":
        if device.type != "cuda":
            raise CommandError("flash_attention_2 runs on CUDA only; use --device cuda or another attention")
        if importlib.util.find_spec("flash_attn") is None:
            raise CommandError("flash_attention_2 needs the flash-attn package (pip install 'tokred[flash]')")
    if args.preset:
        return _preset_source(args.preset, args.dtype, attn, device, output)
    return _pretrained_source(args.model, args.dtype, attn, device, registry, output)


def _preset_source(name: str, dtype_name: str, attn: str, device: torch.device, output: Output) -> Source:
    import torch

    from ..bench import build_preset

    output.note(f"building preset {name} (dtype {dtype_name}, attention {attn}, device {device}) ...")
    started = time.perf_counter()
    model, processor = build_preset(name)
    if dtype_name != "auto":
        dtype = getattr(torch, dtype_name)
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = model.to(device=device, dtype=dtype)
    if attn != "sdpa":  # flash_attention_2 can only be chosen once the weights are on the GPU in half precision
        model.set_attn_implementation(attn)
    output.note(f"built {type(model).__name__} in {time.perf_counter() - started:.1f} s")
    return Source(name, device, processor, model.config, lambda: model)


def _pretrained_source(model_id: str, dtype_name: str, attn: str, device: torch.device, registry: Registry,
                       output: Output) -> Source:
    import torch
    import transformers

    path = Path(model_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CommandError(f"{model_id} is a file, not a model directory (the directory save_pretrained writes)")
        if not (path / "config.json").is_file():
            raise CommandError(
                f"{model_id} has no config.json: not a saved model (save one with model.save_pretrained(DIR) and "
                "processor.save_pretrained(DIR), or give a Hub id such as llava-hf/llava-1.5-7b-hf)")
        where = str(path)
    elif not _is_hub_id(model_id):
        raise CommandError(f"no such directory {model_id!r}, and {model_id!r} is not a Hub id (owner/name)")
    else:
        where = model_id
    # A Hub id: fail at once when neither the cache nor the Hub has it (instead of the Hub client's
    # retries, half a minute), and read a cached copy without asking an unreachable Hub.
    hub: dict[str, Any] = {} if path.exists() else _hub_options(model_id, output)

    output.note(f"reading the configuration and processor of {model_id} ...")
    config = _hub_call(model_id, lambda: transformers.AutoConfig.from_pretrained(where, **hub))
    _check_architecture(model_id, config, registry)
    if path.is_dir():
        _check_saved_files(model_id, path)
    processor = _hub_call(model_id, lambda: transformers.AutoProcessor.from_pretrained(
        where, **hub), what="processor")
    if getattr(processor, "image_processor", None) is None or not callable(processor):
        raise CommandError(
            f"{model_id} has no image processor (preprocessor_config.json) next to its tokenizer; save the "
            "model's processor there with processor.save_pretrained(DIR)")

    def load() -> Any:
        output.note(f"loading the weights of {model_id} (dtype {dtype_name}, attention {attn}, device {device}) ...")
        started = time.perf_counter()
        dtype: Any = "auto" if dtype_name == "auto" else getattr(torch, dtype_name)
        model = _hub_call(model_id, lambda: transformers.AutoModelForImageTextToText.from_pretrained(
            where, dtype=dtype, attn_implementation=attn, **hub), what="weights")
        model = model.to(device)
        output.note(f"loaded {type(model).__name__} in {time.perf_counter() - started:.1f} s")
        return model

    return Source(model_id, device, processor, config, load)


#: How long the reachability check of the Hub waits for an answer, in seconds.
HUB_CHECK_TIMEOUT = 2.5


def _env_flag(name: str) -> bool:
    """Whether the environment variable ``name`` is set to a true value as huggingface_hub reads
    them (``1``, ``ON``, ``YES``, ``TRUE``), read now rather than when huggingface_hub was imported."""
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_offline() -> str | None:
    """The variable that forbids asking the Hub, ``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``, as
    the environment says now or as huggingface_hub read it when imported; ``None`` when online."""
    from huggingface_hub import constants

    if _env_flag("HF_HUB_OFFLINE") or constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE"
    return "TRANSFORMERS_OFFLINE" if _env_flag("TRANSFORMERS_OFFLINE") else None


def _hub_endpoint() -> str:
    """The Hub's address: ``HF_ENDPOINT`` in the environment now, else https://huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _hub_cache() -> str:
    """The directory of the Hugging Face cache, as huggingface_hub finds it, from the environment
    now: ``HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``$XDG_CACHE_HOME/huggingface/hub``, else
    ``~/.cache/huggingface/hub``."""
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return os.path.expanduser(explicit)
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _in_cache(model_id: str, cache: str) -> bool:
    """Whether ``cache`` holds the ``config.json`` of the Hub model ``model_id`` (its main revision)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(model_id, "config.json", cache_dir=cache), str)
    except Exception:  # a malformed id or an unreadable cache: not in it
        return False


def _hub_reachable(endpoint: str, timeout: float = HUB_CHECK_TIMEOUT) -> bool:
    """Whether the Hub at ``endpoint`` answers a HEAD request (any status) within about ``timeout``
    seconds, through huggingface_hub's own HTTP client (its proxies and certificates). The request
    runs in a thread that is given up on after the timeout, so a name lookup that hangs (which no
    socket timeout bounds) does not hold the command."""
    from huggingface_hub.utils import get_session

    answered: list[bool] = []

    def probe() -> None:
        try:
            get_session().head(endpoint, timeout=timeout)
            answered.append(True)
        except Exception:  # refused, timed out, no such host, no route: not reachable
            answered.append(False)

    thread = threading.Thread(target=probe, name="tokred-hub-check", daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(answered and answered[0])


def _not_cached(model_id: str, cache: str, why: str) -> str:
    """The error of a Hub model that is not in the local cache and cannot be downloaded (``why``)."""
    return (f"{model_id} is not in the local Hugging Face cache ({cache}) and {why}: download it where there is "
            f"network (hf download {model_id}) and point HF_HOME at that cache, or pass the model's local directory")


def _hub_options(model_id: str, output: Output) -> dict[str, Any]:
    """The ``from_pretrained`` keywords of the Hub model ``model_id``: the cache found now
    (``cache_dir``), and whether to read it only (``local_files_only``: offline, or the Hub does not
    answer). Raises :class:`CommandError` at once when the model is not in the cache either. Offline
    mode, the endpoint and the cache are read from the environment now, not when transformers was
    imported."""
    cache = _hub_cache()
    return {"cache_dir": cache, "local_files_only": _cache_only(model_id, cache, output)}


def _cache_only(model_id: str, cache: str, output: Output) -> bool:
    """Whether ``model_id`` is to be read from ``cache`` only; see :func:`_hub_options`."""
    cached = _in_cache(model_id, cache)
    offline = _hub_offline()
    if offline is not None:
        if not cached:
            raise CommandError(_not_cached(model_id, cache, f"{offline} is set, so the Hub is not asked"))
        return True
    endpoint = _hub_endpoint()
    if _hub_reachable(endpoint):
        return False
    if not cached:
        raise CommandError(_not_cached(model_id, cache, f"the Hugging Face Hub ({endpoint}) cannot be reached"))
    output.note(f"the Hugging Face Hub ({endpoint}) cannot be reached: using the cached copy of {model_id}")
    return True


def _check_saved_files(model_id: str, path: Path) -> None:
    """A saved model directory holds weights and the processor next to ``config.json``."""
    names = {p.name for p in path.iterdir()}
    if not any(n.endswith((".safetensors", ".bin", ".safetensors.index.json", ".bin.index.json")) for n in names):
        raise CommandError(f"{model_id} has a config.json but no weights (model.safetensors): save the model there "
                           "with model.save_pretrained(DIR)")
    if not names & {"processor_config.json", "preprocessor_config.json"}:
        raise CommandError(f"{model_id} has no processor (processor_config.json or preprocessor_config.json): save "
                           "the model's processor there with processor.save_pretrained(DIR)")


def _check_architecture(model_id: str, config: Any, registry: Registry) -> None:
    """Refuse, before any weight is read, a checkpoint that no registered adapter can handle."""
    supported = sorted({c for entry in registry.entries("adapter") for c in entry.obj.model_classes})  # type: ignore[attr-defined]
    architectures = list(getattr(config, "architectures", None) or [])
    if any(a in supported for a in architectures):
        return
    example = _EXAMPLE_MODEL if _EXAMPLE_MODEL in supported else (supported[0] if supported else "")
    described = architectures[0] if architectures else f"model_type {getattr(config, 'model_type', '?')!r}"
    if getattr(config, "vision_config", None) is None:
        raise CommandError(f"{model_id} holds a text-only model ({described}): tokred needs a vision-language model"
                           + (f" such as {example}" if example else ""))
    if architectures:
        raise CommandError(f"{model_id} holds a {described}, which no tokred adapter handles; supported: "
                           f"{', '.join(supported) or 'none'} ('tokred list' shows the adapters)")


def _causes(exc: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _hub_call(model_id: str, load: Callable[[], Any], *, what: str = "configuration") -> Any:
    """``load()``, with the Hub's and transformers' failures turned into one :class:`CommandError`."""
    try:
        return load()
    except (OSError, ValueError, ImportError, KeyError) as exc:
        raise CommandError(_loading_failure(model_id, exc, what)) from None


def _loading_failure(model_id: str, exc: BaseException, what: str) -> str:
    """What went wrong when loading ``model_id``'s ``what``, and what to do about it."""
    from huggingface_hub import errors

    causes = _causes(exc)
    local = Path(model_id).expanduser().is_dir()

    def caused_by(*types: type) -> bool:
        return any(isinstance(c, types) for c in causes)

    if caused_by(errors.GatedRepoError):
        return (f"{model_id} is a gated model on the Hugging Face Hub: accept its terms on "
                f"https://huggingface.co/{model_id} and log in (hf auth login), or pass a local directory")
    if caused_by(errors.RepositoryNotFoundError):
        return (f"no such directory {model_id!r}, and no model {model_id!r} on the Hugging Face Hub (a private "
                "one needs hf auth login)")
    if caused_by(errors.HFValidationError):
        return f"no such directory {model_id!r}, and {model_id!r} is not a Hub id (owner/name)"
    if (not local and caused_by(errors.LocalEntryNotFoundError)) or _is_connection_error(causes):
        offline = _hub_offline()
        if offline is not None:
            return _not_cached(model_id, _hub_cache(), f"{offline} is set, so the Hub is not asked")
        return (f"could not reach the Hugging Face Hub to download {model_id} (and it is not in the local cache): "
                "check the network or proxy, or download the model elsewhere and pass its local directory; "
                "HF_HUB_OFFLINE=1 with a local path skips the Hub")
    if caused_by(errors.EntryNotFoundError) and not local:
        return f"{model_id} on the Hugging Face Hub has no {what} files: it is not a transformers model"
    detail = " ".join(str(exc).split())
    if what == "weights" and isinstance(exc, OSError):
        return (f"could not load the weights of {model_id}: {detail} (a saved model has model.safetensors "
                "next to its config.json)")
    if what == "processor":
        return f"could not load the processor of {model_id}: {detail} (save it there with processor.save_pretrained(DIR))"
    return f"could not load the {what} of {model_id}: {detail}"


def _is_connection_error(causes: list[BaseException]) -> bool:
    names = {"ConnectionError", "ConnectError", "ConnectTimeout", "ReadTimeout", "Timeout", "ProxyError",
             "OfflineModeIsEnabled", "NameResolutionError", "MaxRetryError"}
    return any(type(c).__name__ in names for c in causes)


# ---------------------------------------------------------------------------- prompts and budgets


def prompt_inputs(processor: Any, images: list[Image.Image], prompt: str) -> Any:
    """The processor's inputs (on the CPU) for one user turn: the images, then the prompt."""
    content: list[dict[str, str]] = [{"type": "image"} for _ in images]
    content.append({"type": "text", "text": prompt})
    try:
        text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    except ValueError as exc:  # typically: the processor ships no chat template
        raise CommandError(f"cannot build the prompt with the processor's chat template: {exc}") from None
    return processor(images=images, text=text, return_tensors="pt")


def video_preset(args: argparse.Namespace) -> Any | None:
    """The ``--preset`` when it is a video preset (its prompt holds a synthetic clip), else ``None``;
    raises :class:`CommandError` when such a preset is given ``--image`` files."""
    if not getattr(args, "preset", None):
        return None
    from ..bench import PRESETS

    preset = PRESETS.get(args.preset)
    if preset is None or preset.video_frames is None:
        return None
    if getattr(args, "image", None):
        raise CommandError(f"preset {preset.name!r} prompts with its own synthetic {preset.video_frames}-frame clip; "
                           "--image does not apply to it")
    return preset


def preset_or_prompt_inputs(args: argparse.Namespace, processor: Any, images: list[Image.Image],
                            prompt: str) -> tuple[Any, list[Any]]:
    """``(inputs, pictures)``: a video preset's prompt with its synthetic clip (the pictures: the
    clip's frames, one list), else :func:`prompt_inputs` with ``images``."""
    preset = video_preset(args)
    if preset is None:
        return prompt_inputs(processor, images, prompt), list(images)
    inputs, clip = preset.video_prompt(processor, prompt)
    return inputs, [clip]


def visual_token_counts(inputs: Any, image_token_id: int | None, num_images: int) -> list[int] | None:
    """Upper bounds of each image's visual tokens: the lengths of the runs of image tokens in the
    processed prompt (one run per image), or ``None`` when that cannot be told.

    The bound is exact where every placeholder becomes a candidate (LLaVA-1.5, Qwen-VL, InternVL);
    LLaVA-NeXT's row separators are placeholders too, but not candidates.
    """
    ids = inputs.get("input_ids") if hasattr(inputs, "get") else None
    if image_token_id is None or ids is None or ids.dim() != 2 or ids.shape[0] != 1:
        return None
    runs: list[int] = []
    previous = False
    for is_image in (ids[0] == image_token_id).tolist():
        if is_image:
            if previous:
                runs[-1] += 1
            else:
                runs.append(1)
        previous = is_image
    if len(runs) == num_images:
        return runs
    if runs:  # adjacent images run together: their total bounds each one
        return [sum(runs)] * num_images
    return None


def check_keep(keep: int | None, counts: list[int] | None) -> None:
    """Refuse ``keep`` larger than an image's visual tokens, before the model is loaded. The budget
    is checked exactly again when the method runs (``tokred.apply``)."""
    if keep is None or counts is None:
        return
    for number_, count in enumerate(counts, start=1):
        if keep > count:
            which = f"image {number_}" if len(counts) > 1 else "the image"
            raise CommandError(
                f"keep={keep} is larger than the {count} visual tokens of {which} (budgets are per image); "
                f"give --keep {min(counts)} or less, or --keep-ratio")
