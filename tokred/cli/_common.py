"""What every command shares: the error type, the argument parser class that suggests corrections,
and the argument types (lists given with commas or spaces, ``KEY=VALUE`` options, counts).

Nothing here imports torch, transformers or pydantic: building the parser for ``--help`` must stay
cheap.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Callable, Iterable, Sequence

__all__ = [
    "CommandError", "Parser", "ListAction", "DEMO_PROMPT", "DTYPES", "positive_int", "parse_option",
    "number", "split_list", "split_paths", "suggest", "add_command",
]

#: The prompt of ``demo``, and of ``run``, ``bench`` and ``show`` when none is given.
DEMO_PROMPT = "What is shown in this image?"
#: What ``--dtype`` takes.
DTYPES = ("auto", "float32", "bfloat16", "float16")


class CommandError(Exception):
    """A problem with the command's inputs that is not a tokred library error (an unreadable image,
    a model that cannot be loaded, a device that is not there); reported like a
    :class:`~tokred.TokredError`: one ``tokred: error: ...`` line on stderr, exit status 2.

    Args:
        message: the one-line error.
        details: lines printed after it, indented (e.g. the valid options, one per line).
    """

    def __init__(self, message: str, *, details: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.details = tuple(details)


def suggest(word: str, candidates: Iterable[str], *, cutoff: float = 0.6) -> str | None:
    """The candidate closest to ``word``, or ``None`` when none is close: the registry's
    :func:`tokred.registry.suggest`, so that the command line and the library suggest alike. It is
    imported on the first call (an error), not when the parser is built."""
    from ..registry import suggest as registry_suggest

    return registry_suggest(word, candidates, cutoff=cutoff)


class Parser(argparse.ArgumentParser):
    """An :class:`argparse.ArgumentParser` whose errors suggest what was probably meant.

    * an unknown flag of a subcommand is reported by that subcommand (its own usage line), with the
      closest of its own flags: ``unrecognized arguments: --kep 64; did you mean '--keep'?``;
    * a misspelled subcommand or choice: ``invalid choice 'lsit' ...; did you mean 'list'?``.

    Descriptions and epilogs are printed as written (their examples keep their lines).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    @property
    def commands(self) -> dict[str, argparse.ArgumentParser]:
        """The subcommands' parsers by name (empty for a parser without subcommands)."""
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                return dict(action.choices)
        return {}

    def parse_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None) -> Any:  # type: ignore[override]
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            command = self.commands.get(getattr(namespace, "command", None) or "", self)
            command.error(self._unrecognized(extras, command))  # the subcommand's usage, not the top level's
        return namespace

    def _unrecognized(self, extras: list[str], command: argparse.ArgumentParser) -> str:
        message = f"unrecognized arguments: {' '.join(extras)}"
        own = [s for action in command._actions for s in action.option_strings if s not in ("-h", "--help")]
        hints = []
        for token in extras:
            if not token.startswith("-") or token == "-":
                continue
            flag = token.split("=", 1)[0]
            elsewhere = sorted(name for name, p in self.commands.items()
                               if p is not command and any(flag in a.option_strings for a in p._actions))
            close = suggest(flag, own, cutoff=0.7)
            if elsewhere:  # a real flag, of another command: say so rather than guess a near one
                hints.append(f"{flag} is an option of " + ", ".join(f"'tokred {name}'" for name in elsewhere))
            elif close is not None:
                hints.append(f"did you mean {close!r}?")
        return "; ".join([message, *hints])

    def _check_value(self, action: argparse.Action, value: Any) -> None:
        # argparse's own message lists the choices; add the closest one, as git does for commands.
        if action.choices is not None and value not in action.choices:
            choices = [str(c) for c in action.choices]
            what = "command" if isinstance(action, argparse._SubParsersAction) else "choice"
            message = f"invalid {what} {value!r} (choose from {', '.join(map(repr, choices))})"
            close = suggest(str(value), choices)
            if close is not None:
                message += f"; did you mean {close!r}?"
            raise argparse.ArgumentError(action, message)
        super()._check_value(action, value)


def add_command(commands: Any, name: str, *, help: str, description: str, epilog: str) -> Parser:
    """A subcommand parser (a :class:`Parser`, as the top-level one) under ``commands``."""
    parser: Parser = commands.add_parser(name, help=help, description=description, epilog=epilog)
    return parser


def split_list(text: str) -> list[str]:
    """``"random,todre"`` -> ``["random", "todre"]``; commas inside ``[...]`` (fnmatch sets) stay."""
    parts, current, depth = [], [], 0
    for char in text:
        if char == "[":
            depth += 1
        elif char == "]" and depth:
            depth -= 1
        if char == "," and not depth:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part.strip() for part in parts if part.strip()]


def split_paths(text: str) -> list[str]:
    """``"a.png,b.png"`` -> ``["a.png", "b.png"]``, as :func:`split_list` splits names; but a value
    that is an existing file (a name with a comma in it, ``"cat, dog.png"``) is one path, whole."""
    if os.path.isfile(text):
        return [text]
    return [part.strip() for part in text.split(",") if part.strip()]


class ListAction(argparse.Action):
    """A flag that takes a list: values separated by spaces (``--keep 32 64``), by commas
    (``--keep 32,64``) or both, and repeated flags (``--keep 32 --keep 64``) add up. A given list
    replaces the default instead of extending it.

    Args:
        element: converts one item (``int``, :func:`positive_int`, ``float``, ``str``, ``Path``); an
            :class:`argparse.ArgumentTypeError` or ``ValueError`` it raises becomes a usage error.
        split: cuts one value into items: :func:`split_list` (names, patterns, numbers), or
            :func:`split_paths` for files (an existing file stays whole).
    """

    def __init__(self, option_strings: Sequence[str], dest: str, *, element: Callable[[str], Any] = str,
                 split: Callable[[str], list[str]] = split_list, nargs: str = "+", **kwargs: Any) -> None:
        self.element = element
        self.split = split
        super().__init__(option_strings, dest, nargs=nargs, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        items = []
        for value in values if isinstance(values, list) else [values]:
            for part in self.split(value):
                try:
                    items.append(self.element(part))
                except (argparse.ArgumentTypeError, ValueError) as exc:
                    raise argparse.ArgumentError(self, f"invalid value {part!r}: {exc}") from None
        if not items and values:
            raise argparse.ArgumentError(self, f"expected at least one value, got {' '.join(values)!r}")
        current = getattr(namespace, self.dest, None)
        previous = [] if current is None or current is self.default else list(current)
        setattr(namespace, self.dest, previous + items)


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def number(text: str) -> float:
    """A decimal number (``0.1``)."""
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def parse_option(text: str) -> tuple[str, Any]:
    """``"tau=0.1"`` -> ``("tau", 0.1)``; values that are not JSON stay strings."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.strip(), json.loads(value)
    except json.JSONDecodeError:
        return key.strip(), value
