"""Shared helpers of the tokred-baselines tests: the authors' reference fixtures.

A test marked ``@pytest.mark.reference("divprune")`` that takes a ``case`` argument runs once per
case of ``fixtures/divprune.pt`` (see ``fixtures/README.md``), with the case's name as its id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

try:
    import tokred_baselines  # noqa: F401 - the distribution under test, registered through its entry point
except ImportError as exc:
    raise ImportError(
        "the tokred-baselines plugin is not installed; from the repository root run: "
        "pip install -c constraints.txt -e plugins/baselines"
    ) from exc

FIXTURES = Path(__file__).parent / "fixtures"


def load_fixture(method: str) -> dict[str, Any]:
    """``{"source": ..., "cases": {name: {key: value}}}`` of ``fixtures/<method>.pt``."""
    return torch.load(FIXTURES / f"{method}.pt", weights_only=True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "reference(method): parametrize `case` over fixtures/<method>.pt")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    marker = metafunc.definition.get_closest_marker("reference")
    if marker is not None and "case" in metafunc.fixturenames:
        data = load_fixture(marker.args[0])
        names = [name for name in data["cases"] if len(marker.args) < 2 or name in marker.args[1]]
        metafunc.parametrize("case", [data["cases"][name] for name in names], ids=names)
