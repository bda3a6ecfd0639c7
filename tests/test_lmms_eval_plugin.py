"""``--model tokred`` through lmms-eval's own CLI, offline, on a tiny saved model and tiny local tasks.

lmms-eval is not a test dependency of the core (its registry requirements pull a CUDA torchvision on
CPU machines); the test skips where it cannot be imported. Install recipe: docs/recipes/lmms-eval.md.

Also a script: ``python tests/test_lmms_eval_plugin.py DIR`` writes the tiny model and tasks into DIR
and prints the lmms-eval command that evaluates them.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

COLOURS = ("red", "green", "blue", "yellow")
RGB = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
NUM_DOCS = 12

_SKIP = "lmms-eval is not installed (CPU install without torchvision: docs/recipes/lmms-eval.md)"

GEN_TASK = "tokred_tiny_gen"
MC_TASK = "tokred_tiny_mc"

_TASK_YAML = """\
task: {task}
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: {output_type}
doc_to_visual: image
doc_to_text: question
{body}
metadata:
  version: 0.1
"""

_GEN_BODY = """\
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 6
  temperature: 0
  do_sample: false
  until: ["\\n"]
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
"""

_MC_BODY = """\
doc_to_target: label
doc_to_choice: {choices}
metric_list:
  - metric: acc
  - metric: acc_norm
""".format(choices=json.dumps(list(COLOURS)))


def write_tiny_tasks(folder: Path) -> Path:
    """Save a 12-image colour dataset with ``datasets.save_to_disk`` and two lmms-eval task YAMLs
    reading it: ``tokred_tiny_gen`` (generation, exact match) and ``tokred_tiny_mc`` (multiple
    choice by log-likelihood, ``acc``/``acc_norm``). Returns the folder to pass as ``--include_path``."""
    import datasets
    from PIL import Image, ImageDraw

    rows = {"image": [], "question": [], "answer": [], "label": []}
    for i in range(NUM_DOCS):
        colour = COLOURS[i % len(COLOURS)]
        image = Image.new("RGB", (336, 336), (128 + 8 * (i % 5), 128, 128))
        draw = ImageDraw.Draw(image)
        box = (40 + 10 * i, 60, 200 + 8 * i, 260 - 5 * i)
        (draw.ellipse if i % 2 else draw.rectangle)(box, fill=RGB[colour])
        rows["image"].append(image)
        rows["question"].append("What colour is the shape?" if i % 3 else "What is the colour of the shape in the picture?")
        rows["answer"].append(colour)
        rows["label"].append(COLOURS.index(colour))
    features = datasets.Features({
        "image": datasets.Image(), "question": datasets.Value("string"),
        "answer": datasets.Value("string"), "label": datasets.Value("int64"),
    })
    data = folder / "data"
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(data))
    tasks = folder / "tasks"
    tasks.mkdir(parents=True, exist_ok=True)
    for task, output_type, body in ((GEN_TASK, "generate_until", _GEN_BODY), (MC_TASK, "multiple_choice", _MC_BODY)):
        (tasks / f"{task}.yaml").write_text(_TASK_YAML.format(task=task, data=data, output_type=output_type, body=body))
    return tasks


def write_tiny_model(folder: Path) -> Path:
    """The tiny random-weight LLaVA of ``tokred.testing`` saved with ``save_pretrained``."""
    from tokred.testing import tiny_model

    model, processor = tiny_model("llava")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def lmms_eval_command(model: Path, tasks: Path, output: Path, method_args: str = "") -> list[str]:
    model_args = f"pretrained={model}" + (f",{method_args}" if method_args else "")
    return [
        sys.executable, "-m", "lmms_eval", "--model", "tokred", "--model_args", model_args,
        "--tasks", f"{GEN_TASK},{MC_TASK}", "--include_path", str(tasks), "--batch_size", "2",
        "--output_path", str(output), "--log_samples",
    ]


def _offline_env(home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(home),
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false")
    return env


#: Runs ``lmms_eval.evaluator.simple_evaluate`` for several ``--model_args`` in one process (one
#: import of lmms-eval, one task index restricted to the tiny tasks) and prints, per run, the
#: metrics and each sample's responses as JSON. In a subprocess, because simple_evaluate patches
#: filelock's metaclass and ``ssl.SSLContext`` process-wide.
_DRIVER = """
import json, sys
from lmms_eval.evaluator import simple_evaluate
from lmms_eval.tasks import TaskManager
tasks_dir, tasks, runs = sys.argv[1], sys.argv[2].split(","), json.loads(sys.argv[3])
manager = TaskManager(include_path=tasks_dir, include_defaults=False)
out = {}
for name, model_args in runs.items():
    r = simple_evaluate(model="tokred", model_args=model_args, tasks=tasks, batch_size=2, task_manager=manager,
                        log_samples=True, bootstrap_iters=0)
    out[name] = {"results": r["results"], "model": r["config"]["model"], "samples": {
        t: [{"doc_id": s["doc_id"], "target": s["target"], "filtered_resps": s["filtered_resps"],
             **{m: s[m] for m in ("acc", "acc_norm", "exact_match") if m in s}} for s in r["samples"][t]]
        for t in tasks}}
