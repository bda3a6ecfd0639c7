"""The conformance suite: the properties every method must have on every adapter.

Each ``check_*`` function builds a tiny offline model of one family, applies the method and
raises :class:`ConformanceError` (an ``AssertionError``) naming the property, the family, the
attention implementation and what differed. :func:`check_method` runs them all.

The properties (DESIGN.md section 6):

1. ``keep_everything``: the method's keep-everything variant gives the unmodified model's logits;
2. ``cache_consistency``: greedy ``generate`` with the KV cache gives the same tokens as
   recomputing every step without a cache on the same reduced sequence (``Run.frozen``);
3. ``layer_counts``: the visual tokens each decoder layer receives (counted by independent hooks)
   match the schedule's promise and the run report;
4. ``batch_invariance``: a left-padded batch of prompts of different lengths gives the same kept
   indices, last-token logits and generated tokens as each prompt alone;
5. ``determinism_and_cleanup``: the same inputs give the same kept indices and logits; every hook is gone
   after the ``with`` block, also when it is left by an exception;
6. ``text_only_and_errors``: text-only prompts pass through untouched; impossible budgets and
   unknown options fail with tokred errors before any model call;
7. ``cache_free_generation``: ``generate(use_cache=False)`` outside ``Run.frozen`` works: every step
   is a prefill that decides afresh on the longer sequence, so each generated token is what a fresh
   run on that prefix predicts, and a method without gates whose selector does not read the text
   (no ``"instruction_embeddings"`` in its ``inputs``: its decisions see only the images)
   generates exactly what it generates with the cache;
8. ``concurrent_calls``: two threads generating at once on one applied model get, each, what the
   same calls give one after the other (tokens and kept indices): a run's state belongs to the
   calling thread;
9. ``beam_search``: ``generate(num_beams=2, num_return_sequences=2)`` with the cache equals the
   cache-free recomputation of the same decisions; it does not apply where the unmodified model's
   own beams differ with and without a cache (InternVL on transformers 5.17), nor where the run
   refuses beams with a :class:`~tokred.RuntimeStateError` naming ``num_beams`` (a selector reading
   [CLS] attention when ``generate`` encodes each image once);
10. ``degenerate_images`` (images): 1x1, 1:100 and 100:1 images, each where the family's processor
    and the unmodified model take it: nothing dropped gives the unmodified logits, and with tokens
    dropped cached ``generate`` equals the frozen recomputation and a batch of them equals each alone;
11. ``video_without_processor`` (videos): video inputs assembled by hand, as a program feeding
    decoded frames without the processor does (:func:`~tokred.testing.processor_free_video_inputs`):
    keep-everything gives the unmodified logits and cached ``generate`` equals the frozen recomputation.

A property may **not apply** to a case (the unmodified model lacks it, or the run refuses the
input clearly, or the family's processor refuses a degenerate shape): the check then returns why,
as it does for a refused method.

A method may be **refused** on a family: ``tokred.apply`` raises :class:`~tokred.ScheduleError`
before any model call (VisionZip needs the vision keys of a [CLS]-attention layer, which Qwen-VL's
towers do not have). Every property then holds vacuously: :meth:`Case.refusal` checks that the
refusal comes before any model call, the check functions return the refusal's message instead of
``None``, :func:`check_method` returns the refused cases, and :func:`parametrize_with_checks` marks
those tests skipped with the message.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn

from .. import compat
from ..decisions import check_image_budgets
from ..errors import BudgetError, OptionsError, RuntimeStateError, ScheduleError, TokredError
from ..method import Method
from ..registry import Registry, default_registry
from ..runtime import apply
from ._tiny import FAMILIES, VIDEO_ADAPTER_OPTIONS, VIDEO_FAMILIES, make_image, tiny_model
from ._video import make_video, processor_free_video_inputs

__all__ = ["ConformanceError", "CHECKS", "DEGENERATE_SIZES", "NotApplicable", "Refusal", "check_method", "checks_for",
           "conformance_cases", "parametrize_with_checks", "tiny_inputs", "tiny_video_inputs"]

_ATOL = 1e-5
# Padding changes the summation order inside the kernels. Measured on the tiny models: up to 3e-5 for
# most methods, 1.1e-4 for cdpruner on llava_onevision (same kept tokens, logits up to 5.8 in size);
# a batch-dependent selection is caught before the logits, by the kept indices and the generated tokens.
_BATCH_ATOL = 2e-4


class ConformanceError(AssertionError):
    """A method broke a conformance property; the message names the property and the case."""


class NotApplicable(Exception):
    """Raised inside a check when its property does not apply to the case (the unmodified model
    lacks it, or the run refuses the input clearly); the check then returns the reason."""


@dataclass(frozen=True)
class Case:
    """One (method, family, attention implementation, modality) combination.

    ``modality`` is ``"image"`` (prompts with one synthetic image each, :func:`tiny_inputs`) or
    ``"video"`` (one synthetic clip each, :func:`tiny_video_inputs`; families of
    :data:`~tokred.testing.VIDEO_FAMILIES`, with the adapter options their videos need).
    """

    method: Method
    name: str
    family: str
    attn_implementation: str
    registry: Registry
    modality: str = "image"

    def fail(self, prop: str, message: str) -> ConformanceError:
        video = ", video" if self.modality == "video" else ""
        return ConformanceError(f"[{prop}] method {self.name!r} on {self.family} ({self.attn_implementation}{video}): {message}")

    def model(self) -> tuple[nn.Module, Any]:
        return tiny_model(self.family, attn_implementation=self.attn_implementation)

    @property
    def adapter_options(self) -> dict[str, Any] | None:
        """What ``tokred.apply`` needs to be told for this case (InternVL: that frames form a video)."""
        return VIDEO_ADAPTER_OPTIONS.get(self.family) if self.modality == "video" else None

    def apply(self, model: nn.Module, method: Method) -> Any:
        """``tokred.apply`` for this case: its registry and adapter options."""
        return apply(model, method, registry=self.registry, adapter_options=self.adapter_options)

    def adapter(self, model: nn.Module) -> Any:
        return self.registry.adapter_for(model, self.adapter_options)

    def inputs(self, processor: Any, prompts: Sequence[str], *, first_prompt: int = 0) -> dict[str, torch.Tensor]:
        """The processor's inputs for ``prompts`` in this case's modality. Video prompts of one batch
        get clips of different lengths (4 and 6 frames) where the processor allows it (Qwen-VL);
        processors that stack clips into one tensor get 4 frames each."""
        if self.modality == "image":
            return tiny_inputs(processor, prompts, first_prompt=first_prompt)
        stacks = bool(getattr(getattr(processor, "video_processor", None), "stacks_frames", False))
        frames = (4, 4) if stacks else (4, 6)
        return tiny_video_inputs(processor, prompts, frames=frames, first_prompt=first_prompt)

    def refusal(self) -> str | None:
        """Why ``tokred.apply`` refuses this method on this family (a
        :class:`~tokred.ScheduleError`, e.g. a selector's required input the adapter cannot
        provide), or ``None`` when it accepts it. A refusal must come before any model call; a
        call made while refusing is a :class:`ConformanceError`."""
        model, _ = self.model()
        calls: list[int] = []
        handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
        try:
            self.apply(model, self.method)
        except ScheduleError as exc:
            if calls:
                raise self.fail("refusal", "the model was called before the method was refused") from exc
            return str(exc)
        finally:
            handle.remove()
        return None


def tiny_inputs(processor: Any, prompts: Sequence[str], images_per_prompt: int = 1, *,
                first_prompt: int = 0, sizes: Sequence[tuple[int, int]] | None = None) -> dict[str, torch.Tensor]:
    """Processor inputs for ``prompts`` (each with ``images_per_prompt`` synthetic images), built
    through the processor's own chat template and left-padded.

    Prompt ``i`` gets the images seeded ``10 * (first_prompt + i) + j``, so
    ``tiny_inputs(processor, [prompts[i]], first_prompt=i)`` reproduces prompt ``i`` of a batch alone,
    images included, whatever layout the model's pixel values have. ``sizes``: ``(width, height)``
    of each prompt's images (default 336 x 336)."""
    if sizes is not None and len(sizes) != len(prompts):
        raise OptionsError(f"sizes names {len(sizes)} image sizes for {len(prompts)} prompts")
    texts, images = [], []
    for i, prompt in enumerate(prompts, start=first_prompt):
        content = [{"type": "image"}] * images_per_prompt + [{"type": "text", "text": prompt}]
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        width, height = sizes[i - first_prompt] if sizes is not None else (336, 336)
        images += [make_image(width, height, seed=10 * i + j) for j in range(images_per_prompt)]
    kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
    if images:
        kwargs["images"] = images
    return dict(processor(**kwargs))


