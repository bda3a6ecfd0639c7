"""Tests of ``tokred bench`` and :mod:`tokred.bench`: accounting, statistics, memory tracking, the
documented JSON, the ideal, selector scaling. Timing *values* are never asserted: these machines
are shared and noisy; the benchmark page holds the measured figures."""

from __future__ import annotations

import contextlib
import importlib.metadata
import io
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import tokred
from tokred.bench import (
    PRESETS,
    Spread,
    TensorPeak,
    build_preset,
    fit_exponents,
    kv_cache_bytes,
    prefill_flops,
    rounds,
    selector_scaling,
)
from tokred.cli import main

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def _installed_registry() -> tokred.Registry:
    return tokred.Registry(entry_points=list(importlib.metadata.entry_points(group="tokred")))


# ------------------------------------------------------------------------------ accounting

# d = 8, h = 2 heads, kv = 1 KV head, head_dim 4, I = 16, V = 10; layer 0 sees 5 tokens, layer 1 sees 3.
SMALL = SimpleNamespace(hidden_size=8, num_attention_heads=2, num_key_value_heads=1, intermediate_size=16, vocab_size=10)


def test_prefill_flops_match_hand_computed_values_for_a_small_config() -> None:
    # layer of 5 tokens: projections 2*5*8*4*(2*2 + 2*1) = 1920, attention 2*2*4*5*6 = 480,
    # MLP 6*5*8*16 = 3840 -> 6240. Layer of 3: 1152 + 192 + 2304 = 3648. lm_head, one position: 2*8*10 = 160.
    assert prefill_flops(SMALL, [5, 3]) == 6240 + 3648 + 160
    assert prefill_flops(SMALL, [5, 3], logits_positions=4) == 6240 + 3648 + 640
    # An explicit head_dim (wider than hidden / heads) changes projections and attention only.
    wide = SimpleNamespace(**vars(SMALL), head_dim=8)
    assert prefill_flops(wide, [5]) == 2 * 5 * 8 * 8 * 6 + 2 * 2 * 8 * 5 * 6 + 3840 + 160


def test_kv_cache_bytes_match_hand_computed_values_for_a_small_config() -> None:
    # Keys and values: 2 x 1 KV head x 4 elements per token and layer; 5 + 3 tokens.
    assert kv_cache_bytes(SMALL, [5, 3], torch.float32) == 2 * 1 * 4 * 8 * 4
    assert kv_cache_bytes(SMALL, [5, 3], torch.bfloat16) == 2 * 1 * 4 * 8 * 2


# ------------------------------------------------------------------------------ statistics


def test_spread_gives_median_and_inclusive_quartiles() -> None:
    s = Spread.of([5.0, 1.0, 4.0, 2.0, 3.0])
    assert (s.median, s.q1, s.q3, s.min, s.max, s.n) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    assert s.format(".1f", "x") == "3.0x [2.0-4.0]"
    assert Spread.of([2.0]).format(".2f", "x") == "2.00x"
    with pytest.raises(ValueError):
        Spread.of([])


def test_rounds_run_every_task_once_per_round_in_rotating_order() -> None:
    calls: list[str] = []
    tasks = {name: (lambda name=name: calls.append(name) or float(len(calls))) for name in "abc"}
    results = rounds(tasks, 3)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert results == {"a": [1.0, 6.0, 8.0], "b": [2.0, 4.0, 9.0], "c": [3.0, 5.0, 7.0]}


def test_tensor_peak_counts_tensors_alive_together_and_not_the_ones_from_before() -> None:
    weights = torch.ones(256, 256)
    mib = 2**20
    with TensorPeak() as tracker:
        a = torch.ones(1024, 256)          # 1 MiB
        weights.add_(1)                    # in place on an older tensor: nothing new
        b = a @ weights                    # 1 MiB -> 2 MiB alive
        del a                              # 1 MiB
        view = b.view(-1)                  # a view: nothing new
        c = b * 2                          # 2 MiB
        del view, b, c                     # 0
        d = torch.ones(512, 256)           # 0.5 MiB
    assert tracker.peak == 2 * mib
    assert tracker.live == mib // 2 and d.numel() == 512 * 256


# ------------------------------------------------------------------------------ the command


