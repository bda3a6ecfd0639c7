"""The documentation cannot rot: its code runs, its reference covers what is registered, it builds.

* every recipe file under docs/examples/ and the getting-started example run, with assertions on
  what they report (visual tokens per layer, kept indices);
* every method, selector, gate and adapter registered by this repository's distributions, every
  hook specification and every name ``tokred`` exports has a ``:::`` entry in docs/reference/;
* every included file exists, and ``mkdocs build --strict`` passes.
"""

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


def project_distributions() -> set[str]:
    """The distributions this repository ships: the core and every plugin under plugins/."""
    names = set()
    for pyproject in [ROOT / "pyproject.toml", *sorted(ROOT.glob("plugins/*/pyproject.toml"))]:
        match = re.search(r'^name\s*=\s*"([^"]+)"', pyproject.read_text(), flags=re.MULTILINE)
        assert match, f"{pyproject} has no project name"
        names.add(match.group(1))
    return names


def project_entries(kind: str) -> list:
    """Registry entries of ``kind`` provided by this repository's distributions. Plugins installed
    from elsewhere into the same environment (a third-party method, the plugin-writing example)
    are not this site's to document."""
    import tokred

    registry = tokred.default_registry()
    assert not [e for e in registry.errors if e.distribution in project_distributions()], registry.errors
    return [entry for entry in registry.entries(kind) if entry.distribution in project_distributions()]


def test_the_repository_distributions_are_installed() -> None:
    import tokred

    registry = tokred.default_registry()
    providers = {e.distribution for kind in ("method", "adapter") for e in registry.entries(kind)}
    assert project_distributions() <= providers, "install the core and every plugin under plugins/"


def test_every_registered_method_has_a_page() -> None:
    for entry in project_entries("method"):
        assert (ROOT / f"docs/methods/{entry.name}.md").is_file(), f"method {entry.name} has no docs page"


# ------------------------------------------------------------------ API reference coverage

_DIRECTIVE = re.compile(r"^:::[ \t]+(?P<path>[\w.]+)[ \t]*$")


def _members_option(lines: list[str]) -> list[str] | None:
    """The ``members`` option of one ``:::`` directive's indented YAML block: ``None`` when absent
    (every public member is rendered), ``[]`` for ``members: false``, else the listed names."""
    for i, line in enumerate(lines):
        key, _, value = line.strip().partition(":")
        if key != "members":
            continue
        value = value.strip()
        if value in ("false", "False", "no"):
            return []
        if value.startswith("["):
            return [name.strip() for name in value.strip("[]").split(",") if name.strip()]
        if value in ("true", "True", "yes"):
            return None
        indent = len(line) - len(line.lstrip())
        names = []
        for item in lines[i + 1:]:
            if len(item) - len(item.lstrip()) <= indent or not item.strip().startswith("- "):
                break
            names.append(item.strip()[2:].strip())
        return names
    return None


def reference_directives() -> list[tuple[str, list[str] | None, str]]:
    """``(python path, members option, page)`` of every ``:::`` directive in docs/reference/."""
    found = []
    for page in sorted((ROOT / "docs/reference").glob("*.md")):
        lines = page.read_text().splitlines()
        for i, line in enumerate(lines):
            match = _DIRECTIVE.match(line)
            if match is None:
                continue
            block = []
            for following in lines[i + 1:]:
                if following.strip() and not following.startswith((" ", "\t")):
                    break
                block.append(following)
            found.append((match["path"], _members_option(block), page.name))
    return found


def _import_path(path: str) -> object:
    """The object a dotted path names: the longest importable module prefix, then attributes."""
    import importlib

    parts = path.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            obj = getattr(obj, name)
        return obj
    raise ModuleNotFoundError(path)


def documented_objects() -> dict[int, str]:
    """``id(obj) -> page`` for every object the reference renders: objects named by a directive and
    the public members (``__all__``, or the ``members`` option) of modules named by one."""
    import inspect

    documented: dict[int, str] = {}
    for path, members, page in reference_directives():
        obj = _import_path(path)
        documented[id(obj)] = page
        if not inspect.ismodule(obj):
            continue
        if members is None:
            members = list(getattr(obj, "__all__", [n for n in vars(obj) if not n.startswith("_")]))
        for name in members:
            documented[id(getattr(obj, name))] = page
    return documented


def test_every_reference_directive_names_an_importable_object() -> None:
    directives = reference_directives()
    assert len(directives) > 20
    for path, members, page in directives:
        obj = _import_path(path)  # raises for a typo or a renamed object
        for name in members or ():
            assert hasattr(obj, name), f"docs/reference/{page}: {path} has no member {name!r}"


def test_every_registered_component_has_a_reference_entry() -> None:
    documented = documented_objects()
    missing = [
        f"{entry.kind} {entry.name!r} ({entry.obj.__module__}.{entry.obj.__qualname__})"
        for kind in ("method", "selector", "gate", "adapter")
        for entry in project_entries(kind)
        if id(entry.obj) not in documented
    ]
    assert not missing, "no ::: directive in docs/reference/ documents: " + ", ".join(missing)
    # mkdocstrings leaves out objects without a docstring of their own.
    undocumented = [
        entry.name for kind in ("method", "selector", "gate", "adapter") for entry in project_entries(kind)
        if not (vars(entry.obj).get("__doc__") or "").strip()
    ]
    assert not undocumented, f"registered classes without a docstring: {undocumented}"


