"""Observing one attention module's query and key states without changing its kernel.

``transformers`` dispatches attention through ``ALL_ATTENTION_FUNCTIONS[config._attn_implementation]``
with the module's own ``config``. To see the post-rotary queries and keys of *one* module, we give
that module (and only it, for the duration of a run) a shallow copy of its config whose
implementation name is :data:`OBSERVED_IMPLEMENTATION`. That registered function calls the module's
original implementation (sdpa, eager, ...) unchanged and then hands ``query``/``key`` to a callback.
No class is patched, masks are still built from the model-level config, every other module keeps
its kernel untouched, and removal restores the original config object.

The name is registered in ``transformers``' attention registry only while some module is observed:
the first observer installs it, the last one to go removes it, so nothing global outlives a run.
"""

from __future__ import annotations

import copy
import threading
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from .. import compat
from ..compat import Keyword

__all__ = ["OBSERVED_IMPLEMENTATION", "observe_attention", "AttentionCallback"]

OBSERVED_IMPLEMENTATION = "tokred_observed"

#: ``callback(query [B, H, Lq, d], key [B, H_kv, Lk, d], scaling)``
AttentionCallback = Callable[[torch.Tensor, torch.Tensor, float], None]


@dataclass
class _Observer:
    implementation: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    callback: AttentionCallback


_observers: "weakref.WeakKeyDictionary[nn.Module, _Observer]" = weakref.WeakKeyDictionary()
#: Guards ``_observers`` together with the registration it implies (runs in several threads).
_lock = threading.Lock()


def _observed_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, **kwargs):  # type: ignore[no-untyped-def]
    observer = _observers.get(module)
    if observer is None:  # only reachable if someone copied the observed config onto another module
        raise RuntimeError(f"{type(module).__name__} uses the {OBSERVED_IMPLEMENTATION!r} attention outside a tokred run")
    output = observer.implementation(module, query, key, value, attention_mask, **kwargs)
    scaling = kwargs.get(Keyword.SCALING)
    if scaling is None:
        scaling = getattr(module, "scaling", getattr(module, "scale", query.shape[-1] ** -0.5))
    observer.callback(query, key, float(scaling))
    return output


def observe_attention(module: nn.Module, callback: AttentionCallback) -> Callable[[], None]:
    """Call ``callback`` with ``module``'s query and key states on every forward; return a remover."""
    with _lock:
        if module in _observers:
            raise RuntimeError(f"{type(module).__name__} is already observed")
        if not _observers:
            compat.install_attention(OBSERVED_IMPLEMENTATION, _observed_attention)
        try:
            return _observe(module, callback)
        except BaseException:
            if not _observers:
                compat.uninstall_attention(OBSERVED_IMPLEMENTATION)
            raise


def _observe(module: nn.Module, callback: AttentionCallback) -> Callable[[], None]:
    original_config = module.config
    name = getattr(original_config, compat.ATTENTION_IMPLEMENTATION)
    # Modeling files define their eager attention as a module-level function the module falls back to.
    implementation = compat.attention_functions().get_interface(name, compat.eager_attention(module))
    if implementation is None:
        raise RuntimeError(f"cannot find the {name!r} attention implementation of {type(module).__name__}")
    observed_config = copy.copy(original_config)
    # This config only, not sub-configs.
    setattr(observed_config, compat.ATTENTION_IMPLEMENTATION, {"": OBSERVED_IMPLEMENTATION})
    _observers[module] = _Observer(implementation, callback)
    module.config = observed_config

    def remove() -> None:
        with _lock:
            module.config = original_config
            if _observers.pop(module, None) is not None and not _observers:
                compat.uninstall_attention(OBSERVED_IMPLEMENTATION)

    return remove
