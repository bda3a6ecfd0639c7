"""Start-up cost: ``tokred --help`` and ``tokred list`` import neither torch nor transformers.

``--help`` took 2.5 to 3.5 s and ``list`` about 5 s on an idle machine, nearly all of it importing
torch. Each check runs in a fresh interpreter, since this one has long imported everything.
"""

from __future__ import annotations

import json
import subprocess
import sys

_HEAVY = ("torch", "transformers", "pydantic", "rich")


def _fresh(code: str) -> dict:
    """Run ``code`` in a new interpreter; it prints one JSON object as its last line."""
    prelude = "import contextlib, io, json, sys\nheavy = lambda: sorted(m for m in %r if m in sys.modules)\n" % (_HEAVY,)
    done = subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def test_help_of_every_command_imports_neither_torch_nor_transformers() -> None:
    result = _fresh(
        "from tokred.cli import main\n"
        "codes = []\n"
        "for argv in (['--help'], ['--version'], *([c, '--help'] for c in ('list', 'run', 'demo', 'bench', 'eval', 'show', 'doctor'))):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        codes.append(main(argv))\n"
        "print(json.dumps({'codes': codes, 'heavy': heavy()}))\n"
    )
    assert result == {"codes": [0] * 9, "heavy": []}


def test_list_imports_no_torch_with_the_first_party_plugins() -> None:
    """The core's adapters and baselines and the ToDRE, STAR and video plugins import torch lazily. (A
    third-party plugin that imports torch at module level, as the example plugin does, still makes
    ``tokred list`` import it: the registry is this repository's distributions only.)"""
    result = _fresh(
        "import importlib.metadata, tokred\n"
        "from tokred.cli import main\n"
        "eps = [ep for ep in importlib.metadata.entry_points(group='tokred')\n"
        "       if ep.dist.name in ('tokred', 'tokred-todre', 'tokred-star', 'tokred-video')]\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    code = main(['list'], registry=tokred.Registry(entry_points=eps))\n"
        "print(json.dumps({'code': code, 'heavy': heavy(), 'out': out.getvalue()}))\n"
    )
    assert result["code"] == 0
    assert result["heavy"] == ["pydantic"]  # the methods' options are pydantic models
    for row in ("todre ", "star ", "fastv ", "llava_next ", "todre.diversity ", "star.cross_attention ", "evs ",
                "llava_onevision ", "llava_next_video "):
        assert any(line.strip().startswith(row) for line in result["out"].splitlines()), row
    assert "failed to load" not in result["out"]


def test_the_public_names_stay_importable_and_listed() -> None:
    """``tokred`` exposes its names lazily (PEP 562): ``from tokred import X``, ``tokred.X`` and
    ``dir(tokred)`` work as before, and torch is imported by the first name that needs it."""
    result = _fresh(
        "import tokred\n"
        "before = heavy()\n"
        "from tokred import Registry, create, list_methods\n"
        "names = [n for n in tokred.__all__ if getattr(tokred, n, None) is None]\n"
        "from tokred import apply, Run\n"
        "print(json.dumps({'before': before, 'missing': names, 'dir': sorted(set(tokred.__all__) - set(dir(tokred))),"
        " 'torch': 'torch' in sys.modules, 'apply': apply.__module__}))\n"
    )
    assert result["before"] == []
    assert result["missing"] == [] and result["dir"] == []
    assert result["torch"] and result["apply"] == "tokred.runtime._run"


def test_the_preset_names_are_read_without_importing_tokred_bench() -> None:
    result = _fresh(
        "from tokred.cli._loading import preset_catalogue\n"
        "names = preset_catalogue()\n"
        "light = 'tokred.bench' not in sys.modules and heavy() == []\n"
        "import tokred.bench\n"
        "same = names == {n: p.description for n, p in tokred.bench.PRESETS.items()}\n"
        "print(json.dumps({'light': light, 'same': same}))\n"
    )
    assert result == {"light": True, "same": True}
