"""``tokred list`` shows STAR as provided by tokred-star; ``tokred demo`` runs it."""

from __future__ import annotations

import json

import pytest
from tokred.cli import main


def _rows(text: str, section: str) -> dict[str, str]:
    """``name -> row`` of one ``tokred list`` section."""
    lines = text.splitlines()
    start = lines.index(section) + 1
    rows = {}
    for line in lines[start:]:
        if not line.strip():
            break
        rows[line.split()[0]] = line
    return rows


def test_list_shows_star_provided_by_tokred_star(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "star (tokred-star)" in _rows(out, "methods")["star"]
    assert "STAR" in _rows(out, "methods")["star"]
    assert "star (tokred-star)" in _rows(out, "selectors")["star.self_attention"]
    assert "star (tokred-star)" in _rows(out, "gates")["star.cross_attention"]
    assert "tokred-star" not in out.partition("plugins that failed to load")[2]


def test_list_json_shows_star_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "--json", "--pattern", "star*"]) == 0
    data = json.loads(capsys.readouterr().out)
    (star,) = data["methods"]
    assert (star["name"], star["distribution"]) == ("star", "tokred-star")
    assert {"keep", "keep_ratio", "stage1_keep", "stage1_keep_ratio", "gate_layer", "stage1", "stage2"} <= set(star["options"])
    assert star["options"]["gate_layer"]["default"] == "1/4"


def test_demo_includes_star(capsys: pytest.CaptureFixture[str]) -> None:
    # The random-weight tiny LLaVA (8 layers, 576 tokens), not the proxy the demo uses by default.
    assert main(["demo", "--family", "llava", "--json", "--repeats", "1"]) in (0, 1)  # 1: another plugin failed
    rows = {row["method"]: row for row in json.loads(capsys.readouterr().out)["rows"]}
    star = rows["star"]
    assert star["error"] is None
    # keep_ratio 0.1 of 576: stage I keeps 115 (twice the ratio), 58 from layer 2 of 8 on.
    assert (star["visual_tokens_in"], star["entering_llm"], star["last_layer"]) == (576, 115, 58)
    assert star["equivalent_visual_tokens"] == pytest.approx((2 * 115 + 6 * 58) / 8)
