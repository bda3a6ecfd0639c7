"""The ``tokred`` entry point of ``tokred-todre``: registers ToDRE's selector, gate and method.

Found by tokred's registry through ``[project.entry-points.tokred] todre = "tokred_todre.plugin"``,
exactly as any third-party plugin is.
"""

from __future__ import annotations

from typing import Callable

from tokred import hookimpl

from ._gate import InformationMigrationGate
from ._method import ToDREMethod
from ._selector import DiversitySelector

__all__ = ["tokred_register_selectors", "tokred_register_gates", "tokred_register_methods"]

_Register = Callable[..., None]


@hookimpl
def tokred_register_selectors(register: _Register) -> None:
    register("todre.diversity", DiversitySelector)


@hookimpl
def tokred_register_gates(register: _Register) -> None:
    register("todre.migration", InformationMigrationGate)


@hookimpl
def tokred_register_methods(register: _Register) -> None:
    register("todre", ToDREMethod)