def _documented_fields(section: str) -> set[str]:
    """Field names listed in the docs table between ``<!-- bench-json:SECTION -->`` markers."""
    text = DOCS.read_text()
    match = re.search(rf"<!-- bench-json:{section} -->(.*?)<!-- /bench-json:{section} -->", text, re.S)
    assert match, f"docs/benchmarks.md has no bench-json:{section} table"
    return set(re.findall(r"^\| `([\w.]+)`", match.group(1), re.M))


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    """One quick run on the tiny preset: a stage-I method, a gate method, the plot."""
    plot = tmp_path_factory.mktemp("bench") / "speedup.png"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = main(["bench", "--preset", "tiny", "--methods", "random", "fastv", "--keep", "16", "--repeats", "1",
                       "--new-tokens", "3", "--json", "--plot", str(plot)], registry=_installed_registry())
    assert status == 0
    return json.loads(stdout.getvalue()), plot


def _flat(data: dict, nested: tuple[str, ...]) -> set[str]:
    keys = set()
    for key, value in data.items():
        keys.add(key)
        if key in nested:
            keys |= {f"{key}.{sub}" for sub in value}
    return keys


def test_bench_json_has_exactly_the_documented_fields(bench_json: tuple[dict, Path]) -> None:
    data, _ = bench_json
    assert _flat(data, ("machine", "model", "settings")) == _documented_fields("top")
    assert [row["method"] for row in data["rows"]] == ["unreduced", "random", "fastv"]
    for row in data["rows"]:
        assert set(row) == _documented_fields("row"), row["method"]
    spread = data["rows"][1]["prefill_speedup"]
    assert set(spread) == {"median", "q1", "q3", "min", "max", "n"} and spread["n"] == 1


def test_bench_accounting_matches_the_model_and_its_real_cache(bench_json: tuple[dict, Path]) -> None:
    data, _ = bench_json
    model, _ = build_preset("tiny")
    config = model.config.get_text_config()
    settings = data["settings"]
    text, layers = settings["text_tokens"], data["model"]["num_layers"]
    assert settings["visual_tokens"] == 576 and text > 0 and layers == 8
    rows = {row["method"]: row for row in data["rows"]}
    expected_visual = {"unreduced": [576] * 8, "random": [16] * 8, "fastv": [576, 576] + [16] * 6}
    for name, visual in expected_visual.items():
        row = rows[name]
        tokens = [text + v for v in visual]
        assert row["visual_tokens_per_layer"] == visual
        assert row["prefill_flops"] == prefill_flops(config, tokens)
        assert row["kv_cache_bytes"] == kv_cache_bytes(config, tokens, torch.float32)
        # The analytic bytes are what the DynamicCache really holds after the prefill.
        assert row["kv_cache_bytes_measured"] == row["kv_cache_bytes"]
        assert row["peak_prefill_bytes"] > 0 and row["peak_generate_bytes"] >= row["kv_cache_bytes"]
    assert rows["unreduced"]["prefill_flops_ratio"] == 1.0
    assert rows["random"]["prefill_flops"] < rows["fastv"]["prefill_flops"] < rows["unreduced"]["prefill_flops"]


def test_bench_compares_stage_one_methods_with_an_ideal_that_computes_the_same_thing(
    bench_json: tuple[dict, Path],
) -> None:
    data, _ = bench_json
    rows = {row["method"]: row for row in data["rows"]}
    random_row, fastv_row = rows["random"], rows["fastv"]
    assert random_row["stage1_only"] and not fastv_row["stage1_only"]
    assert random_row["ideal_logits_max_abs_diff"] < 1e-4 and random_row["ideal_same_tokens"] is True
    assert random_row["prefill_vs_ideal"]["n"] == 1 and random_row["ideal_prefill_seconds"]["median"] > 0
    assert fastv_row["prefill_vs_ideal"] is None and "gates" in fastv_row["ideal_note"]
    assert random_row["overhead_share_of_saved"] is None or random_row["overhead_share_of_saved"]["median"] >= 0


def test_bench_plot_is_a_png_of_the_documented_size(bench_json: tuple[dict, Path]) -> None:
    _, plot = bench_json
    with Image.open(plot) as image:
        assert image.format == "PNG" and image.size == (960, 560)


def test_bench_table_and_progress(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "--preset", "tiny", "--methods", "random", "--keep", "8", "--repeats", "1", "--new-tokens", "1",
            "--no-memory"]
    assert main(args, registry=_installed_registry()) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].split()[:3] == ["method", "budget", "visual"]
    row = next(line for line in lines if line.startswith("random"))
    assert row.split()[1:3] == ["keep=8", "576/8/8"]
    assert "[1/" in captured.err and "random keep=8: ideal prefill, round 1/1" in captured.err


