"""A PNG of an evaluation: accuracy against the visual-token work kept, one line per method.

x is the share of the visual-token work left (layer-averaged visual tokens over the tokens the
model produced, so a gate at a late layer counts as more work than a selector at the same budget);
y is accuracy. Each method's budgets are joined from the smallest share to the largest; the
unreduced model is the point at 100% and a dashed horizontal line. Pillow only, like
:func:`tokred.bench.plot_speedups`.
"""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

from ..bench._plot import _COLOURS, _GREY, _MARGIN, _SIZE, _TEXT, _dashed, _font
from ._evaluate import EvalResult

__all__ = ["plot_accuracy"]

#: Marker shapes, one per round of the colour cycle: with more methods than colours (twelve are
#: registered, eight colours), two methods share a colour but never a colour and a marker.
_MARKERS = ("circle", "square", "triangle", "diamond")


def series_style(index: int) -> tuple[tuple[int, int, int], str]:
    """The colour and marker shape of the ``index``-th method (sorted by name): unique for the
    first ``len(_COLOURS) * len(_MARKERS)`` (32) methods."""
    return _COLOURS[index % len(_COLOURS)], _MARKERS[(index // len(_COLOURS)) % len(_MARKERS)]


def _marker(draw: ImageDraw.ImageDraw, x: float, y: float, shape: str, colour: tuple[int, int, int], r: float = 4.5) -> None:
    if shape == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    elif shape == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=colour)
    elif shape == "triangle":
        draw.polygon([(x, y - r - 1), (x + r + 1, y + r), (x - r - 1, y + r)], fill=colour)
    else:
        draw.polygon([(x, y - r - 1), (x + r + 1, y), (x, y + r + 1), (x - r - 1, y)], fill=colour)


def plot_accuracy(result: EvalResult, path: str | Path, title: str | None = None) -> Image.Image:
    """Draw ``result`` to the PNG file ``path``; return the image. Settings that failed are left out."""
    series: dict[str, list[tuple[float, float]]] = {}
    for r in result.results[1:]:
        if r.error is None and not math.isnan(r.kept_share):
            series.setdefault(r.setting.method_name, []).append((r.kept_share, r.accuracy))
    for points in series.values():
        points.sort()
    base = result.reference.accuracy
    ys = [base] + [y for points in series.values() for _, y in points]
    y_lo = max(0.0, math.floor(min(ys) * 10) / 10 - 0.1)

    image = Image.new("RGB", _SIZE, "white")
    draw = ImageDraw.Draw(image)
    small, normal, big = _font(12), _font(14), _font(17)
    left, top = _MARGIN["left"], _MARGIN["top"]
    right, bottom = _SIZE[0] - _MARGIN["right"], _SIZE[1] - _MARGIN["bottom"]

    def px(x: float, y: float) -> tuple[float, float]:
        return left + x * (right - left), bottom - (y - y_lo) / (1.0 - y_lo) * (bottom - top)

    draw.text((left, 14), title or f"Accuracy on {result.task} against visual-token work kept", fill=_TEXT, font=big)
    draw.text((left, 38), f"{result.model}; {result.reference.n} items; {result.task_description}"[:140],
              fill=_TEXT, font=small)
    tick = y_lo
    while tick <= 1.0 + 1e-9:
        _, y = px(0, tick)
        draw.line([(left, y), (right, y)], fill=(235, 235, 235))
        draw.text((left - 8, y), f"{100 * tick:.0f}%", fill=_TEXT, font=small, anchor="rm")
        tick += 0.1
    for share in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0):
        gx, _ = px(share, y_lo)
        draw.line([(gx, bottom), (gx, bottom + 5)], fill=_TEXT)
        draw.text((gx, bottom + 8), f"{100 * share:g}%", fill=_TEXT, font=small, anchor="mt")
    draw.line([(left, top), (left, bottom), (right, bottom)], fill=_TEXT, width=1)
    draw.text(((left + right) / 2, bottom + 32), "visual-token work kept (layer-averaged tokens / tokens produced)",
              fill=_TEXT, font=normal, anchor="mt")
    _, level = px(0, base)
    _dashed(draw, [(left, level), (right, level)], _GREY)
    bx, by = px(1.0, base)
    draw.ellipse([bx - 4, by - 4, bx + 4, by + 4], fill=_GREY)

    legend_y = top
    for i, (method, points) in enumerate(sorted(series.items())):
        colour, shape = series_style(i)
        drawn = [px(x, y) for x, y in points]
        if len(drawn) > 1:
            draw.line(drawn, fill=colour, width=2)
        for x, y in drawn:
            _marker(draw, x, y, shape, colour)
        draw.line([(right + 16, legend_y + 8), (right + 44, legend_y + 8)], fill=colour, width=2)
        _marker(draw, right + 30, legend_y + 8, shape, colour)
        draw.text((right + 52, legend_y + 8), method, fill=_TEXT, font=normal, anchor="lm")
        legend_y += 22
    _dashed(draw, [(right + 16, legend_y + 8), (right + 44, legend_y + 8)], _GREY)
    draw.text((right + 52, legend_y + 8), f"unreduced ({100 * base:.1f}%)", fill=_TEXT, font=normal, anchor="lm")
    image.save(path, format="PNG")
    return image