def test_every_registered_name_is_listed_in_the_reference_tables() -> None:
    pages = {"adapter": "adapters.md", "method": "methods.md", "selector": "methods.md", "gate": "methods.md"}
    for kind, page in pages.items():
        text = (ROOT / "docs/reference" / page).read_text()
        for entry in project_entries(kind):
            assert f"| `{entry.name}`" in text, f"{kind} {entry.name!r} is missing from the table in docs/reference/{page}"


def test_every_hook_specification_has_a_reference_entry() -> None:
    import inspect

    from tokred import hookspecs

    hooks = [
        function for name, function in inspect.getmembers(hookspecs, inspect.isfunction)
        if hasattr(function, f"{hookspecs.PROJECT_NAME}_spec")
    ]
    assert {h.__name__ for h in hooks} >= {"tokred_register_methods", "tokred_register_adapters"}
    documented = documented_objects()
    missing = [hook.__name__ for hook in hooks if id(hook) not in documented or not (hook.__doc__ or "").strip()]
    assert not missing, f"hook specifications without a documented reference entry: {missing}"


def test_the_public_api_has_a_reference_entry() -> None:
    import tokred

    documented = documented_objects()
    missing = [name for name in tokred.__all__ if name != "__version__" and id(getattr(tokred, name)) not in documented]
    assert not missing, f"names exported by tokred without a reference entry: {missing}"


# ------------------------------------------------------------------ getting started and recipes

def test_getting_started_example_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    import transformers

    from tokred.testing import make_image, tiny_model

    page = (ROOT / "docs/getting-started.md").read_text()
    match = re.search(r"<!-- getting-started-example[^>]*-->\s*```python\n(.*?)```", page, re.S)
    assert match, "docs/getting-started.md has no python block after <!-- getting-started-example -->"
    model, processor = tiny_model("llava")  # stands in for the checkpoint the page names
    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "from_pretrained", classmethod(lambda cls, *a, **k: model))
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", classmethod(lambda cls, *a, **k: processor))
    monkeypatch.chdir(tmp_path)
    make_image().save("cat.jpg")
    namespace: dict = {}
    exec(compile(match.group(1), "docs/getting-started.md", "exec"), namespace)
    assert "tokred run: todre on llava" in capsys.readouterr().out
    assert namespace["run"].report.visual_tokens_per_layer == [[58]] * 8  # keep_ratio=0.1 of 576
    assert not namespace["run"].active  # the hooks are gone after the block



def run_example(name: str) -> dict:
    """Execute docs/examples/<name> as a script; return its global variables."""
    return runpy.run_path(str(ROOT / "docs/examples" / name), run_name="__main__")


def test_recipes_are_included_and_in_the_navigation() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    for recipe in ("llava_todre", "qwen2_5_vl_star", "todre_then_star", "batch_inference", "measuring_speedup",
                   "tiled_budgets", "qwen2_5_vl_video"):
        page = ROOT / f"docs/recipes/{recipe.replace('tiled_budgets', 'tiled-budgets')}.md"
        assert f'--8<-- "docs/examples/{recipe}.py"' in page.read_text(), f"{page} does not include its example"
        assert f"recipes/{page.name}" in nav, f"recipes/{page.name} is not in the mkdocs.yml nav"


def test_llava_todre_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    g = run_example("llava_todre.py")
    report = g["run"].report
    # keep_ratio=0.1 of 576 rounds to 58; the gate (tau=0.1) does not fire on random weights.
    assert report.visual_tokens_per_layer == [[58]] * 8
    image = report.images[0]
    assert image.num_tokens == 576 and len(image.kept_stage1) == 58
    assert image.kept_stage1 == sorted(set(image.kept_stage1)) and image.kept_final == image.kept_stage1
    # tau=1.0 fires at depth 7/8 of the 8 layers: layer 7 sees no visual token.
    assert [layer[0] for layer in g["forced"].report.visual_tokens_per_layer] == [58] * 7 + [0]
    assert g["output"].shape[1] > g["inputs"]["input_ids"].shape[1]
    assert "entered the LLM: 58 of 576" in capsys.readouterr().out


def test_qwen2_5_vl_star_recipe() -> None:
    g = run_example("qwen2_5_vl_star.py")
    report = g["run"].report
    assert report.family == "qwen2_5_vl" and report.method == "star"
    assert report.visual_tokens_input == [144]
    # Stage I keeps twice the final budget; the gate at "1/4" of 8 layers is layer 2.
    assert g["per_layer"] == [48, 48] + [24] * 6
    assert report.equivalent_visual_tokens == [pytest.approx((2 * 48 + 6 * 24) / 8)]
    image = report.images[0]
    assert len(image.kept_final) == 24 and set(image.kept_final) <= set(image.kept_stage1)


