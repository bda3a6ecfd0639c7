"""Pictures of which visual tokens a method kept (``tokred show``), drawn with Pillow.

For each image of the prompt the figure shows the image as the model saw it (the processor's
resized and cropped pixels; for tiled models one panel per tile, labelled "thumbnail" and "tile 1 (row 0,
col 0)", ...; for a video a strip of its frames, labelled "frame 1", ...) with every visual token's cell:
tokens that enter the language model keep their pixels and get a yellow outline, dropped ones are
darkened. When the method has Gates, a strip below shows, for each gate layer, the tokens still
alive from that layer on. Tokens that are not grid cells (a vision [CLS] token kept as a visual
token, LLaVA-NeXT row separators) cannot be placed on the picture; the captions count them.

A Gate's decision depends only on the layers before it, so the tokens alive after gate ``i`` of a
Schedule are those of the same Schedule cut after gate ``i``; :func:`kept_tokens` runs one prefill
per gate but the last to read them, because a run report records the survivors of the last gate
only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont

from .adapters.base import ImageSpan, VisionProbes
from .method import Method
from .registry import Registry, default_registry
from .runtime import apply
from .schedule import Schedule
from .tokens import ImageLayout

__all__ = ["show", "kept_tokens", "kept_figure", "model_view", "tile_labels", "tile_grid", "ImageKept", "Panel",
           "KeptFigure", "DIM_COLOUR", "KEPT_OUTLINE"]

#: Dropped cells are blended 70% towards this colour.
DIM_COLOUR = (20, 20, 20)
_DIM_ALPHA = 0.7
#: Outline of kept cells in the main panels (where cells are at least 8 px wide).
KEPT_OUTLINE = (255, 210, 0)
_GAP = 10
_MARGIN = 12
_TITLE_HEIGHT = 30
_CAPTION_HEIGHT = 22
_LABEL_HEIGHT = 18
_STRIP_SCALE = 1 / 3


@dataclass
class ImageKept:
    """What the figure shows for one image.

    Attributes:
        tiles: the image as the model saw it, one picture per tile of ``layout`` (in tile order).
        layout: where each of the image's ``N`` visual tokens sits.
        entering: indices (into the ``N`` tokens) that entered the language model.
        gates: ``(layer, indices)`` for each gate: the tokens alive from that decoder layer on.
        note: an optional remark for the caption (e.g. that the tiles are approximations).
        tile_grid: ``(rows, cols)`` of the tiles other than the thumbnail, in row-major order, when
            known (:func:`tile_grid`); it puts the row and column into the tiles' labels.
    """

    tiles: list[Image.Image]
    layout: ImageLayout
    entering: list[int]
    gates: list[tuple[int, list[int]]] = field(default_factory=list)
    note: str = ""
    tile_grid: tuple[int, int] | None = None


@dataclass(frozen=True)
class Panel:
    """One drawn tile.

    Attributes:
        image: the image's number in the prompt.
        tile: the tile's number in the image's layout.
        stage: ``"entering"`` (the main panels) or ``"layer <l>"`` (a gate's strip panel).
        box: ``(left, top, right, bottom)`` pixels of the tile's picture in the figure.
        grid: ``(rows, cols)`` of the tile's token grid.
        kept: how many of the tile's grid cells are drawn as kept.
        label: what the panel shows: ``"thumbnail"``, ``"tile 1 (row 0, col 0)"``, ``"tile 2"``, ...;
            empty for an untiled image (:func:`tile_labels`).
    """

    image: int
    tile: int
    stage: str
    box: tuple[int, int, int, int]
    grid: tuple[int, int]
    kept: int
    label: str = ""


@dataclass
class KeptFigure:
    """The figure and where everything is in it (for tests and for callers that crop panels)."""

    image: Image.Image
    panels: list[Panel]


def tile_grid(tiles: int, size: tuple[int, int]) -> tuple[int, int] | None:
    """``(rows, cols)`` with ``rows * cols == tiles`` whose shape is closest to the image's
    ``size = (width, height)``, or ``None`` when two shapes are equally close (or ``tiles < 2``).

    An assumption, not read from the model: tiling processors (LLaVA-NeXT's best pinpoint,
    InternVL's closest aspect ratio) choose a grid that follows the image's aspect ratio, and of
    the grids with the same number of tiles the one closest to it is the one chosen. It is used for
    labels only.
    """
    if tiles < 2:
        return None
    aspect = math.log(size[0] / size[1])
    shapes = sorted((abs(math.log(cols / rows) - aspect), rows, cols)
                    for rows in range(1, tiles + 1) if tiles % rows == 0 for cols in (tiles // rows,))
    if len(shapes) > 1 and math.isclose(shapes[0][0], shapes[1][0]):
        return None
    return shapes[0][1], shapes[0][2]


def tile_labels(layout: ImageLayout, grid: tuple[int, int] | None = None) -> list[str]:
    """One label per tile of ``layout``: ``"frame 1"``, ``"frame 2"``, ... for a video's frames;
    ``"thumbnail"`` for the global view, ``"tile 1"``, ``"tile 2"``, ... for the others in order,
    with ``"(row r, col c)"`` when ``grid`` (their ``(rows, cols)``, row-major) is given and fits;
    all empty for an untiled image."""
    if layout.is_video:
        return [f"frame {frame + 1}" for frame in range(layout.num_tiles)]
    if layout.num_tiles < 2:
        return [""] * layout.num_tiles
    thumbnail = layout.thumbnail_tile
    others = [t for t in range(layout.num_tiles) if t != thumbnail]
    fits = grid is not None and grid[0] * grid[1] == len(others)
    labels = {thumbnail: "thumbnail"} if thumbnail is not None else {}
    for number, tile in enumerate(others):
        labels[tile] = f"tile {number + 1}" + (f" (row {number // grid[1]}, col {number % grid[1]})" if fits and grid else "")
    return [labels[t] for t in range(layout.num_tiles)]


def _short(label: str) -> str:
    """A label without its row and column, for the small strip panels."""
    return label.split(" (")[0]


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font only
        return ImageFont.load_default()


def _panel_size(tile: Image.Image) -> tuple[int, int]:
    """The tile's own pixel size, its longer side brought into 224..448 px."""
    longest = max(tile.size)
    scale = min(max(longest, 224), 448) / longest
    return round(tile.width * scale), round(tile.height * scale)


def _cell_box(row: int, col: int, grid: tuple[int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    rows, cols = grid
    width, height = size
    return (round(col * width / cols), round(row * height / rows),
            round((col + 1) * width / cols), round((row + 1) * height / rows))


def _draw_tile(tile: Image.Image, grid: tuple[int, int], kept: set[tuple[int, int]], size: tuple[int, int],
               outline: bool) -> Image.Image:
    """``tile`` resized to ``size`` with every grid cell not in ``kept`` darkened."""
    picture = tile.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    dropped = Image.new("L", size, 255)
    mask = ImageDraw.Draw(dropped)
    for row, col in kept:
        x0, y0, x1, y1 = _cell_box(row, col, grid, size)
        mask.rectangle([x0, y0, x1 - 1, y1 - 1], fill=0)
    dark = Image.blend(picture, Image.new("RGB", size, DIM_COLOUR), _DIM_ALPHA)
    result = Image.composite(dark, picture, dropped)
    cell_width = size[0] / grid[1]
    if outline and cell_width >= 8:
        draw = ImageDraw.Draw(result)
        for row, col in kept:
            x0, y0, x1, y1 = _cell_box(row, col, grid, size)
            draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=KEPT_OUTLINE, width=1)
    return result


def _cells_by_tile(layout: ImageLayout, indices: Sequence[int]) -> tuple[list[set[tuple[int, int]]], int]:
    """Per tile, the ``(row, col)`` cells of ``indices``; and how many of them are not grid cells."""
    cells: list[set[tuple[int, int]]] = [set() for _ in layout.grids]
    extra = 0
    for index in indices:
        if layout.extra is not None and bool(layout.extra[index]):
            extra += 1
            continue
        cells[int(layout.tile[index])].add((int(layout.row[index]), int(layout.col[index])))
    return cells, extra


def _count(kept: int, total: int, extra: int) -> str:
    return f"{kept} of {total}" + (f" (incl. {extra} non-grid)" if extra else "")


def _caption(number: int, item: ImageKept) -> str:
    _, extra = _cells_by_tile(item.layout, item.entering)
    what = f"video {number + 1} ({item.layout.num_frames} frames, left to right)" if item.layout.is_video else f"image {number + 1}"
    caption = f"{what}: {_count(len(item.entering), item.layout.num_tokens, extra)} visual tokens enter the language model"
    return caption + (f"; {item.note}" if item.note else "")


def _gate_caption(item: ImageKept, layer: int, alive: list[int]) -> str:
    _, extra = _cells_by_tile(item.layout, alive)
    return f"from layer {layer}: {_count(len(alive), item.layout.num_tokens, extra)}"


def _gate_column(measure: ImageDraw.ImageDraw, font: Any, item: ImageKept, layer: int, alive: list[int],
                 gate_w: int) -> int:
    """Width of one gate's strip column: its pictures or its caption, whichever is wider."""
    return max(gate_w, round(measure.textlength(_gate_caption(item, layer, alive), font=font)))


def kept_figure(images: Sequence[ImageKept], title: str) -> KeptFigure:
    """Compose the figure: a title, then per image a caption, its main panels and its gate strip.

    Returns:
        The RGB figure and its :class:`Panel` list (main panels of each image, then its strip).
    """
    title_font, font = _font(16), _font(13)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    captions = [_caption(number, item) for number, item in enumerate(images)]
    text_width = max([measure.textlength(title, font=title_font)]
                     + [measure.textlength(c, font=font) for c in captions])
    blocks: list[tuple[int, int]] = []            # (width, height) of each image's block
    for item in images:
        label_h = _LABEL_HEIGHT if item.layout.num_tiles > 1 else 0
        sizes = [_panel_size(t) for t in item.tiles]
        main_w = sum(w for w, _ in sizes) + _GAP * (len(sizes) - 1)
        main_h = max(h for _, h in sizes)
        strip_sizes = [(round(w * _STRIP_SCALE), round(h * _STRIP_SCALE)) for w, h in sizes]
        gate_w = sum(w for w, _ in strip_sizes) + _GAP * (len(strip_sizes) - 1)
        strip_w = sum(_gate_column(measure, font, item, layer, alive, gate_w) for layer, alive in item.gates)
        strip_w += 2 * _GAP * max(len(item.gates) - 1, 0)
        strip_h = (_CAPTION_HEIGHT + label_h + max(h for _, h in strip_sizes) + _GAP) if item.gates else 0
        blocks.append((max(main_w, strip_w), _CAPTION_HEIGHT + label_h + main_h + _GAP + strip_h))
    width = max([w for w, _ in blocks] + [round(text_width)]) + 2 * _MARGIN
    height = _TITLE_HEIGHT + sum(h for _, h in blocks) + _MARGIN
    figure = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(figure)
    draw.text((_MARGIN, 8), title, fill=(20, 20, 20), font=title_font)
    panels: list[Panel] = []
    y = _TITLE_HEIGHT
    for number, (item, caption, (_, block_h)) in enumerate(zip(images, captions, blocks)):
        cells, _ = _cells_by_tile(item.layout, item.entering)
        labels = tile_labels(item.layout, item.tile_grid)
        label_h = _LABEL_HEIGHT if item.layout.num_tiles > 1 else 0
        draw.text((_MARGIN, y + 4), caption, fill=(20, 20, 20), font=font)
        x, top = _MARGIN, y + _CAPTION_HEIGHT + label_h
        for tile_index, (tile, grid) in enumerate(zip(item.tiles, item.layout.grids)):
            size = _panel_size(tile)
            if labels[tile_index]:
                draw.text((x, top - label_h + 1), labels[tile_index], fill=(20, 20, 20), font=font)
            figure.paste(_draw_tile(tile, grid, cells[tile_index], size, outline=True), (x, top))
            panels.append(Panel(number, tile_index, "entering", (x, top, x + size[0], top + size[1]), grid,
                                len(cells[tile_index]), labels[tile_index]))
            x += size[0] + _GAP
        strip_top = top + max(_panel_size(t)[1] for t in item.tiles) + _GAP
        gate_w = sum(round(_panel_size(t)[0] * _STRIP_SCALE) for t in item.tiles) + _GAP * (len(item.tiles) - 1)
        x = _MARGIN
        for layer, alive in item.gates:
            column_end = x + _gate_column(measure, font, item, layer, alive, gate_w) + 2 * _GAP
            gate_cells, _ = _cells_by_tile(item.layout, alive)
            draw.text((x, strip_top + 4), _gate_caption(item, layer, alive), fill=(20, 20, 20), font=font)
            for tile_index, (tile, grid) in enumerate(zip(item.tiles, item.layout.grids)):
                w, h = _panel_size(tile)
                size = (round(w * _STRIP_SCALE), round(h * _STRIP_SCALE))
                picture_top = strip_top + _CAPTION_HEIGHT + label_h
                if labels[tile_index]:
                    draw.text((x, picture_top - label_h + 1), _short(labels[tile_index]), fill=(20, 20, 20), font=font)
                figure.paste(_draw_tile(tile, grid, gate_cells[tile_index], size, outline=False), (x, picture_top))
                panels.append(Panel(number, tile_index, f"layer {layer}", (x, picture_top, x + size[0], picture_top + size[1]),
                                    grid, len(gate_cells[tile_index]), labels[tile_index]))
                x += size[0] + _GAP
            x = column_end
        y += block_h
    return KeptFigure(figure, panels)


def model_view(pixel_values: torch.Tensor, processor: Any) -> Image.Image:
    """The picture a vision encoder received: ``pixel_values`` ``[3, H, W]`` un-normalised with the
    image processor's ``image_mean`` / ``image_std`` (or stretched to 0..255 when it has none)."""
    pixels = pixel_values.detach().float().cpu()
    image_processor = getattr(processor, "image_processor", processor)
    mean, std = getattr(image_processor, "image_mean", None), getattr(image_processor, "image_std", None)
    if mean is not None and std is not None:
        pixels = pixels * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    else:
        pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min()).clamp(min=1e-12)
    array = (pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous()   # [H, W, 3]
    return Image.fromarray(array.numpy())


def _frames_for(inputs: Mapping[str, Any], span: ImageSpan, processor: Any,
                given: Image.Image | Sequence[Image.Image]) -> tuple[list[Image.Image], str]:
    """One picture per frame of a video span: the processor's pixels when they are frames
    (``pixel_values_videos`` ``[videos, F, 3, H, W]``; InternVL's frames among ``pixel_values``), else
    the frames the caller gave, one per frame of the layout (every ``n``-th when the model merges
    ``n`` sampled frames into one, as Qwen-VL does)."""
    frames = span.layout.num_frames
    videos = inputs.get("pixel_values_videos")
    if videos is not None and videos.dim() == 5 and span.encoder_index < videos.shape[0] and videos.shape[1] == frames:
        return [model_view(frame, processor) for frame in videos[span.encoder_index]], ""
    if videos is None:  # frames written as images (InternVL): their encoder rows
        tiles, note = _tiles_for(inputs.get("pixel_values"), span, processor, None)
        if not note:
            return tiles, note
    pictures = [given] if isinstance(given, Image.Image) else list(given)
    if pictures and len(pictures) % frames == 0:
        step = len(pictures) // frames
        note = f"each panel is the first of the {step} sampled frames the model merges into one" if step > 1 else ""
        return pictures[::step], note
    return [pictures[0]] * frames, "every frame drawn on the first picture given (the model's frames are not known)"


def _tiles_for(pixel_values: torch.Tensor | None, span: ImageSpan, processor: Any,
               original: Image.Image | None) -> tuple[list[Image.Image], str]:
    """The tile pictures of one image and a caption note: the processor's pixels when their shape
    matches the layout (``[images, 3, H, W]`` untiled, ``[images, tiles, 3, H, W]`` tiled, or
    ``[encoder rows, 3, H, W]`` with the image's rows named by ``span.probe_rows``, as InternVL), else
    the original image for every tile."""
    layout, encoder_index = span.layout, span.encoder_index
    tiles = len(layout.grids)
    if pixel_values is not None and pixel_values.dim() == 4 and span.probe_rows is not None and tiles > 1:
        rows_, cols_ = layout.grids[0]
        sources = span.probe_rows[span.probe_rows >= 0]
        rows = torch.unique(sources // (rows_ * cols_)).tolist()
        if len(rows) == tiles and rows[-1] < pixel_values.shape[0]:
            return [model_view(pixel_values[r], processor) for r in rows], ""
    if pixel_values is not None and encoder_index < pixel_values.shape[0]:
        mine = pixel_values[encoder_index]
        if mine.dim() == 3 and tiles == 1:
            return [model_view(mine, processor)], ""
        if mine.dim() == 4 and mine.shape[0] == tiles:
            return [model_view(t, processor) for t in mine], ""
    if original is None:
        return [], "no picture"
    return [original] * tiles, "tiles drawn on the original image (the model's crops are not known)"


def kept_tokens(model: nn.Module, inputs: Mapping[str, Any], method: Method | Schedule, *,
                registry: Registry | None = None, adapter_options: Mapping[str, Any] | None = None,
                ) -> list[tuple[int, int, list[int], list[tuple[int, list[int]]]]]:
    """Which visual tokens of each image enter the language model and survive each gate.

    Runs one prefill of ``inputs`` under ``method``.

    Returns:
        Per image of the batch, in report order: ``(sample, image, entering indices,
        [(gate layer, alive indices)])``; indices point into the image's visual tokens.
    """
    registry = registry or default_registry()
    with torch.no_grad():
        with apply(model, method, registry=registry, adapter_options=adapter_options) as run:
            model(**inputs, logits_to_keep=1)
    return [(r.sample, r.image, list(r.kept_stage1), [(layer, list(kept)) for layer, kept in r.kept_after_gates])
            for r in run.report.images]


def show(model: nn.Module, processor: Any, inputs: Mapping[str, Any], method: Method | Schedule,
         images: Sequence[Image.Image | Sequence[Image.Image]], *, title: str, registry: Registry | None = None,
         adapter_options: Mapping[str, Any] | None = None) -> KeptFigure:
    """The figure of the tokens ``method`` keeps for the prompt ``inputs`` (batch size 1) made from
    the PIL ``images`` in prompt order: an image, or for a video the list of its frames, which is
    drawn as a strip of frames (one panel per frame of the model's layout).

    Raises:
        ValueError: ``inputs`` hold more than one prompt.
    """
    registry = registry or default_registry()
    if inputs["input_ids"].shape[0] != 1:
        raise ValueError("tokred show draws one prompt at a time")
    adapter = registry.adapter_for(model, adapter_options)
    spans = {(s.sample, s.image): s for s in adapter.image_spans(inputs["input_ids"], VisionProbes(), inputs)}
    items = []
    for sample, image, entering, gates in kept_tokens(model, inputs, method, registry=registry,
                                                      adapter_options=adapter_options):
        span = spans[(sample, image)]
        picture = images[image]
        if span.layout.is_video:
            tiles, note = _frames_for(inputs, span, processor, picture)
            items.append(ImageKept(tiles, span.layout, entering, gates, note))
            continue
        picture = picture if isinstance(picture, Image.Image) else picture[0]
        tiles, note = _tiles_for(inputs.get("pixel_values"), span, processor, picture)
        others = span.layout.num_tiles - (span.layout.thumbnail_tile is not None)
        items.append(ImageKept(tiles, span.layout, entering, gates, note, tile_grid(others, picture.size)))
    return kept_figure(items, title)
