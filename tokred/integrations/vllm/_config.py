"""How a vLLM user chooses the tokred method and budget.

Engine-wide, through ``hf_overrides`` (``LLM(..., hf_overrides={"tokred": {"method": "random",
"keep": 64}})`` or ``vllm serve ... --hf-overrides '{"tokred": {...}}'``): every option of
``tokred.create(method, **options)``. vLLM hands ``hf_config`` to the front-end processor and to every
worker, so both sides read the same choice.

Per request, through ``mm_processor_kwargs``: ``{"tokred_keep": 32}`` or ``{"tokred_keep_ratio":
0.1}`` replaces the engine's budget for that request's images; ``{"tokred_keep_ratio": 1.0}`` keeps
every token. vLLM hashes ``mm_processor_kwargs`` into each image's cache key, so the same image with
two budgets never shares a cached encoder output. The method itself is engine-wide.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

__all__ = ["REQUEST_KEYS", "TokredChoice", "engine_choice", "request_budget", "split_request_kwargs"]

#: The per-request ``mm_processor_kwargs`` keys tokred reads (and removes before the HF processor).
REQUEST_KEYS = ("tokred_keep", "tokred_keep_ratio")


@dataclass(frozen=True)
class TokredChoice:
    """The engine-wide method: its name and options exactly as the user gave them."""

    method: str
    options: tuple[tuple[str, Any], ...]

    def stage(self) -> Any:
        """The method's stage I (``tokred.SelectorStage``); raises if it has none or has gates."""
        return _stage(self)


@lru_cache(maxsize=8)
def _stage(choice: TokredChoice) -> Any:
    import tokred

    schedule = tokred.create(choice.method, **dict(choice.options)).schedule()
    if schedule.gates:
        raise tokred.ScheduleError(
            f"tokred method {choice.method!r} has gates at decoder layers; vLLM's paged attention gives no "
            "per-layer point to drop tokens from the KV cache, so only stage I (a Selector) runs in vLLM"
        )
    if schedule.selector is None:
        raise tokred.ScheduleError(f"tokred method {choice.method!r} has no stage-I selector to run in vLLM")
    return schedule.selector


def engine_choice(hf_config: Any) -> TokredChoice | None:
    """The method chosen with ``hf_overrides={"tokred": {...}}``, or ``None`` (vLLM runs unchanged)."""
    raw = getattr(hf_config, "tokred", None)
    if raw is None:
        return None
    if not isinstance(raw, Mapping) or "method" not in raw:
        raise ValueError(f'hf_overrides "tokred" must be a mapping with a "method" key, got {raw!r}')
    options = tuple(sorted((str(k), _freeze(v)) for k, v in raw.items() if k != "method"))
    choice = TokredChoice(str(raw["method"]), options)
    choice.stage()  # validates method and options at engine start, in the front end and in workers
    return choice


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, Mapping):
        return tuple(sorted((k, _freeze(v)) for k, v in value.items()))
    return value


def split_request_kwargs(kwargs: Mapping[str, object]) -> tuple[dict[str, object], dict[str, object]]:
    """``(tokred's keys, the rest)`` of a request's ``mm_processor_kwargs``."""
    ours = {k: v for k, v in kwargs.items() if k in REQUEST_KEYS}
    rest = {k: v for k, v in kwargs.items() if k not in REQUEST_KEYS}
    return ours, rest


def request_budget(choice: TokredChoice | None, kwargs: Mapping[str, object]) -> Any | None:
    """The ``tokred.Budget`` for one request's images, or ``None`` when tokred is off."""
    import tokred

    ours, _ = split_request_kwargs(kwargs)
    if choice is None:
        if ours:
            raise ValueError(
                f"mm_processor_kwargs {sorted(ours)} need a tokred method: start the engine with "
                'hf_overrides={"tokred": {"method": ...}}'
            )
        return None
    if not ours:
        return choice.stage().budget
    return tokred.Budget(keep=ours.get("tokred_keep"), keep_ratio=ours.get("tokred_keep_ratio"))
