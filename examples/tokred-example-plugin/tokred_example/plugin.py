"""The ``tokred`` entry point of tokred-example-plugin: registers its selector and its method.

tokred calls each ``@tokred.hookimpl`` function below once, with a ``register(name, cls)`` callback.
Names are lowercase; prefixing them with the plugin's name keeps them clear of other plugins'.
"""

from __future__ import annotations

from typing import Callable

import tokred

from .norm import NormMethod, NormSelector

__all__ = ["tokred_register_selectors", "tokred_register_methods"]

Register = Callable[..., None]


@tokred.hookimpl
def tokred_register_selectors(register: Register) -> None:
    register("example.norm", NormSelector)


@tokred.hookimpl
def tokred_register_methods(register: Register) -> None:
    register("example-norm", NormMethod)
