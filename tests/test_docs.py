"""Documentation code is executed, and every page's included file exists."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_custom_selector_recipe_runs(capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(ROOT / "docs/examples/custom_selector.py"), run_name="__main__")
    assert capsys.readouterr().out.strip() == "[32]"


def test_every_included_snippet_exists() -> None:
    for page in (ROOT / "docs").rglob("*.md"):
        for included in re.findall(r'--8<-- "([^"]+)"', page.read_text()):
            assert (ROOT / included).is_file(), f"{page.relative_to(ROOT)} includes missing {included}"


def test_every_registered_method_has_a_page() -> None:
    import tokred

    for name in tokred.default_registry().list_methods():
        assert (ROOT / f"docs/methods/{name}.md").is_file(), f"method {name} has no docs page"
