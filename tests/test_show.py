"""Tests of ``tokred show`` and :mod:`tokred.show`: the figure's size, and that exactly the kept
visual tokens are drawn highlighted, in the right cells, per tile and per gate layer."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import tokred
from tokred.cli import main
from tokred.methods import LastTokenAttentionGate
from tokred.show import ImageKept, KeptFigure, Panel, kept_figure, kept_tokens, show
from tokred.testing import make_image, tiny_model

PROMPT = "What is shown in this image?"
SIDE = 24  # the tiny LLaVA's grid: 336 px / 14 px patches


def _installed_registry() -> tokred.Registry:
    return tokred.Registry(entry_points=list(importlib.metadata.entry_points(group="tokred")))


def _bright_cells(image: Image.Image, box: tuple[int, int, int, int], grid: tuple[int, int]) -> set[tuple[int, int]]:
    """Cells of a panel whose centre pixel is (nearly) white: kept cells of a white picture keep their
    pixels, dropped ones are darkened."""
    left, top, right, bottom = box
    rows, cols = grid
    bright = set()
    for row in range(rows):
        for col in range(cols):
            x = left + int((col + 0.5) * (right - left) / cols)
            y = top + int((row + 0.5) * (bottom - top) / rows)
            if min(image.getpixel((x, y))) > 200:
                bright.add((row, col))
    return bright


def _darkened(image: Image.Image, box: tuple[int, int, int, int], grid: tuple[int, int]) -> int:
    """Cells whose centre pixel is dark: the complement check, so a blank panel cannot pass."""
    left, top, right, bottom = box
    rows, cols = grid
    return sum(max(image.getpixel((left + int((c + 0.5) * (right - left) / cols), top + int((r + 0.5) * (bottom - top) / rows)))) < 120
               for r in range(rows) for c in range(cols))


def _cells(indices: list[int]) -> set[tuple[int, int]]:
    return {(i // SIDE, i % SIDE) for i in indices}


@pytest.fixture(scope="module")
def white_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("show") / "white.png"
    Image.new("RGB", (400, 300), "white").save(path)
    return path


def test_show_highlights_exactly_the_tokens_the_selector_kept(
    white_png: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "kept.png"
    args = ["show", "--preset", "tiny", "--method", "random", "--keep", "16", "--option", "seed=5",
            "--image", str(white_png), "--prompt", PROMPT, "-o", str(out), "--json"]
    assert main(args, registry=_installed_registry()) == 0
    data = json.loads(capsys.readouterr().out)
    [panel] = data["panels"]
    assert panel["stage"] == "entering" and panel["grid"] == [SIDE, SIDE] and panel["kept"] == 16

    model, processor = tiny_model("llava")
    inputs = processor(images=[Image.open(white_png).convert("RGB")],
                       text=processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}],
                                                          add_generation_prompt=True), return_tensors="pt")
    with torch.no_grad(), tokred.apply(model, tokred.create("random", keep=16, seed=5)) as run:
        model(**inputs)
    with Image.open(out) as image:
        image = image.convert("RGB")
        assert list(image.size) == data["size"]
        left, top, right, bottom = panel["box"]
        assert (right - left, bottom - top) == (336, 336)  # the model's input resolution
        assert image.width >= 336 + 2 * left
        assert _bright_cells(image, tuple(panel["box"]), (SIDE, SIDE)) == _cells(run.report.images[0].kept_stage1)
        assert _darkened(image, tuple(panel["box"]), (SIDE, SIDE)) == SIDE * SIDE - 16


def test_show_draws_a_strip_per_gate_layer_with_the_survivors_of_each_gate(white_png: Path) -> None:
    model, processor = tiny_model("llava")
    image = Image.open(white_png).convert("RGB")
    inputs = processor(images=[image], text=processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}], add_generation_prompt=True),
        return_tensors="pt")
    schedule = tokred.Schedule(gates=(
        tokred.GateStage(layer=2, gate=LastTokenAttentionGate(), budget=tokred.Budget(keep=64)),
        tokred.GateStage(layer=5, gate=LastTokenAttentionGate(), budget=tokred.Budget(keep=16)),
    ))
    [(_, _, entering, gates)] = kept_tokens(model, inputs, schedule)
    assert entering == list(range(576))
    (first_layer, first), (second_layer, second) = gates
    assert (first_layer, len(first), second_layer, len(second)) == (2, 64, 5, 16)
    assert set(second) <= set(first)
    with torch.no_grad(), tokred.apply(model, tokred.Schedule(gates=schedule.gates[:1])) as cut:
        model(**inputs)
    assert first == cut.report.images[0].kept_final

    figure = show(model, processor, inputs, schedule, [image], title="two gates")
    stages = [p.stage for p in figure.panels]
    assert stages == ["entering", "layer 2", "layer 5"]
    for panel, expected in zip(figure.panels, (entering, first, second)):
        assert panel.kept == len(expected)
        assert _bright_cells(figure.image, panel.box, panel.grid) == _cells(expected)
    main_panel, strip = figure.panels[0], figure.panels[1]
    assert strip.box[1] > main_panel.box[3]  # the strip lies below the image
    assert strip.box[2] - strip.box[0] == 112  # a third of the main panel


def test_tiled_layouts_get_one_panel_per_tile_and_non_grid_tokens_are_counted() -> None:
    # Two tiles (a 2x2 thumbnail, a 3x3 crop) and a leading non-grid token: N = 1 + 4 + 9 = 14.
    layout = tokred.ImageLayout(
        tile=torch.tensor([0] + [0] * 4 + [1] * 9),
        row=torch.tensor([-1] + [0, 0, 1, 1] + [0, 0, 0, 1, 1, 1, 2, 2, 2]),
        col=torch.tensor([-1] + [0, 1, 0, 1] + [0, 1, 2] * 3),
        grids=((2, 2), (3, 3)),
        thumbnail_tile=0,
        extra=torch.tensor([True] + [False] * 13),
    )
    tiles = [Image.new("RGB", (200, 200), "white"), Image.new("RGB", (300, 300), "white")]
    figure = kept_figure([ImageKept(tiles, layout, entering=[0, 1, 6, 13], gates=[(3, [13])])], title="tiles")
    assert isinstance(figure, KeptFigure)
    main_panels = [p for p in figure.panels if p.stage == "entering"]
    assert [(p.tile, p.grid, p.kept) for p in main_panels] == [(0, (2, 2), 1), (1, (3, 3), 2)]
    assert [(p.box[2] - p.box[0], p.box[3] - p.box[1]) for p in main_panels] == [(224, 224), (300, 300)]
    assert _bright_cells(figure.image, main_panels[0].box, (2, 2)) == {(0, 0)}
    assert _bright_cells(figure.image, main_panels[1].box, (3, 3)) == {(0, 1), (2, 2)}
    strip = [p for p in figure.panels if p.stage == "layer 3"]
    assert [(p.tile, p.kept) for p in strip] == [(0, 0), (1, 1)]
    assert all(isinstance(p, Panel) for p in figure.panels)


def test_show_needs_a_model_or_a_preset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", "--method", "random", "-o", str(tmp_path / "x.png")]) == 2
    assert "one of the arguments --model --preset is required" in capsys.readouterr().err


def test_show_rejects_a_bad_budget_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["show", "--preset", "tiny", "--method", "random", "--keep", "0", "-o", str(tmp_path / "x.png")]
    assert main(args, registry=_installed_registry()) == 2
    err = capsys.readouterr().err
    assert "keep must be >= 1" in err and "loading" not in err
    assert not (tmp_path / "x.png").exists()


def test_internvl_tiles_are_drawn_from_their_own_encoder_rows() -> None:
    """InternVL's pixel_values hold every tile of every image in one batch; each image's panels
    must be its own tiles, not the first image's, and not the original picture."""
    from tokred.adapters.base import VisionProbes
    from tokred.show import _tiles_for, model_view

    model, processor = tiny_model("internvl")
    images = [make_image(480, 640), make_image(336, 336, seed=1)]
    content = [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "What?"}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(images=images, text=[prompt], return_tensors="pt")
    spans = tokred.default_registry().adapter_for(model).image_spans(inputs["input_ids"], VisionProbes(), inputs)
    tiles, note = _tiles_for(inputs["pixel_values"], spans[1], processor, images[1])
    assert note == "" and len(tiles) == 5
    expected = [model_view(inputs["pixel_values"][row], processor) for row in range(7, 12)]
    assert [t.tobytes() for t in tiles] == [e.tobytes() for e in expected]
