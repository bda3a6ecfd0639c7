"""A trained, shipped, offline SYNTHETIC PROXY vision-language model, whose answers depend on the
image, for measuring the accuracy of token-reduction methods on a CPU without downloads.

**SYNTHETIC PROXY: its figures rank token-reduction methods on this synthetic task only; they are
not the papers' benchmarks** (POPE, GQA, MME, ... on LLaVA-1.5-7B: see docs/evaluation.md for the
lmms-eval route to those).

* :func:`load_proxy` -> ``(model, processor)`` from the shipped weights; :func:`proxy_task` -> a
  :class:`tokred.eval.Task` of held-out items, for :func:`tokred.eval.evaluate` and
  ``tokred eval --preset proxy`` (which needs no ``--task``).

* :func:`make_item` / :func:`proxy_items`: procedural cluttered scenes (224 px, 256 visual
  tokens) with one question about one of several objects: its colour, whether a coloured shape is
  there, left or right, top or bottom; each item lists the asked object's visual tokens
  (``target_tokens``, what an object-patch oracle keeps).
* :func:`load_proxy` in detail: the shipped stock ``LlavaForConditionalGeneration`` (CLIP tower, MLP
  projector, Llama; about 0.78M parameters) and its ``LlavaProcessor``, answering in one word
  through ``generate``.
* ``python -m tokred.eval.proxy.train --out DIR``: the deterministic recipe that produced the
  shipped weights (one CPU thread).
* :func:`mechanism_figures`: whether the model works like a real LVLM (does the question read the
  image after the first layers? does one token carry the answer? what does [CLS] attend to?); the
  shipped proxy fails several of these checks (issue #26, docs/evaluation.md).
* :func:`measure` and the reference selections (oracle, random, L2 norm, k-center, last-token
  attention): accuracy with a subset of the visual tokens, fed by hand at original positions.

Figures from this proxy rank methods on this synthetic task only; they are not the papers'
benchmarks.
"""

from __future__ import annotations

from ._inputs import Batch, Prompt, assemble, encode_prompts, pixel_values, visual_embeddings, visual_features
from ._measure import (
    Context,
    Scores,
    Selection,
    accuracy_by_kind,
    evaluate as measure,
    last_token_attention,
    select_kcenter,
    select_l2,
    select_last_token_attention,
    select_oracle,
    select_random,
)
from ._mechanisms import cls_attention, mechanism_figures
from ._model import PROXY_DIMENSIONS, WEIGHTS_DIR, build_model, build_processor, build_tokenizer, load_proxy, save_proxy
from ._scenes import COLOURS, GRID, IMAGE_SIZE, KINDS, PATCH_SIZE, SHAPES, ProxyItem, SceneObject, ask, askable, make_item, proxy_items
from ._task import TASK_DESCRIPTION, proxy_task

__all__ = [
    # the public entry points
    "load_proxy", "proxy_task", "TASK_DESCRIPTION",
    # scenes and questions
    "COLOURS", "SHAPES", "KINDS", "IMAGE_SIZE", "PATCH_SIZE", "GRID", "SceneObject", "ProxyItem", "make_item",
    "proxy_items", "ask", "askable",
    # does it work like a real LVLM
    "mechanism_figures", "cls_attention",
    # the model
    "PROXY_DIMENSIONS", "WEIGHTS_DIR", "build_tokenizer", "build_processor", "build_model", "save_proxy",
    # reduced inputs and measurement
    "Prompt", "Batch", "pixel_values", "encode_prompts", "visual_features", "visual_embeddings", "assemble",
    "Context", "Selection", "Scores", "measure", "accuracy_by_kind", "select_oracle", "select_random", "select_l2",
    "select_kcenter", "select_last_token_attention", "last_token_attention",
]