def tiny_video_inputs(processor: Any, prompts: Sequence[str], videos_per_prompt: int = 1, *,
                      frames: int | Sequence[int] = 4, images_per_prompt: int = 0, first_prompt: int = 0,
                      size: tuple[int, int] = (112, 112)) -> dict[str, torch.Tensor]:
    """Processor inputs for ``prompts``, each with ``images_per_prompt`` synthetic images followed by
    ``videos_per_prompt`` synthetic clips (:func:`~tokred.testing.make_video`), built through the
    processor's own chat template (``{"type": "video"}`` items) and its ``videos=`` argument, left-padded.

    Args:
        processor: a tiny model's processor (:data:`~tokred.testing.VIDEO_FAMILIES`), or any processor
            whose chat template and ``videos=`` take a list of PIL frames per video.
        prompts: the questions.
        videos_per_prompt: clips per prompt.
        frames: frames of every clip, or per prompt number (``frames[first_prompt + i]`` for prompt
            ``i``, so that a prompt alone gets the clip it had in the batch).
        images_per_prompt: still images before the clips (mixed prompts).
        first_prompt: the number of the first prompt (seeds and frame counts), as in :func:`tiny_inputs`.
        size: ``(width, height)`` of every frame before the processor resizes it.

    Prompt ``i``'s clips are seeded ``10 * (first_prompt + i) + j``, its images like :func:`tiny_inputs`;
    the images go to the processor as one list per prompt (LLaVA-OneVision lays out the images of a
    multi-image prompt without tiles)."""
    texts, images, videos = [], [], []
    for i, prompt in enumerate(prompts, start=first_prompt):
        content = ([{"type": "image"}] * images_per_prompt + [{"type": "video"}] * videos_per_prompt
                   + [{"type": "text", "text": prompt}])
        texts.append(processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True))
        if images_per_prompt:  # nested per prompt: processors that lay out multi-image prompts differently see them
            images.append([make_image(seed=10 * i + j) for j in range(images_per_prompt)])
        count = frames if isinstance(frames, int) else frames[i]
        videos += [make_video(count, *size, seed=10 * i + j) for j in range(videos_per_prompt)]
    kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
    if images:
        kwargs["images"] = images
    if videos:
        kwargs["videos"] = videos
    return {name: value for name, value in processor(**kwargs).items() if name != "video_metadata"}


