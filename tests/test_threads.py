"""One applied model, several threads: a run's state belongs to the thread that calls the model.

Threaded servers (a web app's thread pool around one model, ``generate`` in a streamer's worker
thread) call one model from several threads; each call must get what it gets alone. The
conformance property ``concurrent_calls`` checks this for every method and family; these tests
pin the issue's reproducers and the cross-thread reading of ``run.report`` and ``run.frozen``."""

from __future__ import annotations

import threading
from typing import Any, Callable

import pytest
import torch

import tokred
from tokred.errors import RuntimeStateError
from tokred.testing import tiny_inputs, tiny_model

PROMPTS = ("Describe the image.", "What colour is the largest shape? Answer briefly please.")


def _generate(model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=6, do_sample=False)


def _in_threads(work: Callable[[int], None], count: int) -> list[str]:
    """Run ``work(i)`` in ``count`` threads started together; the errors they raised."""
    start, errors = threading.Barrier(count), []

    def run(i: int) -> None:
        try:
            start.wait(timeout=60)
            work(i)
        except BaseException as exc:  # collected: a thread's exception must fail the test
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


@pytest.mark.parametrize("family, method", [("llava", "fastv"), ("llava", "random"), ("qwen2_5_vl", "todre")])
def test_two_threads_generating_on_one_applied_model_get_what_each_gets_alone(family: str, method: str) -> None:
    """The issue's reproducer: 2 calls per thread, 3 trials, against the same calls made in turn."""
    model, processor = tiny_model(family)
    inputs = [tiny_inputs(processor, [prompt], first_prompt=i) for i, prompt in enumerate(PROMPTS)]
    with tokred.apply(model, tokred.create(method, keep_ratio=0.25)):
        expected = [_generate(model, x) for x in inputs]
        for _ in range(3):
            got: dict[int, list[torch.Tensor]] = {0: [], 1: []}
            errors = _in_threads(lambda i: got[i].extend(_generate(model, inputs[i]) for _ in range(2)), 2)
            assert errors == []
            for i in range(2):
                assert all(torch.equal(tokens, expected[i]) for tokens in got[i])


def test_the_report_of_a_generate_run_in_a_worker_thread_is_read_in_the_main_thread() -> None:
    """The streamer pattern: ``generate`` in a worker thread, ``run.report`` read afterwards in the
    thread that entered the run (which never called the model), then ``run.frozen`` there."""
    model, processor = tiny_model("llava")
    inputs = tiny_inputs(processor, PROMPTS[:1])
    with tokred.apply(model, tokred.create("fastv", keep=20)) as run:
        got: list[tuple[torch.Tensor, Any]] = []
        assert _in_threads(lambda i: got.append((_generate(model, inputs), run.report.kept_indices)), 1) == []
        cached, kept_in_worker = got[0]
        assert run.report.kept_indices == kept_in_worker
        assert run.report.prefills == 1
        with run.frozen():
            with torch.no_grad():
                recomputed = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, recomputed)


def test_each_thread_reads_its_own_report() -> None:
    model, processor = tiny_model("llava")
    inputs = [tiny_inputs(processor, [prompt], first_prompt=i) for i, prompt in enumerate(PROMPTS)]
    with tokred.apply(model, tokred.create("fastv", keep=20)) as run:
        alone = []
        for x in inputs:
            _generate(model, x)
            alone.append(run.report.kept_indices)
        assert alone[0] != alone[1]  # the two images keep different tokens, so a mix-up would show
        seen: dict[int, Any] = {}

        def work(i: int) -> None:
            for _ in range(2):
                _generate(model, inputs[i])
                seen[i] = run.report.kept_indices

        assert _in_threads(work, 2) == []
    assert seen == {0: alone[0], 1: alone[1]}


def test_frozen_in_one_thread_leaves_the_other_deciding() -> None:
    """Freezing is per thread: a thread replaying its decisions does not make another thread's
    prefill replay them (which would fail: its image is another one)."""
    model, processor = tiny_model("llava")
    inputs = [tiny_inputs(processor, [prompt], first_prompt=i) for i, prompt in enumerate(PROMPTS)]
    with tokred.apply(model, tokred.create("fastv", keep=20)) as run:
        expected = [_generate(model, x) for x in inputs]
        got: dict[int, torch.Tensor] = {}

        def work(i: int) -> None:
            if i == 0:
                got[0] = _generate(model, inputs[0])
                with run.frozen():
                    for _ in range(2):
                        with torch.no_grad():
                            got[2] = model.generate(**inputs[0], max_new_tokens=6, do_sample=False, use_cache=False)
            else:
                for _ in range(3):
                    got[1] = _generate(model, inputs[1])

        assert _in_threads(work, 2) == []
    assert torch.equal(got[0], expected[0]) and torch.equal(got[2], expected[0]) and torch.equal(got[1], expected[1])


def test_a_second_run_on_the_model_from_another_thread_is_refused() -> None:
    model, _ = tiny_model("llava")
    with tokred.apply(model, tokred.create("random", keep=20)):
        errors = _in_threads(lambda i: tokred.apply(model, tokred.create("fastv", keep=20)).__enter__(), 1)
    assert len(errors) == 1 and "already has an active tokred run" in errors[0]
    with tokred.apply(model, tokred.create("fastv", keep=20)):  # the first run's exit freed the model
        pass
    with pytest.raises(RuntimeStateError, match="nothing to freeze"):
        with tokred.apply(model, tokred.create("fastv", keep=20)) as run, run.frozen():
            pass
