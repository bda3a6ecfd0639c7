"""The trained SYNTHETIC PROXY (tokred.eval.proxy): shipped weights, its task, its preset and demo.

Figures here are regression checks of the shipped model on small fixed subsets of its held-out
items; they rank methods on this synthetic task only, not on the papers' benchmarks.
"""

from __future__ import annotations

import importlib.metadata
import json

import numpy as np
import pytest
import torch

import tokred
from tokred.cli import main
from tokred.eval import evaluate
from tokred.eval.proxy import (
    KINDS,
    WEIGHTS_DIR,
    accuracy_by_kind,
    load_proxy,
    proxy_items,
    proxy_task,
    select_oracle,
    select_random,
)
from tokred.eval.proxy._measure import predictions
from tokred.eval.proxy.train import CHECK_ITEMS


@pytest.fixture(scope="module")
def proxy():  # type: ignore[no-untyped-def]
    return load_proxy()


@pytest.fixture(scope="module")
def training() -> dict:
    return json.loads((WEIGHTS_DIR / "training.json").read_text())


def _registry() -> tokred.Registry:
    return tokred.Registry(entry_points=list(importlib.metadata.entry_points(group="tokred")))


def test_the_shipped_files_are_package_data_and_record_their_recipe(training: dict) -> None:
    for name in ("model.safetensors", "config.json", "tokenizer.json", "processor_config.json", "training.json"):
        assert (WEIGHTS_DIR / name).is_file(), name
    assert (WEIGHTS_DIR / "model.safetensors").stat().st_size < 8 * 2**20
    assert {"recipe", "torch", "transformers", "threads", "timings_s", "model_sha256", "test", "val"} <= set(training)
    assert training["threads"] == 1


def test_the_shipped_weights_give_the_recorded_predictions(proxy, training: dict) -> None:  # type: ignore[no-untyped-def]
    model, processor = proxy
    got = predictions(model, processor, proxy_items("test", CHECK_ITEMS))
    assert got == training["check_predictions"]
    # The recorded figures themselves: the unreduced model is well above every question type's prior.
    full = training["test"]["full"]
    for kind in KINDS:
        prior = 1 / 8 if kind == "colour" else 1 / 2
        assert full[kind] > prior + 0.3, (kind, full[kind])


def test_the_hand_built_inputs_give_the_model_s_own_logits(proxy) -> None:  # type: ignore[no-untyped-def]
    """The training and measurement pipeline (pixels, prompt, positions) is the processor's and the
    model's own: the first answer token's logits agree with a plain forward of the processor's batch."""
    from tokred.eval.proxy._inputs import answer_logits, assemble, encode_prompts, pixel_values, visual_embeddings

    model, processor = proxy
    items = proxy_items("test", 2)
    with torch.no_grad():
        visual = visual_embeddings(model, pixel_values([it.image for it in items]))
        hand = answer_logits(model, assemble(model, encode_prompts(processor, [it.question for it in items]), visual))
        for row, it in enumerate(items):
            text = processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": it.question}]}],
                add_generation_prompt=True)
            inputs = processor(images=[it.image], text=text, return_tensors="pt")
            torch.testing.assert_close(model(**inputs).logits[0, -1], hand[row], atol=1e-4, rtol=1e-4)


def test_the_task_is_deterministic_balanced_and_held_out() -> None:
    a, b = proxy_task("test", 8), proxy_task("test", 8)
    assert [i.id for i in a.items] == [f"test-{n}" for n in range(8)]
    assert [i.kind for i in a.items] == list(KINDS) * 2
    for x, y in zip(a.items, b.items):
        assert (x.question, x.answer, x.choices, x.meta) == (y.question, y.answer, y.choices, y.meta)
        assert np.array_equal(np.asarray(x.images[0]), np.asarray(y.images[0]))
        assert x.answer in x.choices and x.meta["target_tokens"]
    val = proxy_task("val", 8)
    assert all(not np.array_equal(np.asarray(x.images[0]), np.asarray(y.images[0])) for x, y in zip(a.items, val.items))
    assert "SYNTHETIC PROXY" in a.description
    with pytest.raises(ValueError):
        proxy_task("train", 4)


def test_the_object_patch_oracle_beats_random_at_ten_percent(proxy) -> None:  # type: ignore[no-untyped-def]
    model, processor = proxy
    items = proxy_items("test", 64)
    oracle = accuracy_by_kind(model, processor, items, select_oracle(26))["all"]
    random = accuracy_by_kind(model, processor, items, select_random(26))["all"]
    assert oracle >= random + 0.15, (oracle, random)


