"""Baseline methods shipped with tokred (``random``, ``fastv``), registered as a plugin through
the core distribution's own ``tokred`` entry point, exactly as third-party methods are."""

from __future__ import annotations

from ..hookspecs import hookimpl
from .fastv import FastVMethod, LastTokenAttentionGate
from .random import RandomMethod, RandomSelector

__all__ = ["RandomSelector", "RandomMethod", "LastTokenAttentionGate", "FastVMethod"]


@hookimpl
def tokred_register_selectors(register) -> None:  # type: ignore[no-untyped-def]
    register("random", RandomSelector)


@hookimpl
def tokred_register_gates(register) -> None:  # type: ignore[no-untyped-def]
    register("last_token_attention", LastTokenAttentionGate, aliases=("fastv",))


@hookimpl
def tokred_register_methods(register) -> None:  # type: ignore[no-untyped-def]
    register("random", RandomMethod)
    register("fastv", FastVMethod)
