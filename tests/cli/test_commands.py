"""``run --preset`` (offline, no image needed) and ``show``'s panel labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

import tokred
from tokred import compat
from tokred.cli import main
from tokred.show import tile_grid, tile_labels
from tokred.testing import make_image, tiny_model

# ------------------------------------------------------------------------------------ run --preset


def test_run_on_a_preset_needs_no_model_and_no_image(capsys: pytest.CaptureFixture[str],
                                                     registry: tokred.Registry) -> None:
    argv = ["run", "--preset", "tiny", "--method", "random", "--keep", "16", "--max-new-tokens", "2"]
    assert main(argv, registry=registry) == 0
    captured = capsys.readouterr()
    assert "tokred run: random on llava" in captured.out and "576 visual tokens in; per layer 16 x8" in captured.out
    assert "synthetic 336 x 336 test image" in captured.err and "building preset tiny" in captured.err

    assert main([*argv, "--json"], registry=registry) == 0
    data = json.loads(capsys.readouterr().out)
    assert (data["model"], data["preset"], data["images"]) == ("tiny", True, ["synthetic test image"])
    assert data["report"]["visual_tokens_per_layer"] == [[16]] * 8


def test_run_on_a_tiled_preset_with_two_images_after_one_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              registry: tokred.Registry) -> None:
    wide, square = tmp_path / "wide.png", tmp_path / "square.png"
    make_image(640, 480).save(wide)
    make_image().save(square)
    argv = ["run", "--preset", "tiny-llava_next", "--method", "random", "--keep", "32", "--image", str(wide),
            str(square), "--max-new-tokens", "1", "--json"]
    assert main(argv, registry=registry) == 0
    report = json.loads(capsys.readouterr().out)["report"]
    assert [len(image["kept_final"]) for image in report["images"]] == [32, 32]


_RANDOM_WEIGHTS = ("tokred: warning: preset '{}' has random weights, so its answer is meaningless (it is for trying "
                   "the commands and timing them); for real answers give --model with a trained checkpoint, such as "
                   "--model llava-hf/llava-1.5-7b-hf, or --preset proxy (trained weights)")


@pytest.mark.parametrize("preset", ["tiny", "tiny-llava_next"])
def test_run_on_a_random_weight_preset_warns_once_that_its_answer_is_noise(
    preset: str, capsys: pytest.CaptureFixture[str], registry: tokred.Registry,
) -> None:
    argv = ["run", "--preset", preset, "--method", "random", "--keep", "8", "--max-new-tokens", "1"]
    for extra in ([], ["--json"]):
        assert main([*argv, *extra], registry=registry) == 0
        captured = capsys.readouterr()
        warnings = [line for line in captured.err.splitlines() if "warning" in line]
        assert warnings == [_RANDOM_WEIGHTS.format(preset)]
        assert "random weights" not in captured.out  # stdout stays the answer (and the JSON parses)
    json.loads(captured.out)


def test_the_warning_follows_the_presets_own_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whether a preset warns is Preset.trained (shipped weights), not its name."""
    import dataclasses
    import io

    from tokred.bench import PRESETS
    from tokred.cli._output import Output
    from tokred.cli._run import _warn_if_random

    def warnings(name: str) -> str:
        output = Output(io.StringIO(), io.StringIO())
        _warn_if_random(name, output)
        return output.stderr.getvalue()  # type: ignore[attr-defined]

    assert PRESETS["proxy"].trained and warnings("proxy") == ""
    assert "'llava-135m' has random weights" in warnings("llava-135m")
    monkeypatch.setitem(PRESETS, "tiny", dataclasses.replace(PRESETS["tiny"], loader="tokred.eval.proxy:load_proxy"))
    assert warnings("tiny") == ""
    assert "--preset tiny or proxy (trained weights)" in warnings("llava-135m")