print("RESULTS=" + json.dumps(out, default=str))
"""


def _check(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == 0, f"lmms-eval failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"


def _run_cli(command: list[str], env: dict[str, str], cwd: Path) -> tuple[dict, dict[str, list[dict]]]:
    """Run lmms-eval's CLI; return its results JSON and, per task, its logged samples."""
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    _check(done)
    output = Path(command[command.index("--output_path") + 1])
    results = sorted(output.rglob("*_results.json"))
    assert len(results) == 1, f"expected one results file under {output}, found {results}\n{done.stdout[-3000:]}"
    samples = {}
    for task in (GEN_TASK, MC_TASK):
        files = sorted(output.rglob(f"*_samples_{task}.jsonl"))
        assert len(files) == 1, f"expected one samples file for {task}, found {files}"
        samples[task] = [json.loads(line) for line in files[0].read_text().splitlines() if line.strip()]
    return json.loads(results[0].read_text()), samples


def _run_in_process(runs: dict[str, str], tasks: Path, env: dict[str, str], cwd: Path) -> dict[str, dict]:
    command = [sys.executable, "-c", _DRIVER, str(tasks), f"{GEN_TASK},{MC_TASK}", json.dumps(runs)]
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    _check(done)
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULTS="))
    return json.loads(line[len("RESULTS="):])


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("lmms_eval", reason=_SKIP)
    try:
        import lmms_eval.evaluator  # noqa: F401  (the evaluation path: accelerate, datasets, evaluate, ...)
    except Exception as error:  # noqa: BLE001 - any import failure means this environment cannot run it
        pytest.skip(f"lmms-eval's evaluator cannot be imported here: {type(error).__name__}: {error}")
    root = tmp_path_factory.mktemp("lmms")
    return write_tiny_model(root / "tiny-llava"), write_tiny_tasks(root), root


def _metric(results: dict, task: str, name: str) -> float:
    value = results[task][f"{name},none"]
    assert isinstance(value, (int, float)) and 0.0 <= value <= 1.0, (task, name, value)
    return float(value)


def _lls(samples: list[dict]) -> dict[int, list[float]]:
    """doc id -> the negative log-likelihood of each choice, as the model returned it (lmms-eval
    logs each choice's ``(nll, is_greedy)``; the CLI's JSON lines hold them as strings)."""
    return {s["doc_id"]: [float(r[0]) for r in s["filtered_resps"]] for s in samples}


