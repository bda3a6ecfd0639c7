"""The SYNTHETIC PROXY task as a :class:`tokred.eval.Task`.

Held-out items of :mod:`._scenes` (never drawn in training) as multiple-choice items: the scene as
a PIL image, the question, the answer vocabulary of its question type as ``choices`` and the right
one as ``answer``; ``kind`` is the question type, so ``tokred eval`` reports each separately.
Scored by the log-likelihood of each (one-word, one-token) choice, which for this model is the
argmax of the first answer token over the choices.

Figures on this task rank token-reduction methods on this synthetic task only; they are not the
papers' benchmarks.
"""

from __future__ import annotations

from .._task import Task, TaskItem
from ._scenes import KINDS, proxy_items

__all__ = ["proxy_task", "TASK_DESCRIPTION", "DEFAULT_ITEMS"]

#: Items :func:`proxy_task` returns by default (64 per question type).
DEFAULT_ITEMS = 256

TASK_DESCRIPTION = (
    "SYNTHETIC PROXY: procedural cluttered scenes with 3-5 objects, one question about one of them "
    "(colour / presence / left-right / top-bottom); ranks methods on this task only, not the papers' benchmarks"
)


def proxy_task(split: str = "test", n: int = DEFAULT_ITEMS, *, start: int = 0) -> Task:
    """Held-out items ``start .. start + n - 1`` of ``split`` (``"test"`` or ``"val"``) as a Task.

    SYNTHETIC PROXY: the figures it gives rank methods on this task only; they are not the papers'
    benchmarks. Equal arguments give equal tasks, pixel for pixel; question types cycle through
    :data:`~tokred.eval.proxy.KINDS` (``n`` divisible by 4 is balanced). Each item's ``meta`` holds
    its scene ``seed`` and ``target_tokens`` (the visual-token indices, 0..255 row-major on the
    16 x 16 grid, covered by the asked object: what an object-patch oracle keeps).

    Args:
        split: ``"test"`` (the figures in the docs) or ``"val"`` (what training reports).
        n: number of items, at least 1.
        start: index of the first item.
    """
    if n < 1:
        raise ValueError(f"a task needs at least one item, asked for {n}")
    items = [
        TaskItem(
            id=f"{split}-{start + i}", images=(it.image,), question=it.question, answer=it.answer,
            choices=tuple(it.choices), kind=it.kind, meta={"seed": it.seed, "target_tokens": list(it.target_tokens)},
        )
        for i, it in enumerate(proxy_items(split, n, start=start))
    ]
    assert all(item.kind in KINDS for item in items)
    return Task(f"proxy-{split}", tuple(items), TASK_DESCRIPTION)
