"""How a Selector's time grows with the number of visual tokens ``N`` and the budget ``k``.

Each registered Selector runs alone on synthetic tokens: ``[N, D]`` random features (normal, plus
a common offset, like real projected tokens, which are not centred), a near-square grid layout, a
softmax of random logits as [CLS] attention and random pre-projector features ``[N, D]``. Every cell
``(N, k)`` is timed ``repeats`` times (one untimed warm-up call first) and summarised by its median.

A least-squares fit of ``log t = a + b log N + c log k`` over the measured cells gives the empirical
exponents ``b`` and ``c``, to set against what the algorithm says: ToDRE's greedy diversity
selection does ``k - 1`` matrix-vector products over ``[N, D]`` (``O(N k D)``: ``b = c = 1``),
STAR's self-attention scores form ``N x N`` logits (``O(N^2 D)``: ``b = 2``, ``c = 0``). Fixed
costs (Python, small allocations) flatten the exponents at small sizes.

Cells larger than one that took more than ``max_seconds`` (in both ``N`` and ``k``) are skipped and
say so.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import torch

from ..components import Selector
from ..tokens import ImageLayout, VisualTokens
from ._timing import Spread, timed

__all__ = ["synthetic_tokens", "selector_scaling", "fit_exponents"]


def _near_square(n: int) -> tuple[int, int]:
    """``(rows, cols)`` with ``rows * cols == n`` and ``rows`` the largest divisor ``<= sqrt(n)``."""
    rows = next(r for r in range(math.isqrt(n), 0, -1) if n % r == 0)
    return rows, n // rows


def synthetic_tokens(n: int, dim: int, *, device: torch.device, dtype: torch.dtype, seed: int = 0) -> VisualTokens:
    """One image's worth of random visual tokens: features ``[n, dim]``, pre-projector features
    ``[n, dim]``, [CLS] attention ``[n]`` (sums to 1) and a near-square grid layout."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(n, dim, generator=generator) + torch.randn(1, dim, generator=generator)
    cls_attention = torch.softmax(torch.randn(n, generator=generator), dim=0)
    pre_projector = torch.randn(n, dim, generator=generator)
    return VisualTokens(
        features=features.to(device=device, dtype=dtype),
        layout=ImageLayout.grid(*_near_square(n)),
        pre_projector=pre_projector.to(device=device, dtype=dtype),
        cls_attention=cls_attention.to(device),
    )


def fit_exponents(cells: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Least-squares exponents ``{"N": b, "k": c}`` of ``t ~ N^b k^c`` over measured cells; an
    exponent is ``None`` when its variable takes fewer than two values."""
    measured = [c for c in cells if c["seconds"] is not None]
    varies = {name: len({c[name] for c in measured}) > 1 for name in ("N", "k")}
    names = [name for name in ("N", "k") if varies[name]]
    if not names:
        return {"N": None, "k": None}
    design = torch.tensor([[1.0] + [math.log(c[name]) for name in names] for c in measured], dtype=torch.float64)
    target = torch.tensor([[math.log(c["seconds"]["median"])] for c in measured], dtype=torch.float64)
    solution = torch.linalg.lstsq(design, target).solution.flatten().tolist()
    fitted = dict(zip(names, solution[1:]))
    return {name: fitted.get(name) for name in ("N", "k")}


def selector_scaling(selector: Selector, sizes: Sequence[int], keeps: Sequence[int], *, dim: int, repeats: int = 3,
                     max_seconds: float = 10.0, device: torch.device = torch.device("cpu"),
                     dtype: torch.dtype = torch.float32,
                     step: Callable[[str], None] = lambda label: None) -> dict[str, Any]:
    """Time ``selector.select(tokens, k)`` for every ``N`` in ``sizes`` and ``k`` in ``keeps``
    (``k <= N``).

    Returns:
        ``{"cells": [{"N", "k", "seconds": Spread dict or None, "skipped": reason or None}],
        "exponents": {"N": b, "k": c}}``; seconds are wall time per call.
    """
    slow: list[tuple[int, int]] = []
    cells: list[dict[str, Any]] = []
    warm = synthetic_tokens(min(sizes), dim, device=device, dtype=dtype)
    selector.select(warm, min(min(keeps), warm.num_tokens))
    for n in sorted(sizes):
        tokens = synthetic_tokens(n, dim, device=device, dtype=dtype, seed=n)
        for k in sorted(keeps):
            if k > n:
                continue
            step(f"N={n}, k={k}")
            cell: dict[str, Any] = {"N": n, "k": k, "seconds": None, "skipped": None}
            blocker = next(((sn, sk) for sn, sk in slow if sn <= n and sk <= k), None)
            if blocker is not None:
                cell["skipped"] = f"N={blocker[0]}, k={blocker[1]} took more than {max_seconds:g} s"
            else:
                times = []
                for _ in range(repeats):
                    times.append(timed(functools.partial(selector.select, tokens, k), device))
                    if times[-1] > max_seconds:
                        slow.append((n, k))
                        break
                cell["seconds"] = Spread.of(times).to_dict()
            cells.append(cell)
    return {"cells": cells, "exponents": fit_exponents(cells)}