_PROMPTS = ("What is shown in this image?", "Describe the picture in detail please, with the colours of every shape.")


def _hook_census(model: nn.Module) -> dict[str, Any]:
    """Every forward hook and attention config object in the model, to compare before and after."""
    census: dict[str, Any] = {}
    for name, module in model.named_modules():
        census[name] = (
            tuple(module._forward_pre_hooks), tuple(module._forward_hooks),
            id(getattr(module, "config", None)),
        )
    return census


@contextlib.contextmanager
def _count_layer_inputs(layers: Sequence[nn.Module]) -> Iterator[list[list[int]]]:
    """Record each decoder layer's input sequence length per forward, with hooks of our own."""
    lengths: list[list[int]] = []

    def make(index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            if index == 0:
                lengths.append([])
            lengths[-1].append(int(hidden.shape[1]))

        return hook

    handles = [layer.register_forward_pre_hook(make(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        yield lengths
    finally:
        for handle in handles:
            handle.remove()


def _logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _generate(model: nn.Module, inputs: dict[str, torch.Tensor], **kwargs: Any) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=6, do_sample=False, **kwargs)


def _answers(model: nn.Module, inputs: dict[str, torch.Tensor], generated: torch.Tensor) -> list[list[int]]:
    """Each row's generated tokens, up to and including its first end-of-sequence token: in a batch,
    a row that ends early is padded while the others go on, which must not count as a difference."""
    eos = model.generation_config.eos_token_id
    stops = set(eos if isinstance(eos, (list, tuple)) else [] if eos is None else [eos])
    answers = []
    for row in generated[:, inputs["input_ids"].shape[1]:].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        answers.append(row[:end])
    return answers


def _cached_and_recomputed(case: Case, model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy ``generate`` under the case's method with the KV cache, then without it replaying the
    same decisions (``Run.frozen``): the two must agree token for token."""
    with case.apply(model, case.method) as run:
        cached = _generate(model, inputs)
        with run.frozen():
            recomputed = _generate(model, inputs, use_cache=False)
    return cached, recomputed


# ------------------------------------------------------------------------ checks


def check_keep_everything(case: Case) -> None:
    """Property 1: keeping every visual token reproduces the unmodified model's logits."""
    model, processor = case.model()
    inputs = case.inputs(processor, _PROMPTS[:1])
    expected = _logits(model, inputs)
    with case.apply(model, case.method.keep_everything()):
        got = _logits(model, inputs)
    if got.shape != expected.shape:
        raise case.fail("keep_everything", f"logits shape {tuple(got.shape)} != unmodified {tuple(expected.shape)}")
    diff = (got - expected).abs().max().item()
    if diff > _ATOL:
        raise case.fail("keep_everything", f"logits differ from the unmodified model by {diff:.3g} (atol {_ATOL})")


def check_cache_consistency(case: Case) -> None:
    """Property 2: cached generation equals cache-free recomputation on the same reduced sequence."""
    model, processor = case.model()
    inputs = case.inputs(processor, _PROMPTS[:1])
    cached, recomputed = _cached_and_recomputed(case, model, inputs)
    if not torch.equal(cached, recomputed):
        raise case.fail("cache_consistency", f"generate with cache gave {cached[0, -6:].tolist()}, "
                        f"recomputation without cache gave {recomputed[0, -6:].tolist()}")


def _promised_counts(case: Case, num_layers: int, image_tokens: int) -> list[set[int]]:
    """Per layer, the visual-token counts the schedule allows for one one-image prompt."""
    schedule = case.method.schedule()
    count = {image_tokens}
    if schedule.selector is not None:
        count = {schedule.selector.budget.tokens_for(image_tokens)}
    gates = dict(zip(schedule.gate_layers(num_layers), schedule.gates))
    promised = []
    for layer in range(num_layers):
        stage = gates.get(layer)
        if stage is not None:
            count = {stage.budget.tokens_for(image_tokens)} if stage.budget is not None else count | {0}
        promised.append(set(count))
    return promised


def check_layer_counts(case: Case) -> None:
    """Property 3: each decoder layer sees the number of visual tokens the schedule promised."""
    model, processor = case.model()
    inputs = case.inputs(processor, _PROMPTS[:1])
    adapter = case.adapter(model)
    layers = list(adapter.decoder_layers())
    # The adapter's candidates, not every image-token position: LLaVA-NeXT's newline tokens are
    # image tokens that stay (they count as text here).
    image_tokens = adapter.count_visual_tokens(inputs)
    text_tokens = inputs["input_ids"].shape[1] - image_tokens
    with case.apply(model, case.method) as run, _count_layer_inputs(layers) as lengths:
        _logits(model, inputs)
    seen = [n - text_tokens for n in lengths[0]]
    promised = _promised_counts(case, len(layers), image_tokens)
    for layer, (n, allowed) in enumerate(zip(seen, promised)):
        if n not in allowed:
            raise case.fail("layer_counts", f"layer {layer} received {n} visual tokens; the schedule promised {sorted(allowed)}")
    reported = [counts[0] for counts in run.report.visual_tokens_per_layer]
    if reported != seen:
        raise case.fail("layer_counts", f"report says {reported} visual tokens per layer, the layers received {seen}")
    if any(later > earlier for earlier, later in zip(seen, seen[1:])):
        raise case.fail("layer_counts", f"the visual-token count grew from one layer to the next: {seen}")


def check_batch_invariance(case: Case) -> None:
    """Property 4: a padded batch behaves like each prompt alone."""
    model, processor = case.model()
    batch = case.inputs(processor, _PROMPTS)
    with case.apply(model, case.method) as run:
        batch_logits = _logits(model, batch)[:, -1]
        batch_kept = run.report.kept_indices
        batch_tokens = _answers(model, batch, _generate(model, batch))
        for i, prompt in enumerate(_PROMPTS):
            alone = case.inputs(processor, [prompt], first_prompt=i)
            alone_logits = _logits(model, alone)[:, -1]
            if run.report.kept_indices[0] != batch_kept[i]:
                raise case.fail("batch_invariance", f"prompt {i} keeps different tokens in a batch than alone")
            diff = (alone_logits[0] - batch_logits[i]).abs().max().item()
            if diff > _BATCH_ATOL:
                raise case.fail("batch_invariance", f"prompt {i}: last-token logits differ by {diff:.3g} between batch and alone")
            alone_tokens = _answers(model, alone, _generate(model, alone))
            if alone_tokens[0] != batch_tokens[i]:
                raise case.fail("batch_invariance", f"prompt {i} generates {alone_tokens[0]} alone but "
                                f"{batch_tokens[i]} in a batch")


def check_determinism_and_cleanup(case: Case) -> None:
    """Property 5: same inputs, same kept indices; no hook survives the run, even after an exception."""
    model, processor = case.model()
    inputs = case.inputs(processor, _PROMPTS[:1])
    expected = _logits(model, inputs)  # transformers installs its own output-capturing hooks on first use
    before = _hook_census(model)
    kept, logits = [], []
    for _ in range(2):
        with case.apply(model, case.method) as run:
            logits.append(_logits(model, inputs))
            kept.append(run.report.kept_indices)
    if kept[0] != kept[1]:
        raise case.fail("determinism_and_cleanup", "the same inputs gave different kept indices in two runs")
    if not torch.equal(logits[0], logits[1]):  # same indices, different replacement features or merges
        diff = (logits[0] - logits[1]).abs().max().item()
        raise case.fail("determinism_and_cleanup", f"the same inputs gave logits differing by {diff:.3g} in two runs")
    if _hook_census(model) != before:
        raise case.fail("determinism_and_cleanup", "hooks or attention configs remain after the with block")

    class _Boom(Exception):
        pass

    try:
        with case.apply(model, case.method):
            raise _Boom
    except _Boom:
        pass
    if _hook_census(model) != before:
        raise case.fail("determinism_and_cleanup", "hooks remain after an exception inside the with block")
    with case.apply(model, case.method.keep_everything()):
        pass
    if not torch.equal(_logits(model, inputs), expected):
        raise case.fail("determinism_and_cleanup", "the model computes differently after the run ended")


def check_text_only_and_errors(case: Case) -> None:
    """Property 6: text-only prompts are untouched; impossible budgets fail before any model call."""
    model, processor = case.model()
    text = dict(processor(text=["USER: Tell me a story about a fox. ASSISTANT:"], return_tensors="pt"))
    expected = _logits(model, text)
    with case.apply(model, case.method):
        got = _logits(model, text)
        generated = _generate(model, text)
    if not torch.equal(got, expected):
        raise case.fail("text_only_and_errors", "a text-only prompt's logits changed under the run")
    if not torch.equal(generated, _generate(model, text)):
        raise case.fail("text_only_and_errors", "a text-only prompt generates differently under the run")

    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for bad in ({"keep": 0}, {"keep": 3, "keep_ratio": 0.5}, {"keep_ratio": 1.5}, {"no_such_option_xyz": 1}):
            try:
                case.registry.create(case.name, **bad)
            except (BudgetError, OptionsError):
                continue
            raise case.fail("text_only_and_errors", f"options {bad} were accepted")
        image_tokens = _fixed_tokens(case, model)
        if image_tokens is not None:
            too_many = case.registry.create(case.name, keep=image_tokens + 1)
            try:
                case.apply(model, too_many)
            except BudgetError:
                pass
            else:
                raise case.fail("text_only_and_errors", f"keep={image_tokens + 1} > {image_tokens} tokens was accepted")
    finally:
        handle.remove()
    if calls:
        raise case.fail("text_only_and_errors", "the model was called while validating options")


def check_cache_free_generation(case: Case) -> None:
    """Property 7: ``generate(use_cache=False)`` re-decides at every step, consistently."""
    model, processor = case.model()
    inputs = case.inputs(processor, _PROMPTS[:1])
    length = inputs["input_ids"].shape[1]
    with case.apply(model, case.method) as run:
        recomputed = _generate(model, inputs, use_cache=False)
        steps = recomputed.shape[1] - length
        if run.report.prefills != steps:
            raise case.fail("cache_free_generation", f"{steps} cache-free steps were reported as {run.report.prefills} prefills")
        if steps and not run.report.images:
            raise case.fail("cache_free_generation", "the report of the last step describes no image")
    for step in range(steps):
        prefix = _extended(inputs, recomputed[:, length:length + step])
        with case.apply(model, case.method):  # greedy with generate's own logits processors
            with torch.no_grad():
                predicted = int(model.generate(**prefix, max_new_tokens=1, do_sample=False)[0, -1])
        if predicted != int(recomputed[0, length + step]):
            raise case.fail("cache_free_generation", f"step {step} generated {int(recomputed[0, length + step])} "
                            f"without cache, but a fresh run on the same prefix predicts {predicted}")
    schedule = case.method.schedule()
    reads_text = schedule.selector is not None and "instruction_embeddings" in schedule.selector.selector.inputs
    if not schedule.gates and not reads_text:
        with case.apply(model, case.method):
            cached = _generate(model, inputs)
        if not torch.equal(cached, recomputed):
            raise case.fail("cache_free_generation", f"without gates, generate without cache gave "
                            f"{recomputed[0, length:].tolist()} but with cache {cached[0, length:].tolist()}")


def check_concurrent_calls(case: Case) -> None:
    """Property 8: two threads generating at once on one applied model each get what the same calls
    give one after the other: the same tokens, and their own run report's kept indices."""
    model, processor = case.model()
    prompts = [case.inputs(processor, [prompt], first_prompt=i) for i, prompt in enumerate(_PROMPTS)]
    with case.apply(model, case.method) as run:
        expected = []
        for inputs in prompts:
            expected.append((_generate(model, inputs), run.report.kept_indices))
        start = threading.Barrier(len(prompts))
        results: dict[int, list[tuple[torch.Tensor, Any]]] = {i: [] for i in range(len(prompts))}
        errors: list[str] = []

        def work(i: int) -> None:
            try:
                start.wait(timeout=60)
                for _ in range(2):
                    results[i].append((_generate(model, prompts[i]), run.report.kept_indices))
            except BaseException as exc:  # reported below: a thread's exception must fail the check
                errors.append(f"thread {i}: {type(exc).__name__}: {exc}")

        threads = [threading.Thread(target=work, args=(i,), name=f"tokred-conformance-{i}") for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    if errors:
        raise case.fail("concurrent_calls", "; ".join(errors))
    for i, ((tokens, kept), got) in enumerate(zip(expected, results.values())):
        for call, (got_tokens, got_kept) in enumerate(got):
            if not torch.equal(got_tokens, tokens):
                raise case.fail("concurrent_calls", f"thread {i} call {call} generated {got_tokens[0, -6:].tolist()}, "
                                f"alone {tokens[0, -6:].tolist()}")
            if got_kept != kept:
                raise case.fail("concurrent_calls", f"thread {i} call {call}: its run report keeps other tokens than alone")


#: What the unmodified tiny model does, per (family, attention implementation, modality): the same
#: for every method, so computed once per process (the tiny models are built from a fixed seed).
_UNMODIFIED: dict[tuple[str, str, str, str], Any] = {}


def _unmodified(case: Case, what: str, compute: Callable[[], Any]) -> Any:
    key = (case.family, case.attn_implementation, case.modality, what)
    if key not in _UNMODIFIED:
        _UNMODIFIED[key] = compute()
    return _UNMODIFIED[key]


_BEAMS = {"num_beams": 2, "num_return_sequences": 2}


def check_beam_search(case: Case) -> None:
    """Property 9: beam search with the cache equals the cache-free recomputation of the same
    decisions (every beam's cache rows carry their own key masks through the reorderings)."""
    model, processor = case.model()
    inputs = case.inputs(processor, _PROMPTS[:1])
    agree = _unmodified(case, "beams", lambda: torch.equal(_generate(model, inputs, **_BEAMS),
                                                           _generate(model, inputs, use_cache=False, **_BEAMS)))
    if not agree:
        raise NotApplicable(f"on transformers {compat.transformers_version()} the unmodified {case.family} model's "
                            "beams differ with and without a cache")
    with case.apply(model, case.method) as run:
        try:
            cached = _generate(model, inputs, **_BEAMS)
        except RuntimeStateError as exc:
            if "num_beams" not in str(exc):
                raise
            raise NotApplicable(f"the run refuses beam search: {exc}") from exc
        with run.frozen():
            recomputed = _generate(model, inputs, use_cache=False, **_BEAMS)
    if not torch.equal(cached, recomputed):
        raise case.fail("beam_search", f"beams with cache {cached[:, -6:].tolist()}, recomputed without cache "
                        f"{recomputed[:, -6:].tolist()}")


#: ``(width, height)`` of the degenerate images: one pixel, 1:100 and 100:1.
DEGENERATE_SIZES: tuple[tuple[int, int], ...] = ((1, 1), (3, 300), (300, 3))


def _accepted_sizes(model: nn.Module, processor: Any, adapter: Any) -> tuple[list[tuple[tuple[int, int], int]], list[str]]:
    """The degenerate sizes the processor and the unmodified model take, each with its number of
    visual tokens, and why the others failed."""
    sizes, refused = [], []
    for size in DEGENERATE_SIZES:
        try:
            inputs = tiny_inputs(processor, _PROMPTS[:1], sizes=[size])
            _logits(model, inputs)
        except Exception as exc:  # the processor or the unmodified model refuses it: not tokred's to handle
            refused.append(f"{size[0]}x{size[1]} ({type(exc).__name__}: {str(exc)[:120]})")
        else:
            sizes.append((size, adapter.count_visual_tokens(inputs)))
    return sizes, refused


def check_degenerate_images(case: Case) -> None:
    """Property 10: 1x1, 1:100 and 100:1 images (each where the family's processor and the
    unmodified model take it) keep the other properties: nothing dropped gives the unmodified
    logits; with tokens dropped, cached generation equals the frozen recomputation, and a batch of
    them keeps the same tokens and generates the same answers as each alone."""
    model, processor = case.model()
    adapter, schedule = case.adapter(model), case.method.schedule()
    accepted, refused = _unmodified(case, "degenerate sizes", lambda: _accepted_sizes(model, processor, adapter))
    if not accepted:
        raise NotApplicable(f"the unmodified {case.family} model refuses every degenerate image: {'; '.join(refused)}")
    # A budget of absolute size (keep=32) cannot be met by an image of 4 visual tokens: tokred refuses
    # it with a BudgetError, never clamping, which is right; such sizes are left out here.
    sizes, too_small = [], []
    for size, tokens in accepted:
        try:
            check_image_budgets(schedule, schedule.gate_layers(adapter.num_layers), tokens, f"{tokens} visual tokens")
        except BudgetError as exc:
            too_small.append(f"{size[0]}x{size[1]}: {exc}")
        else:
            sizes.append(size)
    if not sizes:
        raise NotApplicable(f"the method's budget exceeds every degenerate image's visual tokens: {'; '.join(too_small)}")
    prompts = [_PROMPTS[i % len(_PROMPTS)] for i in range(len(sizes))]
    batch = tiny_inputs(processor, prompts, sizes=sizes)
    expected = _unmodified(case, "degenerate logits", lambda: _logits(model, batch))
    with case.apply(model, case.method.keep_everything()):
        got = _logits(model, batch)
    # Real positions only: a padding position's logits depend on how its fully masked attention row
    # is handled, which differs between kernels (eager) and is never read.
    real = batch["attention_mask"].bool()
    diff = (got - expected)[real].abs().max().item() if got.shape == expected.shape else float("inf")
    if diff > _ATOL:
        raise case.fail("degenerate_images", f"keeping everything on {sizes} changes the logits by {diff:.3g}")
    with case.apply(model, case.method) as run:
        cached = _generate(model, batch)
        batch_kept = run.report.kept_indices
        with run.frozen():
            recomputed = _generate(model, batch, use_cache=False)
        if not torch.equal(cached, recomputed):
            raise case.fail("degenerate_images", f"images {sizes}: generate with cache gave {cached[:, -6:].tolist()}, "
                            f"recomputation without cache {recomputed[:, -6:].tolist()}")
        answers = _answers(model, batch, cached)
        for i, size in enumerate(sizes):
            alone = tiny_inputs(processor, [prompts[i]], first_prompt=i, sizes=[size])
            alone_answer = _answers(model, alone, _generate(model, alone))[0]
            if run.report.kept_indices[0] != batch_kept[i]:
                raise case.fail("degenerate_images", f"a {size[0]}x{size[1]} image keeps different tokens in a batch than alone")
            if alone_answer != answers[i]:
                raise case.fail("degenerate_images", f"a {size[0]}x{size[1]} image generates {alone_answer} alone but "
                                f"{answers[i]} in a batch")


def check_video_without_processor(case: Case) -> None:
    """Property 11: video inputs assembled by hand (:func:`~tokred.testing.processor_free_video_inputs`)
    behave as the processor's: keep-everything gives the unmodified logits, and cached generation
    equals the frozen recomputation."""
    model, processor = case.model()
    try:
        inputs = processor_free_video_inputs(model, processor, _PROMPTS[:1])
    except NotImplementedError as exc:
        raise NotApplicable(str(exc)) from exc
    expected = _logits(model, inputs)
    with case.apply(model, case.method.keep_everything()):
        got = _logits(model, inputs)
    diff = (got - expected).abs().max().item() if got.shape == expected.shape else float("inf")
    if diff > _ATOL:
        raise case.fail("video_without_processor", f"keeping everything changes the logits by {diff:.3g}")
    cached, recomputed = _cached_and_recomputed(case, model, inputs)
    if not torch.equal(cached, recomputed):
        raise case.fail("video_without_processor", f"generate with cache gave {cached[0, -6:].tolist()}, "
                        f"recomputation without cache {recomputed[0, -6:].tolist()}")


def _extended(inputs: dict[str, torch.Tensor], new_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """``inputs`` followed by the text tokens ``new_ids`` ``[B, n]``: every per-position input
    (``[B, L]`` like ``input_ids``: the attention mask, Qwen's ``mm_token_type_ids``) grows too, with
    ones for the mask and zeros (text) for the others."""
    ids = inputs["input_ids"]
    extended = dict(inputs)
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.shape == ids.shape:
            tail = new_ids if name == "input_ids" else (torch.ones_like(new_ids) if name == "attention_mask" else torch.zeros_like(new_ids))
            extended[name] = torch.cat([value, tail.to(value.dtype)], dim=1)
    return extended


def _fixed_tokens(case: Case, model: nn.Module) -> int | None:
    return case.adapter(model).visual_tokens_per_image()


def _unless_refused(check: Callable[[Case], None]) -> Callable[[Case], str | None]:
    """``check`` run only where the method is accepted; on a family that refuses it, the
    refusal's message is returned instead (see :meth:`Case.refusal`), and where the property does
    not apply to the case (:class:`NotApplicable`), why not."""
    def run(case: Case) -> str | None:
        refusal = case.refusal()
        if refusal is not None:
            return f"tokred.apply refuses {case.name} on {case.family}: {refusal}"
        try:
            check(case)
        except NotApplicable as exc:
            return f"{check.__name__.removeprefix('check_')} does not apply to {case.name} on {case.family}: {exc}"
        return None

    run.__name__ = check.__name__
    run.__qualname__ = check.__qualname__
    run.__doc__ = check.__doc__
    return run


#: Property name -> check function, in the order of DESIGN.md section 6 (then tokred's own).
#: Each returns ``None`` when the property holds, or why it did not run (``tokred.apply`` refuses
#: the method on the case's family, or the property does not apply to the case), and raises
#: :class:`ConformanceError` otherwise.
CHECKS: dict[str, Callable[[Case], str | None]] = {
    "keep_everything": _unless_refused(check_keep_everything),
    "cache_consistency": _unless_refused(check_cache_consistency),
    "layer_counts": _unless_refused(check_layer_counts),
    "batch_invariance": _unless_refused(check_batch_invariance),
    "determinism_and_cleanup": _unless_refused(check_determinism_and_cleanup),
    "text_only_and_errors": _unless_refused(check_text_only_and_errors),
    "cache_free_generation": _unless_refused(check_cache_free_generation),
    "concurrent_calls": _unless_refused(check_concurrent_calls),
    "beam_search": _unless_refused(check_beam_search),
    "degenerate_images": _unless_refused(check_degenerate_images),
    "video_without_processor": _unless_refused(check_video_without_processor),
}

#: Properties about one modality's inputs; every other property runs on both.
_MODALITY_OF_CHECK: dict[str, str] = {"degenerate_images": "image", "video_without_processor": "video"}


def checks_for(modality: str = "image") -> list[str]:
    """The properties checked on ``modality`` (``"image"`` or ``"video"``) prompts, in order."""
    if modality not in ("image", "video"):
        raise OptionsError(f"modality must be 'image' or 'video', got {modality!r}")
    return [name for name in CHECKS if _MODALITY_OF_CHECK.get(name, modality) == modality]


def _selected_checks(checks: Sequence[str] | None, modality: str) -> list[str]:
    """``checks`` (default: every property of ``modality``), each a property of that modality."""
    valid = checks_for(modality)
    selected = valid if checks is None else list(checks)
    unknown = sorted(set(selected) - set(valid))
    if unknown:
        raise OptionsError(f"unknown checks {unknown} for {modality}s; valid: {valid}")
    return selected


@dataclass(frozen=True)
class Refusal:
    """A case :func:`check_method` did not run: ``tokred.apply`` refused the method there
    (``check`` is ``None``), or property ``check`` does not apply to the case (e.g. the unmodified
    model's own beams differ with and without a cache)."""

    family: str
    attn_implementation: str
    message: str
    check: str | None = None


def conformance_cases(
    method: str | Method,
    families: Sequence[str] | None = None,
    attn_implementations: Sequence[str] = ("sdpa", "eager"),
    registry: Registry | None = None,
    *,
    modality: str = "image",
) -> list[Case]:
    """The (family, attention implementation) cases a method is checked on.

    ``families`` defaults to every registered adapter that :func:`tiny_model` can build (with
    ``modality="video"``: that can also take videos, :data:`~tokred.testing.VIDEO_FAMILIES`).
    """
    registry = registry or default_registry()
    if modality not in ("image", "video"):
        raise OptionsError(f"modality must be 'image' or 'video', got {modality!r}")
    if isinstance(method, str):
        name, instance = method, registry.create(method)
    else:
        name, instance = registry.name_of(method), method
    capable = FAMILIES if modality == "image" else VIDEO_FAMILIES
    if families is None:
        families = [f for f in registry.list_adapters() if f in capable]
    else:
        families = list(families)
        unable = [f for f in families if f not in capable]
        if unable:
            raise OptionsError(f"no tiny {modality} inputs for {unable}; families with them: {list(capable)}")
    if not families:
        raise TokredError(f"no adapter family to check: none of the registered adapters has a tiny model for {modality}s")
    return [Case(instance, name, f, impl, registry, modality) for f in families for impl in attn_implementations]


def check_method(
    method: str | Method,
    families: Sequence[str] | None = None,
    attn_implementations: Sequence[str] = ("sdpa", "eager"),
    *,
    registry: Registry | None = None,
    checks: Sequence[str] | None = None,
    modality: str = "image",
) -> list[Refusal]:
    """Run the conformance suite for ``method`` (a registered name or a Method instance).

    ``modality="video"`` runs every property on video prompts instead (one synthetic 4-frame clip
    per prompt, clips of 4 and 6 frames in a batch where the processor allows it) on the families
    that take videos.

    Raises :class:`ConformanceError` at the first property that fails, naming it, the family and
    the attention implementation. A Method instance must be of a registered class, since the suite
    also creates it by name with impossible options.

    Returns:
        The cases ``tokred.apply`` refused (a :class:`~tokred.ScheduleError` before any model call,
        e.g. a required selector input the family cannot provide), one :class:`Refusal` each, and
        the (case, property) pairs where a property does not apply (``Refusal.check`` names it);
        empty when every property ran on every family checked.
    """
    selected = _selected_checks(checks, modality)
    refused = []
    for case in conformance_cases(method, families, attn_implementations, registry, modality=modality):
        refusal = case.refusal()
        if refusal is not None:
            refused.append(Refusal(case.family, case.attn_implementation, refusal))
            continue
        for prop in selected:
            reason = CHECKS[prop](case)
            if reason is not None:
                refused.append(Refusal(case.family, case.attn_implementation, reason, prop))
    return refused


def parametrize_with_checks(
    methods: Sequence[str | Method],
    families: Sequence[str] | None = None,
    attn_implementations: Sequence[str] = ("sdpa", "eager"),
    xfail: dict[str | tuple[str, str], str] | None = None,
    *,
    registry: Registry | None = None,
    modality: str = "image",
    checks: Sequence[str] | None = None,
) -> Any:
    """A ``pytest.mark.parametrize`` over ``case, check``: one test per (method, family, attention
    implementation, property), with ids like ``mymethod-llava-sdpa-cache_consistency``::

        @parametrize_with_checks(["mymethod"])
        def test_conformance(case, check):
            check(case)

    ``xfail`` maps a property name, or a ``(method name, property)`` pair, to a reason; those
    tests are marked ``xfail(strict=True)``, so a fixed property shows up as a failure to update.
    ``modality="video"`` checks video prompts (ids end in ``-video``) on the families that take videos.
    ``checks`` limits the properties (default: every one of the modality, :func:`checks_for`).
    Cases where ``tokred.apply`` refuses the method (see the module documentation) are skipped
    with the refusal's message.
    pytest is imported here, not at module import: tokred does not depend on it.
    """
    import pytest

    xfail = dict(xfail or {})
    unknown = sorted({key if isinstance(key, str) else key[1] for key in xfail} - set(CHECKS))
    if unknown:
        raise OptionsError(f"xfail names unknown checks {unknown}; valid: {list(CHECKS)}")
    selected = _selected_checks(checks, modality)

    def skipping_refusals(check: Callable[[Case], str | None]) -> Callable[[Case], None]:
        def run(case: Case) -> None:
            reason = check(case)
            if reason is not None:
                pytest.skip(reason)

        return run

    params = []
    for method in methods:
        for case in conformance_cases(method, families, attn_implementations, registry, modality=modality):
            for prop in selected:
                check = CHECKS[prop]
                reason = xfail.get((case.name, prop), xfail.get(prop))
                marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason is not None else []
                ident = f"{case.name}-{case.family}-{case.attn_implementation}-{prop}" + ("-video" if modality == "video" else "")
                params.append(pytest.param(case, skipping_refusals(check), marks=marks, id=ident))
    return pytest.mark.parametrize("case, check", params)
