"""Analytic prefill FLOPs and KV-cache bytes of a decoder, from its config and per-layer token counts.

Token reduction changes how many tokens each decoder layer processes; these functions turn those
counts (a run report's ``visual_tokens_per_layer`` plus the text tokens) into work and memory, so
every method is accounted for the same way.

FLOPs count the matrix products only (2 FLOPs per multiply-add), for one sample, for a
Llama-style decoder layer (grouped-query attention and a gated MLP: Llama, Qwen2, InternLM2) that
processes ``n`` tokens:

* projections: ``2 n d hd (2 h + 2 kv)`` (queries and output ``h`` heads, keys and values ``kv``
  heads, each ``hd`` wide, from and to width ``d``);
* attention: ``2 h hd n (n + 1)``, the ``n (n + 1) / 2`` causal query-key pairs of ``Q K^T`` and of
  ``A V``: the work causal attention needs, not what a kernel that skips no masked block does;
* MLP: ``6 n d I`` (gate, up and down projections, width ``I``).

Norms, rotary embeddings, softmax and activations are left out (a few percent at these widths), as
are the vision encoder (the same for every method) and biases. The ``lm_head`` adds ``2 d V`` per
position whose logits are computed: one in ``generate``'s prefill.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..runtime import RunReport

__all__ = ["head_dim", "layer_flops", "prefill_flops", "kv_cache_bytes", "tokens_per_layer", "cache_bytes"]


def head_dim(text_config: Any) -> int:
    """Width of one attention head: ``config.head_dim`` when set, else ``hidden_size / heads``."""
    explicit = getattr(text_config, "head_dim", None)
    return int(explicit) if explicit else int(text_config.hidden_size) // int(text_config.num_attention_heads)


def _kv_heads(text_config: Any) -> int:
    return int(getattr(text_config, "num_key_value_heads", None) or text_config.num_attention_heads)


def layer_flops(text_config: Any, n: int) -> int:
    """FLOPs of one decoder layer over ``n`` tokens of one sample (see the module notes)."""
    d, h, kv, hd = int(text_config.hidden_size), int(text_config.num_attention_heads), _kv_heads(text_config), head_dim(text_config)
    projections = 2 * n * d * hd * (2 * h + 2 * kv)
    attention = 2 * h * hd * n * (n + 1)
    mlp = 6 * n * d * int(text_config.intermediate_size)
    return projections + attention + mlp


def prefill_flops(text_config: Any, tokens_per_layer: Sequence[int], *, logits_positions: int = 1) -> int:
    """FLOPs of one sample's prefill through the decoder and ``lm_head``.

    Args:
        text_config: the language model's config (``hidden_size``, ``num_attention_heads``,
            ``num_key_value_heads``, ``intermediate_size``, ``vocab_size``, optional ``head_dim``).
        tokens_per_layer: ``[num_layers]`` tokens (text and visual) each decoder layer processes.
        logits_positions: positions whose logits are computed (``generate``: 1).
    """
    layers = sum(layer_flops(text_config, int(n)) for n in tokens_per_layer)
    return layers + 2 * int(text_config.hidden_size) * int(text_config.vocab_size) * logits_positions


def kv_cache_bytes(text_config: Any, tokens_per_layer: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of one sample's KV cache when decoder layer ``l`` holds ``tokens_per_layer[l]`` tokens:
    keys and values, ``kv`` heads of ``hd`` elements of ``dtype`` each per token and layer."""
    per_token = 2 * _kv_heads(text_config) * head_dim(text_config) * torch.empty((), dtype=dtype).element_size()
    return per_token * sum(int(n) for n in tokens_per_layer)


def tokens_per_layer(report: RunReport, text_tokens: int, sample: int = 0) -> list[int]:
    """``[num_layers]`` tokens each decoder layer processed for ``sample`` in the report's prefill:
    its visual tokens at that layer plus its ``text_tokens`` (never reduced)."""
    return [text_tokens + int(per_sample[sample]) for per_sample in report.visual_tokens_per_layer]


def cache_bytes(cache: Any) -> int:
    """Bytes held by a ``transformers`` cache's key and value tensors (all layers, all samples)."""
    total = 0
    for layer in getattr(cache, "layers", ()):
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
