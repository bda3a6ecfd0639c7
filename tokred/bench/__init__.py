"""Benchmarks of token reduction, measured the same way for every method (``tokred bench``).

* :class:`Bench`: prefill and ``generate`` time against the unreduced model and the ideal (the same
  model fed only the kept tokens), selection overhead, analytic FLOPs, KV-cache bytes, peak memory.
* :func:`selector_scaling`: a Selector's time against the number of tokens and the budget.
* :func:`prefill_flops`, :func:`kv_cache_bytes`: the analytic accounting, usable on their own.
* :data:`PRESETS`: random-weight models of realistic shape, built offline (``--preset llava-135m``).
* :func:`plot_speedups`: a PNG of speed-up against budget (Pillow).

Speed is reported as ratios measured in one process, interleaved, with medians and spread: the
machines these numbers come from are shared and noisy (see ``docs/benchmarks.md``).
"""

from __future__ import annotations

from ._bench import MEMORY_NOTE, SCHEMA, Bench, Contender, format_markdown, format_table, machine_info
from ._flops import cache_bytes, head_dim, kv_cache_bytes, layer_flops, prefill_flops, tokens_per_layer
from ._ideal import Ideal
from ._memory import TensorPeak, peak_bytes
from ._plot import plot_speedups
from ._presets import PRESETS, Preset, build_preset
from ._scaling import fit_exponents, selector_scaling, synthetic_tokens
from ._timing import Spread, rounds, timed

__all__ = [
    "Bench", "Contender", "SCHEMA", "MEMORY_NOTE", "format_table", "format_markdown", "machine_info",
    "prefill_flops", "layer_flops", "kv_cache_bytes", "tokens_per_layer", "cache_bytes", "head_dim",
    "Ideal", "TensorPeak", "peak_bytes", "plot_speedups", "PRESETS", "Preset", "build_preset",
    "selector_scaling", "fit_exponents", "synthetic_tokens", "Spread", "rounds", "timed",
]
