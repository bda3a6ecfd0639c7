"""Train the SYNTHETIC PROXY from scratch, deterministically, on one CPU thread.

    python -m tokred.eval.proxy.train --out DIR [--seed S] [--threads 1] [--eval-items N] ...

Every phase draws its questions about a pool of 4,096 training scenes (seeds below ``2**40``,
disjoint from the held-out splits :func:`tokred.eval.proxy.proxy_task` reads):

A. **Vision tower** with per-patch auxiliary heads (discarded afterwards): the colour and the shape
   of the object covering the patch (or "none"), the patch's row and column (weighted 3x on object
   patches, so that positions survive into the features), and the patch's mean colour (so that
   background patches keep informative, varied features, as a real CLIP's do). 800 steps: at 400,
   a patch's shape (it sees one quadrant of its object) was right 81% of the time, and the look-up
   by shape among 256 tokens then found the wrong object often enough to cost the unreduced model
   several points; at 800, 98% (training batches).
B0. **Symbolic language-model pretraining** (no image): each object patch is written as the sum of
   the input embeddings of its four words (colour, shape, left/right, top/bottom), background
   patches as noise, at their original positions, in short sequences. The look-up the task needs
   (find the asked shape among several objects, read its colour or side) is learnt here in a few
   hundred steps, where among 256 real tokens it was not learnt in 900. Curriculum: colour
   questions with one token per object first, then every question type, then every object patch.
   2,000 steps, ``presence`` asked three times as often as each other type (``question_mix``): it
   needs two look-ups (the asked shape's colour, then a comparison with the named colour), and at
   1,000 steps with an even mix it stayed at 70% of the training batches while the others were at
   100%; with this mix it reaches 97%.
B1. **Projector alignment** (LLaVA's stage 1, word embeddings as targets): the projector alone
   learns to map each object patch's tower feature to its words' embedding sum. 200 steps.
B2. **Projector + language model** on real scenes, tower frozen: the first steps keep every
   object's patches (asked object and distractors alike) plus a few random others, then every
   sequence keeps a uniform random subset of its visual tokens (keep rate drawn from 100 (twice as
   often), 50, 25 and 10%, original positions), so reduced inputs are in distribution for every
   method. The alignment
   loss stays on, and each step adds a symbolic batch (rehearsal), so the look-up is not unlearnt
   while the projector is imperfect. 1,200 steps, the same question mix.

No loss looks at attention: no head is told where the asked object is, and no phase prefers the
tokens some reduction method would keep (the curriculum keeps every object, not the asked one;
the last phase keeps uniform random subsets).

Each phase is bitwise reproducible on one machine with the same torch build and thread count.
Its figures rank reduction methods on this synthetic task only; they are not the papers'
benchmarks.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import transformers

from ._inputs import NUM_VISUAL, assemble, encode_prompts, project, visual_features
from ._model import build_model, build_processor, build_tokenizer, save_proxy
from ._scenes import COLOURS, GRID, KINDS, SHAPES, ProxyItem, ask, askable, make_item

__all__ = ["Recipe", "train", "patch_labels", "train_seed", "held_out_figures", "CHECK_ITEMS", "main"]

_COLOUR_NAMES = tuple(COLOURS)
_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float32).view(1, 3, 1, 1)
_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float32).view(1, 3, 1, 1)
_MIN_LABEL_PIXELS = 20  # a patch is an object patch when the object covers >= 10% of its pixels


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a trained proxy (saved with the weights in ``training.json``)."""

    seed: int = 0
    pool: int = 4096
    vision_steps: int = 800
    vision_batch: int = 32
    vision_lr: float = 1e-2
    symbolic_steps: int = 2000
    symbolic_background: int = 24
    symbolic_colour_steps: int = 200
    symbolic_sparse_steps: int = 600
    symbolic_batch: int = 64
    symbolic_first_kinds: tuple[str, ...] = ("colour",)
    language_steps: int = 1200
    language_batch: int = 32
    language_lr: float = 2e-3
    projector_steps: int = 0
    curriculum_steps: int = 200
    rehearsal_weight: float = 1.0
    align_steps: int = 200
    curriculum_colour_steps: int = 0
    curriculum_sparse_steps: int = 0
    projector_lr: float = 2e-3
    #: Phase B's keep rates, drawn uniformly per step: 1.0 listed twice, because the unreduced
    #: sequence (every distractor present) is the hardest input to look the asked object up in;
    #: with each rate once (same tower and symbolic phase) the unreduced model scored 95.3% on val,
    #: 1.4 points below the oracle at 10%; with 1.0 twice, 98.0%.
    keep_rates: tuple[float, ...] = (1.0, 1.0, 0.5, 0.25, 0.1)
    align_weight: float = 20.0
    eos_weight: float = 0.1
    position_weight: float = 3.0
    warmup: int = 50
    dimensions: dict[str, int] = field(default_factory=dict)
    #: The question types symbolic and phase-B batches draw from, uniformly: a type listed n times
    #: is asked n times as often. ``presence`` is listed three times because it is the one type that
    #: needs two look-ups (the asked shape's colour, then a comparison with the named colour); asked
    #: as often as the others it plateaued at 70% of the symbolic training batches.
    question_mix: tuple[str, ...] = ("colour", "presence", "presence", "presence", "left_right", "top_bottom")

    def __post_init__(self) -> None:
        unknown = sorted(set(self.question_mix) - set(KINDS))
        if unknown or not self.question_mix:
            raise ValueError(f"question_mix must list question types of {', '.join(KINDS)}; got {self.question_mix!r}")