def test_batch_8_answers_as_batch_1_through_tokred_eval(proxy) -> None:  # type: ignore[no-untyped-def]
    model, processor = proxy
    task = proxy_task("test", 12)
    registry = _registry()
    methods = [registry.create("random", keep_ratio=0.1), registry.create("fastv", keep_ratio=0.1)]
    one = evaluate(model, processor, task, methods, registry=registry, batch_size=1, timing_rounds=0)
    eight = evaluate(model, processor, task, methods, registry=registry, batch_size=8, timing_rounds=0)
    assert [p.prediction for p in one.predictions] == [p.prediction for p in eight.predictions]
    assert [r.accuracy for r in one.results] == [r.accuracy for r in eight.results]
    assert one.reference.accuracy >= 0.75


def test_the_proxy_preset_brings_its_task_through_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["eval", "--preset", "proxy", "--methods", "random", "--keep-ratio", "0.25", "--items", "8",
            "--timing-rounds", "0", "--json"]
    assert main(argv, registry=_registry()) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["task"] == "proxy-test" and data["items"] == 8 and "SYNTHETIC PROXY" in data["task_description"]
    assert [r["label"] for r in data["results"]] == ["unreduced", "random (keep_ratio=0.25)"]
    assert data["results"][1]["entering"] == 64


def test_other_presets_still_need_a_task(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "--preset", "tiny", "--methods", "random"], registry=_registry()) == 2
    assert "--task FILE is required (only --preset proxy brings its own task)" in capsys.readouterr().err


def test_the_demo_answers_with_the_proxy_and_measures_accuracy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--repeats", "1", "--methods", "random", "--items", "8", "--json"], registry=_registry()) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {row["method"]: row for row in data["rows"]}
    assert data["family"] == "proxy" and data["items"] == 8 and "SYNTHETIC PROXY" in data["note"]
    assert rows["unreduced"]["entering_llm"] == 256 and rows["random"]["entering_llm"] == 26
    assert rows["unreduced"]["generated_text"] == data["answer"]
    assert rows["unreduced"]["agreement"] == 1.0 and 0.0 <= rows["random"]["accuracy"] <= 1.0


def test_the_demo_says_why_a_method_lands_near_chance(capsys: pytest.CaptureFixture[str]) -> None:
    """STAR's first stage keeps the visual tokens other patches attend to most, which in this proxy's
    tower are not the asked objects': its row lands near chance, and the line under the table says
    it kept far fewer of the answers' tokens than a uniform choice would. Random, well above
    chance, is not listed."""
    argv = ["demo", "--repeats", "1", "--methods", "star,random", "--items", "24", "--keep-ratio", "0.1"]
    assert main([*argv, "--json"], registry=_registry()) == 0
    data = json.loads(capsys.readouterr().out)
    near = data["near_chance"]
    assert 0.3 < near["prior"] < 0.5 and near["threshold"] == 0.10
    assert set(near["methods"]) == {"star"}, near
    star = near["methods"]["star"]
    assert star["accuracy"] <= near["prior"] + 0.10 and star["items"] == 16
    assert star["answer_tokens_kept"] < 0.10  # a uniform 10% keeps about 10% of them
    assert main(argv, registry=_registry()) == 0
    lines = capsys.readouterr().out.splitlines()
    (line,) = [x for x in lines if x.startswith("Near chance")]
    assert "star kept" in line and "a uniform choice keeps about 10%" in line and "star misses what the questions" in line
    assert "random" not in line


@pytest.mark.parametrize("method", [None, "random", "fastv"])
def test_one_token_choices_are_scored_from_the_prompt_prefill_as_the_rows_would(proxy, method, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The proxy's choices are one token each: the prompt prefill scores them, and gives what the
    continuation rows, run under the prompt's frozen decisions, give."""
    from tokred.eval import _scoring
    from tokred.eval._inputs import chat_prompt

    model, processor = proxy
    task = proxy_task("test", 4)
    prompts = [chat_prompt(processor, it.question, 1) for it in task.items]
    images = [it.open_images() for it in task.items]
    choices = [[" " + c for c in it.choices] for it in task.items]

    def scores() -> list[list[float]]:
        if method is None:
            got = _scoring.score_continuations(model, processor, prompts, images, choices, None)
        else:
            with tokred.apply(model, tokred.create(method, keep_ratio=0.1), registry=_registry()) as run:
                got = _scoring.score_continuations(model, processor, prompts, images, choices, run)
        return [[s.logprob for s in row] for row in got]

    fast = scores()
    monkeypatch.setattr(_scoring, "_one_token_each", lambda *args: False)
    rows = scores()
    assert [len(r) for r in fast] == [len(c) for c in choices]
    for a, b in zip(fast, rows):
        assert a == pytest.approx(b, abs=1e-4)


def test_a_recipe_asks_only_the_task_s_question_types() -> None:
    from tokred.eval.proxy.train import Recipe

    assert Recipe().question_mix.count("presence") == 3        # the type that needs two look-ups
    with pytest.raises(ValueError, match="question_mix must list question types of colour, presence"):
        Recipe(question_mix=("colour", "counting"))
    with pytest.raises(ValueError, match="question_mix"):
        Recipe(question_mix=())
