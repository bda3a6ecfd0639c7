"""The README's example runs (on the tiny model standing in for the checkpoint it names)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import transformers

from tokred.testing import make_image, tiny_model

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(marker: str, language: str) -> str:
    text = README.read_text()
    match = re.search(rf"<!-- {re.escape(marker)}[^>]*-->\s*```{language}\n(.*?)```", text, re.S)
    assert match, f"README has no {language} block after <!-- {marker} -->"
    return match.group(1)


def test_readme_example_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, processor = tiny_model("llava")
    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "from_pretrained", classmethod(lambda cls, *a, **k: model))
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", classmethod(lambda cls, *a, **k: processor))
    monkeypatch.chdir(tmp_path)
    make_image().save("cat.jpg")
    exec(compile(readme_block("readme-example", "python"), "README.md", "exec"), {})
    output = capsys.readouterr().out
    assert "tokred run: fastv on llava" in output and "576 x2, 64 x6" in output


@pytest.mark.parametrize("marker", ["ci:demo-command", "ci:test-command"])
def test_readme_commands_use_the_torch_constraint(marker: str) -> None:
    command = readme_block(marker, "bash")
    assert "-c constraints.txt" in command and command.count("\n") == 1