def test_run_needs_a_model_or_a_preset(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--method", "random"]) == 2
    assert "one of the arguments --model --preset is required" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ show labels


def test_untiled_images_have_no_tile_wording(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             registry: tokred.Registry) -> None:
    argv = ["show", "--preset", "tiny", "--method", "fastv", "--keep", "16", "-o", str(tmp_path / "k.png")]
    assert main(argv, registry=registry) == 0
    out = capsys.readouterr().out
    assert "tile" not in out and "thumbnail" not in out
    assert out.splitlines()[0].split() == ["image", "stage", "kept", "of", "grid", "cells"]
    assert main([*argv, "--json"], registry=registry) == 0
    assert [p["label"] for p in json.loads(capsys.readouterr().out)["panels"]] == ["", ""]


@pytest.mark.parametrize(("preset", "size", "expected"), [
    # LLaVA-NeXT: the thumbnail first, then the tiles row-major.
    ("tiny-llava_next", (640, 480), ["thumbnail", "tile 1 (row 0, col 0)", "tile 2 (row 0, col 1)",
                                     "tile 3 (row 1, col 0)", "tile 4 (row 1, col 1)"]),
    # InternVL: the tiles, then the thumbnail; a 2:1 image is one row of two tiles.
    ("tiny-internvl", (672, 336), ["tile 1 (row 0, col 0)", "tile 2 (row 0, col 1)", "thumbnail"]),
])
def test_tiled_panels_are_labelled(preset: str, size: tuple[int, int], expected: list[str], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str], registry: tokred.Registry) -> None:
    image, out = tmp_path / "image.png", tmp_path / "kept.png"
    make_image(*size).save(image)
    argv = ["show", "--preset", preset, "--method", "random", "--keep-ratio", "0.1", "--image", str(image),
            "-o", str(out)]
    assert main([*argv, "--json"], registry=registry) == 0
    panels = json.loads(capsys.readouterr().out)["panels"]
    assert [p["label"] for p in panels if p["stage"] == "entering"] == expected
    with Image.open(out) as figure:
        figure = figure.convert("L")
        for panel in panels:  # each label is drawn in the band above its panel
            left, top, right, _ = panel["box"]
            band = figure.crop((left, top - 16, min(right, left + 60), top))
            assert band.getextrema()[0] < 100, panel["label"]
    assert main(argv, registry=registry) == 0
    table = capsys.readouterr().out
    assert "thumbnail" in table and "tile 1 (row 0, col 0)" in table


def test_tile_labels_without_a_grid_or_a_thumbnail() -> None:
    layout = tokred.ImageLayout(tile=torch.tensor([0, 1, 2]), row=torch.zeros(3, dtype=torch.long),
                                col=torch.zeros(3, dtype=torch.long), grids=((1, 1),) * 3, thumbnail_tile=None)
    assert tile_labels(layout) == ["tile 1", "tile 2", "tile 3"]
    assert tile_labels(layout, (1, 3)) == ["tile 1 (row 0, col 0)", "tile 2 (row 0, col 1)", "tile 3 (row 0, col 2)"]
    assert tile_labels(layout, (2, 2)) == ["tile 1", "tile 2", "tile 3"]  # a grid that does not fit is not used
    assert tile_labels(tokred.ImageLayout.grid(2, 2)) == [""]


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (1000, 300), (300, 1000), (700, 650), (336, 672)])
def test_tile_grid_agrees_with_llava_next_own_choice(size: tuple[int, int]) -> None:
    """The label's rows and columns follow the image's shape; for LLaVA-NeXT that is the model's own grid."""
    grid_shape = compat.modeling_function("llava_next.modeling_llava_next", "get_anyres_image_grid_shape")
    model, _ = tiny_model("llava_next")
    config = model.config
    rows, cols = grid_shape((size[1], size[0]), config.image_grid_pinpoints, config.vision_config.image_size)
    assert tile_grid(rows * cols, size) in ((rows, cols), None)
    if rows != cols or rows * cols != 2:
        assert tile_grid(rows * cols, size) == (rows, cols)


def test_tile_grid_refuses_to_guess_a_tie() -> None:
    assert tile_grid(2, (500, 500)) is None
    assert tile_grid(1, (500, 300)) is None
    assert tile_grid(6, (300, 200)) == (2, 3)


# ------------------------------------------------------------------------------------ eval


