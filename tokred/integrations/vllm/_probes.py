"""Optional selector inputs from vLLM's vision towers: [CLS] attention and pre-projector features.

They mirror what tokred's transformers adapters capture (``tokred.adapters.base``), computed the
same way so that a selector reading them keeps the same tokens in both engines:

* ``cls_attention``: at the encoder layer whose output the projector reads, the softmax attention
  of the [CLS] query to every position, averaged over heads, in float32
  (``tokred.adapters.base.cls_attention_rows``). vLLM builds a LLaVA CLIP tower only up to that
  layer, so it is the tower's last layer. It is read from the query and key that layer's attention
  module receives (a forward pre-hook, installed only while tokred encodes a batch); under tensor
  parallelism each rank holds some of the heads, and the head sum is all-reduced.
* ``pre_projector``: the input of the multimodal projector (a forward pre-hook).

Nothing is patched: hooks live on module instances, for one call.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn as nn

__all__ = ["Probes", "capture"]


@dataclass
class Probes:
    """What one encoder call captured, in call order.

    Attributes:
        cls_attention: ``[L]`` float32 per encoder row (image or tile): [CLS] -> every position (the
            [CLS] column included).
        pre_projector: the projector's input at each call, as it received it (``[B, cells, D_v]``,
            or ``[cells_total, D_v]`` for images of different sizes; the family module splits it).
    """

    cls_attention: list[torch.Tensor] = field(default_factory=list)
    pre_projector: list[torch.Tensor] = field(default_factory=list)


def _cls_rows(attention: nn.Module, total_heads: int, all_reduce: Callable[[torch.Tensor], torch.Tensor],
              probes: Probes) -> Callable[..., None]:
    def hook(module: nn.Module, args: tuple) -> None:
        query, key = args[0], args[1]                                   # [B, L, H_local * d]
        heads, dim = int(module.num_heads), int(module.head_size)       # type: ignore[arg-type]
        batch, length = query.shape[:2]
        q = query.reshape(batch, length, heads, dim)[:, 0].float()      # [B, H, d]
        k = key.reshape(batch, key.shape[1], heads, dim).float()        # [B, L, H, d]
        logits = torch.einsum("bhd,blhd->bhl", q, k) * float(module.scale)  # type: ignore[arg-type]
        summed = torch.softmax(logits, dim=-1).sum(dim=1)               # [B, L]
        if heads != total_heads:  # tensor parallel: this rank holds heads / tp of them
            summed = all_reduce(summed.contiguous())
        probes.cls_attention.extend((summed / total_heads).detach().unbind(0))

    return hook


@contextmanager
def capture(probes: Probes, *, attention: nn.Module | None = None, total_heads: int = 0,
            projector: nn.Module | None = None) -> Iterator[Probes]:
    """Capture into ``probes`` while the block runs: [CLS] attention at ``attention`` (a vLLM
    ``MMEncoderAttention`` that receives ``(query, key, value)`` ``[B, L, H_local * d]``; ``total_heads``
    over all tensor-parallel ranks) and the input of ``projector``. ``None`` skips one."""
    removers = []
    if attention is not None:
        from ._compat import tensor_model_parallel_all_reduce

        removers.append(attention.register_forward_pre_hook(
            _cls_rows(attention, total_heads, tensor_model_parallel_all_reduce, probes)).remove)
    if projector is not None:
        def on_projector(module: nn.Module, args: tuple) -> None:
            probes.pre_projector.append(args[0].detach())

        removers.append(projector.register_forward_pre_hook(on_projector).remove)
    try:
        yield probes
    finally:
        for remove in removers:
            remove()
