"""The command line's documentation cannot rot: docs/cli.md names every flag of every command, and
every ``tokred ...`` command line written in the docs, the READMEs and the commands' own examples
parses with today's parser."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from tokred.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
CLI_PAGE = ROOT / "docs/cli.md"


def _commands() -> dict[str, argparse.ArgumentParser]:
    return build_parser().commands


def _section(name: str) -> str:
    text = CLI_PAGE.read_text()
    match = re.search(rf"^## `tokred {name}`\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"docs/cli.md has no section '## `tokred {name}`'"
    return match.group(1)


@pytest.mark.parametrize("name", list(build_parser().commands))
def test_every_flag_of_every_command_is_documented_in_its_section(name: str) -> None:
    section = _section(name)
    parser = _commands()[name]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        names = action.option_strings or [action.metavar or action.dest]
        assert any(f"`{n}" in section for n in names), f"docs/cli.md, tokred {name}: {names[0]} is not documented"


def test_the_page_lists_every_command_and_preset() -> None:
    from tokred.cli._loading import preset_catalogue

    text = CLI_PAGE.read_text()
    for name in _commands():
        assert f"[`tokred {name}`](#tokred-{name})" in text
    presets = text.split("## Presets", 1)[1]
    for name in preset_catalogue():
        assert f"| `{name}` |" in presets, f"preset {name} is missing from docs/cli.md"


def _fenced_lines(text: str) -> list[str]:
    """The lines of the shell code blocks (bash, sh, console, or no language) of a Markdown page,
    continuations joined; in console blocks only the ``$ `` lines."""
    lines, block, language = [], None, ""
    for line in text.splitlines():
        fence = line.strip().startswith("```")
        if fence and block is None:
            block, language = [], line.strip()[3:].strip()
        elif fence:
            if language in ("bash", "sh", "shell", "console", ""):
                for command in "\n".join(block).replace("\\\n", " ").splitlines():
                    command = command.strip()
                    if language == "console" and not command.startswith("$ "):
                        continue
                    lines.append(command.removeprefix("$ "))
            block = None
        elif block is not None:
            block.append(line)
    return lines


def _pages() -> list[Path]:
    return [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md", ROOT / "CONTRIBUTING.md",
            *sorted(ROOT.glob("plugins/*/README.md")), *sorted(ROOT.glob("examples/*/README.md"))]


def _documented_command_lines() -> list[tuple[str, str]]:
    """``(where, command line)`` of every ``tokred ...`` command in the shell blocks of the docs and
    READMEs, and in the examples of every command's ``--help``."""
    found = []
    for page in _pages():
        for line in _fenced_lines(page.read_text()):
            if re.match(r"(\S*/)?tokred ", line):
                found.append((str(page.relative_to(ROOT)), line))
    for name, parser in _commands().items():
        for line in (parser.epilog or "").replace("\\\n", " ").splitlines():
            if line.strip().startswith("tokred "):
                found.append((f"tokred {name} --help", line.strip()))
    return found


def _argv(line: str) -> list[str] | None:
    """The arguments after ``tokred``, or ``None`` for a line that is not a runnable command."""
    for stop in (" | ", " > ", " && ", " 2>"):
        line = line.split(stop)[0]
    if "..." in line:
        return None  # a placeholder: "tokred show ... -o kept.png"
    words = shlex.split(line, comments=True)
    return words[1:] if words and words[0].endswith("tokred") else None


def test_the_docs_quote_many_command_lines() -> None:
    assert len([line for _, line in _documented_command_lines() if _argv(line)]) > 30


@pytest.mark.parametrize(("where", "line"), _documented_command_lines())
def test_every_documented_command_line_parses(where: str, line: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv = _argv(line)
    if argv is None:
        pytest.skip("a placeholder, not a command")
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code != 0:  # --help and --version exit 0
            pytest.fail(f"{where}: `{line}` does not parse: {capsys.readouterr().err.strip()}")


def _inline_mentions() -> list[tuple[str, str, str]]:
    """``(where, command, flag)`` of every flag written after a command in inline code in the prose
    (`` `tokred run --method` ``, `` `tokred list --json` ``)."""
    found = []
    commands = _commands()
    for page in _pages():
        prose = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
        for span in re.findall(r"`(?:\S*/)?tokred ([^`]+)`", prose):
            words = span.split()
            if words and words[0] in commands:
                found += [(str(page.relative_to(ROOT)), words[0], w.split("=")[0]) for w in words[1:]
                          if w.startswith("-")]
    return found


def test_every_flag_quoted_in_the_prose_exists() -> None:
    mentions = _inline_mentions()
    assert len(mentions) > 10
    commands = _commands()
    stale = [f"{where}: tokred {command} {flag}" for where, command, flag in mentions
             if not any(flag in a.option_strings for a in commands[command]._actions)]
    assert not stale, f"flags that the commands no longer have: {stale}"
