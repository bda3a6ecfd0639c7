"""The package layout stays acyclic: no module imports, at import time, a module that imports it
back (the schedule -> registry -> method -> schedule circle is gone and must not return)."""

from __future__ import annotations

import ast
from pathlib import Path

import tokred

ROOT = Path(tokred.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, level: int, name: str | None, package: str) -> str:
    if level == 0:
        return name or ""
    base = package.split(".")
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([name] if name else []))


def _import_time_edges() -> dict[str, set[str]]:
    """module -> the tokred modules it imports at module level (not under ``TYPE_CHECKING``, not
    inside functions)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(module, node.level, node.module, package)
                # "from . import compat" imports the module tokred.compat; "from .x import y" imports x.
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target.startswith("tokred") and target != module:
                    edges[module].add(target)
    return edges


def test_no_import_cycles_between_modules() -> None:
    edges = _import_time_edges()
    # A package importing its own submodules (tokred -> tokred.runtime) is not a cycle of concern;
    # what must not happen is two modules needing each other to finish importing.
    def reaches(start: str, goal: str) -> list[str] | None:
        stack, seen = [(start, [start])], {start}
        while stack:
            node, path = stack.pop()
            for nxt in edges.get(node, ()):
                if nxt == goal:
                    return path + [nxt]
                if nxt not in seen and not goal.startswith(nxt + "."):
                    seen.add(nxt)
                    stack.append((nxt, path + [nxt]))
        return None

    cycles = []
    for module, targets in edges.items():
        for target in targets:
            if module.startswith(target + "."):
                continue  # a submodule importing its parent package's already-initialised names
            back = reaches(target, module)
            if back is not None and not any(module.startswith(m + ".") for m in back[1:-1]):
                cycles.append(" -> ".join([module, *back]))
    assert not cycles, "import cycles:\n" + "\n".join(sorted(cycles)[:10])


def test_the_schedule_does_not_import_the_registry_at_import_time() -> None:
    edges = _import_time_edges()
    assert "tokred.registry" not in edges["tokred.schedule"]
    assert "tokred.schedule" not in edges["tokred.method"]
