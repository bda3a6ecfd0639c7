"""An lmms-eval model that runs any registered tokred method on any supported model family.

Registered as ``--model tokred`` through lmms-eval's ``lmms_eval.models`` entry-point group
(:mod:`tokred.integrations._lmms_eval_entry`)::

    lmms-eval --model tokred \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=todre,keep_ratio=0.1 \\
        --tasks pope --batch_size 8

``--model_args`` (``key=value``, comma-separated; see :func:`parse_model_args` for how values are read):

* ``pretrained`` (required): a hub id or a local folder saved with ``save_pretrained``.
* ``method``: a registered tokred method (``tokred list``); absent or ``none``: the unreduced model,
  the baseline every reduced score is compared with.
* every other key that is not one below is an option of the method (``keep``, ``keep_ratio``,
  ``seed``, ``tau``, ``gate_layer``, ...), validated by the method's own options model: an unknown
  option fails before the model is loaded, naming the valid ones.
* ``device`` (default ``cuda`` when available, else ``cpu``), ``dtype`` (``auto``, ``float32``,
  ``bfloat16``, ``float16``; default ``auto`` on CUDA, ``float32`` on CPU), ``batch_size``
  (default 1; lmms-eval's ``--batch_size`` fills it), ``attn_implementation`` (``sdpa``, ``eager``).
* ``model_class``: a ``transformers`` class name (e.g. ``LlavaForConditionalGeneration``) instead of
  ``AutoModelForImageTextToText``; ``revision``; ``trust_remote_code``.
* ``processor_backend``: the image processor backend, ``pil`` (default: the same preprocessing on
  every machine, no torchvision needed) or ``torchvision``; ``default`` leaves the choice to
  transformers.
* ``max_new_tokens``: used when a task's ``generation_kwargs`` give none (default 256).
* ``loglikelihood``: ``sum`` (default) or ``mean`` of the continuation tokens' negative log-probs.

What the requests get:

* ``generate_until``: the task's prompt goes into the processor's chat template as one user turn,
  after the task's images (or at the processor's image placeholders, where the prompt has as many as
  there are images); batches are left-padded and run through ``model.generate`` inside
  ``with tokred.apply(model, method)``. Generation stops at EOS or ``max_new_tokens``; the text is
  cut at the first of the task's ``until`` strings.
* ``loglikelihood`` (``multiple_choice`` tasks): the value returned is the continuation's
  **negative** log-likelihood (a loss), because lmms-eval's ``multiple_choice`` picks the choice with
  the smallest value (``np.argmin``; lmms-eval issue #370). The requests that share a prompt and its
  images (the choices of one question) are scored together by
  :func:`tokred.eval.score_continuations`: one prefill of the prompt decides the reduction, then every
  choice is scored under that decision (``Run.frozen(rows=...)``), so a gate never sees the choice it
  scores, and the logits of the reduced sequence are read through ``Run.output_positions`` (checked,
  not assumed). ``tokred eval`` scores multiple-choice items the same way, so both give the same
  accuracy on the same items (tested).

Not supported yet: ``generate_until_multi_round``, videos, multi-process (accelerate) data
parallelism, lmms-eval's ``chat`` model type (tasks are read through ``doc_to_text``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
from lmms_eval.api.instance import GenerationResult, Instance
from lmms_eval.api.model import lmms
from loguru import logger

import tokred
from tokred.eval import score_continuations

__all__ = ["TokredLMM", "parse_model_args", "coerce_value", "MODEL_ARGS"]

#: Keys of ``--model_args`` that configure the model; every other key is an option of the method.
MODEL_ARGS: frozenset[str] = frozenset({
    "pretrained", "method", "device", "dtype", "batch_size", "max_batch_size", "attn_implementation",
    "model_class", "revision", "trust_remote_code", "processor_backend", "max_new_tokens", "loglikelihood",
})

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", re.IGNORECASE)


def coerce_value(text: str) -> Any:
    """One ``--model_args`` value as a user means it.

    ``true``/``false`` (any case) -> bool; ``none``/``null`` -> None; ``64``, ``-3`` -> int;
    ``0.1``, ``1e-3`` -> float; a value in single or double quotes -> the string inside, unconverted
    (``seed='7'`` stays the string ``"7"``); anything else (``7/8``, ``max_sum``) -> the string.
    tokred's options are pydantic models, so a value of the wrong type (``keep=0.5``) is refused by
    the method, not rounded here.
    """
    value = text.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    lowered = value.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    if _INT.fullmatch(value):
        return int(value)
    if _FLOAT.fullmatch(value):
        return float(value)
    return value


def parse_model_args(arg_string: str) -> dict[str, Any]:
    """``"pretrained=x,method=todre,keep_ratio=0.1"`` -> ``{"pretrained": "x", "method": "todre",
    "keep_ratio": 0.1}``. Commas inside quotes or brackets do not split; a key given twice is an
    error (lmms-eval's own parser keeps the last one silently)."""
    parts: list[str] = []
    depth, quote, current = 0, "", []
    for char in arg_string.strip():
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    args: dict[str, Any] = {}
    for part in filter(str.strip, parts):
        if "=" not in part:
            raise ValueError(f"--model_args entry {part.strip()!r} is not key=value")
        key, value = part.split("=", 1)
        key = key.strip()
        if key in args:
            raise ValueError(f"--model_args gives {key!r} twice")
        args[key] = coerce_value(value)
    return args


@dataclass
class _Batch:
    """One batch as the processor built it (left-padded ``[B, L]``)."""

    rows: list[int]
    inputs: dict[str, Any]


@dataclass
class _Stats:
    """What the runs of one request type did, for the log line at the end."""

    prefills: int = 0
    visual_in: int = 0
    visual_equivalent: float = 0.0
    lm_tokens_full: int = 0
    lm_tokens_reduced: int = 0
    seconds: float = 0.0
    kept_per_image: list[int] = field(default_factory=list)


class TokredLMM(lmms):
    """``--model tokred``: a Hugging Face vision-language model, reduced by a tokred method.

    See the module documentation for ``--model_args``. One tokred run (``tokred.apply``) covers each
    call of :meth:`generate_until` and :meth:`loglikelihood`; its hooks are removed when the call
    returns, also on errors.
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        method: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        attn_implementation: str | None = None,
        model_class: str | None = None,
        revision: str | None = None,
        trust_remote_code: bool = False,
        processor_backend: str = "pil",
        max_new_tokens: int = 256,
        loglikelihood: str = "sum",
        **method_options: Any,
    ) -> None:
        super().__init__()
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise NotImplementedError("--model tokred runs in one process; multi-process data parallelism is not supported yet")
        if isinstance(method, str) and method.lower() == "none":
            method = None
        if method is None and method_options:
            raise ValueError(
                f"method options {sorted(method_options)} given without method=...; the model arguments are "
                f"{sorted(MODEL_ARGS)}"
            )
        # Validate the method before loading anything: unknown options fail here, naming the valid ones.
        self.method_name = method
        self.method = tokred.create(method, **method_options) if method is not None else None
        self.method_options = dict(method_options)
        if str(batch_size).startswith("auto"):
            raise ValueError("--model tokred needs a fixed batch size (got 'auto')")
        self.batch_size_per_gpu = int(batch_size)
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if loglikelihood not in ("sum", "mean"):
            raise ValueError(f"loglikelihood must be 'sum' or 'mean', got {loglikelihood!r}")
        self.loglikelihood_reduction = loglikelihood
        self.max_new_tokens = int(max_new_tokens)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.pretrained = pretrained
        self._model = _load_model(pretrained, model_class, self._device, dtype, attn_implementation, revision, trust_remote_code)
        self.processor = _load_processor(pretrained, processor_backend, revision, trust_remote_code)
        tokenizer = getattr(self.processor, "tokenizer", None)
        if tokenizer is None:
            raise TypeError(f"the processor of {pretrained} has no tokenizer")
        tokenizer.padding_side = "left"  # batches end with real tokens: generate() and right-aligned scoring need it
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        if self.method is not None:
            tokred.apply(self._model, self.method)  # checks the model, its attention and the budget; installs nothing
        self.stats: dict[str, _Stats] = {}
        logger.info(f"tokred: {pretrained} ({type(self._model).__name__}) on {self._device}, "
                    f"method {self.method_name or 'none (unreduced)'} {self.method_options}")

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> TokredLMM:
        """Read ``--model_args`` with :func:`parse_model_args` (not lmms-eval's parser, which turns
        ``7`` into an int but ``-7`` into a float and keeps a repeated key silently)."""
        args = parse_model_args(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if "batch_size" in extra and "batch_size" in args:
            extra.pop("batch_size")  # --model_args wins over lmms-eval's default of --batch_size
        return cls(**args, **extra)

    # ------------------------------------------------------------------ lmms properties

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    # ------------------------------------------------------------------ requests

    def generate_until(self, requests: list[Instance]) -> list[str]:
        items = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            items.append((context, dict(gen_kwargs or {}), self._visuals(doc_to_visual, task, split, doc_id)))
        results: list[str | None] = [None] * len(items)
        groups: dict[str, list[int]] = {}
        for index, (_, gen_kwargs, _) in enumerate(items):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(index)
        stats = self.stats.setdefault("generate_until", _Stats())
        with self._run() as run:
            for indices in groups.values():
                gen_kwargs = items[indices[0]][1]
                until = _until(gen_kwargs)
                generate_kwargs = self._generate_kwargs(gen_kwargs)
                # longest prompts first: the first batch shows memory trouble at once
                indices = sorted(indices, key=lambda i: -len(items[i][0]))
                for start in range(0, len(indices), self.batch_size):
                    rows = indices[start:start + self.batch_size]
                    batch = self._encode([self._prompt(items[i][0], len(items[i][2])) for i in rows],
                                         [items[i][2] for i in rows], rows)
                    began = time.perf_counter()
                    with torch.inference_mode():
                        output = self._model.generate(**batch.inputs, **generate_kwargs)
                    self._account(stats, run, batch, time.perf_counter() - began)
                    new_tokens = output[:, batch.inputs["input_ids"].shape[1]:]
                    for row, text in zip(rows, self.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)):
                        results[row] = _cut(text, until)
        self._log_stats("generate_until")
        return [r if r is not None else "" for r in results]

    def loglikelihood(self, requests: list[Instance]) -> list[Any]:
        """``(nll, is_greedy)`` per request (see the module documentation).

        Requests that share a prompt and its images (the choices of one question) are scored
        together by :func:`tokred.eval.score_continuations`: the reduction is decided once, on the
        prompt alone, and every continuation is scored under that decision, so a gate never sees
        the choice it scores; ``tokred eval`` scores choices the same way."""
        items = [self._loglikelihood_item(request) for request in requests]
        groups: dict[tuple[str, str], list[int]] = {}
        for index, (prompt, _, _, source) in enumerate(items):
            groups.setdefault((prompt, source), []).append(index)
        results: list[Any] = [None] * len(items)
        stats = self.stats.setdefault("loglikelihood", _Stats())
        keys = sorted(groups, key=lambda key: -len(key[0]))
        with self._run() as run:
            for start in range(0, len(keys), self.batch_size):
                batch = keys[start:start + self.batch_size]
                prompts, images, continuations = [], [], []
                for key in batch:
                    members = groups[key]
                    prompt, _ = _move_trailing_space(items[members[0]][0], "")
                    prompts.append(prompt)
                    images.append(items[members[0]][2])
                    continuations.append([_move_trailing_space(items[i][0], items[i][1])[1] for i in members])
                began = time.perf_counter()
                scores = score_continuations(self._model, self.processor, prompts, images, continuations, run)
                stats.seconds += time.perf_counter() - began
                if run is not None:
                    stats.prefills += len(prompts)
                    stats.kept_per_image.extend(len(image.kept_final) for image in run.report.images)
                for key, per_prompt in zip(batch, scores):
                    for index, score in zip(groups[key], per_prompt):
                        nll = -score.logprob / (score.tokens if self.loglikelihood_reduction == "mean" else 1)
                        results[index] = _result(nll, score.greedy)
        self._log_stats("loglikelihood")
        return results

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "--model tokred does not implement generate_until_multi_round yet (tokred refuses to continue "
            "a conversation on a pruned cache; each round would have to be run as a whole conversation)"
        )

    # ------------------------------------------------------------------ prompts and inputs

    def _visuals(self, doc_to_visual: Any, task: str, split: str, doc_id: int) -> list[Any]:
        if doc_to_visual is None:
            return []
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        flat = []
        for visual in visuals:
            flat.extend(visual if isinstance(visual, (list, tuple)) else [visual])
        for visual in flat:
            if not hasattr(visual, "convert"):  # PIL images only: tokred refuses video
                raise NotImplementedError(
                    f"--model tokred takes images (PIL); task {task!r} gave {type(visual).__name__} "
                    f"{str(visual)[:80]!r} (videos are not supported)"
                )
        return [visual.convert("RGB") for visual in flat]

    def _loglikelihood_item(self, request: Instance) -> tuple[str, str, list[Any], str]:
        """``(prompt, continuation, images, source)``; ``source`` names the document the images
        come from, so that the choices of one question are scored under one decision."""
        args = request.args
        if len(args) == 2:  # acc_mutual_info's unconditional requests: (context, continuation), no image
            context, continuation = args
            return self._prompt(context, 0), continuation, [], ""
        context, target, doc_to_visual, doc_id, task, split = args
        if not isinstance(target, str):  # the "loglikelihood" output type passes doc_to_target itself
            target = target(self.task_dict[task][split][doc_id])
            target = target if isinstance(target, str) else str(target)
        visuals = self._visuals(doc_to_visual, task, split, doc_id)
        return self._prompt(context, len(visuals)), target, visuals, f"{task}/{split}/{doc_id}"

    def _prompt(self, context: str, num_images: int) -> str:
        """The chat prompt of one user turn holding ``num_images`` images and ``context``, ending with
        the generation prompt (the assistant's turn opened)."""
        placeholder = getattr(self.processor, "image_token", None) or "<image>"
        content: list[dict[str, Any]] = []
        pieces = context.split(placeholder)
        if num_images and len(pieces) - 1 == num_images:  # the task placed the images itself
            for i, piece in enumerate(pieces):
                if i:
                    content.append({"type": "image"})
                if piece.strip():
                    content.append({"type": "text", "text": piece.strip()})
        else:
            content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": context}]
        if getattr(self.processor, "chat_template", None) is None:
            return "".join(f"{placeholder}\n" for _ in range(num_images)) + context
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def _encode(self, texts: list[str], visuals: list[list[Any]], rows: list[int]) -> _Batch:
        images = [image for row in visuals for image in row]
        inputs = self.processor(images=images or None, text=texts, padding=True, return_tensors="pt")
        moved: dict[str, Any] = {}
        for key, value in inputs.items():
            if isinstance(value, torch.Tensor):
                value = value.to(self._device)
                if value.is_floating_point():
                    value = value.to(self._model.dtype)
            moved[key] = value
        if "attention_mask" not in moved:
            raise RuntimeError("the processor returned no attention_mask; tokred needs one for padded batches")
        return _Batch(rows, moved)

    def _generate_kwargs(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        do_sample = bool(gen_kwargs.get("do_sample", temperature > 0)) and temperature > 0
        kwargs: dict[str, Any] = {
            "max_new_tokens": int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
            "do_sample": do_sample,
            "num_beams": int(gen_kwargs.get("num_beams") or 1),
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if do_sample:
            kwargs["temperature"] = temperature
            if gen_kwargs.get("top_p") is not None:
                kwargs["top_p"] = float(gen_kwargs["top_p"])
        return kwargs

    # ------------------------------------------------------------------ runs and statistics

    @contextlib.contextmanager
    def _run(self) -> Iterator[tokred.Run | None]:
        if self.method is None:
            yield None
            return
        with tokred.apply(self._model, self.method) as run:
            yield run

    def _account(self, stats: _Stats, run: tokred.Run | None, batch: _Batch, seconds: float) -> None:
        stats.seconds += seconds
        real = batch.inputs["attention_mask"].sum(dim=1).tolist()
        stats.lm_tokens_full += int(sum(real))
        if run is None:
            stats.lm_tokens_reduced += int(sum(real))
            return
        report = run.report
        stats.prefills += len(real)
        stats.visual_in += sum(report.visual_tokens_input)
        stats.visual_equivalent += sum(report.equivalent_visual_tokens)
        stats.kept_per_image.extend(len(image.kept_final) for image in report.images)
        first = report.visual_tokens_per_layer[0] if report.visual_tokens_per_layer else [0] * len(real)
        stats.lm_tokens_reduced += int(sum(n - (v - k) for n, v, k in zip(real, report.visual_tokens_input, first)))

    def _log_stats(self, kind: str) -> None:
        stats = self.stats.get(kind)
        if stats is None:
            return
        if self.method is None:
            logger.info(f"tokred {kind}: unreduced, {stats.lm_tokens_full} language-model tokens, {stats.seconds:.1f} s in the model")
            return
        kept = sum(stats.kept_per_image) / len(stats.kept_per_image) if stats.kept_per_image else math.nan
        logger.info(
            f"tokred {kind}: {self.method_name} kept {kept:.1f} visual tokens per image (final), "
            f"{stats.visual_equivalent / max(1, stats.prefills):.1f} equivalent per sample of "
            f"{stats.visual_in / max(1, stats.prefills):.1f}; language-model input {stats.lm_tokens_reduced} of "
            f"{stats.lm_tokens_full} tokens; {stats.seconds:.1f} s in the model"
        )


# ---------------------------------------------------------------------- helpers


def _result(nll: float, greedy: bool) -> Any:
    """A loglikelihood result lmms-eval 0.7 passes through unchanged.

    Its evaluator sends every response through ``unwrap_generation_output``, which turns anything
    but ``str``, ``(str, dict)``, ``list[str]`` or ``GenerationResult`` into ``str(output)``: a plain
    ``(float, bool)`` tuple would reach ``multiple_choice`` scoring as the string ``"(1.5, True)"``.
    A ``GenerationResult`` is unwrapped to its ``text`` as it is, so the tuple goes in there."""
    return GenerationResult(text=(nll, greedy))  # type: ignore[arg-type]


def _until(gen_kwargs: dict[str, Any]) -> list[str]:
    until = gen_kwargs.get("until")
    if until is None:
        return []
    if isinstance(until, str):
        return [until]
    if not isinstance(until, (list, tuple)):
        raise ValueError(f"generation_kwargs['until'] must be a string or a list, got {type(until).__name__}")
    return [u for u in until if u]


def _cut(text: str, until: Sequence[str]) -> str:
    for stop in until:
        text = text.split(stop, 1)[0]
    return text


def _move_trailing_space(context: str, continuation: str) -> tuple[str, str]:
    """lm-eval's convention: whitespace at the end of the context belongs to the continuation."""
    stripped = context.rstrip()
    return stripped, context[len(stripped):] + continuation


def _load_model(pretrained: str, model_class: str | None, device: torch.device, dtype: str | None,
                attn_implementation: str | None, revision: str | None, trust_remote_code: bool) -> torch.nn.Module:
    import transformers

    if model_class is None:
        cls = transformers.AutoModelForImageTextToText
    else:
        cls = getattr(transformers, model_class, None)
        if cls is None:
            raise ValueError(f"transformers has no class {model_class!r}")
    if dtype is None:
        dtype = "auto" if device.type == "cuda" else "float32"
    torch_dtype: Any = dtype if dtype == "auto" else getattr(torch, dtype, None)
    if torch_dtype is None:
        raise ValueError(f"unknown dtype {dtype!r}; use auto, float32, bfloat16 or float16")
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if revision is not None:
        kwargs["revision"] = revision
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    model = cls.from_pretrained(pretrained, **kwargs)
    return model.to(device).eval()


def _load_processor(pretrained: str, backend: str | None, revision: str | None, trust_remote_code: bool) -> Any:
    import transformers

    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision is not None:
        kwargs["revision"] = revision
    if backend not in (None, "default"):
        kwargs["backend"] = backend
    return transformers.AutoProcessor.from_pretrained(pretrained, **kwargs)
