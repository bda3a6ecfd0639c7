"""Index bookkeeping for reduced sequences: packing, gathering and attention masks.

Conventions: ``origin`` tensors ``[B, L']`` give, for each position of a reduced sequence, the
position it had in the language model's full input (``-1`` marks padding). Reduced sequences are
left-padded, like the prompts ``generate`` expects, so the last position of every row is a real
token and new tokens append on the right.
"""

from __future__ import annotations

import torch

__all__ = ["left_pack", "gather_positions", "gather_rows", "causal_key_mask", "format_mask"]


def left_pack(keep: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` bool -> ``[B, L']`` long: for each row the indices of its ``True`` entries in order,
    right-aligned, ``-1`` in front; ``L'`` is the largest row count."""
    counts = keep.sum(dim=1)
    width = int(counts.max().item()) if keep.shape[0] else 0
    packed = torch.full((keep.shape[0], width), -1, dtype=torch.long, device=keep.device)
    for row in range(keep.shape[0]):
        kept = torch.nonzero(keep[row]).flatten()
        if kept.numel():
            packed[row, width - kept.numel():] = kept
    return packed


def gather_rows(tensor: torch.Tensor, index: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """Gather ``tensor`` along ``seq_dim`` with a per-row ``index`` ``[B, L']`` (``-1`` allowed,
    gathered as position 0). The batch dimension is the one just before ``seq_dim``; leading
    dimensions (M-RoPE's axis) and trailing ones (features) are carried along. A batch dimension of
    size 1 (broadcast rotary tables) is expanded first."""
    seq_dim = seq_dim % tensor.dim()
    batch_dim = seq_dim - 1
    index = index.clamp(min=0).to(tensor.device)
    if tensor.shape[batch_dim] == 1 and index.shape[0] > 1:
        tensor = tensor.expand(*tensor.shape[:batch_dim], index.shape[0], *tensor.shape[batch_dim + 1:])
    shape = [1] * tensor.dim()
    shape[batch_dim], shape[seq_dim] = index.shape
    expanded = index.view(shape).expand(*tensor.shape[:seq_dim], index.shape[1], *tensor.shape[seq_dim + 1:])
    return torch.gather(tensor, seq_dim, expanded)


def gather_positions(position_ids: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Gather ``[B, L]`` or ``[k, B, L]`` position ids at ``index`` ``[B, L']``; padding gets 0."""
    gathered = gather_rows(position_ids, index, seq_dim=-1)
    return gathered.masked_fill(index.to(gathered.device) < 0, 0)


def causal_key_mask(key_valid: torch.Tensor, num_queries: int) -> torch.Tensor:
    """Bool ``[B, 1, Q, K]`` mask (``True`` = attend) for the last ``Q`` positions of a sequence
    whose keys are ``key_valid`` ``[B, K]``: causal, padding excluded. A padding query with
    nothing to attend to attends to itself, so no row is fully masked (fully masked rows give NaN
    in some kernels, and NaN would leak into valid rows through 0 * NaN)."""
    batch, keys = key_valid.shape
    query_pos = torch.arange(keys - num_queries, keys, device=key_valid.device)
    key_pos = torch.arange(keys, device=key_valid.device)
    mask = (key_pos[None, :] <= query_pos[:, None])[None] & key_valid[:, None, :]
    self_only = (key_pos[None, :] == query_pos[:, None])[None] & ~mask.any(dim=-1, keepdim=True)
    return (mask | self_only)[:, None]


def format_mask(mask: torch.Tensor, like: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Convert a bool mask to the format the model used for this layer: bool for sdpa, additive
    float (0 or the dtype's minimum) for eager. ``like`` is the mask the model built (may be None)."""
    if like is not None and like.dtype != torch.bool:
        additive = torch.zeros(mask.shape, dtype=like.dtype, device=mask.device)
        return additive.masked_fill(~mask, torch.finfo(like.dtype).min)
    return mask