def _check_run(name: str, results: dict, samples: dict[str, list[dict]]) -> None:
    _metric(results, GEN_TASK, "exact_match")
    _metric(results, MC_TASK, "acc")
    _metric(results, MC_TASK, "acc_norm")
    assert len(samples[GEN_TASK]) == NUM_DOCS and len(samples[MC_TASK]) == NUM_DOCS
    lls_of = _lls(samples[MC_TASK])
    for sample in samples[MC_TASK]:
        lls = lls_of[sample["doc_id"]]
        assert len(lls) == len(COLOURS) and all(math.isfinite(v) and v > 0 for v in lls), (name, sample["doc_id"], lls)
        # acc is the argmin of these losses, as lmms-eval's multiple_choice scoring takes it
        assert sample["acc"] == float(min(range(len(lls)), key=lls.__getitem__) == int(sample["target"]))


def test_lmms_eval_cli_with_a_reduced_model(tiny_setup) -> None:
    """The documented command: ``lmms-eval --model tokred`` found through the entry point."""
    model, tasks, root = tiny_setup
    results, samples = _run_cli(lmms_eval_command(model, tasks, root / "out-cli", "method=random,keep=64"),
                                _offline_env(root / "hf-home"), cwd=root)
    assert results["config"]["model"] == "tokred"
    assert results["config"]["model_args"].endswith("method=random,keep=64")
    _check_run("cli", results["results"], samples)


def test_reduced_scores_against_unreduced(tiny_setup) -> None:
    model, tasks, root = tiny_setup
    runs = _run_in_process({"unreduced": f"pretrained={model}", "keep_all": f"pretrained={model},method=random,keep=576",
                            "random64": f"pretrained={model},method=random,keep=64"},
                           tasks, _offline_env(root / "hf-home"), cwd=root)
    for name, run in runs.items():
        assert run["model"] == "tokred"
        _check_run(name, run["results"], run["samples"])
    unreduced, keep_all, random64 = (_lls(runs[n]["samples"][MC_TASK]) for n in ("unreduced", "keep_all", "random64"))
    # Keeping all 576 tokens goes through the reduced path (selector, packing, right-aligned scoring of
    # padded batches) and must give the unreduced model's numbers; keeping 64 must change them.
    for doc in unreduced:
        assert keep_all[doc] == pytest.approx(unreduced[doc], rel=1e-4, abs=1e-4), doc
    assert any(random64[doc] != pytest.approx(unreduced[doc], rel=1e-3) for doc in unreduced)
    gen = {n: {s["doc_id"]: s["filtered_resps"] for s in runs[n]["samples"][GEN_TASK]} for n in runs}
    assert gen["keep_all"] == gen["unreduced"]


def test_lmms_eval_loglikelihood_matches_a_direct_forward(tiny_setup) -> None:
    """The unreduced plugin's scores are the plain model's: sum of -log p of the continuation tokens."""
    import torch
    import transformers

    from lmms_eval.api.instance import Instance

    from tokred.integrations.lmms_eval import TokredLMM

    model_dir, _, _ = tiny_setup
    from PIL import Image

    image = Image.new("RGB", (336, 336), (200, 40, 40))
    lm = TokredLMM.create_from_arg_string(f"pretrained={model_dir},batch_size=2")
    lm.task_dict = {"t": {"test": [{"image": image}]}}
    contexts = [("What colour is the shape?", " red"), ("What colour is the shape?", " green blue")]
    requests = [Instance("loglikelihood", (c, cont, lambda doc: [doc["image"]], 0, "t", "test"), idx=i,
                         metadata={"task": "t", "doc_id": 0, "repeats": 1}) for i, (c, cont) in enumerate(contexts)]
    got = [r.text for r in lm.loglikelihood(requests)]

    model = transformers.LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = transformers.AutoProcessor.from_pretrained(model_dir, backend="pil")
    for (context, continuation), (nll, greedy) in zip(contexts, got):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": context}]}]
        prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
        whole = processor(images=[image], text=[prompt + continuation], return_tensors="pt")
        n = len(processor.tokenizer(prompt + continuation).input_ids) - len(processor.tokenizer(prompt).input_ids)
        with torch.no_grad():
            logits = model(**whole).logits[0]
        log_probs = torch.log_softmax(logits[-n - 1:-1], dim=-1)
        target = whole["input_ids"][0, -n:]
        assert nll == pytest.approx(-float(log_probs.gather(-1, target[:, None]).sum()), rel=1e-5)
        assert greedy == bool((log_probs.argmax(-1) == target).all())

    # The same two rows (padded to each other) through the reduced path, keeping every token.
    reduced = TokredLMM.create_from_arg_string(f"pretrained={model_dir},batch_size=2,method=random,keep=576")
    reduced.task_dict = lm.task_dict
    assert [r.text[0] for r in reduced.loglikelihood(requests)] == pytest.approx([g[0] for g in got], rel=1e-5)


