"""Arguments: suggestions for typos, lists with commas or spaces, ``list PATTERN``, cheap ``--help``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import tokred
from tokred.cli import build_parser, main
from tokred.cli._common import split_list


def _error(capsys: pytest.CaptureFixture[str], argv: list[str], registry: tokred.Registry | None = None) -> str:
    assert main(argv, registry=registry) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err


# ------------------------------------------------------------------------------------ suggestions


def test_a_misspelled_flag_is_reported_by_its_command_with_the_closest_flag(capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["run", "--preset", "tiny", "--method", "random", "--kep", "64"])
    assert err.startswith("usage: tokred run ")  # the subcommand's usage, not the top level's
    assert "tokred run: error: unrecognized arguments: --kep 64; did you mean '--keep'?" in err


def test_a_misspelled_flag_with_its_value_after_an_equals_sign(capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["bench", "--preset", "tiny", "--metods=random"])
    assert "did you mean '--methods'?" in err


def test_a_flag_of_another_command_says_which_commands_take_it(capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["list", "--keep", "5"])
    assert "usage: tokred list" in err
    assert "--keep is an option of 'tokred bench', 'tokred eval', 'tokred run', 'tokred show'" in err


def test_a_misspelled_command_suggests_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["lsit"])
    assert "invalid command 'lsit'" in err and "did you mean 'list'?" in err


def test_a_misspelled_choice_suggests_the_closest(capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["show", "--preset", "tiyn", "--method", "random", "-o", "x.png"])
    assert "invalid choice 'tiyn'" in err and "did you mean 'tiny'?" in err
    assert "did you mean 'bfloat16'?" in _error(capsys, ["bench", "--dtype", "bfloat61"])


def test_no_suggestion_when_nothing_is_close(capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["run", "--preset", "tiny", "--method", "random", "--zzzzzz"])
    assert "unrecognized arguments: --zzzzzz" in err and "did you mean" not in err


def test_a_misspelled_method_option_names_the_closest_and_lists_the_valid_ones(
    capsys: pytest.CaptureFixture[str], registry: tokred.Registry,
) -> None:
    err = _error(capsys, ["run", "--preset", "tiny", "--method", "todre", "--option", "tua=0.1"], registry)
    first, header, *options = err.strip().splitlines()
    assert first == "tokred: error: unknown option 'tua' for method 'todre'; did you mean 'tau'?"
    assert header.strip() == "valid options of method 'todre':"
    fields = registry.entry("method", "todre").obj.model_fields
    rows = [line for line in options if len(line) - len(line.lstrip()) == 4]  # not the wrapped descriptions
    assert [line.split()[0] for line in rows] == list(fields)
    tau = next(line for line in rows if line.split()[0] == "tau")
    assert "default 0.1" in tau and fields["tau"].description.split()[0] in tau
    assert "building preset" not in err  # refused before the model


def test_several_unknown_options_are_named_together(capsys: pytest.CaptureFixture[str], registry: tokred.Registry) -> None:
    err = _error(capsys, ["show", "--preset", "tiny", "--method", "random", "--option", "sed=1", "--option", "zzz=2",
                          "-o", "x.png"], registry)
    assert err.splitlines()[0] == "tokred: error: unknown options 'sed', 'zzz' for method 'random'; did you mean 'seed' for 'sed'?"


def test_bench_checks_the_shared_options_against_every_method(capsys: pytest.CaptureFixture[str],
                                                              registry: tokred.Registry) -> None:
    err = _error(capsys, ["bench", "--preset", "tiny", "--methods", "random", "--option", "sede=3"], registry)
    assert "unknown option 'sede' for method 'random'; did you mean 'seed'?" in err
    err = _error(capsys, ["bench", "--scaling", "--selectors", "random", "--option", "sede=3"], registry)
    assert "unknown option 'sede' for selector 'random'; did you mean 'seed'?" in err


def test_a_misspelled_method_name_suggests_the_closest(capsys: pytest.CaptureFixture[str], registry: tokred.Registry) -> None:
    err = _error(capsys, ["run", "--preset", "tiny", "--method", "tdore"], registry)
    # The registry's own error: the command line adds nothing of its own.
    assert err.startswith("tokred: error: unknown method 'tdore' (did you mean 'todre'?); registered: ")
    assert err.count("did you mean") == 1 and len(err.splitlines()) == 1


def test_the_command_line_suggests_with_the_registrys_function(monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    import tokred.registry
    from tokred.cli._common import suggest

    assert suggest("lsit", ["list", "run"]) == tokred.registry.suggest("lsit", ["list", "run"]) == "list"
    monkeypatch.setattr(tokred.registry, "suggest", lambda word, candidates, cutoff=0.6: "shared")
    assert suggest("lsit", ["list", "run"]) == "shared"
    assert "did you mean 'shared'?" in _error(capsys, ["lsit"])


def test_the_valid_options_of_a_misspelled_one_fit_in_100_columns(capsys: pytest.CaptureFixture[str],
                                                                  registry: tokred.Registry) -> None:
    err = _error(capsys, ["run", "--preset", "tiny", "--method", "fastv", "--option", "kep=3"], registry)
    first, header, *options = err.strip().splitlines()
    assert first == "tokred: error: unknown option 'kep' for method 'fastv'; did you mean 'keep'?"
    assert header == "  valid options of method 'fastv':"
    assert max(len(line) for line in options) <= 100
    rows = [line for line in options if len(line) - len(line.lstrip()) == 4]
    assert [line.split()[0] for line in rows] == list(registry.entry("method", "fastv").obj.model_fields)
    spread = options.index(next(line for line in rows if line.split()[0] == "spread"))
    column = rows[0].index("Visual tokens")  # the descriptions' column
    assert options[spread + 1].startswith(" " * column) and options[spread + 1][column] != " "  # wrapped under it


# ------------------------------------------------------------------------------------ lists


@pytest.mark.parametrize("methods", [["random,todre"], ["random", "todre"], ["random,", "todre"], ["random, todre"]])
def test_lists_take_commas_spaces_or_both(methods: list[str]) -> None:
    args = build_parser().parse_args(["bench", "--preset", "tiny", "--methods", *methods, "--keep", "32,64", "144"])
    assert args.methods == ["random", "todre"]
    assert args.keep == [32, 64, 144]


def test_repeated_list_flags_add_up_and_replace_the_default() -> None:
    args = build_parser().parse_args(["bench", "--scaling", "--sizes", "576", "--sizes", "2304,5184",
                                      "--selectors", "todre.*,[rs]*"])
    assert args.sizes == [576, 2304, 5184]
    assert args.selectors == ["todre.*", "[rs]*"]
    defaults = build_parser().parse_args(["bench", "--scaling"])
    assert defaults.sizes == [576, 2304, 5184, 10000, 20000] and defaults.selectors == ["*"]
    ratios = build_parser().parse_args(["bench", "--preset", "tiny", "--keep-ratio", "0.1,0.25"])
    assert ratios.keep_ratio == [0.1, 0.25]
    demo = build_parser().parse_args(["demo", "--methods", "random,fast*"])
    assert demo.methods == ["random", "fast*"]


def test_a_bad_list_item_is_a_usage_error_naming_it(capsys: pytest.CaptureFixture[str]) -> None:
    err = _error(capsys, ["bench", "--preset", "tiny", "--keep", "32,x"])
    assert "argument --keep: invalid value 'x': expected a whole number" in err
    assert "must be at least 1" in _error(capsys, ["bench", "--preset", "tiny", "--keep", "0"])


def test_split_list_keeps_commas_inside_fnmatch_sets() -> None:
    assert split_list("[a,b]*,c") == ["[a,b]*", "c"]
    assert split_list(" random , todre ,") == ["random", "todre"]


def test_images_take_several_paths_after_one_flag() -> None:
    args = build_parser().parse_args(["run", "--preset", "tiny", "--method", "random", "--image", "a.png", "b.png",
                                      "--image", "c.png"])
    assert [str(p) for p in args.image] == ["a.png", "b.png", "c.png"]


@pytest.mark.parametrize("argv", [["run", "--method", "random"], ["show", "--method", "random", "-o", "x.png"],
                                  ["bench", "--methods", "random"]])
def test_images_take_commas_as_the_other_list_flags_do(argv: list[str]) -> None:
    command = argv[0]
    args = build_parser().parse_args([*argv, "--preset", "tiny", "--image", "a.png,b.png",
                                      "--image", "c.png, d.png", "e.png"])
    assert [str(p) for p in args.image] == ["a.png", "b.png", "c.png", "d.png", "e.png"]
    assert "separated by commas" in " ".join(build_parser().commands[command].format_help().split())


def test_an_existing_file_with_a_comma_in_its_name_is_one_image(tmp_path: Path) -> None:
    (tmp_path / "cat, dog.png").write_bytes(b"")
    whole = str(tmp_path / "cat, dog.png")
    args = build_parser().parse_args(["run", "--preset", "tiny", "--method", "random", "--image", whole,
                                      f"{tmp_path / 'a.png'},{tmp_path / 'b.png'}"])
    assert [str(p) for p in args.image] == [whole, str(tmp_path / "a.png"), str(tmp_path / "b.png")]


def test_images_given_with_commas_all_reach_the_model(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      registry: tokred.Registry) -> None:
    from tokred.testing import make_image

    for name in ("a.png", "b.png"):
        make_image().save(tmp_path / name)
    argv = ["run", "--preset", "tiny", "--method", "random", "--keep", "8", "--max-new-tokens", "1", "--json",
            "--image", f"{tmp_path / 'a.png'},{tmp_path / 'b.png'}"]
    assert main(argv, registry=registry) == 0
    assert json.loads(capsys.readouterr().out)["images"] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]


def test_demo_compares_the_methods_of_a_comma_list(capsys: pytest.CaptureFixture[str], registry: tokred.Registry) -> None:
    assert main(["demo", "--repeats", "1", "--methods", "random,fast*", "--json"], registry=registry) == 0
    rows = [row["method"] for row in json.loads(capsys.readouterr().out)["rows"]]
    assert rows == ["unreduced", "random", "fastv"]


# ------------------------------------------------------------------------------------ list PATTERN


def _methods_listed(out: str) -> list[str]:
    lines = out.splitlines()
    start = lines.index("methods") + 1
    end = next((i for i in range(start, len(lines)) if not lines[i].strip()), len(lines))
    return [line.split()[0] for line in lines[start + 2:end]]  # after the header and its dashes


def test_list_takes_a_positional_pattern(capsys: pytest.CaptureFixture[str], registry: tokred.Registry) -> None:
    assert main(["list", "to*"], registry=registry) == 0
    out = capsys.readouterr().out
    assert _methods_listed(out) == ["todre"]
    assert "todre.diversity" in out and "todre.migration" in out and "fastv" not in out


def test_list_takes_several_patterns_with_commas_or_spaces_and_the_old_flag(
    capsys: pytest.CaptureFixture[str], registry: tokred.Registry,
) -> None:
    for argv in (["list", "fast*,rand*"], ["list", "fast*", "rand*"], ["list", "fast*", "--pattern", "rand*"]):
        assert main(argv, registry=registry) == 0
        assert _methods_listed(capsys.readouterr().out) == ["fastv", "random"], argv
    assert main(["list", "zz*", "--json"], registry=registry) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["methods"] == [] and data["adapters"] == []


# ------------------------------------------------------------------------------------ help


@pytest.mark.parametrize(("command", "expected"), [
    ("bench", "--methods"), ("show", "--output"), ("run", "--preset"), ("list", "PATTERN"),
])
def test_every_command_has_help_with_examples(command: str, expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert expected in out and "examples:" in out


def test_top_level_help_lists_the_commands_and_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("list", "run", "demo", "bench", "eval", "show", "doctor"):
        assert f"    {command}" in out
    assert "tokred run --preset tiny" in out


def test_the_module_runs_as_the_command(tmp_path) -> None:  # noqa: ANN001
    done = subprocess.run([sys.executable, "-m", "tokred.cli", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith(f"tokred {tokred.__version__}\n")
