"""The ``tokred`` entry point of tokred-star: registers STAR's selector, gate and method."""

from __future__ import annotations

from typing import Callable

import tokred

from ._cross_attention import CrossAttentionGate
from ._method import StarMethod
from ._self_attention import SelfAttentionSelector

__all__ = ["tokred_register_selectors", "tokred_register_gates", "tokred_register_methods"]

Register = Callable[..., None]


@tokred.hookimpl
def tokred_register_selectors(register: Register) -> None:
    register("star.self_attention", SelfAttentionSelector)


@tokred.hookimpl
def tokred_register_gates(register: Register) -> None:
    register("star.cross_attention", CrossAttentionGate)


@tokred.hookimpl
def tokred_register_methods(register: Register) -> None:
    register("star", StarMethod)
