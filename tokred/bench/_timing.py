"""Timing on shared, noisy machines: interleaved rounds, per-round ratios, medians with their spread.

Background load drifts over seconds; a ratio of two calls made back to back in the same round is
much steadier than a ratio of two medians taken minutes apart. So every measured quantity is timed
once per round, all quantities interleaved (the order rotates from round to round, so none always
runs first after a pause), and ratios are formed within a round before taking their median.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch

__all__ = ["Spread", "timed", "rounds"]


@dataclass(frozen=True)
class Spread:
    """A sample summarised: median, quartiles and extremes (same unit as the sample).

    ``q1`` / ``q3`` are the inclusive quartiles (``statistics.quantiles(..., method="inclusive")``),
    equal to the median for a single value.
    """

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no values to summarise")
        if len(values) == 1:
            q1 = q3 = float(values[0])
        else:
            q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
        return cls(float(statistics.median(values)), float(q1), float(q3), float(min(values)), float(max(values)), len(values))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self, spec: str = ".2f", suffix: str = "") -> str:
        """``"1.23x [1.20-1.25]"``: the median and the interquartile range."""
        if self.n == 1:
            return f"{self.median:{spec}}{suffix}"
        return f"{self.median:{spec}}{suffix} [{self.q1:{spec}}-{self.q3:{spec}}]"


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``fn()``; on CUDA, queued kernels are waited for before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def rounds(tasks: dict[str, Callable[[], float]], repeats: int,
           step: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Run every task once per round for ``repeats`` rounds; each task returns its own measurement
    (so it can exclude setup such as installing hooks). Round ``r`` starts at task ``r mod len``."""
    names = list(tasks)
    results: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            if step is not None:
                step(f"{name}, round {r + 1}/{repeats}")
            results[name].append(tasks[name]())
    return results
