"""``tokred.eval``: tasks, scoring on reduced sequences, and the evaluation runner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import tokred
from tokred import OptionsError, TokredError
from tokred.eval import (
    Task,
    TaskItem,
    continuation_logprobs,
    evaluate,
    load_task,
    normalise,
    plot_accuracy,
    save_task,
    settings_for,
)
from tokred.testing import make_image, tiny_model


def _task(n: int = 4) -> Task:
    """Multiple-choice and open items on tiny synthetic images (the answers of a random-weight
    model are meaningless; the tests compare settings and batchings, not accuracy)."""
    items = []
    for i in range(n):
        image = (make_image(seed=i),)
        items.append(TaskItem(f"mc{i}", image, "What colour is the shape? Answer with one word.", "red",
                              ("red", "green", "blue"), kind="colour"))
        items.append(TaskItem(f"open{i}", image, "Name the shape.", "circle", kind="name"))
    return Task.from_items("tiny", items, "tiny random-weight test task")


# ----------------------------------------------------------------------------------- tasks


def test_a_task_round_trips_through_jsonl(tmp_path: Path) -> None:
    task = _task(2)
    path = save_task(task, tmp_path / "task.jsonl")
    loaded = load_task(path)
    assert loaded.name == "task" and [i.id for i in loaded.items] == [i.id for i in task.items]
    assert loaded.items[0].choices == ("red", "green", "blue") and loaded.items[1].choices is None
    assert loaded.items[0].kind == "colour"
    assert loaded.items[0].open_images()[0].size == task.items[0].open_images()[0].size


@pytest.mark.parametrize(("line", "message"), [
    ('{"question": "q", "answr": "a"}', r"task.jsonl:2: unknown keys \['answr'\]"),
    ('{"question": "q", "answer": "a", "choices": ["b", "c"]}', r"task.jsonl:2: item 'line-2': the answer 'a' is not one of"),
    ('{"question": "q", "answer": "a", "image": "missing.png"}', r"task.jsonl:2: image .*missing.png does not exist"),
    ('{"question": "q", "answer": 3}', r"task.jsonl:2: 'answer' must be a string"),
    ('not json', r"task.jsonl:2: not JSON"),
    ('{"id": "x", "question": "q", "answer": "a"}', r"item id 'x' appears twice"),
])
def test_task_files_are_validated_line_by_line(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "task.jsonl"
    path.write_text('{"id": "x", "question": "q", "answer": "a"}\n' + line + "\n")
    with pytest.raises(OptionsError, match=message):
        load_task(path)


def test_normalise_compares_answers_as_a_reader_would() -> None:
    assert normalise("  The Red. ") == "the red"
    assert normalise('"blue"') == "blue"
    assert normalise("left\nbecause it is") == "left"
    assert normalise("") == ""


# -------------------------------------------------------------------------------- scoring


def test_continuation_logprobs_read_the_last_tokens_of_a_reduced_output() -> None:
    model, processor = tiny_model("llava")
    inputs = processor(images=[make_image()], text=["USER: <image>\nWhat is it? ASSISTANT: a red circle"], return_tensors="pt")
    with torch.no_grad():
        plain = model(**inputs).logits
        with tokred.apply(model, tokred.create("random", keep_ratio=1.0)) as run:
            same = model(**inputs).logits
        [kept_all] = continuation_logprobs(same, run.output_positions, inputs["input_ids"], [3])
        with tokred.apply(model, tokred.create("random", keep=16)) as run:
            reduced = model(**inputs).logits
        [got] = continuation_logprobs(reduced, run.output_positions, inputs["input_ids"], [3])
    by_hand = torch.log_softmax(plain[0, -4:-1].float(), -1).gather(1, inputs["input_ids"][0, -3:, None]).sum()
    assert kept_all == pytest.approx(float(by_hand), abs=1e-4)
    assert continuation_logprobs(plain, None, inputs["input_ids"], [3]) == [pytest.approx(float(by_hand), abs=1e-5)]
    by_hand_reduced = torch.log_softmax(reduced[0, -4:-1].float(), -1).gather(1, inputs["input_ids"][0, -3:, None]).sum()
    assert got == pytest.approx(float(by_hand_reduced), abs=1e-5)
    with pytest.raises(TokredError, match="did not survive as expected"):
        shifted = run.output_positions.clone()
        shifted[0, -1] -= 1
        continuation_logprobs(reduced, shifted, inputs["input_ids"], [3])


# ---------------------------------------------------------------------------------- runner


@pytest.fixture(scope="module")
def llava():  # type: ignore[no-untyped-def]
    return tiny_model("llava")


def test_settings_start_with_the_unreduced_model_and_cross_methods_and_budgets() -> None:
    settings = settings_for(["random", "fastv"], [{"keep_ratio": 0.25}, {"keep": 16}])
    assert [s.label for s in settings] == ["unreduced", "random keep_ratio=0.25", "random keep=16",
                                          "fastv keep_ratio=0.25", "fastv keep=16"]
    with pytest.raises(tokred.BudgetError, match=r"keep_ratio must be in \(0, 1\]"):
        settings_for(["random"], [{"keep_ratio": 2.0}])
    with pytest.raises(OptionsError, match="unknown method 'nope'"):
        settings_for(["nope"], [{}])


def test_batch_size_does_not_change_a_single_answer(llava) -> None:  # type: ignore[no-untyped-def]
    model, processor = llava
    task = _task(5)
    methods = ["random", "fastv", "todre", "star"]
    one = evaluate(model, processor, task, methods, [{"keep_ratio": 0.25}], batch_size=1, timing_rounds=0)
    eight = evaluate(model, processor, task, methods, [{"keep_ratio": 0.25}], batch_size=8, timing_rounds=0)
    def answers(result):  # type: ignore[no-untyped-def]
        return sorted((p.setting, p.item, p.prediction, p.correct) for p in result.predictions)
    assert answers(one) == answers(eight)
    assert [r.accuracy for r in one.results] == [r.accuracy for r in eight.results]


def test_a_keep_everything_setting_answers_exactly_as_the_unreduced_model(llava) -> None:  # type: ignore[no-untyped-def]
    model, processor = llava
    keep_all = [tokred.create(name).keep_everything() for name in ("random", "fastv", "todre", "star")]
    result = evaluate(model, processor, _task(3), keep_all, batch_size=4, timing_rounds=0)
    for row in result.results[1:]:
        assert row.agreement == 1.0 and row.accuracy == result.reference.accuracy, row.setting.label
        assert row.entering == row.visual_tokens == 576


def test_choices_are_scored_under_decisions_made_on_the_prompt(llava) -> None:  # type: ignore[no-untyped-def]
    """A gate must not see the choice it scores: every choice row keeps the visual tokens the gate
    kept on the prompt alone."""
    model, processor = llava
    task = Task.from_items("one", [_task(1).items[0]])
    seen: list[list[list[int]]] = []
    original = tokred.runtime.Run.frozen

    def recording(self, rows=None):  # type: ignore[no-untyped-def]
        decided = self.report.kept_indices
        context = original(self, rows=rows)

        class Wrapper:
            def __enter__(inner):  # type: ignore[no-untyped-def]
                return context.__enter__()

            def __exit__(inner, *exc):  # type: ignore[no-untyped-def]
                seen.append([decided[0], *self.report.kept_indices])
                return context.__exit__(*exc)

        return Wrapper()

    tokred.runtime.Run.frozen = recording  # type: ignore[method-assign]
    try:
        evaluate(model, processor, task, ["fastv"], [{"keep": 16}], timing_rounds=0)
    finally:
        tokred.runtime.Run.frozen = original  # type: ignore[method-assign]
    [(decided, *choices)] = seen
    assert len(choices) == 3 and all(kept == decided for kept in choices) and len(decided) == 16


def test_predictions_are_written_as_they_come_and_a_rerun_resumes(llava, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, processor = llava
    output = tmp_path / "predictions.jsonl"
    task = _task(2)
    first = evaluate(model, processor, task, ["random"], [{"keep": 16}], output=output, timing_rounds=0)
    lines = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(lines) == 2 * len(task) and {line["setting"] for line in lines} == {"unreduced", "random keep=16"}
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        again = evaluate(model, processor, task, ["random"], [{"keep": 16}], output=output, timing_rounds=0)
    finally:
        handle.remove()
    assert calls == [] and [r.accuracy for r in again.results] == [r.accuracy for r in first.results]
    assert len(output.read_text().splitlines()) == 2 * len(task)


def test_figures_progress_table_json_and_plot(llava, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, processor = llava
    progress: list[tuple[int, int]] = []
    result = evaluate(model, processor, _task(2), ["random", "fastv"], [{"keep_ratio": 0.25}], timing_rounds=2,
                      progress=lambda done, total, what: progress.append((done, total)))
    assert progress[-1][0] == progress[-1][1] and all(a <= b for (a, _), (b, _) in zip(progress, progress[1:]))
    random_row, fastv_row = result.results[1:]
    assert random_row.entering == 144 and random_row.equivalent == 144.0
    assert fastv_row.entering == 576 and 144 < fastv_row.equivalent < 576      # a gate at layer 2 of 8
    assert random_row.prefill_speedup is not None and random_row.prefill_speedup.n == 2
    data = json.loads(json.dumps(result.to_dict()))
    assert [r["label"] for r in data["results"]] == ["unreduced", "random keep_ratio=0.25", "fastv keep_ratio=0.25"]
    assert len(result.rows()) == 3 and len(result.rows()[0]) == len(result.HEADERS)
    image = plot_accuracy(result, tmp_path / "accuracy.png")
    assert (tmp_path / "accuracy.png").stat().st_size > 1000 and image.size == (960, 560)


def test_every_registered_method_gets_its_own_colour_and_marker_in_the_plot() -> None:
    from tokred.eval._plot import series_style

    styles = [series_style(i) for i in range(32)]
    assert len(set(styles)) == 32                      # twelve methods are registered today, eight colours
    assert styles[0][0] == styles[8][0] and styles[0][1] != styles[8][1]


def test_an_impossible_budget_fails_before_any_item(llava) -> None:  # type: ignore[no-untyped-def]
    model, processor = llava
    calls: list[int] = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(tokred.BudgetError, match="keep=1000 is larger than the 576"):
            evaluate(model, processor, _task(1), ["random"], [{"keep": 1000}])
    finally:
        handle.remove()
    assert calls == []


def test_multiple_choice_by_generation_counts_answers_matching_no_choice(llava) -> None:  # type: ignore[no-untyped-def]
    model, processor = llava
    result = evaluate(model, processor, _task(2), [], multiple_choice="generate", max_new_tokens=3, timing_rounds=0)
    mc = [p for p in result.predictions if p.item.startswith("mc")]
    assert all(p.valid == (p.prediction in ("red", "green", "blue")) for p in mc)
    assert result.reference.invalid == sum(not p.valid for p in result.predictions) / len(result.predictions)
