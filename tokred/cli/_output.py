"""How the commands print: tables, notes, errors, JSON and progress.

Results go to stdout, everything else (notes, warnings, progress, errors) to stderr, so that
``tokred bench --json > result.json`` and ``tokred list | grep todre`` get the result only.

On a terminal, tables are drawn with `rich <https://rich.readthedocs.io>`_ (aligned to the
terminal's width, long cells wrapped, headers in bold) and long commands show a progress bar with
the time left. In a pipe or a file the same tables are plain text, one line per row, columns
separated by at least two spaces, with a dashed line under the headers, so that ``grep``, ``awk``,
``cut`` and tests can read them; progress is one line per step (``[3/15] fastv repeat 2/5, about
12 s left``) that reads well in a CI log. Colours appear only on a terminal and never when the
``NO_COLOR`` environment variable is set (https://no-color.org).

rich is imported only when something is drawn on a terminal.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import time
from types import TracebackType
from typing import Any, Collection, Sequence, TextIO

__all__ = ["Output", "Progress", "plain_table", "duration", "plain_text"]


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real stream
        return False


def _width() -> int:
    """The terminal's columns (``COLUMNS`` first, as ``shutil`` reads them); 100 when unknown or 0."""
    columns = shutil.get_terminal_size(fallback=(100, 24)).columns
    return columns if columns >= 20 else 100


# reStructuredText and Markdown markup of docstrings, shown as plain text (see plain_text).
_ROLE = re.compile(r":[\w.:-]+:`(?:~?([^`<]*?)\s*<[^>`]*>|~([^`]*\.)?([^`.]+)|([^`]*))`")
_LITERAL = re.compile(r"``(.+?)``")
_CODE = re.compile(r"`([^`]+)`")
_STRONG = re.compile(r"\*\*(\S(?:.*?\S)?)\*\*")


def plain_text(text: str) -> str:
    """``text`` without the inline markup of docstrings, for the terminal.

    Literals in double or single backquotes become their text; a reStructuredText role becomes its
    target (``:func:`tokred.create``` reads ``tokred.create``), its last part after ``~``
    (``:class:`~tokred.Method``` reads ``Method``) or its title (``:func:`title <target>```); strong
    emphasis in double asterisks becomes its text. A lone ``*`` (``ratio * N``) stays.
    """
    text = _ROLE.sub(lambda m: m.group(1) or m.group(3) or m.group(4) or "", text)
    text = _LITERAL.sub(r"\1", text)
    text = _CODE.sub(r"\1", text)
    return _STRONG.sub(r"\1", text)


class Output:
    """Where one command invocation prints.

    Args:
        stdout: the result stream.
        stderr: the stream of notes, warnings, errors and progress.
        terminal: draw for a terminal (rich tables, a progress bar); default: whether each stream
            is one.
        colour: use colours; default: on a terminal unless ``NO_COLOR`` is set.
        width: the terminal width for rich tables; default: the terminal's (100 when unknown).
    """

    def __init__(self, stdout: TextIO, stderr: TextIO, *, terminal: bool | None = None,
                 colour: bool | None = None, width: int | None = None) -> None:
        self.stdout = stdout
        self.stderr = stderr
        self.terminal = _is_terminal(stdout) if terminal is None else terminal
        self.err_terminal = _is_terminal(stderr) if terminal is None else terminal
        no_colour = bool(os.environ.get("NO_COLOR"))
        self.colour = (self.terminal and not no_colour) if colour is None else colour
        self.err_colour = (self.err_terminal and not no_colour) if colour is None else colour
        self.width = width or _width()
        self._progress: Progress | None = None

    # ------------------------------------------------------------------ stdout

    def print(self, text: str = "") -> None:
        """One block of text on stdout."""
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def json(self, data: Any) -> None:
        """``data`` as indented JSON on stdout."""
        self.print(json.dumps(data, indent=2, default=str))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]], *, right: Collection[int] = (),
              indent: int = 0) -> str:
        """The table as text: drawn by rich on a terminal, :func:`plain_table` otherwise.

        Args:
            headers: column titles.
            rows: the cells, already formatted as strings.
            right: the columns to right-align (numbers).
            indent: spaces before every line.
        """
        if not self.terminal:
            text = plain_table(headers, rows, right=right)
            return "\n".join(" " * indent + line for line in text.splitlines())
        from rich import box
        from rich.padding import Padding
        from rich.table import Table
        from rich.text import Text

        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
                      header_style="bold", border_style="dim")
        for index, header in enumerate(headers):
            last = index == len(headers) - 1
            table.add_column(Text(header), justify="right" if index in right else "left",
                             no_wrap=not last, overflow="fold")
        for row in rows:
            table.add_row(*(Text(str(cell)) for cell in row))  # Text: cells are not rich markup ("[bfr]*")
        return self._render(Padding(table, (0, 0, 0, indent), expand=False) if indent else table).rstrip("\n")

    def heading(self, text: str) -> str:
        """A section title: bold on a terminal with colours, plain otherwise."""
        return self.style(text, "bold")

    def style(self, text: str, style: str) -> str:
        """``text`` in a rich ``style`` (``"bold"``, ``"red"``, ...) when colours are on, else as is."""
        if not self.colour:
            return text
        from rich.text import Text

        return self._render(Text(text, style=style)).rstrip("\n")

    def _render(self, renderable: Any) -> str:
        from rich.console import Console

        buffer = io.StringIO()
        console = Console(file=buffer, force_terminal=self.colour, no_color=not self.colour,
                          color_system="standard" if self.colour else None, width=self.width,
                          highlight=False, emoji=False)
        console.print(renderable)
        return buffer.getvalue()

    # ------------------------------------------------------------------ stderr

    def note(self, message: str) -> None:
        """Progress of a long step, on stderr so stdout stays the result."""
        if self._progress is not None and self._progress.live is not None:
            self._progress.live.console.print(message, markup=False, highlight=False)
            return
        self.stderr.write(message + "\n")
        self.stderr.flush()

    def warn(self, message: str) -> None:
        """``tokred: warning: ...`` on stderr."""
        self.note(("\x1b[33mtokred: warning:\x1b[0m " if self.err_colour else "tokred: warning: ") + message)

    def error(self, message: str, details: Sequence[str] = ()) -> None:
        """``tokred: error: ...`` on stderr (one line), then ``details`` indented, one per line."""
        prefix = "\x1b[1;31mtokred: error:\x1b[0m " if self.err_colour else "tokred: error: "
        self.stderr.write(prefix + " ".join(message.split()) + "\n")
        for line in details:
            self.stderr.write(f"  {line}\n")
        self.stderr.flush()

    def progress(self, total: int) -> Progress:
        """A progress display over ``total`` steps (use it as a context manager)."""
        return Progress(self, total)


