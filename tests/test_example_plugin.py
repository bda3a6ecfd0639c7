"""The example plugin under examples/ is installed and tested by CI like a third-party plugin."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = "examples/tokred-example-plugin"


def _tokred(*args: str) -> str:
    """Run the ``tokred`` command of this environment in a fresh process, as a user would."""
    script = Path(sys.executable).with_name("tokred")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "tokred.cli"]
    done = subprocess.run([*command, *args], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def _rows(text: str, section: str) -> dict[str, str]:
    """``name -> row`` of one section of ``tokred list``."""
    lines = text.splitlines()
    rows = {}
    for line in lines[lines.index(section) + 1:]:
        if not line.strip():
            break
        rows[line.split()[0]] = line
    return rows


def test_tokred_list_shows_the_example_plugin() -> None:
    out = _tokred("list")
    assert "example (tokred-example-plugin)" in _rows(out, "methods")["example-norm"]
    assert "largest feature norm" in _rows(out, "methods")["example-norm"]
    assert "example (tokred-example-plugin)" in _rows(out, "selectors")["example.norm"]
    assert "plugins that failed to load" not in out


def test_tokred_list_json_shows_its_distribution_and_options() -> None:
    data = json.loads(_tokred("list", "--json", "--pattern", "example*"))
    (method,) = data["methods"]
    assert (method["name"], method["plugin"], method["distribution"]) == ("example-norm", "example", "tokred-example-plugin")
    assert {"keep", "keep_ratio", "center"} <= set(method["options"])
    assert method["options"]["center"]["default"] is False
    assert [s["name"] for s in data["selectors"]] == ["example.norm"]
    assert data["plugin_errors"] == []


def test_ci_installs_and_collects_the_example_plugin(pytestconfig: pytest.Config) -> None:
    readme = (ROOT / "README.md").read_text()
    command = re.search(r"<!-- ci:test-command[^>]*-->\s*```bash\n(.*?)```", readme, re.S)
    assert command is not None and f"-e {PLUGIN}" in command.group(1)
    assert "examples" in pytestconfig.getini("testpaths")
    (entry_point,) = [ep for ep in importlib.metadata.entry_points(group="tokred") if ep.name == "example"]
    assert (entry_point.value, entry_point.dist.name) == ("tokred_example.plugin", "tokred-example-plugin")