@pytest.mark.parametrize(("args", "message"), [
    (["--methods", "random"], "give --model or --preset"),
    (["--preset", "tiny", "--methods", "nope*"], "no registered method matches 'nope*'"),
    (["--preset", "tiny", "--methods", "random", "--option", "keep=3"], "give the budgets with --keep"),
    (["--preset", "tiny", "--device", "cpu", "--attn-implementation", "flash_attention_2"], "CUDA only"),
    (["--scaling", "--keep-ratio", "0.1"], "--scaling takes absolute budgets"),
])
def test_bench_rejects_bad_inputs_with_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", *args], registry=_installed_registry()) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("tokred: error:") == 1


def test_bench_reports_a_method_that_fails_on_the_model_in_its_row(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "--preset", "tiny", "--methods", "random", "--keep", "999", "--repeats", "1", "--new-tokens", "1",
            "--no-memory", "--json"]
    assert main(args, registry=_installed_registry()) == 1
    rows = {row["method"]: row for row in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["unreduced"]["error"] is None and rows["unreduced"]["prefill_seconds"]["n"] == 1
    assert "BudgetError" in rows["random"]["error"] and "keep=999 is larger than" in rows["random"]["error"]


# ------------------------------------------------------------------------------ presets


def test_llava_135m_preset_has_the_documented_shape() -> None:
    model, processor = build_preset("llava-135m")
    text, vision = model.config.get_text_config(), model.config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads, text.num_key_value_heads,
            text.intermediate_size) == (576, 30, 9, 3, 1536)
    decoder = sum(p.numel() for p in model.model.language_model.layers.parameters())
    assert 105e6 < decoder < 107e6
    assert (vision.image_size // vision.patch_size) ** 2 == 576
    assert 4.5e6 < sum(p.numel() for p in model.model.vision_tower.parameters()) < 5.5e6
    assert "llava-135m" in PRESETS and "tiny" in PRESETS


# ------------------------------------------------------------------------------ selector scaling


class _SleepSelector(tokred.Selector):
    """Takes N * k microseconds: the cost law the scaling fit must recover."""

    def select(self, tokens: tokred.VisualTokens, k: int) -> torch.Tensor:
        time.sleep(tokens.num_tokens * k * 1e-6)
        return torch.arange(k)


def test_selector_scaling_recovers_the_cost_law_and_skips_cells_past_the_limit() -> None:
    result = selector_scaling(_SleepSelector(), [1000, 2000, 4000], [10, 20, 40], dim=8, repeats=3)
    assert result["exponents"]["N"] == pytest.approx(1.0, abs=0.2)
    assert result["exponents"]["k"] == pytest.approx(1.0, abs=0.2)

    # 10 ms, 40 ms, 40 ms, (160 ms): the two 40 ms cells exceed the limit, the largest is skipped.
    limited = selector_scaling(_SleepSelector(), [1000, 4000], [10, 40], dim=8, repeats=1, max_seconds=0.03)
    cells = {(c["N"], c["k"]): c for c in limited["cells"]}
    assert cells[(1000, 10)]["seconds"] is not None and cells[(4000, 10)]["seconds"] is not None
    assert cells[(4000, 40)]["seconds"] is None
    assert cells[(4000, 40)]["skipped"] == "N=1000, k=40 took more than 0.03 s"


def test_fit_exponents_leaves_out_a_variable_that_does_not_vary() -> None:
    cells = [{"N": n, "k": 8, "seconds": {"median": 1e-6 * n**2}} for n in (100, 200, 400)]
    fitted = fit_exponents(cells)
    assert fitted["N"] == pytest.approx(2.0) and fitted["k"] is None


def test_bench_scaling_command_times_registered_selectors(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench", "--scaling", "--selectors", "rand*", "--sizes", "64", "256", "--keep", "4", "16",
            "--dim", "32", "--repeats", "1", "--json"]
    assert main(args, registry=_installed_registry()) == 0
    data = json.loads(capsys.readouterr().out)
    assert [row["selector"] for row in data["selectors"]] == ["random"]
    for row in data["selectors"]:
        assert [(c["N"], c["k"]) for c in row["cells"]] == [(64, 4), (64, 16), (256, 4), (256, 16)]
        assert all(c["seconds"]["median"] > 0 for c in row["cells"])


@pytest.mark.parametrize(("preset", "family", "visual"), [
    ("tiny-llava_next", "llava_next", 720), ("tiny-internvl", "internvl", 320),
])
def test_tiled_presets_build_their_family(preset: str, family: str, visual: int) -> None:
    import tokred
    from tokred.adapters.base import VisionProbes
    from tokred.testing import make_image

    model, processor = build_preset(preset)
    adapter = tokred.default_registry().adapter_for(model)
    assert adapter.family == family
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}], add_generation_prompt=True)
    inputs = processor(images=[make_image()], text=[prompt], return_tensors="pt")
    spans = adapter.image_spans(inputs["input_ids"], VisionProbes(), inputs)
    assert [span.positions.numel() for span in spans] == [visual]


