"""The ``tokred`` entry point of ``tokred-video``: registers the EVS selector and method.

Found by tokred's registry through ``[project.entry-points.tokred] video = "tokred_video.plugin"``,
exactly as any third-party plugin is.
"""

from __future__ import annotations

from typing import Callable

from tokred import hookimpl

from ._evs import EVSMethod, EVSSelector

__all__ = ["tokred_register_selectors", "tokred_register_methods"]

_Register = Callable[..., None]


@hookimpl
def tokred_register_selectors(register: _Register) -> None:
    register("evs", EVSSelector)


@hookimpl
def tokred_register_methods(register: _Register) -> None:
    register("evs", EVSMethod)
