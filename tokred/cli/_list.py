"""``tokred list [PATTERN ...]``: what the installed plugins registered, and who provided it."""

from __future__ import annotations

import argparse
import fnmatch
import inspect
from typing import TYPE_CHECKING, Any, Callable

from ._common import add_command, split_list
from ._output import plain_text

if TYPE_CHECKING:
    from ..registry import Entry, Kind, Registry
    from ._output import Output

__all__ = ["add_parser", "handle"]

# (section title, registry kind, how to describe one entry in a line)
_SECTIONS: tuple[tuple[str, Kind, Callable[[Entry], str]], ...] = (
    ("methods", "method", lambda e: e.obj.describe()),  # type: ignore[attr-defined]
    ("adapters", "adapter", lambda e: ", ".join(e.obj.model_classes)),  # type: ignore[attr-defined]
    ("selectors", "selector", lambda e: _doc_summary(e.obj)),
    ("gates", "gate", lambda e: _doc_summary(e.obj)),
)


def add_parser(commands: Any) -> None:
    p = add_command(
        commands, "list", help="list registered methods, adapters, selectors and gates",
        description=(
            "List what the installed plugins registered: methods (what 'tokred run --method' takes),\n"
            "adapters (the supported model families), and the selectors (stage I) and gates\n"
            "(stage II) that methods are built from. Each row names the plugin and the distribution\n"
            "that provided it. Plugins that failed to load are listed at the end; the others still work.\n"
            "In a pipe the tables are plain text, one line per row. Descriptions are shown without\n"
            "their docstring markup (``k`` reads k); --json gives them as written."
        ),
        epilog=(
            "examples:\n  tokred list\n  tokred list 'to*'\n  tokred list 'fast*,rand*'\n"
            "  tokred list --json | jq '.methods[].name'"
        ),
    )
    p.add_argument("patterns", nargs="*", metavar="PATTERN",
                   help="show only names matching one of these fnmatch patterns; several can be given, "
                        "separated by spaces or commas (default: all)")
    p.add_argument("--pattern", action="append", default=[], metavar="GLOB",
                   help="the same as PATTERN (repeatable)")
    p.add_argument("--json", action="store_true",
                   help="print JSON instead of tables: every entry with its options, and the plugin errors")
    p.set_defaults(handler=handle)


def _patterns(args: argparse.Namespace) -> list[str]:
    patterns = [p for text in [*args.patterns, *args.pattern] for p in split_list(text)]
    return patterns or ["*"]


def handle(args: argparse.Namespace, registry: Registry, output: Output) -> int:
    patterns = _patterns(args)
    sections = {
        title: [_entry_record(e, describe) for e in registry.entries(kind)
                if any(fnmatch.fnmatchcase(e.name, p) for p in patterns)]
        for title, kind, describe in _SECTIONS
    }
    failures = registry.errors
    if args.json:
        data: dict[str, Any] = dict(sections)
        data["plugin_errors"] = [
            {"plugin": f.plugin, "distribution": f.distribution, "hook": f.hook,
             "error": f"{type(f.error).__name__}: {f.error}", "message": str(f)}
            for f in failures
        ]
        output.json(data)
        return 0
    shown = ", ".join(repr(p) for p in patterns)
    blocks = []
    for title, records in sections.items():
        if records:
            # Descriptions are docstring summaries: their markup (``k``) is for the docs, not the terminal.
            rows = [[_name_with_aliases(r), _provider(r), plain_text(r["description"])] for r in records]
            body = output.table(["name", "provided by", "description"], rows, indent=2)
        else:
            body = "  (none" + (f" matching {shown})" if patterns != ["*"] else ")")
        blocks.append(f"{output.heading(title)}\n{body}")
    if failures:
        lines = "\n".join(f"  {output.style(str(f), 'red')}" for f in failures)
        blocks.append(f"{output.heading('plugins that failed to load')}\n{lines}")
    output.print("\n\n".join(blocks))
    return 0


def _entry_record(entry: Entry, describe: Callable[[Entry], str]) -> dict[str, Any]:
    record: dict[str, Any] = {
        "name": entry.name, "aliases": list(entry.aliases), "plugin": entry.plugin,
        "distribution": entry.distribution, "description": describe(entry),
    }
    fields = getattr(entry.obj, "model_fields", None)
    if fields is not None:  # options are what 'tokred run --option' accepts; adapters have none
        record["options"] = {
            n: {"required": f.is_required(), "default": None if f.is_required() else f.default,
                "description": f.description}
            for n, f in fields.items()
        }
    return record


def _name_with_aliases(record: dict[str, Any]) -> str:
    aliases = record["aliases"]
    return record["name"] + (f" (alias: {', '.join(aliases)})" if aliases else "")


def _provider(record: dict[str, Any]) -> str:
    # Plugins passed in-process (Registry(plugins=...)) have no distribution.
    dist = record["distribution"]
    return f"{record['plugin']} ({dist})" if dist else f"{record['plugin']} (in-process)"


def _doc_summary(obj: type) -> str:
    """The first paragraph of the class docstring on one line: summaries often wrap over lines."""
    return " ".join(inspect.cleandoc(obj.__doc__ or "").split("\n\n")[0].split())
