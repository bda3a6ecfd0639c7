"""A PNG of a benchmark: prefill speed-up against the budget, one line per method (Pillow only).

Each point is the median of the per-round speed-ups over the unreduced model, with a whisker over
the interquartile range; a dashed line in the same colour is the ideal (same model fed only the kept
tokens), drawn for stage-I-only methods. A grey line marks 1x, the unreduced model.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

__all__ = ["plot_speedups"]

_SIZE = (960, 560)
_MARGIN = {"left": 80, "right": 230, "top": 64, "bottom": 72}
_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (140, 86, 75),
            (227, 119, 194), (23, 190, 207)]
_GREY = (150, 150, 150)
_TEXT = (30, 30, 30)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed-size bitmap font
        return ImageFont.load_default()


def _nice_step(span: float, ticks: int = 6) -> float:
    """A 1, 2 or 5 times a power of ten step giving about ``ticks`` ticks over ``span``."""
    raw = span / ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _dashed(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], colour: tuple[int, int, int]) -> None:
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        length = math.hypot(x1 - x0, y1 - y0)
        for start in range(0, int(length), 12):
            a, b = start / length, min(start + 7, length) / length
            draw.line([(x0 + (x1 - x0) * a, y0 + (y1 - y0) * a), (x0 + (x1 - x0) * b, y0 + (y1 - y0) * b)],
                      fill=colour, width=2)


def plot_speedups(result: dict[str, Any], path: str | Path, title: str | None = None) -> Image.Image:
    """Draw ``result`` (a :class:`~tokred.bench.Bench` result) to the PNG file ``path``; return the image.

    Rows that failed, and the unreduced row, are not drawn. Rows of one method are joined in the
    order of their budget value (``keep`` or ``keep_ratio``).
    """
    series: dict[str, list[dict[str, Any]]] = {}
    for row in result["rows"]:
        if row["error"] is None and row["method"] != "unreduced" and row["budget_value"] is not None:
            series.setdefault(row["method"], []).append(row)
    for rows in series.values():
        rows.sort(key=lambda r: r["budget_value"])
    xs = sorted({r["budget_value"] for rows in series.values() for r in rows}) or [0.0, 1.0]
    ys = [1.0] + [r[key]["q3"] for rows in series.values() for r in rows
                  for key in ("prefill_speedup", "ideal_prefill_speedup") if r.get(key)]
    x_lo, x_hi = (xs[0], xs[-1]) if xs[0] != xs[-1] else (xs[0] - 1, xs[0] + 1)
    y_step = _nice_step(max(ys) * 1.1)
    y_hi = y_step * math.ceil(max(ys) * 1.1 / y_step)

    image = Image.new("RGB", _SIZE, "white")
    draw = ImageDraw.Draw(image)
    small, normal, big = _font(12), _font(14), _font(17)
    left, top = _MARGIN["left"], _MARGIN["top"]
    right, bottom = _SIZE[0] - _MARGIN["right"], _SIZE[1] - _MARGIN["bottom"]

    def px(x: float, y: float) -> tuple[float, float]:
        pad = 0.05 * (x_hi - x_lo)
        fx = (x - x_lo + pad) / (x_hi - x_lo + 2 * pad)
        return left + fx * (right - left), bottom - y / y_hi * (bottom - top)

    model = result["model"]
    mach = result["machine"]
    where = mach["gpu"] or f"{mach['cpu']}, torch threads: {mach['torch_threads']}"
    draw.text((left, 14), title or "Prefill speed-up over the unreduced model", fill=_TEXT, font=big)
    draw.text((left, 38), f"{model['name']}, {model['dtype']}, {model['attn_implementation']} on {where}; "
                          "median and interquartile range", fill=_TEXT, font=small)
    # Axes, grid and ticks.
    tick = 0.0
    while tick <= y_hi + 1e-9:
        _, y = px(0, tick)
        draw.line([(left, y), (right, y)], fill=(235, 235, 235))
        draw.text((left - 8, y), f"{tick:g}x", fill=_TEXT, font=small, anchor="rm")
        tick += y_step
    for x in xs:
        gx, _ = px(x, 0)
        draw.line([(gx, bottom), (gx, bottom + 5)], fill=_TEXT)
        draw.text((gx, bottom + 8), f"{x:g}", fill=_TEXT, font=small, anchor="mt")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=_TEXT, width=1)
    budget_kind = next((r["budget"].split("=")[0] for rows in series.values() for r in rows), "budget")
    draw.text(((left + right) / 2, bottom + 32), f"{budget_kind} (visual tokens per image)" if budget_kind == "keep"
              else budget_kind, fill=_TEXT, font=normal, anchor="mt")
    _, one = px(0, 1.0)
    _dashed(draw, [(left, one), (right, one)], _GREY)

    legend_y = top
    for i, (method, rows) in enumerate(sorted(series.items())):
        colour = _COLOURS[i % len(_COLOURS)]
        points = [px(r["budget_value"], r["prefill_speedup"]["median"]) for r in rows]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for r, (x, y) in zip(rows, points):
            s = r["prefill_speedup"]
            draw.line([px(r["budget_value"], s["q1"]), px(r["budget_value"], s["q3"])], fill=colour, width=2)
            draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        ideal = [px(r["budget_value"], r["ideal_prefill_speedup"]["median"]) for r in rows if r.get("ideal_prefill_speedup")]
        draw.line([(right + 16, legend_y + 8), (right + 44, legend_y + 8)], fill=colour, width=2)
        draw.text((right + 52, legend_y + 8), method, fill=_TEXT, font=normal, anchor="lm")
        legend_y += 22
        if ideal:
            _dashed(draw, ideal if len(ideal) > 1 else [(ideal[0][0] - 10, ideal[0][1]), (ideal[0][0] + 10, ideal[0][1])], colour)
            _dashed(draw, [(right + 16, legend_y + 8), (right + 44, legend_y + 8)], colour)
            draw.text((right + 52, legend_y + 8), f"{method} (ideal)", fill=_TEXT, font=normal, anchor="lm")
            legend_y += 22
    _dashed(draw, [(right + 16, legend_y + 8), (right + 44, legend_y + 8)], _GREY)
    draw.text((right + 52, legend_y + 8), "unreduced (1x)", fill=_TEXT, font=normal, anchor="lm")
    image.save(path, format="PNG")
    return image