def test_todre_then_star_recipe() -> None:
    import torch

    import tokred

    g = run_example("todre_then_star.py")
    assert g["per_layer"] == [128, 128] + [64] * 6
    schedule, model, inputs = g["schedule"], g["model"], g["inputs"]
    data = schedule.to_dict()
    assert (data["selector"]["name"], data["gates"][0]["name"]) == ("todre.diversity", "star.cross_attention")
    # Stage I is ToDRE's choice: the selector alone keeps the same tokens.
    with tokred.apply(model, schedule.model_copy(update={"gates": ()})) as alone, torch.no_grad():
        model(**inputs)
    image = g["run"].report.images[0]
    assert image.kept_stage1 == alone.report.images[0].kept_stage1
    assert len(image.kept_final) == 64 and set(image.kept_final) <= set(image.kept_stage1)


def test_batch_inference_recipe() -> None:
    g = run_example("batch_inference.py")  # the recipe itself checks each row against its prompt alone
    lengths = g["batch"]["attention_mask"].sum(1).tolist()
    assert lengths[0] != lengths[1], "the recipe should batch prompts of different lengths"
    assert g["batch"]["attention_mask"][0, 0] == 0, "shorter rows are padded on the left"
    assert g["answers"].shape == (2, 8)
    assert g["batched_layers"] == [[576, 576]] * 2 + [[64, 64]] * 6


def test_measuring_speedup_recipe() -> None:
    g = run_example("measuring_speedup.py")
    rows = g["rows"]
    assert [row["method"] for row in g["result"]["rows"]] == ["unreduced", "random", "fastv"]
    assert all(row["error"] is None for row in rows.values())
    assert rows["random"]["visual_tokens_per_layer"] == [64] * 8
    assert rows["fastv"]["visual_tokens_per_layer"] == [576, 576] + [64] * 6
    # The ideal computes what the tokred run computes; fewer tokens, fewer FLOPs.
    assert rows["random"]["ideal_same_tokens"] is True
    assert rows["random"]["ideal_logits_max_abs_diff"] < 1e-4
    assert rows["random"]["prefill_flops_ratio"] < rows["fastv"]["prefill_flops_ratio"] < 1
    # Speed is not asserted (shared machines are noisy); that every round produced a ratio is.
    assert rows["random"]["prefill_speedup"]["n"] == rows["fastv"]["generate_speedup"]["n"] == 3


def test_tiled_budgets_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    g = run_example("tiled_budgets.py")
    out = capsys.readouterr().out
    # A 2x2-tiled square image (thumbnail + 4 tiles of 144) and a 1x3-tiled tall one, newlines not counted.
    assert "keep=64: image 0 keeps 64 of 720" in out and "keep=64: image 1 keeps 64 of 576" in out
    assert "keep_ratio=0.1: image 0 keeps 72 of 720" in out and "keep_ratio=0.1: image 1 keeps 58 of 576" in out
    spread = g["spread"].report.images
    assert [image.kept_per_tile for image in spread] == [[13, 13, 13, 13, 12], [16, 16, 16, 16]]
    assert [image.tile_sizes for image in spread] == [[144] * 5, [144] * 4]
    assert "with newline tokens as candidates: [744, 612]" in out


def test_qwen2_5_vl_video_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("tokred_video", reason="the recipe needs the tokred-video plugin (plugins/video)")
    pytest.importorskip("tokred_todre", reason="the recipe needs the tokred-todre plugin (plugins/todre)")
    g = run_example("qwen2_5_vl_video.py")
    out = capsys.readouterr().out
    assert "video: 8 temporal patches of 8 x 8 tokens = 512 visual tokens" in out
    assert "todre: the video keeps 51 of 512" in out                    # 10% of the clip, rounded half up
    assert "visual tokens per decoder layer: [51, 51, 51, 51, 51, 51, 51, 51]" in out
    assert "evs: per frame [64, " in out                                 # the first temporal patch whole
    assert "evs, per_frame=True: per frame [16, 16, 16, 16, 16, 16, 16, 16]" in out
    record = g["run"].report.images[0]
    assert record.kind == "video" and record.tile_sizes == [64] * 8


def test_the_site_builds_in_strict_mode(tmp_path: Path) -> None:
    """Broken links, a missing page in the nav, an unresolvable ``:::`` target or a docstring that
    griffe cannot parse all fail the strict build."""
    import os
    import subprocess
    import sys

    pytest.importorskip("mkdocstrings", reason="the docs extra is not installed: pip install -e '.[docs]'")
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert build.returncode == 0, build.stderr[-4000:]
    reference = {page: page.read_text() for page in (tmp_path / "site/reference").glob("*/index.html")}
    assert len(reference) >= 10
    # docs/reference/griffe_docstrings.py turns the docstrings' Sphinx roles into links and shows
    # each pydantic option's description.
    leftovers = [str(page) for page, html in reference.items() if re.search(r":(class|func|meth|attr|mod|data):`", html)]
    assert not leftovers, f"Sphinx roles left in {leftovers}"
    methods = (tmp_path / "site/reference/methods/index.html").read_text()
    assert 'id="tokred_todre.ToDREMethod.tau"' in methods and "Stage-II threshold" in methods
