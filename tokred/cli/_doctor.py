"""``tokred doctor``: versions, the transformers (and, where installed, vLLM) internals tokred depends on, the plugins."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from ._common import add_command

if TYPE_CHECKING:
    from ..registry import Registry
    from ._output import Output

__all__ = ["add_parser", "handle"]


def add_parser(commands: Any) -> None:
    p = add_command(
        commands, "doctor", help="check the installation: versions, transformers internals, plugins",
        description=(
            "Print the versions of tokred, Python, torch and transformers, whether that transformers\n"
            "release lies in the range tokred is tested with, every transformers-internal name tokred\n"
            "depends on (tokred.compat) and whether the installed release has it, the same for vLLM where\n"
            "it is installed (tokred.integrations.vllm._compat), and the plugins that loaded or failed.\n"
            "Exits with 1 when a name is missing or a plugin failed."
        ),
        epilog="examples:\n  tokred doctor\n  tokred doctor --json",
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(handler=handle)


def handle(args: argparse.Namespace, registry: Registry, output: Output) -> int:
    import platform

    import torch

    from .. import __version__, compat

    checks = _rows(compat.check_transformers())
    failures = registry.errors
    plugins = sorted({e.plugin for kind in ("method", "adapter", "selector", "gate")
                      for e in registry.entries(kind)})  # type: ignore[arg-type]
    report = {
        "tokred": __version__, "python": platform.python_version(), "torch": compat.torch_version(),
        "cuda": torch.cuda.is_available(), "transformers": compat.transformers_version(),
        "transformers_tested_range": list(compat.TESTED_TRANSFORMERS),
        "transformers_in_tested_range": compat.in_tested_range(),
        "transformers_names": checks, "plugins": plugins, "plugin_errors": [str(f) for f in failures],
    }
    report["vllm"] = vllm = _vllm_report()
    healthy = all(c["ok"] for c in checks) and not failures and (vllm is None or all(c["ok"] for c in vllm["names"]))
    if args.json:
        output.json(report)
        return 0 if healthy else 1
    low, high = compat.TESTED_TRANSFORMERS
    in_range = report["transformers_in_tested_range"]
    rows = [
        ["tokred", __version__], ["python", report["python"]],
        ["torch", f"{report['torch']} (CUDA {'available' if report['cuda'] else 'not available'})"],
        ["transformers", f"{report['transformers']} ({'within' if in_range else 'OUTSIDE'} the tested range {low} to {high})"],
    ]
    lines = [output.table(["package", "version"], rows), ""]
    lines.append(output.heading(f"transformers internals tokred depends on ({sum(c['ok'] for c in checks)} of "
                                f"{len(checks)} found)"))
    lines += _check_lines(output, checks)
    if vllm is not None:
        names = vllm["names"]
        lines.append("")
        lines.append(output.heading(f"{vllm['distribution']} {vllm['version']} ("
                                    f"{'a tested release' if vllm['in_tested'] else 'NOT a tested release'}; tested: "
                                    f"{', '.join(vllm['tested']) or 'none'}): vLLM internals tokred depends on "
                                    f"({sum(c['ok'] for c in names)} of {len(names)} found)"))
        lines += _check_lines(output, names)
    lines.append(f"\n{output.heading('plugins')}: {', '.join(plugins) or 'none'}")
    lines += [f"  {output.style('FAILED', 'bold red')}  {failure}" for failure in failures]
    if not in_range:
        lines.append(f"\nnote: transformers {report['transformers']} is not a release tokred was tested with; "
                     f"`pip install '{compat.tested_requirement()}'` installs one that is")
    output.print("\n".join(lines))
    return 0 if healthy else 1


def _vllm_report() -> dict[str, Any] | None:
    """The installed vLLM distribution and release, whether it is a tested one, and every vLLM name
    and hook the integration needs (:func:`tokred.integrations.vllm._compat.check_vllm`); ``None``
    where vLLM is not installed."""
    from ..integrations.vllm.versions import TESTED_VLLM, vllm_distribution, vllm_version

    distribution = vllm_distribution()
    if distribution is None:
        return None
    from ..integrations.vllm import _compat

    version = vllm_version()
    tested = list(TESTED_VLLM.get(distribution, ()))
    names = _rows(_compat.check_vllm())
    return {"distribution": distribution, "version": version, "tested": tested, "in_tested": version in tested,
            "names": names}


def _rows(results: list[tuple[Any, str | None]]) -> list[dict[str, Any]]:
    """``(requirement, problem or None)`` pairs (transformers' or vLLM's) as the report's rows."""
    return [{"name": r.name, "ok": problem is None, "problem": problem} for r, problem in results]


def _check_lines(output: Output, rows: list[dict[str, Any]]) -> list[str]:
    """One line per row: ``ok`` or ``MISSING`` with what is missing."""
    lines = []
    for row in rows:
        mark = output.style("ok     ", "green") if row["ok"] else output.style("MISSING", "bold red")
        lines.append(f"  {mark}  {row['name']}" + ("" if row["ok"] else f": {row['problem']}"))
    return lines
