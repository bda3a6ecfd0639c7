"""How a vLLM user chooses the tokred method, its budget and its positions.

Nothing here imports vLLM: the same parsing runs in the front end (the multimodal processor), in
every worker (the model) and in tests of the main suite.

**Engine-wide**, through ``hf_overrides`` (vLLM hands the HF config to the processor and to every
worker, so both read the same choice)::

    LLM(model, hf_overrides={"tokred": {"method": "random", "keep": 64}})
    vllm serve MODEL --hf-overrides '{"tokred": {"method": "todre", "keep": 64, "stage2": false}}'

The mapping holds ``"method"`` (a registered method) and that method's options exactly as
``tokred.create(method, **options)`` takes them, or ``"selector"`` (a registered Selector), its
options and a budget (``"keep"`` or ``"keep_ratio"``). ``"positions"`` (``"original"``, the default
of tokred's ``Schedule``, or ``"renumber"``) is the schedule's position rule.

**Per request**, through ``mm_processor_kwargs={"tokred": {...}}``: the same keys. Without
``"method"``/``"selector"`` they replace the engine's options of the same name (``keep`` and
``keep_ratio`` replace each other: giving one drops the engine's other); with one of them they
replace the engine's method altogether. ``positions`` is engine-wide only: it decides how vLLM
runs the model (see ``tokred.integrations.vllm``). vLLM hashes ``mm_processor_kwargs`` into each
image's cache keys (processor cache, encoder cache, prefix cache), so one image under two budgets
never shares a cached result.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

from ...errors import OptionsError, ScheduleError, TokredError

if TYPE_CHECKING:
    from ...schedule import Schedule, SelectorStage

__all__ = [
    "CONFIG_KEY", "TokredConfig", "TokredRequestError", "engine_config", "request_config", "split_request_kwargs",
    "Positions", "VLLM_SELECTOR_INPUTS",
]

#: The key in ``hf_overrides`` (engine) and in ``mm_processor_kwargs`` (request).
CONFIG_KEY = "tokred"

Positions = Literal["original", "renumber"]
_POSITIONS: tuple[Positions, ...] = ("original", "renumber")
_BUDGET_KEYS = ("keep", "keep_ratio")

#: The optional selector inputs tokred's vLLM models capture, on the families that have them
#: (LLaVA-1.5 and LLaVA-NeXT: both; Qwen-VL: neither, as in the transformers adapters). A selector
#: that *requires* another input (VisionZip: ``vision_keys``) is refused at engine start.
VLLM_SELECTOR_INPUTS: frozenset[str] = frozenset({"cls_attention", "pre_projector"})


class TokredRequestError(TokredError, ValueError):
    """A tokred choice that cannot serve a request (an unknown method, a bad option, a budget larger
    than an image). A ``ValueError``, so that vLLM rejects the request (``vllm serve`` answers 400)
    instead of treating it as an engine failure."""


def _freeze(value: Any) -> Any:
    """``value`` made hashable (lists to tuples, mappings to sorted item tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class TokredConfig:
    """One choice of stage I: a registered method (or selector with a budget) and its options.

    Attributes:
        method: the registered method's name, or ``None`` when :attr:`selector` is given.
        selector: the registered selector's name, or ``None`` when :attr:`method` is given.
        options: the options, sorted and frozen (``keep``/``keep_ratio`` among them for a selector).
        positions: the schedule's position rule.
    """

    method: str | None
    selector: str | None
    options: tuple[tuple[str, Any], ...]
    positions: Positions = "original"

    @classmethod
    def parse(cls, raw: object, *, where: str) -> TokredConfig:
        """A config from its mapping form; ``where`` names its origin in errors. Only the form is
        checked here; :meth:`schedule` checks the method and its options."""
        if not isinstance(raw, Mapping):
            raise OptionsError(f"{where} must be a mapping such as {{\"method\": \"random\", \"keep\": 64}}, got {raw!r}")
        method, selector = raw.get("method"), raw.get("selector")
        if (method is None) == (selector is None):
            raise OptionsError(f'{where} needs exactly one of "method" (a registered tokred method) or "selector" '
                               f"(a registered selector with keep or keep_ratio), got {dict(raw)!r}")
        name = method if method is not None else selector
        if not isinstance(name, str):
            raise OptionsError(f"{where}: the method or selector name must be a string, got {name!r}")
        positions = raw.get("positions", "original")
        if positions not in _POSITIONS:
            raise OptionsError(f"{where}: positions must be 'original' or 'renumber', got {positions!r}")
        options = tuple(sorted((str(k), _freeze(v)) for k, v in raw.items() if k not in ("method", "selector", "positions")))
        return cls(method, selector, options, positions)

    @property
    def name(self) -> str:
        """``method 'random'`` or ``selector 'example.norm'``, for messages."""
        return f"method {self.method!r}" if self.method is not None else f"selector {self.selector!r}"

    def option_dict(self) -> dict[str, Any]:
        return {k: _thaw(v) for k, v in self.options}

    def merged(self, request: Mapping[str, Any], *, where: str) -> TokredConfig:
        """This (engine-wide) config with a request's overrides applied (see the module notes)."""
        nulls = sorted(str(key) for key, value in request.items() if value is None)
        if nulls:  # JSON's null would otherwise fall back to the method's default budget, silently
            raise OptionsError(
                f"{where}: {', '.join(repr(k) for k in nulls)} is null; give a value, or leave the key out to keep "
                "the engine's"
            )
        if "positions" in request and request["positions"] != self.positions:
            raise OptionsError(
                f"{where}: positions is engine-wide (it decides how vLLM runs the model); this engine runs with "
                f"positions={self.positions!r}"
            )
        if "method" in request or "selector" in request:
            return TokredConfig.parse({**request, "positions": self.positions}, where=where)
        options = self.option_dict()
        if any(key in request for key in _BUDGET_KEYS):
            for key in _BUDGET_KEYS:
                options.pop(key, None)
        options.update(request)
        base: dict[str, Any] = {"method": self.method} if self.method is not None else {"selector": self.selector}
        return TokredConfig.parse({**base, **options, "positions": self.positions}, where=where)

    # ----------------------------------------------------------------- transport

    def to_json(self) -> str:
        """The config as compact JSON: what travels with each image from the processor to the model."""
        payload: dict[str, Any] = {"positions": self.positions, **self.option_dict()}
        payload["method" if self.method is not None else "selector"] = self.method or self.selector
        return json.dumps(payload, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> TokredConfig:
        return cls.parse(json.loads(text), where="tokred config")

    # ----------------------------------------------------------------- schedule

    def schedule(self) -> Schedule:
        """The tokred :class:`~tokred.Schedule` this config stands for (cached); raises
        :class:`~tokred.OptionsError` for an unknown name or option and
        :class:`~tokred.ScheduleError` for a schedule that cannot run in vLLM (gates, or no selector)."""
        return _schedule(self)

    def stage(self) -> SelectorStage:
        """The schedule's stage I."""
        stage = self.schedule().selector
        assert stage is not None  # _schedule refuses schedules without one
        return stage


@lru_cache(maxsize=64)
def _schedule(config: TokredConfig) -> Schedule:
    from ...budget import Budget
    from ...registry import default_registry
    from ...schedule import Schedule, SelectorStage

    registry = default_registry()
    options = config.option_dict()
    if config.method is not None:
        schedule = registry.create(config.method, **options).schedule()
    else:
        budget = {key: options.pop(key) for key in _BUDGET_KEYS if key in options}
        if not budget:
            raise OptionsError(f"tokred {config.name} needs a budget: keep or keep_ratio")
        assert config.selector is not None
        selector = registry.selector(config.selector, **options)
        schedule = Schedule(selector=SelectorStage(selector=selector, budget=Budget(**budget)))
    if schedule.gates:
        gates = ", ".join(f"{registry.describe(g.gate)} at decoder layer {g.layer!r}" for g in schedule.gates)
        raise ScheduleError(
            f"tokred {config.name} has stage-II gates ({gates}), which cannot run in vLLM: a gate drops tokens "
            "inside the language model, from its decoder layer on, and needs text->visual attention probabilities "
            "there; vLLM's paged attention kernels return neither probabilities nor a way to remove one sequence's "
            "tokens from the KV cache of later layers. Only stage I (a Selector, before the language model) runs in "
            "vLLM: choose options without gates (todre and star: \"stage2\": false)"
        )
    if schedule.selector is None:
        raise ScheduleError(f"tokred {config.name} has no stage-I selector, so there is nothing it can do in vLLM")
    selector = schedule.selector.selector
    if "instruction_embeddings" in selector.inputs:
        # Silently passing None would run a different method than the transformers path runs.
        raise ScheduleError(
            f"tokred {config.name}: {registry.describe(selector)} reads the instruction's embeddings, which vLLM cannot "
            "give it: vLLM encodes an image once, before and apart from the prompt's text, and caches the result for "
            "every request that shows the same image, so a selection that depends on the text would be reused for "
            "other texts. Choose a selector that reads the image only"
        )
    unavailable = sorted(selector.required_inputs() - VLLM_SELECTOR_INPUTS)
    if unavailable:
        raise ScheduleError(
            f"tokred {config.name}: {registry.describe(selector)} needs {', '.join(unavailable)}, which tokred's vLLM "
            f"models do not capture (they capture {', '.join(sorted(VLLM_SELECTOR_INPUTS))}, where the family has them)"
        )
    return schedule.model_copy(update={"positions": config.positions})


def engine_config(hf_config: object) -> TokredConfig | None:
    """The engine-wide config (``hf_overrides={"tokred": {...}}``), validated, or ``None``."""
    raw = getattr(hf_config, CONFIG_KEY, None)
    if raw is None:
        return None
    config = TokredConfig.parse(raw, where='hf_overrides["tokred"]')
    config.schedule()  # method and options fail at engine start, in the front end and in every worker
    return config


def split_request_kwargs(kwargs: Mapping[str, object]) -> tuple[object | None, dict[str, object]]:
    """``(the request's tokred mapping or None, the other mm_processor_kwargs)``."""
    rest = {k: v for k, v in kwargs.items() if k != CONFIG_KEY}
    return kwargs.get(CONFIG_KEY), rest


def request_config(engine: TokredConfig | None, kwargs: Mapping[str, object]) -> TokredConfig | None:
    """The config for one request: the engine's, with the request's ``mm_processor_kwargs["tokred"]``
    applied; ``None`` when tokred is off. Errors are :class:`TokredRequestError`."""
    raw, _ = split_request_kwargs(kwargs)
    if raw is None:
        return engine
    where = 'mm_processor_kwargs["tokred"]'
    try:
        if engine is None:
            raise OptionsError(
                f'{where} needs an engine started with a tokred method (hf_overrides={{"tokred": {{"method": ...}}}}): '
                "the engine decides at start how vLLM positions the kept tokens"
            )
        if not isinstance(raw, Mapping):
            raise OptionsError(f"{where} must be a mapping such as {{\"keep\": 32}}, got {raw!r}")
        config = engine.merged(raw, where=where)
        config.schedule()
    except TokredRequestError:
        raise
    except TokredError as exc:
        raise TokredRequestError(str(exc)) from exc
    return config