def _eval_task(tasks: Path):  # type: ignore[no-untyped-def]
    """The tiny dataset as a ``tokred eval`` task: the same images, questions and choices."""
    import datasets

    from tokred.eval import Task, TaskItem

    rows = datasets.load_from_disk(str(tasks.parent / "data"))["test"]
    return Task.from_items("tiny", [TaskItem(str(i), (row["image"],), row["question"], row["answer"], COLOURS)
                                    for i, row in enumerate(rows)])


@pytest.mark.parametrize("method_args", ["", "method=random,keep=64", "method=fastv,keep=64"])
def test_lmms_eval_gives_the_accuracy_tokred_eval_gives(tiny_setup, method_args: str) -> None:
    """The same items, the same model, the same method: lmms-eval's multiple-choice ``acc`` equals
    ``tokred eval``'s accuracy by log-likelihood, item by item (fastv's gate decides on the prompt
    in both, never on the choice it scores)."""
    import transformers

    import tokred
    from tokred.eval import evaluate

    model_dir, tasks, root = tiny_setup
    runs = _run_in_process({"run": f"pretrained={model_dir}" + (f",{method_args}" if method_args else "")},
                           tasks, _offline_env(root / "hf-home"), cwd=root)
    lmms_samples = {s["doc_id"]: s["acc"] for s in runs["run"]["samples"][MC_TASK]}
    model = transformers.LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = transformers.AutoProcessor.from_pretrained(model_dir, backend="pil")
    methods = [] if not method_args else [tokred.create(method_args.split(",")[0].split("=")[1], keep=64)]
    result = evaluate(model, processor, _eval_task(tasks), methods, timing_rounds=0, batch_size=3)
    row = result.results[-1]
    ours = {int(p.item): float(p.correct) for p in result.predictions if p.setting == row.setting.label}
    assert ours == lmms_samples
    assert row.accuracy == pytest.approx(_metric(runs["run"]["results"], MC_TASK, "acc"))


def test_model_args_parsing() -> None:
    pytest.importorskip("lmms_eval", reason=_SKIP)
    from tokred.integrations.lmms_eval import parse_model_args

    assert parse_model_args("pretrained=/m,method=todre,keep_ratio=0.1,keep=64,tau=-1e-2,stage2=False,"
                            "gate_layer=7/8,seed='7',spread=None") == {
        "pretrained": "/m", "method": "todre", "keep_ratio": 0.1, "keep": 64, "tau": -0.01,
        "stage2": False, "gate_layer": "7/8", "seed": "7", "spread": None}
    with pytest.raises(ValueError, match="twice"):
        parse_model_args("keep=1,keep=2")


def test_unknown_method_option_fails_before_loading(tmp_path: Path) -> None:
    pytest.importorskip("lmms_eval", reason=_SKIP)
    import tokred
    from tokred.integrations.lmms_eval import TokredLMM

    with pytest.raises(tokred.OptionsError, match="kepe"):
        TokredLMM.create_from_arg_string(f"pretrained={tmp_path / 'absent'},method=random,kepe=64")
    with pytest.raises(ValueError, match="without method"):
        TokredLMM.create_from_arg_string(f"pretrained={tmp_path / 'absent'},keep=64")


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "lmms-scratch").resolve()
    tasks = write_tiny_tasks(target)
    model = write_tiny_model(target / "tiny-llava")
    print(" ".join(lmms_eval_command(model, tasks, target / "out", "method=random,keep=64")))
