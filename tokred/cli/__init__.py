"""The ``tokred`` command line: ``tokred list``, ``run``, ``demo``, ``bench``, ``eval``, ``show`` and ``doctor``.

* ``list`` shows every registered method, adapter, selector and gate with the plugin and
  distribution that provided it, and the plugins that failed to load.
* ``run`` answers one prompt about one or more images with a reduced model (a checkpoint or an
  offline preset) and prints the answer and the run report.
* ``demo`` needs no download: it loads the trained synthetic proxy (or builds a tiny random-weight
  model) and compares every registered method with the unreduced model (visual tokens per layer,
  prefill speed-up, a few generated tokens).
* ``bench`` measures methods and budgets on a model or a random-weight size preset: speed-up over
  the unreduced model and overhead over the ideal, FLOPs, KV-cache bytes, peak memory
  (:mod:`tokred.bench`); ``bench --scaling`` times Selectors alone against ``N`` and ``k``.
* ``eval`` answers a task's items with every method at every budget and reports accuracy,
  retention and agreement next to the prefill speed-up (:mod:`tokred.eval`).
* ``show`` draws the image with the visual tokens a method kept (:mod:`tokred.show`).
* ``doctor`` checks the installation: versions, the transformers internals tokred depends on
  (:mod:`tokred.compat`), the plugins.

:func:`main` returns an exit status instead of exiting, so it can be called in-process; every
command takes the :class:`~tokred.Registry` to use, so tests and embedding code can pass their own.
Errors a user can cause print one ``tokred: error: ...`` line on stderr (then, indented, the valid
options where an option was wrong) and return 2; usage errors, unknown method names and unknown
options name the closest valid one (:func:`tokred.registry.suggest`, shared with the library).

Building the parser imports neither torch nor transformers (each command imports what it needs
when it runs), so ``tokred --help`` and ``tokred COMMAND --help`` answer at once.

One module per command (``_list``, ``_run``, ``_demo``, ``_bench``, ``_eval``, ``_show``, ``_doctor``, each
with ``add_parser(commands)`` and ``handle(args, registry, output)``), plus ``_common`` (the
parser class, argument types), ``_output`` (tables, progress, JSON) and ``_loading`` (models,
presets, images, methods, output paths).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Any, Sequence

from . import _bench, _demo, _doctor, _eval, _list, _run, _show
from ._common import CommandError, Parser
from ._output import Output

if TYPE_CHECKING:
    from ..registry import Registry

__all__ = ["main", "build_parser", "CommandError"]

_COMMANDS = (_list, _run, _demo, _bench, _eval, _show, _doctor)


def main(argv: Sequence[str] | None = None, *, registry: Registry | None = None) -> int:
    """Run the ``tokred`` command line and return its exit status.

    Args:
        argv: the arguments after the program name; default: ``sys.argv[1:]``.
        registry: the registry to list and create methods from; default:
            :func:`tokred.default_registry` (the installed plugins).

    Returns:
        0 on success; 2 for usage errors and for errors the user can fix (unknown method or option,
        impossible budget, unreadable input, a model that cannot be loaded); 1 when ``demo``,
        ``bench`` or ``eval`` had a method fail, or ``doctor`` found a problem; 130 when interrupted.
    """
    from ..errors import TokredError

    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help and usage errors: an in-process caller gets a status, not an exit
        return exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    output = Output(sys.stdout, sys.stderr)
    try:
        if registry is None:
            from ..registry import default_registry

            registry = default_registry()
        return int(args.handler(args, registry, output))
    except CommandError as exc:
        output.error(str(exc), exc.details)
        return 2
    except TokredError as exc:
        # The library's first line is the error; lines after it (the valid options) are its details.
        message, *details = str(exc).splitlines() or [""]
        output.error(message, [line.removeprefix("  ") for line in details])
        return 2
    except KeyboardInterrupt:
        output.stderr.write("tokred: interrupted\n")
        return 130
    except BrokenPipeError:
        # The reader left early (`tokred list --json | head`); send the rest of stdout, including
        # the interpreter's final flush, to devnull instead of failing again.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file (captured in-process)
            pass
        return 1


def build_parser() -> Parser:
    """The argument parser of the ``tokred`` command and its subcommands."""
    parser = Parser(
        prog="tokred",
        description="Training-free visual-token reduction for vision-language models on transformers.",
        epilog=(
            "examples:\n"
            "  tokred list 'to*'\n"
            "  tokred demo\n"
            "  tokred run --preset tiny --method todre --keep 64\n"
            "  tokred bench --preset llava-135m --methods random,todre --keep 32,64\n"
            "  tokred show --preset tiny --method star --keep 32 -o kept.png\n\n"
            "Run 'tokred COMMAND --help' for the options of a command."
        ),
    )
    parser.add_argument("--version", action=_Version, help="print the versions of tokred, torch and transformers, and exit")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in _COMMANDS:
        command.add_parser(commands)
    return parser


class _Version(argparse.Action):
    """``--version``: like argparse's, but the text is read only when asked for (package metadata
    and :mod:`tokred.compat` are not needed for anything else at start-up)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        sys.stdout.write(_version_text() + "\n")
        parser.exit()


def _version_text() -> str:
    """tokred's, torch's and transformers' versions, read from package metadata (nothing imported)."""
    from .. import __version__, compat

    transformers = compat.transformers_version()
    tested = "within" if compat.in_tested_range(transformers) else "OUTSIDE"
    low, high = compat.TESTED_TRANSFORMERS
    return (f"tokred {__version__}\ntorch {compat.torch_version()}\n"
            f"transformers {transformers} ({tested} the tested range {low} to {high})")