@pytest.fixture
def task_file(tmp_path: Path) -> Path:
    """A three-item task: an open question, a yes/no choice, a two-image choice."""
    make_image().save(tmp_path / "a.png")
    make_image(seed=1).save(tmp_path / "b.png")
    items = [
        {"id": "q1", "image": "a.png", "question": "What is shown? Answer with one word.", "answer": "shapes"},
        {"id": "q2", "image": "b.png", "question": "Is it red?", "choices": ["yes", "no"], "answer": "yes"},
        {"id": "q3", "image": ["a.png", "b.png"], "question": "Which is darker?", "choices": ["first", "second"],
         "answer": "first"},
    ]
    path = tmp_path / "task.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def test_eval_reports_every_method_at_every_budget_and_resumes(task_file: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str],
                                                               registry: tokred.Registry) -> None:
    predictions = tmp_path / "predictions.jsonl"
    argv = ["eval", "--preset", "tiny", "--task", str(task_file), "--methods", "random,fastv", "--keep", "16,64",
            "--timing-rounds", "0", "--output", str(predictions), "--json"]
    assert main(argv, registry=registry) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == "tokred.eval/1" and data["items"] == 3
    assert [r["label"] for r in data["results"]] == ["unreduced", "random (keep=16)", "random (keep=64)",
                                                     "fastv (keep=16)", "fastv (keep=64)"]
    assert all(r["n"] == 3 and r["error"] is None for r in data["results"])
    lines = predictions.read_text().splitlines()
    assert len(lines) == 5 * 3

    assert main(argv[:-1], registry=registry) == 0  # the same file again: nothing is recomputed
    captured = capsys.readouterr()
    assert len(predictions.read_text().splitlines()) == 5 * 3
    header = next(line for line in captured.out.splitlines() if line.startswith("setting"))
    assert header.split()[:3] == ["setting", "accuracy", "retention"]
    assert "[15/15]" in captured.err


def test_eval_refuses_a_bad_task_before_the_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        registry: tokred.Registry) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "What?", "answr": "x"}\n')
    assert main(["eval", "--preset", "tiny", "--task", str(bad), "--methods", "random"], registry=registry) == 2
    err = capsys.readouterr().err
    assert f"tokred: error: {bad}:1: unknown keys ['answr']" in err and "building preset" not in err


# ------------------------------------------------------------------------------------ depth-matched layers on the proxy


def test_the_demo_runs_the_proxy_at_llava_depth_fractions(capsys: pytest.CaptureFixture[str],
                                                          registry: tokred.Registry) -> None:
    from tokred.cli._loading import layer_options_at_depth

    argv = ["demo", "--repeats", "2", "--methods", "fastv,random", "--items", "4", "--json"]
    assert main(argv, registry=registry) == 0
    data = json.loads(capsys.readouterr().out)
    # Whatever the proxy's depth: FastV's layer 2 of LLaVA-1.5's 32, at this model's depth.
    assert data["depth_matched"] == layer_options_at_depth({"fastv": {"layer": "2/32"}}, data["num_layers"])
    rows = {row["method"]: row for row in data["rows"]}
    assert rows["fastv"]["error"] is None and rows["fastv"]["prefill_speedup"]["n"] == 2
    assert rows["random"]["prefill_speedup"]["median"] > 0 and "prefill_time_ratio" not in rows["random"]

    assert main(["demo", "--repeats", "1", "--methods", "fastv", "--items", "4"], registry=registry) == 0
    out = capsys.readouterr().out
    assert "depth-matched layers" in out and "fastv: layer=" in out and "LLaVA-1.5's layer 2 of 32" in out
    assert "prefill speed-up" in out


def test_eval_on_the_proxy_depth_matches_layers_under_the_users_options(capsys: pytest.CaptureFixture[str],
                                                                        registry: tokred.Registry) -> None:
    from tokred.cli._loading import layer_options_at_depth

    argv = ["eval", "--preset", "proxy", "--methods", "fastv,random", "--keep-ratio", "0.25", "--items", "4",
            "--timing-rounds", "0", "--json"]
    assert main(argv, registry=registry) == 0
    data = json.loads(capsys.readouterr().out)
    from tokred.bench import build_preset

    assert registry.create("fastv").layer == 2  # the method's own default is untouched
    num_layers = build_preset("proxy")[0].config.get_text_config().num_hidden_layers
    matched = layer_options_at_depth({"fastv": {"layer": "2/32"}}, num_layers)
    assert data["depth_matched"] == matched
    assert [r["label"] for r in data["results"]] == [
        "unreduced", f"fastv (keep_ratio=0.25, layer={matched['fastv']['layer']})", "random (keep_ratio=0.25)"]

    argv[argv.index("fastv,random")] = "fastv"  # random has no layer option
    assert main([*argv, "--option", "layer=3"], registry=registry) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["depth_matched"] == {}
    assert [r["label"] for r in data["results"]] == ["unreduced", "fastv (keep_ratio=0.25, layer=3)"]
    assert main([*argv[:-1], "--option", "layer=3"], registry=registry) == 0
    assert "depth-matched" not in capsys.readouterr().out