class Progress:
    """Progress over a known number of steps, on stderr: a rich bar with the elapsed time and the
    time left on a terminal, one line per step elsewhere. Call :meth:`step` before each step."""

    def __init__(self, output: Output, total: int) -> None:
        self.output = output
        self.total = total
        self.done = 0
        self.started = time.perf_counter()
        self.live: Any = None  # the rich Progress, on a terminal
        self._task: Any = None

    def __enter__(self) -> Progress:
        if self.output.err_terminal:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress as RichProgress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            console = Console(file=self.output.stderr, force_terminal=True, no_color=not self.output.err_colour,
                              highlight=False)
            self.live = RichProgress(TextColumn("{task.description}", markup=False), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                                     TimeRemainingColumn(), console=console)
            self.live.start()
            self._task = self.live.add_task("", total=self.total)
        self.output._progress = self
        return self

    def step(self, label: str) -> None:
        """Step ``done + 1`` of :attr:`total` starts; ``label`` says what it is."""
        self.done += 1
        if self.live is not None:
            self.live.update(self._task, completed=self.done - 1, description=label)
            return
        line = f"[{self.done}/{self.total}] {label}"
        if self.done > 1:
            elapsed = time.perf_counter() - self.started
            line += f", about {duration(elapsed / (self.done - 1) * (self.total - self.done + 1))} left"
        self.output.stderr.write(line + "\n")
        self.output.stderr.flush()

    def update(self, done: int, total: int, label: str) -> None:
        """``done`` of ``total`` steps are complete, the last being ``label`` (for work that reports
        what it finished rather than what it starts, as :func:`tokred.eval.evaluate` does)."""
        self.total = total
        if self.live is not None:
            self.live.update(self._task, completed=done, total=total, description=label)
            self.done = done
            return
        self.done = done
        line = f"[{done}/{total}] {label}"
        if 0 < done < total:
            elapsed = time.perf_counter() - self.started
            line += f", about {duration(elapsed / done * (total - done))} left"
        self.output.stderr.write(line + "\n")
        self.output.stderr.flush()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if self.live is not None:
            if kind is None:
                self.live.update(self._task, completed=self.total, description="done")
            self.live.stop()
        self.output._progress = None


def duration(seconds: float) -> str:
    """``"12 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Collection[int] = ()) -> str:
    """A plain-text table: columns separated by two spaces, ``right`` columns right-aligned, a
    dashed line under the headers, no trailing spaces."""
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows)]

    def line(cells: Sequence[str]) -> str:
        parts = [str(cell).rjust(w) if i in right else str(cell).ljust(w) for i, (cell, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])
