"""What a new reader of the documentation site sees first: every recipe linked from the home page,
the repository in the header, code blocks that wrap instead of being clipped."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _mkdocs() -> dict:
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def _nav_section(nav: list, title: str) -> list[str]:
    for item in nav:
        if isinstance(item, dict) and title in item:
            return [page for entry in item[title] for page in (entry.values() if isinstance(entry, dict) else [entry])]
    raise AssertionError(f"mkdocs.yml has no nav section {title!r}")


def test_the_home_page_links_every_recipe_in_the_navigation() -> None:
    recipes = _nav_section(_mkdocs()["nav"], "Recipes")
    assert len(recipes) >= 9
    home = (ROOT / "docs/index.md").read_text()
    missing = [page for page in recipes if f"]({page})" not in home]
    assert not missing, f"docs/index.md does not link the recipes {missing}"


def test_the_header_links_the_repository() -> None:
    config = _mkdocs()
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", config["repo_url"])
    assert config["repo_name"] == config["repo_url"].removeprefix("https://github.com/")


def test_code_blocks_wrap_long_lines() -> None:
    sheets = _mkdocs()["extra_css"]
    css = "".join((ROOT / "docs" / sheet).read_text() for sheet in sheets)
    assert re.search(r"pre\s*>\s*code\s*\{[^}]*white-space:\s*pre-wrap", css)
