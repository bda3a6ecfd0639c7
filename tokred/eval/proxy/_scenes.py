"""Procedural scenes and questions of the SYNTHETIC PROXY task.

Every item is a 224 x 224 RGB image with 3 to 5 solid *objects* (distinct shapes, colours from
:data:`COLOURS`) on a cluttered background: a two-colour gradient, patches of stripes, checks and
blotches, 14 to 30 small clutter marks (dots, lines, hollow boxes, arcs) half of them in the
objects' own colours, and pixel noise. A question asks about one object; the others and the clutter
are distractors, so that neither "keep colourful tokens" nor plain feature diversity finds the asked
object by itself.

With CLIP's 14 px patches an image is a 16 x 16 grid of 256 visual tokens, numbered row-major.
``target_tokens`` lists the tokens whose patch holds at least one pixel of the asked object: what an
object-patch oracle keeps.

This is a SYNTHETIC PROXY for ranking token-reduction methods on this task only; its figures are not
the papers' benchmarks. Everything is deterministic in the item's seed (numpy's PCG64 and PIL's
drawing).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "COLOURS", "SHAPES", "KINDS", "IMAGE_SIZE", "PATCH_SIZE", "GRID", "SceneObject", "ProxyItem",
    "make_item", "proxy_items", "item_seed", "question_text", "choices_for", "ask", "askable", "side_of",
]

IMAGE_SIZE = 224
PATCH_SIZE = 14
GRID = IMAGE_SIZE // PATCH_SIZE  # 16 patches per side, 256 visual tokens

#: Object colours (name -> RGB). Clutter uses them too, so colour alone does not find an object.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 140, 25),
    "yellow": (240, 220, 40),
    "green": (45, 170, 60),
    "cyan": (40, 205, 215),
    "blue": (45, 75, 225),
    "purple": (140, 55, 195),
    "pink": (250, 135, 195),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "diamond", "star")
#: Question types: ``colour`` (what colour is the <shape>?), ``presence`` (is there a <colour>
#: <shape>?), ``left_right`` and ``top_bottom`` (where is the <shape>?).
KINDS: tuple[str, ...] = ("colour", "presence", "left_right", "top_bottom")

_COLOUR_NAMES = tuple(COLOURS)
_MIN_OBJECTS, _MAX_OBJECTS = 3, 5
_MIN_SIZE, _MAX_SIZE = 26, 30  # object bounding-box side in pixels (about 2 x 2 patches)
_JITTER = 2  # pixels an object's centre may sit off its patch-grid corner
_HALF = IMAGE_SIZE // 2
_SIDE_MARGIN = 4  # an object asked left/right (top/bottom) lies this far inside its half
_NOISE_SIGMA = 14.0
_NOISE_BANK_SIZE = 320

# Disjoint seed ranges: training draws below 2**40, held-out splits above.
_SPLIT_OFFSETS = {"test": 1 << 40, "val": 1 << 41}


@dataclass(frozen=True)
class SceneObject:
    """One drawn object: ``box`` is ``(x0, y0, x1, y1)`` in pixels, inclusive."""

    shape: str
    colour: str
    box: tuple[int, int, int, int]


@dataclass(frozen=True)
class ProxyItem:
    """One question about one scene of the SYNTHETIC PROXY task.

    Attributes:
        image: 224 x 224 RGB image.
        question: e.g. ``"what colour is the star?"`` (lower case, one sentence).
        choices: the answers a model may give for this ``kind`` (one word each).
        answer: the right one, an element of ``choices``.
        kind: one of :data:`KINDS`.
        target_tokens: sorted visual-token indices (0..255, row-major on the 16 x 16 grid) whose
            patch holds at least one pixel of the asked object.
        seed: the seed the item was drawn from.
        objects: every object in the scene; ``objects[target]`` is the asked one.
        target: index of the asked object in ``objects``.
        coverage: ``[len(objects), 256]`` int array, pixels of each object inside each patch
            (training labels are derived from it).
    """

    image: Image.Image
    question: str
    choices: list[str]
    answer: str
    kind: str
    target_tokens: list[int]
    seed: int
    objects: tuple[SceneObject, ...]
    target: int
    coverage: np.ndarray


def choices_for(kind: str) -> list[str]:
    """The answer vocabulary of a question type (its prior is one over its length)."""
    if kind == "colour":
        return list(_COLOUR_NAMES)
    if kind == "presence":
        return ["yes", "no"]
    if kind == "left_right":
        return ["left", "right"]
    if kind == "top_bottom":
        return ["top", "bottom"]
    raise ValueError(f"unknown question kind {kind!r}; valid: {', '.join(KINDS)}")


def question_text(kind: str, shape: str, colour: str | None = None) -> str:
    """The question for ``kind`` about ``shape`` (``colour`` only for ``presence``)."""
    if kind == "colour":
        return f"what colour is the {shape}?"
    if kind == "presence":
        if colour is None:
            raise ValueError("a presence question needs a colour")
        return f"is there a {colour} {shape}?"
    # Every question ends with its shape word, so that word sits at the same place before the answer.
    if kind == "left_right":
        return f"left or right: where is the {shape}?"
    if kind == "top_bottom":
        return f"top or bottom: where is the {shape}?"
    raise ValueError(f"unknown question kind {kind!r}; valid: {', '.join(KINDS)}")


def item_seed(split: str, index: int) -> int:
    """The seed of held-out item ``index`` of ``split`` (``"test"`` or ``"val"``); training seeds
    are below ``2**40`` and never collide with these."""
    if split not in _SPLIT_OFFSETS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(_SPLIT_OFFSETS)}")
    if not 0 <= index < (1 << 40):
        raise ValueError(f"index {index} out of range")
    return _SPLIT_OFFSETS[split] + index


def proxy_items(split: str = "test", n: int = 256, *, start: int = 0) -> list[ProxyItem]:
    """Held-out items ``start .. start + n - 1`` of ``split``; question types cycle through
    :data:`KINDS`, so every ``n`` divisible by 4 is balanced."""
    return [make_item(item_seed(split, i), kind=KINDS[i % len(KINDS)]) for i in range(start, start + n)]


# ---------------------------------------------------------------------------------------- drawing


@functools.lru_cache(maxsize=1)
def _noise_bank() -> np.ndarray:
    """``[320, 320, 3]`` float32 Gaussian pixel noise (sigma 14), fixed; each image adds a window of
    it at an offset drawn from its own seed (drawing fresh noise per image took longer than the
    rest of the scene)."""
    bank = np.random.default_rng(20240901).standard_normal((_NOISE_BANK_SIZE, _NOISE_BANK_SIZE, 3), dtype=np.float32)
    bank *= np.float32(_NOISE_SIGMA)
    bank.setflags(write=False)
    return bank


def _muted(rng: np.random.Generator) -> np.ndarray:
    """A random low-saturation colour, ``[3]`` float."""
    base = rng.uniform(50, 200, size=3)
    grey = base.mean()
    return (grey + (base - grey) * rng.uniform(0.2, 0.6)).astype(np.float32)


def _background(rng: np.random.Generator) -> np.ndarray:
    """``[224, 224, 3]`` float: a gradient in a random direction plus patterned rectangles."""
    size = IMAGE_SIZE
    ramp = np.arange(size, dtype=np.float32) / (size - 1) - 0.5
    angle = rng.uniform(0, 2 * math.pi)
    t = np.float32(math.cos(angle)) * ramp[None, :] + np.float32(math.sin(angle)) * ramp[:, None] + 0.5
    t = np.clip(t, 0, 1)[..., None]
    c0, c1 = _muted(rng), _muted(rng)
    img = c0 + (c1 - c0) * t
    for _ in range(int(rng.integers(3, 7))):
        w, h = (int(v) for v in rng.integers(24, 110, size=2))
        x0, y0 = int(rng.integers(0, size - w + 1)), int(rng.integers(0, size - h + 1))
        a, b = _muted(rng), _muted(rng)
        ly, lx = np.arange(h)[:, None], np.arange(w)[None, :]
        pattern = int(rng.integers(0, 4))
        period = int(rng.integers(3, 10))
        if pattern == 0:  # stripes, horizontal or vertical
            m = ((ly if rng.random() < 0.5 else lx) // period) % 2
        elif pattern == 1:  # diagonal stripes
            m = ((lx + ly) // period) % 2
        elif pattern == 2:  # checks
            m = ((lx // period) + (ly // period)) % 2
        else:  # blotches: coarse random cells
            cells = rng.random(((h + period - 1) // period, (w + period - 1) // period)) < 0.5
            m = np.kron(cells, np.ones((period, period)))[:h, :w]
        alpha = np.float32(rng.uniform(0.5, 1.0))
        # patch = a where m else b, blended over the background with weight alpha
        patch = b + (a - b) * np.broadcast_to(m, (h, w)).astype(np.float32)[..., None]
        region = img[y0:y0 + h, x0:x0 + w]
        region += (patch - region) * alpha
    return img


def _clutter_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    if rng.random() < 0.5:
        return COLOURS[_COLOUR_NAMES[int(rng.integers(0, len(_COLOUR_NAMES)))]]
    return tuple(int(v) for v in rng.integers(0, 256, size=3))  # type: ignore[return-value]


def _draw_clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator) -> None:
    """Small marks no object looks like: dots, thin lines, hollow boxes and arcs (each under 12 px
    wide when filled, or at most 2 px thick)."""
    size = IMAGE_SIZE
    for _ in range(int(rng.integers(14, 31))):
        colour = _clutter_colour(rng)
        kind = int(rng.integers(0, 4))
        x, y = (int(v) for v in rng.integers(0, size, size=2))
        if kind == 0:  # dot
            r = int(rng.integers(1, 5))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour)
        elif kind == 1:  # line
            length, angle = rng.uniform(8, 50), rng.uniform(0, 2 * math.pi)
            x1, y1 = x + length * math.cos(angle), y + length * math.sin(angle)
            draw.line((x, y, x1, y1), fill=colour, width=int(rng.integers(1, 3)))
        elif kind == 2:  # hollow box
            w, h = (int(v) for v in rng.integers(6, 22, size=2))
            draw.rectangle((x, y, x + w, y + h), outline=colour, width=1)
        else:  # arc
            r = int(rng.integers(6, 20))
            start = float(rng.uniform(0, 360))
            draw.arc((x - r, y - r, x + r, y + r), start, start + float(rng.uniform(60, 270)), fill=colour,
                     width=int(rng.integers(1, 3)))


def _shape_mask(shape: str, side: int) -> Image.Image:
    """``side x side`` binary ("L") mask of ``shape`` filling its box."""
    mask = Image.new("L", (side, side), 0)
    d = ImageDraw.Draw(mask)
    s = side - 1
    if shape == "circle":
        d.ellipse((0, 0, s, s), fill=255)
    elif shape == "square":
        inset = round(side * 0.08)
        d.rectangle((inset, inset, s - inset, s - inset), fill=255)
    elif shape == "triangle":
        d.polygon([(s / 2, 0), (s, s), (0, s)], fill=255)
    elif shape == "cross":
        bar = side / 3
        d.rectangle((bar, 0, s - bar, s), fill=255)
        d.rectangle((0, bar, s, s - bar), fill=255)
    elif shape == "diamond":
        d.polygon([(s / 2, 0), (s, s / 2), (s / 2, s), (0, s / 2)], fill=255)
    elif shape == "star":
        c, outer, inner = s / 2, s / 2, s / 2 * 0.42
        points = []
        for i in range(10):
            r = outer if i % 2 == 0 else inner
            a = -math.pi / 2 + i * math.pi / 5
            points.append((c + r * math.cos(a), c + r * 1.05 * math.sin(a) + s * 0.04))
        d.polygon(points, fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return mask


def _patch_counts(mask: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
    """``[256]``: pixels of ``mask`` (``[side, side]`` bool, drawn at ``box``) inside each patch."""
    x0, y0, x1, y1 = box
    px0, py0, px1, py1 = x0 // PATCH_SIZE, y0 // PATCH_SIZE, x1 // PATCH_SIZE, y1 // PATCH_SIZE
    window = np.zeros(((py1 - py0 + 1) * PATCH_SIZE, (px1 - px0 + 1) * PATCH_SIZE), dtype=np.int64)
    oy, ox = y0 - py0 * PATCH_SIZE, x0 - px0 * PATCH_SIZE
    window[oy:oy + mask.shape[0], ox:ox + mask.shape[1]] = mask
    counts = np.zeros((GRID, GRID), dtype=np.int64)
    counts[py0:py1 + 1, px0:px1 + 1] = window.reshape(py1 - py0 + 1, PATCH_SIZE, px1 - px0 + 1, PATCH_SIZE).sum(axis=(1, 3))
    return counts.reshape(-1)


def _axis_ok(lo: int, hi: int, half: str | None) -> bool:
    """Whether ``lo .. hi`` lies inside the image and, when ``half`` is given, inside that half
    (4 px clear of the middle)."""
    if lo < 0 or hi > IMAGE_SIZE - 1:
        return False
    if half == "low":
        return hi <= _HALF - _SIDE_MARGIN - 1
    if half == "high":
        return lo >= _HALF + _SIDE_MARGIN
    return True


def _place(rng: np.random.Generator, side: int, taken: list[tuple[int, int, int, int]],
           x_half: str | None, y_half: str | None) -> tuple[int, int, int, int] | None:
    """A box of ``side`` centred on a patch-grid corner (plus up to 2 px of jitter), so that the
    object covers about 2 x 2 patches, one quadrant each; inside the image (and the given halves),
    at least 4 px from every taken box. ``None`` when 100 draws found no room."""
    for _ in range(100):
        gx, gy = (int(v) for v in rng.integers(1, GRID, size=2))
        jx, jy = (int(v) for v in rng.integers(-_JITTER, _JITTER + 1, size=2))
        x0, y0 = gx * PATCH_SIZE + jx - side // 2, gy * PATCH_SIZE + jy - side // 2
        box = (x0, y0, x0 + side - 1, y0 + side - 1)
        if not (_axis_ok(box[0], box[2], x_half) and _axis_ok(box[1], box[3], y_half)):
            continue
        if all(box[0] > t[2] + 4 or box[2] < t[0] - 4 or box[1] > t[3] + 4 or box[3] < t[1] - 4 for t in taken):
            return box
    return None


def make_item(seed: int, kind: str | None = None) -> ProxyItem:
    """Draw one item from ``seed`` (any non-negative int); ``kind`` fixes the question type,
    otherwise it is drawn too. Equal arguments give equal items, pixel for pixel."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown question kind {kind!r}; valid: {', '.join(KINDS)}")
    rng = np.random.default_rng(seed)
    if kind is None:
        kind = KINDS[int(rng.integers(0, len(KINDS)))]

    # The asked object is placed first, inside the half its answer names.
    n_objects = int(rng.integers(_MIN_OBJECTS, _MAX_OBJECTS + 1))
    shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n_objects]]
    colours = [_COLOUR_NAMES[int(i)] for i in rng.integers(0, len(_COLOUR_NAMES), size=n_objects)]
    sides = [int(v) for v in rng.integers(_MIN_SIZE, _MAX_SIZE + 1, size=n_objects)]
    x_half = y_half = None
    if kind == "left_right":
        x_half = "low" if rng.random() < 0.5 else "high"
    elif kind == "top_bottom":
        y_half = "low" if rng.random() < 0.5 else "high"
    boxes: list[tuple[int, int, int, int]] = []
    kept: list[int] = []
    for i, side in enumerate(sides):
        box = _place(rng, side, boxes, x_half if i == 0 else None, y_half if i == 0 else None)
        if box is None:  # no room left: the scene has fewer objects (never the asked one)
            continue
        boxes.append(box)
        kept.append(i)
    objects = tuple(SceneObject(shapes[i], colours[i], box) for i, box in zip(kept, boxes))

    canvas = Image.fromarray(np.clip(_background(rng), 0, 255).astype(np.uint8), "RGB")
    _draw_clutter(ImageDraw.Draw(canvas), rng)
    coverage = np.zeros((len(objects), GRID * GRID), dtype=np.int64)
    for j, obj in enumerate(objects):
        side = obj.box[2] - obj.box[0] + 1
        mask = _shape_mask(obj.shape, side)
        canvas.paste(Image.new("RGB", (side, side), COLOURS[obj.colour]), obj.box[:2], mask)
        coverage[j] = _patch_counts(np.asarray(mask) > 0, obj.box)
    ox, oy = (int(v) for v in rng.integers(0, _NOISE_BANK_SIZE - IMAGE_SIZE + 1, size=2))
    pixels = np.asarray(canvas, dtype=np.float32) + _noise_bank()[oy:oy + IMAGE_SIZE, ox:ox + IMAGE_SIZE]
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "RGB")

    base = ProxyItem(image, "", [], "", kind, [], seed, objects, 0, coverage)
    return ask(base, 0, kind, rng)


