"""Peak memory of one call: the high-water mark of tensor memory allocated during it.

What is measured, on every device the same quantity: the largest total size of the tensors that
the call allocated and that were alive at the same time, not counting tensors that existed before it
(weights, inputs). It includes activations, attention masks, the KV cache and tokred's bookkeeping.

* CUDA: ``torch.cuda.max_memory_allocated`` minus the memory allocated before the call, after
  ``reset_peak_memory_stats`` (the caching allocator's own account; block rounding included).
* CPU: PyTorch has no allocator statistics on the CPU, and the process's resident set size mixes in
  the Python heap and the C allocator's caching. :class:`TensorPeak` instead follows every tensor
  storage created by a PyTorch operator during the call (a ``TorchDispatchMode``) and frees it from
  the account when its storage is garbage-collected. Scratch buffers a kernel allocates internally
  and frees before returning are not seen, so the CPU figure is a lower bound on the true peak.

Tracking costs time (a Python call per operator): measure memory in separate, untimed calls.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["TensorPeak", "peak_bytes"]


class TensorPeak(TorchDispatchMode):
    """Within ``with TensorPeak() as tracker:``, ``tracker.peak`` is the largest number of bytes held
    at once by tensor storages created inside the block (see the module notes)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}      # storage id -> bytes, for storages created inside
        self._outside: set[int] = set()       # storages that existed before (seen as op inputs)

    def _storage_of(self, tensor: torch.Tensor) -> torch.UntypedStorage | None:
        try:
            return tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # sparse, meta and other storage-less tensors
            return None

    def _forget(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        inputs, _ = tree_flatten((args, kwargs or {}))
        for tensor in inputs:
            if isinstance(tensor, torch.Tensor) and (storage := self._storage_of(tensor)) is not None:
                key = storage._cdata
                if key not in self._sizes and key not in self._outside:
                    # An op input we never saw created: it existed before the block. In-place ops
                    # return it, and it must not count as a new allocation.
                    self._outside.add(key)
                    weakref.finalize(storage, self._outside.discard, key)
        result = func(*args, **(kwargs or {}))
        outputs, _ = tree_flatten(result)
        for tensor in outputs:
            if not isinstance(tensor, torch.Tensor) or (storage := self._storage_of(tensor)) is None:
                continue
            key = storage._cdata
            if key in self._outside:
                continue
            size = storage.nbytes()
            if key not in self._sizes:
                weakref.finalize(storage, self._forget, key)
            # Views add nothing (same storage); resize_ and out= ops may grow an existing one.
            self.live += size - self._sizes.get(key, 0)
            self._sizes[key] = size
        self.peak = max(self.peak, self.live)
        return result


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes of the peak tensor memory allocated by ``fn()`` beyond what was allocated before."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    with TensorPeak() as tracker:
        fn()
    return int(tracker.peak)
