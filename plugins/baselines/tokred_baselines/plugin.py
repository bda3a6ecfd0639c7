"""The ``tokred`` entry point of tokred-baselines: registers every baseline's components and method.

Found by tokred's registry through ``[project.entry-points.tokred] baselines = "tokred_baselines.plugin"``,
exactly as any third-party plugin is.
"""

from __future__ import annotations

from typing import Callable

import tokred

from .cdpruner import CDPrunerMethod, CDPrunerSelector
from .dart import DARTGate, DARTMethod
from .divprune import DivPruneMethod, DivPruneSelector
from .pdrop import PDropGate, PDropMethod
from .pool import PoolMethod, PoolSelector
from .visionzip import VisionZipMethod, VisionZipSelector

__all__ = ["tokred_register_selectors", "tokred_register_gates", "tokred_register_methods"]

Register = Callable[..., None]


@tokred.hookimpl
def tokred_register_selectors(register: Register) -> None:
    register("divprune", DivPruneSelector)
    register("visionzip", VisionZipSelector)
    register("cdpruner", CDPrunerSelector)
    register("pool", PoolSelector)


@tokred.hookimpl
def tokred_register_gates(register: Register) -> None:
    register("dart", DARTGate)
    register("pdrop", PDropGate)


@tokred.hookimpl
def tokred_register_methods(register: Register) -> None:
    register("divprune", DivPruneMethod)
    register("visionzip", VisionZipMethod)
    register("dart", DARTMethod)
    register("pdrop", PDropMethod)
    register("cdpruner", CDPrunerMethod)
    register("pool", PoolMethod)