def side_of(obj: SceneObject, axis: str) -> str | None:
    """``"low"`` (left / top), ``"high"`` (right / bottom) or ``None`` (too close to the middle to
    be asked) for ``axis`` ``"x"`` or ``"y"``."""
    lo, hi = (obj.box[0], obj.box[2]) if axis == "x" else (obj.box[1], obj.box[3])
    if hi <= _HALF - _SIDE_MARGIN - 1:
        return "low"
    if lo >= _HALF + _SIDE_MARGIN:
        return "high"
    return None


def askable(item: ProxyItem, target: int, kind: str) -> bool:
    """Whether ``kind`` can be asked about ``item.objects[target]`` (positions need the object
    inside one half, 4 px clear of the middle)."""
    if kind == "left_right":
        return side_of(item.objects[target], "x") is not None
    if kind == "top_bottom":
        return side_of(item.objects[target], "y") is not None
    return kind in KINDS


def ask(item: ProxyItem, target: int, kind: str, rng: np.random.Generator) -> ProxyItem:
    """The same scene as ``item`` with a question of ``kind`` about ``item.objects[target]``
    (``rng`` draws the colour a presence question names). Raises ``ValueError`` when the question
    cannot be asked (:func:`askable`)."""
    if not askable(item, target, kind):
        raise ValueError(f"cannot ask {kind} about object {target} of item {item.seed}")
    objects = item.objects
    asked = objects[target]
    if kind == "colour":
        question, answer = question_text(kind, asked.shape), asked.colour
    elif kind == "presence":
        if rng.random() < 0.5:
            colour, answer = asked.colour, "yes"
        else:
            # Half of the negatives name a colour another object has (binding matters).
            others = sorted({o.colour for j, o in enumerate(objects) if j != target} - {asked.colour})
            if others and rng.random() < 0.5:
                colour = others[int(rng.integers(0, len(others)))]
            else:
                pool = [c for c in _COLOUR_NAMES if c != asked.colour]
                colour = pool[int(rng.integers(0, len(pool)))]
            answer = "no"
        question = question_text(kind, asked.shape, colour)
    elif kind == "left_right":
        question, answer = question_text(kind, asked.shape), "left" if side_of(asked, "x") == "low" else "right"
    else:
        question, answer = question_text(kind, asked.shape), "top" if side_of(asked, "y") == "low" else "bottom"
    target_tokens = [int(t) for t in np.flatnonzero(item.coverage[target] > 0)]
    return dataclasses.replace(item, question=question, choices=choices_for(kind), answer=answer, kind=kind,
                               target_tokens=target_tokens, target=target)