def train_seed(seed: int, phase: int, step: int, index: int) -> int:
    """The scene seed of training item ``index`` of ``step`` in ``phase`` (0 vision, 1 language):
    always below ``2**40``, so never a held-out item."""
    if not (0 <= seed < 256 and 0 <= phase < 4 and 0 <= step < (1 << 20) and 0 <= index < (1 << 10)):
        raise ValueError("seed, phase, step or index out of range")
    return (seed << 32) | (phase << 30) | (step << 10) | index


@dataclass
class ScenePool:
    """The training scenes, drawn once: ``items`` (``P``), ``pixels`` ``[P, 3, 224, 224]`` uint8,
    and, after phase A, ``features`` ``[P, 256, D_v]`` from the trained (frozen) tower."""

    items: list[ProxyItem]
    pixels: torch.Tensor
    features: torch.Tensor | None = None

    def pixel_values(self, index: torch.Tensor) -> torch.Tensor:
        """``[len(index), 3, 224, 224]`` float32, as the processor normalises them."""
        return normalise(self.pixels[index])


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` uint8 -> float32 exactly as :func:`._inputs.pixel_values` computes it."""
    return (pixels.float() / 255.0 - _MEAN) / _STD


def make_pool(recipe: Recipe, log: Callable[[str], None]) -> ScenePool:
    """Draw ``recipe.pool`` training scenes (phase 0 seeds)."""
    items, images = [], []
    progress = _Progress("scenes", recipe.pool, 1024, log)
    for i in range(recipe.pool):
        item = make_item(train_seed(recipe.seed, 0, i >> 10, i & 1023))
        items.append(item)
        images.append(torch.from_numpy(np.array(item.image)).permute(2, 0, 1))
        progress(i, "")
    return ScenePool(items, torch.stack(images))


def patch_labels(items: Sequence[ProxyItem]) -> dict[str, torch.Tensor]:
    """Per-patch training labels, each ``[B, 256]`` long: ``colour`` (0 none, 1..8 as in COLOURS),
    ``shape`` (0 none, 1..6 as in SHAPES), ``object`` (index into the item's objects, -1 none);
    ``obj`` bool, the patch is an object patch; and ``side_lr`` / ``side_tb`` float (+1 left / top
    half, -1 right / bottom half)."""
    batch = len(items)
    colour = torch.zeros(batch, NUM_VISUAL, dtype=torch.long)
    owner = torch.full((batch, NUM_VISUAL), -1, dtype=torch.long)
    shape = torch.zeros(batch, NUM_VISUAL, dtype=torch.long)
    for b, item in enumerate(items):
        if not item.objects:
            continue
        cov = torch.from_numpy(item.coverage)  # [n_objects, 256]
        best, which = cov.max(dim=0)
        hit = best >= _MIN_LABEL_PIXELS
        owner[b, hit] = which[hit]
        colour[b, hit] = torch.tensor([_COLOUR_NAMES.index(item.objects[int(w)].colour) + 1 for w in which[hit]],
                                      dtype=torch.long)
        shape[b, hit] = torch.tensor([SHAPES.index(item.objects[int(w)].shape) + 1 for w in which[hit]],
                                     dtype=torch.long)
    idx = torch.arange(NUM_VISUAL)
    side_lr = torch.where(idx % GRID < GRID // 2, 1.0, -1.0).expand(batch, NUM_VISUAL)
    side_tb = torch.where(idx // GRID < GRID // 2, 1.0, -1.0).expand(batch, NUM_VISUAL)
    return {"colour": colour, "shape": shape, "object": owner, "obj": colour > 0, "side_lr": side_lr,
            "side_tb": side_tb}


class VisionHeads(nn.Module):
    """Per-patch auxiliary heads on the tower's features ``[B, 256, D_v]`` (training only)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.colour = nn.Linear(width, len(COLOURS) + 1)
        self.shape = nn.Linear(width, len(SHAPES) + 1)
        self.row = nn.Linear(width, GRID)
        self.col = nn.Linear(width, GRID)
        self.rgb = nn.Linear(width, 3)

    def losses(self, feats: torch.Tensor, labels: dict[str, torch.Tensor], rgb: torch.Tensor,
               position_weight: float) -> tuple[torch.Tensor, dict[str, float]]:
        """The summed loss and per-head figures; ``rgb`` ``[B, 256, 3]`` is each patch's mean
        normalised pixel value."""
        idx = torch.arange(NUM_VISUAL)
        rows, cols = (idx // GRID).expand(feats.shape[0], -1), (idx % GRID).expand(feats.shape[0], -1)
        weight = torch.where(labels["obj"], position_weight, 1.0)
        c_logits, s_logits = self.colour(feats), self.shape(feats)
        # object patches are about a tenth of all patches: weight them up so "none" does not win
        w_obj = torch.where(labels["obj"], 5.0, 1.0).flatten()
        l_colour = (F.cross_entropy(c_logits.flatten(0, 1), labels["colour"].flatten(), reduction="none") * w_obj).mean()
        l_shape = (F.cross_entropy(s_logits.flatten(0, 1), labels["shape"].flatten(), reduction="none") * w_obj).mean()
        l_row = (F.cross_entropy(self.row(feats).flatten(0, 1), rows.flatten(), reduction="none") * weight.flatten()).mean()
        l_col = (F.cross_entropy(self.col(feats).flatten(0, 1), cols.flatten(), reduction="none") * weight.flatten()).mean()
        l_rgb = F.mse_loss(self.rgb(feats), rgb)
        obj = labels["obj"]
        with torch.no_grad():
            stats = {
                "colour_acc_obj": float((c_logits.argmax(-1)[obj] == labels["colour"][obj]).float().mean()),
                "shape_acc_obj": float((s_logits.argmax(-1)[obj] == labels["shape"][obj]).float().mean()),
                "none_acc": float((s_logits.argmax(-1)[~obj] == 0).float().mean()),
            }
        return l_colour + l_shape + l_row + l_col + l_rgb, stats


def _unique(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """``params`` without repeats, in order: with tied word embeddings ``lm_head`` shares the
    embedding matrix, which the optimiser must update once per step, not twice."""
    seen: set[int] = set()
    return [p for p in params if not (id(p) in seen or seen.add(id(p)))]  # type: ignore[func-returns-value]


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


class _RecentAccuracy:
    """Training-batch accuracy per question type since the last report (for the progress lines)."""

    def __init__(self) -> None:
        self.hits: dict[str, list[int]] = {}
        self.text = ""

    def add(self, items: Sequence[ProxyItem], hit: torch.Tensor) -> None:
        for it, h in zip(items, hit.tolist()):
            c = self.hits.setdefault(it.kind, [0, 0])
            c[0] += int(h)
            c[1] += 1

    def flush(self, step: int, total: int, every: int = 25) -> str:
        if (step + 1) % every == 0 or step + 1 == total:
            n = sum(c[1] for c in self.hits.values())
            overall = sum(c[0] for c in self.hits.values()) / max(n, 1)
            self.text = f"{overall:.2f} (" + " ".join(
                f"{k}:{self.hits[k][0] / self.hits[k][1]:.2f}" for k in KINDS if k in self.hits) + ")"
            self.hits = {}
        return self.text


class _Progress:
    """Prints ``[phase] step i/n ... elapsed, ETA`` lines."""

    def __init__(self, name: str, total: int, every: int, log: Callable[[str], None]) -> None:
        self.name, self.total, self.every, self.log = name, total, every, log
        self.start = time.perf_counter()

    def __call__(self, step: int, text: str) -> None:
        done = step + 1
        if done % self.every and done != self.total:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / done * (self.total - done)
        self.log(f"[{self.name}] step {done}/{self.total} {text} | {elapsed:.0f}s elapsed, ETA {eta:.0f}s")


def train_vision(model: transformers.LlavaForConditionalGeneration, pool: ScenePool, recipe: Recipe,
                 log: Callable[[str], None]) -> dict[str, float]:
    """Phase A: train the vision tower with per-patch heads on the pool's scenes; then store the
    frozen tower's features of every pool scene in ``pool.features``. Returns the last step's
    figures."""
    tower = model.model.vision_tower
    width = model.config.vision_config.hidden_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed + 1000)
        heads = VisionHeads(width)
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.vision_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(recipe.seed + 1001)
    labels_all = patch_labels(pool.items)
    progress = _Progress("vision", recipe.vision_steps, 25, log)
    tower.train()
    stats: dict[str, float] = {}
    order = torch.randperm(len(pool.items), generator=gen)
    cursor = 0
    for step in range(recipe.vision_steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, recipe.vision_steps, recipe.vision_lr, recipe.warmup)
        if cursor + recipe.vision_batch > len(order):  # next epoch
            order, cursor = torch.randperm(len(pool.items), generator=gen), 0
        index = order[cursor:cursor + recipe.vision_batch]
        cursor += recipe.vision_batch
        pixels = pool.pixel_values(index)
        rgb = F.avg_pool2d(pixels, 14).flatten(2).transpose(1, 2)  # [B, 256, 3]
        feats = visual_features(model, pixels)
        labels = {k: v[index] for k, v in labels_all.items()}
        loss, stats = heads.losses(feats, labels, rgb, recipe.position_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        stats["loss"] = float(loss.detach())
        progress(step, " ".join(f"{k} {v:.3f}" for k, v in stats.items()))
    tower.eval()
    with torch.no_grad():
        pool.features = torch.cat([
            visual_features(model, pool.pixel_values(torch.arange(i, min(i + 64, len(pool.items)))))
            for i in range(0, len(pool.items), 64)
        ])
    return stats


def _alignment_targets(model: transformers.LlavaForConditionalGeneration, tokenizer: transformers.PreTrainedTokenizerFast,
                       labels: dict[str, torch.Tensor], detach: bool = True) -> torch.Tensor:
    """``[B, 256, D]``: every object patch written as the sum of the input embeddings of the four
    words that describe it, ``E[colour] + E[shape] + E[left|right] + E[top|bottom]`` (the side of
    the image the patch lies in); detached unless ``detach=False``. Only object patches are used."""
    emb = model.model.language_model.get_input_embeddings().weight
    if detach:
        emb = emb.detach()

    def e(word: str) -> torch.Tensor:
        return emb[tokenizer.convert_tokens_to_ids(word)]

    colours = torch.stack([torch.zeros_like(e("red"))] + [e(c) for c in _COLOUR_NAMES])  # [9, D]
    shapes = torch.stack([torch.zeros_like(e("red"))] + [e(s) for s in SHAPES])  # [7, D]
    left = (labels["side_lr"] > 0)[..., None]
    top = (labels["side_tb"] > 0)[..., None]
    return (colours[labels["colour"]] + shapes[labels["shape"]]
            + torch.where(left, e("left"), e("right")) + torch.where(top, e("top"), e("bottom")))


def _questions(pool: ScenePool, rng: np.random.Generator, n: int, kinds: Sequence[str] = KINDS
               ) -> tuple[list[int], list[ProxyItem]]:
    """``n`` training questions on pool scenes: a uniform scene, question type (of ``kinds``) and
    askable object."""
    index, items = [], []
    while len(items) < n:
        i = int(rng.integers(0, len(pool.items)))
        kind = kinds[int(rng.integers(0, len(kinds)))]
        scene = pool.items[i]
        targets = [t for t in range(len(scene.objects)) if askable(scene, t, kind)]
        if not targets:
            continue
        index.append(i)
        items.append(ask(scene, targets[int(rng.integers(0, len(targets)))], kind, rng))
    return index, items


def _object_keep(labels: dict[str, torch.Tensor], sparse: bool, max_background: int, gen: torch.Generator
                 ) -> torch.Tensor:
    """``[B, k]`` sorted visual-token indices for the curriculum: the patches of every object in
    the scene (the asked one and the distractors alike; with ``sparse``, one patch per object, its
    first) plus ``0 .. max_background`` uniformly random other patches, every row filled up to the
    same ``k``. The look-up (find the asked shape among several, read its colour or side) is learnt
    far faster on such short sequences than among 256 tokens."""
    obj = labels["obj"]  # [B, 256]
    if sparse:
        owner = labels["object"]
        first = torch.zeros_like(obj)
        for b in range(obj.shape[0]):
            for o in owner[b].unique():
                if o >= 0:
                    first[b, int(torch.nonzero(owner[b] == o)[0])] = True
        obj = first
    n_bg = int(torch.randint(max_background + 1, (1,), generator=gen))
    k = max(1, int(obj.sum(dim=1).max()) + n_bg)
    keep = []
    for b in range(obj.shape[0]):
        objects = torch.nonzero(obj[b]).flatten()
        others = torch.nonzero(~obj[b]).flatten()
        fill = others[torch.randperm(len(others), generator=gen)[:k - len(objects)]]
        keep.append(torch.cat([objects, fill]).sort().values)
    return torch.stack(keep)


def _symbolic_loss(model: transformers.LlavaForConditionalGeneration, processor: transformers.LlavaProcessor,
                   pool: ScenePool, labels_all: dict[str, torch.Tensor], rng: np.random.Generator,
                   gen: torch.Generator, batch_size: int, kinds: Sequence[str], sparse: bool, max_background: int,
                   prompt_cache: dict[str, object]) -> tuple[torch.Tensor, list[ProxyItem], torch.Tensor]:
    """One batch of symbolic questions (see :func:`train_symbolic`): ``(loss, items, hits)``,
    ``hits`` ``[B]`` bool, the answer token is the argmax."""
    tokenizer = processor.tokenizer
    emb = model.model.language_model.get_input_embeddings()
    index, items = _questions(pool, rng, batch_size, kinds)
    labels = {key: v[torch.tensor(index)] for key, v in labels_all.items()}
    keep_t = _object_keep(labels, sparse, max_background, gen)  # [B, k]
    obj = labels["obj"]
    if sparse:  # only the kept first patch of each object is written as an object
        owner = labels["object"]
        obj = torch.zeros_like(obj)
        for b in range(len(items)):
            for o in owner[b].unique():
                if o >= 0:
                    obj[b, int(torch.nonzero(owner[b] == o)[0])] = True
    k = keep_t.shape[1]
    kept = {key: v.gather(1, keep_t) for key, v in labels.items() if key != "obj"}
    kept_obj = obj.gather(1, keep_t)
    scale = float(emb.weight.detach().std())
    noise = torch.randn(len(items), k, emb.weight.shape[1], generator=gen) * scale
    # gradients reach the embeddings through the symbolic tokens, as through words
    targets = _alignment_targets(model, tokenizer, kept, detach=False)  # [B, k, D]
    visual = torch.where(kept_obj[..., None], targets, noise)
    answers = [tokenizer.convert_tokens_to_ids(it.answer) for it in items]
    for it in items:
        if it.question not in prompt_cache:
            prompt_cache[it.question] = encode_prompts(processor, [it.question])[0]
    # the answer only: an end-of-sequence target here slowed learning the look-up several-fold
    batch = assemble(model, [prompt_cache[it.question] for it in items], visual, keep_t,  # type: ignore[misc]
                     [[a] for a in answers], gathered=True)
    out = model.model.language_model(inputs_embeds=batch.inputs_embeds, position_ids=batch.position_ids,
                                     attention_mask=batch.attention_mask, use_cache=False)
    logits = model.lm_head(out.last_hidden_state)
    loss = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=-100)
    with torch.no_grad():
        hits = logits[torch.arange(len(items)), batch.last].argmax(-1) == torch.tensor(answers)
    return loss, items, hits


def train_symbolic(model: transformers.LlavaForConditionalGeneration, processor: transformers.LlavaProcessor,
                   pool: ScenePool, recipe: Recipe, log: Callable[[str], None]) -> dict[str, float]:
    """Phase B0, language-model pretraining on *symbolic* scenes (no image): the visual tokens of a
    sequence are each object patch written as the sum of its words' embeddings (the same vectors
    the alignment loss of phase B pulls the projector towards: :func:`_alignment_targets`) and
    ``0 .. symbolic_background`` background patches written as Gaussian noise of the embeddings'
    scale, all at their original positions. Sequences are short, so the language model learns to
    look a shape up and read its colour and side quickly, as a text model would on scene
    descriptions; no loss looks at attention."""
    params = _unique(list(model.model.language_model.parameters()) + list(model.lm_head.parameters()))
    opt = torch.optim.AdamW(params, lr=recipe.language_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(recipe.seed + 3000)
    rng = np.random.default_rng([recipe.seed, 3001])
    labels_all = patch_labels(pool.items)
    prompt_cache: dict[str, object] = {}
    progress = _Progress("symbolic", recipe.symbolic_steps, 25, log)
    model.model.language_model.train()
    stats: dict[str, float] = {}
    recent = _RecentAccuracy()
    for step in range(recipe.symbolic_steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, recipe.symbolic_steps, recipe.language_lr, recipe.warmup)
        first = step < recipe.symbolic_colour_steps
        sparse = first or step < recipe.symbolic_sparse_steps
        loss, items, hits = _symbolic_loss(model, processor, pool, labels_all, rng, gen, recipe.symbolic_batch,
                                           recipe.symbolic_first_kinds if first else recipe.question_mix, sparse,
                                           recipe.symbolic_background, prompt_cache)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        recent.add(items, hits)
        stats = {"loss": float(loss.detach())}
        progress(step, f"loss {stats['loss']:.3f} train acc {recent.flush(step, recipe.symbolic_steps)}")
    return stats


def _align_projector(model: transformers.LlavaForConditionalGeneration, tokenizer: transformers.PreTrainedTokenizerFast,
                     pool: ScenePool, labels_all: dict[str, torch.Tensor], recipe: Recipe,
                     log: Callable[[str], None]) -> None:
    """Phase B's first part: the projector alone, on the alignment loss alone (LLaVA's stage 1,
    with word embeddings as the target instead of captions): each object patch's projected token
    towards its words' embeddings. Trained jointly from the start, the answer loss through a
    language model that cannot read the projector yet drowns this signal and pushes the tokens
    away from the words the symbolic phase taught the language model."""
    assert pool.features is not None
    projector = model.model.multi_modal_projector
    opt = torch.optim.AdamW(projector.parameters(), lr=recipe.projector_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(recipe.seed + 5000)
    progress = _Progress("align", recipe.align_steps, 25, log)
    for step in range(recipe.align_steps):
        opt.param_groups[0]["lr"] = _lr_at(step, recipe.align_steps, recipe.projector_lr, recipe.warmup)
        idx = torch.randint(len(pool.items), (recipe.language_batch,), generator=gen)
        labels = {key: v[idx] for key, v in labels_all.items()}
        obj = labels["obj"]
        loss = F.mse_loss(projector(pool.features[idx])[obj], _alignment_targets(model, tokenizer, labels)[obj])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        progress(step, f"align {float(loss.detach()):.5f}")


def train_language(model: transformers.LlavaForConditionalGeneration, processor: transformers.LlavaProcessor,
                   pool: ScenePool, recipe: Recipe, log: Callable[[str], None]) -> dict[str, float]:
    """Phase B: projector + language model on questions about the pool's scenes, tower frozen
    (its features were stored by phase A), random token dropping."""
    if pool.features is None:
        raise ValueError("phase B needs the pool's tower features (run train_vision first)")
    tokenizer = processor.tokenizer
    for p in model.model.vision_tower.parameters():
        p.requires_grad_(False)
    projector = list(model.model.multi_modal_projector.parameters())
    language = _unique(list(model.model.language_model.parameters()) + list(model.lm_head.parameters()))
    opt = torch.optim.AdamW([{"params": projector}, {"params": language}], lr=recipe.language_lr, weight_decay=0.0)
    # LLaVA's stage 1: the projector learns to speak to the language model before the language
    # model moves; unfrozen at once, answer gradients through a random projector undo what the
    # symbolic phase taught it.
    for p in language:
        p.requires_grad_(recipe.projector_steps == 0)
    gen = torch.Generator().manual_seed(recipe.seed + 2000)
    rng = np.random.default_rng([recipe.seed, 2001])
    sym_gen = torch.Generator().manual_seed(recipe.seed + 4000)
    sym_rng = np.random.default_rng([recipe.seed, 4001])
    labels_all = patch_labels(pool.items)
    eos = tokenizer.eos_token_id
    prompt_cache: dict[str, object] = {}
    progress = _Progress("language", recipe.language_steps, 25, log)
    model.model.multi_modal_projector.train()
    model.model.language_model.train()
    if recipe.align_steps:
        _align_projector(model, tokenizer, pool, labels_all, recipe, log)
    rates: list[float | str] = ["objects", *recipe.keep_rates]
    correct: dict[float | str, list[int]] = {r: [0, 0] for r in rates}
    stats: dict[str, float] = {}
    recent = ""
    for step in range(recipe.language_steps):
        if step == recipe.projector_steps:
            for p in language:
                p.requires_grad_(True)
        opt.param_groups[0]["lr"] = _lr_at(step, recipe.language_steps, recipe.projector_lr, recipe.warmup)
        opt.param_groups[1]["lr"] = (0.0 if step < recipe.projector_steps else _lr_at(
            step - recipe.projector_steps, recipe.language_steps - recipe.projector_steps, recipe.language_lr,
            recipe.warmup))
        early = step < recipe.curriculum_steps
        colour_only = early and step < recipe.curriculum_colour_steps
        kinds = recipe.symbolic_first_kinds if colour_only else recipe.question_mix
        index, items = _questions(pool, rng, recipe.language_batch, kinds)
        idx = torch.tensor(index)
        if early:
            rate = "objects"
            keep = _object_keep({key: v[idx] for key, v in labels_all.items()}, step < recipe.curriculum_sparse_steps,
                                recipe.symbolic_background, gen)
        else:
            rate = recipe.keep_rates[int(torch.randint(len(recipe.keep_rates), (1,), generator=gen))]
            k = max(1, round(NUM_VISUAL * rate))
            keep = torch.stack([torch.randperm(NUM_VISUAL, generator=gen)[:k].sort().values for _ in items])
        visual = project(model, pool.features[idx])  # [B, 256, D]
        answers = [tokenizer.convert_tokens_to_ids(it.answer) for it in items]
        for it in items:
            if it.question not in prompt_cache:
                prompt_cache[it.question] = encode_prompts(processor, [it.question])[0]
        prompts = [prompt_cache[it.question] for it in items]
        batch = assemble(model, prompts, visual, keep, [[a, eos] for a in answers])  # type: ignore[arg-type]
        out = model.model.language_model(inputs_embeds=batch.inputs_embeds, position_ids=batch.position_ids,
                                         attention_mask=batch.attention_mask, use_cache=False)
        logits = model.lm_head(out.last_hidden_state)
        rows = torch.arange(len(items))
        l_answer = F.cross_entropy(logits[rows, batch.last], torch.tensor(answers))
        # weighted down: ending the answer is trivial, and a full-weight target slowed learning
        l_eos = F.cross_entropy(logits[rows, batch.last + 1], torch.full((len(items),), eos))
        loss = l_answer + recipe.eos_weight * l_eos
        if recipe.rehearsal_weight > 0:  # keep the look-up the symbolic phase taught while the projector learns
            l_sym, _, _ = _symbolic_loss(model, processor, pool, labels_all, sym_rng, sym_gen, recipe.symbolic_batch,
                                         recipe.question_mix, False, recipe.symbolic_background, prompt_cache)
            loss = loss + recipe.rehearsal_weight * l_sym
        l_align = torch.zeros(())
        if recipe.align_weight > 0:
            labels = {key: v[idx] for key, v in labels_all.items()}
            obj = labels["obj"]
            if obj.any():
                target = _alignment_targets(model, tokenizer, labels)
                l_align = F.mse_loss(visual[obj], target[obj])
                loss = loss + recipe.align_weight * l_align
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            pred = logits[torch.arange(len(items)), batch.last].argmax(-1)
            hits = int((pred == torch.tensor(answers)).sum())
        correct[rate][0] += hits
        correct[rate][1] += len(items)
        stats = {"loss": float(l_answer.detach()), "align": float(l_align.detach()), "acc": hits / len(items)}
        if (step + 1) % 25 == 0 or step + 1 == recipe.language_steps:
            recent = " ".join(f"{r}:{c / n:.2f}" for r, (c, n) in correct.items() if n)
            correct = {r: [0, 0] for r in rates}
        progress(step, f"loss {stats['loss']:.3f} align {stats['align']:.4f} train acc by keep rate {recent}")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return stats


def train(recipe: Recipe, log: Callable[[str], None] = print
          ) -> tuple[transformers.LlavaForConditionalGeneration, transformers.LlavaProcessor, dict[str, float]]:
    """Train a proxy from scratch following ``recipe``; returns ``(model, processor, timings)``."""
    tokenizer = build_tokenizer()
    processor = build_processor(tokenizer)
    model = build_model(tokenizer, seed=recipe.seed, **recipe.dimensions)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    pool = make_pool(recipe, log)
    timings["scenes_s"] = time.perf_counter() - start
    mid = time.perf_counter()
    train_vision(model, pool, recipe, log)
    timings["vision_s"] = time.perf_counter() - mid
    mid = time.perf_counter()
    if recipe.symbolic_steps:
        train_symbolic(model, processor, pool, recipe, log)
    timings["symbolic_s"] = time.perf_counter() - mid
    mid = time.perf_counter()
    train_language(model, processor, pool, recipe, log)
    timings["language_s"] = time.perf_counter() - mid
    timings["total_s"] = time.perf_counter() - start
    return model.eval(), processor, timings


#: Held-out test items whose predictions ``training.json`` lists, for a fast exact regression check.
CHECK_ITEMS = 32


def held_out_figures(model: transformers.LlavaForConditionalGeneration, processor: transformers.LlavaProcessor,
                     n_val: int, log: Callable[[str], None] = print) -> dict[str, object]:
    """Accuracy per question type, unreduced and at 10% of the visual tokens (26 of 256: the
    object-patch oracle and uniform random), on ``n_val`` items of the ``val`` split and on the 256
    ``test`` items ``tokred eval --preset proxy`` uses; and the first-token predictions of the first
    :data:`CHECK_ITEMS` test items (argmax over the vocabulary, the hand-built inputs of
    :mod:`._inputs`)."""
    from ._measure import accuracy_by_kind, predictions, select_oracle, select_random
    from ._scenes import proxy_items
    from ._task import DEFAULT_ITEMS

    figures: dict[str, object] = {}
    for split, n in (("val", n_val), ("test", DEFAULT_ITEMS)):
        items = proxy_items(split, n)
        figures[split] = {
            "items": n,
            "full": accuracy_by_kind(model, processor, items, None),
            "oracle_10": accuracy_by_kind(model, processor, items, select_oracle(26)),
            "random_10": accuracy_by_kind(model, processor, items, select_random(26)),
        }
        for name, fig in figures[split].items():  # type: ignore[union-attr]
            if name != "items":
                log(f"{split} {name}: " + " ".join(f"{k} {v:.3f}" for k, v in fig.items()))
    figures["check_predictions"] = predictions(model, processor, proxy_items("test", CHECK_ITEMS))
    return figures


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    defaults = Recipe()
    ap = argparse.ArgumentParser(prog="python -m tokred.eval.proxy.train", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for the weights, config, tokenizer and processor files")
    ap.add_argument("--seed", type=int, default=defaults.seed)
    ap.add_argument("--pool", type=int, default=defaults.pool, help="training scenes drawn once")
    ap.add_argument("--vision-steps", type=int, default=defaults.vision_steps)
    ap.add_argument("--symbolic-steps", type=int, default=defaults.symbolic_steps,
                    help="language-model pretraining steps on symbolic scenes before phase B (0: none)")
    ap.add_argument("--symbolic-colour-steps", type=int, default=defaults.symbolic_colour_steps,
                    help="of those, the first steps: colour questions only, one token per object")
    ap.add_argument("--symbolic-sparse-steps", type=int, default=defaults.symbolic_sparse_steps,
                    help="the first symbolic steps (colour steps included) with one token per object")
    ap.add_argument("--language-steps", type=int, default=defaults.language_steps)
    ap.add_argument("--curriculum-steps", type=int, default=defaults.curriculum_steps,
                    help="the first phase B steps keep every object's patches plus a few random others")
    ap.add_argument("--curriculum-colour-steps", type=int, default=defaults.curriculum_colour_steps,
                    help="of those, the first: colour questions only")
    ap.add_argument("--curriculum-sparse-steps", type=int, default=defaults.curriculum_sparse_steps,
                    help="of those, the first: one patch per object")
    ap.add_argument("--rehearsal-weight", type=float, default=defaults.rehearsal_weight,
                    help="weight of a symbolic batch's loss added to every phase B step (0: none)")
    ap.add_argument("--align-steps", type=int, default=defaults.align_steps,
                    help="projector-only steps on the alignment loss before phase B's answers")
    ap.add_argument("--projector-steps", type=int, default=defaults.projector_steps,
                    help="the first phase B steps train the projector only, the language model frozen")
    ap.add_argument("--projector-lr", type=float, default=defaults.projector_lr)
    ap.add_argument("--vision-batch", type=int, default=defaults.vision_batch)
    ap.add_argument("--language-batch", type=int, default=defaults.language_batch)
    ap.add_argument("--vision-lr", type=float, default=defaults.vision_lr)
    ap.add_argument("--language-lr", type=float, default=defaults.language_lr)
    ap.add_argument("--keep-rates", type=float, nargs="+", default=list(defaults.keep_rates))
    ap.add_argument("--align-weight", type=float, default=defaults.align_weight)
    ap.add_argument("--question-mix", nargs="+", default=list(defaults.question_mix), choices=KINDS,
                    help="question types drawn uniformly (repeat one to ask it more often)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (bitwise reproducibility holds per thread count)")
    ap.add_argument("--eval-items", type=int, default=512, help="held-out 'val' items scored after training (0: none)")
    return ap.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    recipe = Recipe(seed=args.seed, pool=args.pool, vision_steps=args.vision_steps, language_steps=args.language_steps,
                    symbolic_steps=args.symbolic_steps, symbolic_colour_steps=args.symbolic_colour_steps,
                    symbolic_sparse_steps=args.symbolic_sparse_steps, projector_steps=args.projector_steps,
                    projector_lr=args.projector_lr, curriculum_steps=args.curriculum_steps, rehearsal_weight=args.rehearsal_weight,
                    align_steps=args.align_steps,
                    curriculum_colour_steps=args.curriculum_colour_steps,
                    curriculum_sparse_steps=args.curriculum_sparse_steps,
                    vision_batch=args.vision_batch, language_batch=args.language_batch,
                    vision_lr=args.vision_lr, language_lr=args.language_lr,
                    keep_rates=tuple(args.keep_rates), align_weight=args.align_weight,
                    question_mix=tuple(args.question_mix))
    log = lambda text: print(text, flush=True)  # noqa: E731
    log(f"training the SYNTHETIC PROXY: {recipe} on {args.threads} thread(s), torch {torch.__version__}, "
        f"transformers {transformers.__version__}")
    model, processor, timings = train(recipe, log)
    metadata: dict[str, object] = {
        "recipe": dataclasses.asdict(recipe), "timings_s": timings, "threads": args.threads,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    if args.eval_items:
        metadata.update(held_out_figures(model, processor, args.eval_items, log))
    out = save_proxy(model, processor, args.out, metadata=metadata)
    # The weights' digest goes in last, so a retraining can be compared with the shipped file bit for bit.
    metadata["model_sha256"] = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    (out / "training.json").write_text(json.dumps(metadata, indent=2, sort_keys=True) + "\n")
    log(f"saved to {out} after {timings['total_s']:.0f}s of training")
    return 0


if __name__ == "__main__":
    sys.exit(main())
