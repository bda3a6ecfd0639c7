"""Output: plain tables in pipes, rich tables and a progress bar on terminals, NO_COLOR, JSON."""

from __future__ import annotations

import io
import json
import re

import pytest

import tokred
from tokred.cli import _output, main
from tokred.cli._output import Output, duration, plain_table, plain_text

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def test_plain_tables_have_one_line_per_row_and_no_trailing_spaces() -> None:
    text = plain_table(["name", "n"], [["a" * 30, "1"], ["b", "22"]], right={1})
    assert text.splitlines() == [
        "name" + " " * 28 + " n",
        "-" * 30 + "  --",
        "a" * 30 + "   1",
        "b" + " " * 29 + "  22",
    ]


def test_a_terminal_gets_a_rich_table_with_colours_unless_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    out = Output(io.StringIO(), io.StringIO(), terminal=True, width=60)
    cell = "a long description that is wider than the terminal, so it wraps onto more lines [bfr]*"
    text = out.table(["name", "description"], [["fastv", cell]])
    assert ANSI.search(text)  # bold headers
    plain = ANSI.sub("", text)
    assert max(len(line) for line in plain.splitlines()) <= 60
    assert len(plain.splitlines()) > 3  # wrapped in the terminal's width
    assert "[bfr]*" in plain  # cells are text, not rich markup

    monkeypatch.setenv("NO_COLOR", "1")
    no_colour = Output(io.StringIO(), io.StringIO(), terminal=True, width=60)
    assert not no_colour.colour
    text = no_colour.table(["name", "description"], [["fastv", cell]])
    assert not ANSI.search(text) and "fastv" in text
    assert no_colour.heading("methods") == "methods"


def test_a_pipe_gets_no_colours(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NO_COLOR", raising=False)
    out = Output(io.StringIO(), io.StringIO())
    assert not out.terminal and not out.colour
    assert out.style("MISSING", "bold red") == "MISSING"


def test_list_on_a_terminal(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                            registry: tokred.Registry) -> None:
    monkeypatch.setattr(_output, "_is_terminal", lambda stream: True)
    monkeypatch.setenv("NO_COLOR", "1")
    assert main(["list"], registry=registry) == 0
    out = capsys.readouterr().out
    assert not ANSI.search(out)
    rows = [line for line in out.splitlines() if line.strip().startswith("todre ")]
    assert rows and "tokred-todre" in rows[0]
    assert "------" not in out  # rich's rule under the header, not the plain table's dashes


@pytest.mark.parametrize("terminal", [False, True])
def test_list_shows_descriptions_without_their_docstring_markup(
    terminal: bool, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], registry: tokred.Registry,
) -> None:
    monkeypatch.setattr(_output, "_is_terminal", lambda stream: terminal)
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "400")  # one line per row on the terminal too
    assert main(["list"], registry=registry) == 0
    out = capsys.readouterr().out
    assert "`" not in out
    selectors = out.split("\nselectors\n")[1]
    random = next(line for line in selectors.splitlines() if line.strip().startswith("random "))
    assert random.rstrip().endswith("Keeps k tokens drawn uniformly without replacement.")
    assert main(["list", "random", "--json"], registry=registry) == 0  # JSON gives the text as written
    assert json.loads(capsys.readouterr().out)["selectors"][0]["description"] == (
        "Keeps ``k`` tokens drawn uniformly without replacement.")


@pytest.mark.parametrize(("text", "plain"), [
    ("keep the ``k`` tokens at layer ``K``", "keep the k tokens at layer K"),
    ("see :class:`~tokred.Method` and :func:`tokred.create`", "see Method and tokred.create"),
    (":func:`the factory <tokred.create>` and `x`", "the factory and x"),
    ("a **strong** word; keep_ratio * N stays, as does a*b", "a strong word; keep_ratio * N stays, as does a*b"),
])
def test_plain_text_strips_inline_markup_only(text: str, plain: str) -> None:
    assert plain_text(text) == plain


def test_progress_in_a_pipe_is_one_line_per_step_with_the_time_left() -> None:
    err = io.StringIO()
    out = Output(io.StringIO(), err)
    with out.progress(3) as progress:
        for label in ("a", "b", "c"):
            progress.step(label)
    lines = err.getvalue().splitlines()
    assert lines[0] == "[1/3] a"
    assert re.fullmatch(r"\[2/3\] b, about \d+ s left", lines[1]) and lines[2].startswith("[3/3] c, about ")


def test_progress_on_a_terminal_is_a_bar_that_ends_complete() -> None:
    err = io.StringIO()
    out = Output(io.StringIO(), err, terminal=True, colour=False)
    with out.progress(4) as progress:
        for step in range(4):
            progress.step(f"step {step}")
            out.note("a note while the bar is shown")
    text = err.getvalue()
    assert "4/4" in text and "a note while the bar is shown" in text and "eta" in text


def test_durations_read_naturally() -> None:
    assert [duration(s) for s in (0.4, 12, 185, 3720)] == ["0 s", "12 s", "3 min 05 s", "1 h 02 min"]


def test_errors_are_one_line_then_indented_details() -> None:
    err = io.StringIO()
    Output(io.StringIO(), err).error("something\nwrong  here", ["first", "second"])
    assert err.getvalue() == "tokred: error: something wrong here\n  first\n  second\n"


@pytest.mark.parametrize("argv", [
    ["list", "--json"], ["doctor", "--json"], ["demo", "--json", "--repeats", "1", "--methods", "random"],
    ["run", "--preset", "tiny", "--method", "random", "--keep", "4", "--max-new-tokens", "1", "--json"],
    ["bench", "--preset", "tiny", "--methods", "random", "--keep", "4", "--repeats", "1", "--new-tokens", "1",
     "--no-memory", "--json"],
])
def test_every_command_that_prints_a_table_prints_json_instead(argv: list[str], capsys: pytest.CaptureFixture[str],
                                                               registry: tokred.Registry) -> None:
    assert main(argv, registry=registry) == 0
    captured = capsys.readouterr()
    assert isinstance(json.loads(captured.out), dict)  # stdout is the JSON document only


def test_an_interrupt_exits_130_and_a_closed_pipe_1(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                                      registry: tokred.Registry) -> None:
    from tokred.cli import _list

    def interrupted(*args: object) -> int:
        raise KeyboardInterrupt

    monkeypatch.setattr(_list, "handle", interrupted)
    assert main(["list"], registry=registry) == 130
    assert capsys.readouterr().err == "tokred: interrupted\n"

    def reader_left(*args: object) -> int:
        raise BrokenPipeError

    monkeypatch.setattr(_list, "handle", reader_left)
    assert main(["list"], registry=registry) == 1
