"""Loading: every failure is one ``tokred: error:`` line (exit 2) that says what was tried and what to
do, found before the expensive part (weights, the benchmark) wherever it can be."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import transformers
from huggingface_hub import constants, errors

import tokred
from tokred.cli import _loading, main
from tokred.cli._loading import check_keep, visual_token_counts

RUN = ["run", "--method", "random", "--keep", "8", "--max-new-tokens", "2"]


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], registry: tokred.Registry | None = None) -> str:
    """The single error line of a command that must fail with status 2 and no traceback."""
    assert main(argv, registry=registry) == 2
    captured = capsys.readouterr()
    errors_ = [line for line in captured.err.splitlines() if line.startswith("tokred: error:")]
    assert len(errors_) == 1, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return errors_[0]


@pytest.fixture
def no_weights_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if a checkpoint's weights are loaded."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained", refuse)


# ------------------------------------------------------------------------------------ --model


def test_a_directory_that_is_not_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    error = _one_line_error(capsys, [*RUN, "--model", str(tmp_path)])
    assert error == (f"tokred: error: {tmp_path} has no config.json: not a saved model (save one with "
                     "model.save_pretrained(DIR) and processor.save_pretrained(DIR), or give a Hub id such as "
                     "llava-hf/llava-1.5-7b-hf)")


def test_a_text_only_model_is_refused_before_its_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          no_weights_loaded: None) -> None:
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=2, vocab_size=64)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path)
    error = _one_line_error(capsys, [*RUN, "--model", str(tmp_path)])
    assert error == (f"tokred: error: {tmp_path} holds a text-only model (LlamaForCausalLM): tokred needs a "
                     "vision-language model such as LlavaForConditionalGeneration")


def test_a_vision_language_model_without_an_adapter_is_refused_before_its_weights(
    saved_llava: tuple[Path, Path], capsys: pytest.CaptureFixture[str], no_weights_loaded: None,
) -> None:
    import importlib.metadata

    methods_only = tokred.Registry(entry_points=[  # the baseline methods, but no adapter: no model is supported
        ep for ep in importlib.metadata.entry_points(group="tokred") if ep.name == "tokred-methods"])
    error = _one_line_error(capsys, [*RUN, "--model", str(saved_llava[0])], methods_only)
    assert "holds a LlavaForConditionalGeneration, which no tokred adapter handles" in error


@pytest.mark.parametrize("model", ["/nonexistent", "./no/such/dir", "a/b/c", "~/no-such-model-dir"])
def test_a_path_that_does_not_exist_and_is_no_hub_id(model: str, capsys: pytest.CaptureFixture[str]) -> None:
    error = _one_line_error(capsys, [*RUN, "--model", model])
    assert error == f"tokred: error: no such directory {model!r}, and {model!r} is not a Hub id (owner/name)"
    assert "Repo id must" not in error


def test_a_file_is_not_a_model_directory(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "weights.bin").write_bytes(b"")
    error = _one_line_error(capsys, [*RUN, "--model", str(tmp_path / "weights.bin")])
    assert "is a file, not a model directory" in error


def test_a_saved_model_without_processor_or_weights(saved_llava: tuple[Path, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    no_processor = tmp_path / "no-processor"
    no_processor.mkdir()
    for name in ("config.json", "model.safetensors"):
        (no_processor / name).write_bytes((saved_llava[0] / name).read_bytes())
    error = _one_line_error(capsys, [*RUN, "--model", str(no_processor)])
    assert error.endswith("has no processor (processor_config.json or preprocessor_config.json): save the model's "
                          "processor there with processor.save_pretrained(DIR)")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    for path in saved_llava[0].iterdir():
        if not path.name.endswith(".safetensors"):
            (no_weights / path.name).write_bytes(path.read_bytes())
    error = _one_line_error(capsys, [*RUN, "--model", str(no_weights)])
    assert "has a config.json but no weights (model.safetensors)" in error


@pytest.fixture
def hf_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty Hugging Face cache of the test's own (HF_HOME), online mode, and no other cache variable."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    return tmp_path / "hf-home"


def _hub_failure(monkeypatch: pytest.MonkeyPatch, cause: BaseException) -> None:
    """The Hub answers tokred's check, then AutoConfig.from_pretrained fails as transformers does when
    the Hub lookup fails with ``cause``."""
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files") from cause

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", fail)
    monkeypatch.setattr(_loading, "_hub_reachable", lambda endpoint, timeout=0.0: True)


def test_a_hub_failure_after_the_check_says_so_and_how_to_work_offline(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], hf_home: Path,
) -> None:
    _hub_failure(monkeypatch, errors.LocalEntryNotFoundError("no connection"))
    error = _one_line_error(capsys, [*RUN, "--model", "someone/some-model"])
    assert error.startswith("tokred: error: could not reach the Hugging Face Hub to download someone/some-model")
    assert "HF_HUB_OFFLINE=1 with a local path" in error


def _error_and_seconds(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[str, float]:
    """The one error line of a command, checked as :func:`_one_line_error` does, and how long it took."""
    started = time.perf_counter()
    error = _one_line_error(capsys, argv)
    return error, time.perf_counter() - started


def test_an_unreachable_hub_fails_at_once_with_one_clear_line(monkeypatch: pytest.MonkeyPatch, hf_home: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """No network (nothing listens on the endpoint): one line within seconds, not the Hub client's
    retries (10 lines, about 30 s). The endpoint and the cache are read when the command runs."""
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    error, seconds = _error_and_seconds(capsys, [*RUN, "--model", "llava-hf/llava-1.5-7b-hf"])
    assert seconds < 10
    assert error == (
        f"tokred: error: llava-hf/llava-1.5-7b-hf is not in the local Hugging Face cache ({hf_home / 'hub'}) and the "
        "Hugging Face Hub (http://127.0.0.1:9) cannot be reached: download it where there is network (hf download "
        "llava-hf/llava-1.5-7b-hf) and point HF_HOME at that cache, or pass the model's local directory")


def test_offline_mode_set_after_import_fails_at_once_and_names_the_cache(
    monkeypatch: pytest.MonkeyPatch, hf_home: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    def asked(*args: object, **kwargs: object) -> None:
        raise AssertionError("the Hub client was asked")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", asked)
    monkeypatch.setattr(_loading, "_hub_reachable", asked)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # huggingface_hub read its constants long ago: the environment counts
    error, seconds = _error_and_seconds(capsys, [*RUN, "--model", "someone/some-model"])
    assert seconds < 10
    assert error == (
        f"tokred: error: someone/some-model is not in the local Hugging Face cache ({hf_home / 'hub'}) and "
        "HF_HUB_OFFLINE is set, so the Hub is not asked: download it where there is network (hf download "
        "someone/some-model) and point HF_HOME at that cache, or pass the model's local directory")


def test_a_cached_model_is_read_from_the_cache_when_the_hub_is_unreachable(
    monkeypatch: pytest.MonkeyPatch, hf_home: Path, saved_llava: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
) -> None:
    model, image = saved_llava
    repo = hf_home / "hub" / "models--someone--tiny-llava"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    for path in model.iterdir():
        (snapshot / path.name).write_bytes(path.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    started = time.perf_counter()
    assert main([*RUN, "--model", "someone/tiny-llava", "--image", str(image), "--json"]) == 0
    assert time.perf_counter() - started < 30
    captured = capsys.readouterr()
    assert json.loads(captured.out)["model"] == "someone/tiny-llava"
    assert ("the Hugging Face Hub (http://127.0.0.1:9) cannot be reached: using the cached copy of "
            "someone/tiny-llava") in captured.err
    assert "Retry" not in captured.err


def test_a_model_missing_from_the_hub(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                      hf_home: Path) -> None:
    missing = errors.RepositoryNotFoundError.__new__(errors.RepositoryNotFoundError)
    Exception.__init__(missing, "404")
    _hub_failure(monkeypatch, missing)
    error = _one_line_error(capsys, [*RUN, "--model", "someone/typo"])
    assert error == ("tokred: error: no such directory 'someone/typo', and no model 'someone/typo' on the Hugging Face "
                     "Hub (a private one needs hf auth login)")


# ------------------------------------------------------------------------------------ budgets before weights


def test_an_impossible_keep_is_refused_before_the_weights_load(saved_llava: tuple[Path, Path], no_weights_loaded: None,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    model, image = saved_llava
    error = _one_line_error(capsys, ["run", "--model", str(model), "--image", str(image), "--method", "random",
                                     "--keep", "577"])
    assert error == ("tokred: error: keep=577 is larger than the 576 visual tokens of the image (budgets are per "
                     "image); give --keep 576 or less, or --keep-ratio")


def test_show_refuses_an_impossible_keep_given_as_an_option(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    error = _one_line_error(capsys, ["show", "--preset", "tiny", "--method", "random", "--option", "keep=600",
                                     "-o", str(tmp_path / "x.png")])
    assert "keep=600 is larger than the 576 visual tokens" in error
    assert not (tmp_path / "x.png").exists()


def test_visual_token_counts_are_per_image_runs_of_the_image_token() -> None:
    import torch

    ids = torch.tensor([[1, 9, 9, 9, 2, 9, 9, 3]])
    assert visual_token_counts({"input_ids": ids}, 9, 2) == [3, 2]
    assert visual_token_counts({"input_ids": ids}, 9, 3) == [5, 5, 5]  # runs do not match images: the total bounds each
    assert visual_token_counts({"input_ids": ids}, None, 2) is None
    check_keep(2, [3, 2])
    with pytest.raises(tokred.cli.CommandError, match="keep=3 is larger than the 2 visual tokens of image 2"):
        check_keep(3, [3, 2])


def test_a_working_model_directory_still_runs(saved_llava: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    model, image = saved_llava
    assert main(["run", "--model", str(model), "--image", str(image), "--method", "random", "--keep", "576",
                 "--max-new-tokens", "1", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["report"]["visual_tokens_per_layer"] == [[576]] * 8
    assert "reading the configuration and processor" in captured.err and "loading the weights" in captured.err


# ------------------------------------------------------------------------------------ output files


@pytest.mark.parametrize(("flag", "make", "message"), [
    ("--plot", lambda d: d / "missing" / "p.png", "the directory '{d}/missing' does not exist"),
    ("--json-file", lambda d: d, "'{d}' is a directory; give a file name inside it"),
    ("--plot", lambda d: d / "file.txt" / "p.png", "'{d}/file.txt' is not a directory"),
])
def test_bench_checks_its_output_files_before_anything_runs(flag: str, make, message: str, tmp_path: Path,  # noqa: ANN001
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file.txt").write_text("")
    error = _one_line_error(capsys, ["bench", "--preset", "tiny", "--methods", "random", flag, str(make(tmp_path))])
    assert error.startswith(f"tokred: error: {flag} ") and message.format(d=tmp_path) in error
    assert "building preset" not in capsys.readouterr().err


def test_show_checks_its_output_file_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", "--preset", "tiny", "--method", "random", "-o", str(tmp_path / "no" / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "--output" in err and "does not exist" in err and "building preset" not in err