def test_llava_next_135m_preset_has_the_real_token_count() -> None:
    """336 px tiles and the released pinpoints: a square image is 2,880 tokens + 48 newlines."""
    from tokred.testing import make_image

    model, processor = build_preset("llava-next-135m")
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}], add_generation_prompt=True)
    inputs = processor(images=[make_image(672, 672)], text=[prompt], return_tensors="pt")
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 2928
    assert model.config.get_text_config().num_hidden_layers == 30


def test_bench_on_tiled_llava_next_counts_candidates_and_matches_the_ideal(capsys: pytest.CaptureFixture[str]) -> None:
    """LLaVA-NeXT's ideal needs image_sizes for its encoder; newline tokens are text in the counts."""
    args = ["bench", "--preset", "tiny-llava_next", "--methods", "random", "--keep", "16", "--repeats", "1",
            "--new-tokens", "2", "--no-memory", "--json"]
    assert main(args) == 0
    rows = {row["method"]: row for row in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["unreduced"]["visual_tokens_input"] == 720
    assert rows["random"]["visual_tokens_per_layer"] == [16] * 8
    assert rows["random"]["ideal_same_tokens"] is True and rows["random"]["ideal_logits_max_abs_diff"] < 1e-5


# ------------------------------------------------------------------------------------- video


def test_bench_on_a_video_preset_counts_the_clip_and_matches_the_ideal(capsys: pytest.CaptureFixture[str]) -> None:
    """A video preset prompts with its synthetic clip; the ideal (the model's own forward up to its
    language model, then only the kept tokens at their M-RoPE positions) computes what the run does."""
    args = ["bench", "--preset", "tiny-qwen2-vl-video", "--methods", "random", "evs", "--keep-ratio", "0.25",
            "--repeats", "1", "--new-tokens", "2", "--no-memory", "--json"]
    assert main(args) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {row["method"]: row for row in result["rows"]}
    assert result["settings"]["visual_tokens"] == 64 and result["model"]["family"] == "qwen2_vl"
    for name in ("random", "evs"):
        assert rows[name]["visual_tokens_per_layer"] == [16] * 8
        assert rows[name]["ideal_same_tokens"] is True and rows[name]["ideal_logits_max_abs_diff"] < 1e-5
    assert main(["bench", "--preset", "tiny-qwen2-vl-video", "--image", "x.png", "--methods", "random"]) == 2
    assert "--image does not apply" in capsys.readouterr().err


def test_video_presets_build_the_documented_token_counts() -> None:
    preset = PRESETS["qwen2-vl-video-135m"]
    assert preset.video_frames == 32 and preset.family == "qwen2_vl"
    model, processor = build_preset("tiny-qwen2-vl-video")
    inputs, clip = PRESETS["tiny-qwen2-vl-video"].video_prompt(processor, "What happens?")
    assert len(clip) == 8 and inputs["video_grid_thw"].tolist() == [[4, 8, 8]]
    with pytest.raises(ValueError, match="has no video"):
        PRESETS["tiny"].video_prompt(processor, "x")


def test_the_ideal_is_refused_with_a_reason_where_deepstack_features_are_needed() -> None:
    from tokred.bench._ideal import unsupported_reason

    model, _ = tokred.testing.tiny_model("qwen3_vl")
    reason = unsupported_reason(tokred.default_registry().adapter_for(model))
    assert reason is not None and "deepstack" in reason
    for family in ("llava", "qwen2_5_vl", "llava_onevision", "internvl"):
        model, _ = tokred.testing.tiny_model(family)
        assert unsupported_reason(tokred.default_registry().adapter_for(model)) is None
