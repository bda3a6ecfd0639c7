"""pytest plugin for tokred and its plugins, loaded through the ``pytest11`` entry point.

Fixtures:

* ``tiny_model``: a factory, ``tiny_model("llava", attn_implementation="eager") -> (model, processor)``
  the offline random-weight models of :func:`tokred.testing.tiny_model`;
* ``tokred_registry``: a fresh :class:`tokred.Registry` built from the installed entry points, so a
  test sees exactly what a user's process would (not the process-wide default registry).

tokred is imported inside the fixtures, so merely having tokred installed costs a pytest run
without these fixtures nothing.
"""

from __future__ import annotations

from typing import Any, Callable

import pytest


@pytest.fixture
def tiny_model() -> Callable[..., tuple[Any, Any]]:
    """Factory: ``tiny_model(family, attn_implementation="sdpa") -> (model, processor)``."""
    from tokred.testing import tiny_model as build

    return build


@pytest.fixture
def tokred_registry() -> Any:
    """A fresh registry loaded from the installed ``tokred`` entry points."""
    from tokred import Registry

    return Registry()
