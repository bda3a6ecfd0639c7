"""Evaluation tasks: items of an image, a question and a reference answer or answer choices.

A task on disk is a JSONL file, one item per line::

    {"id": "q1", "image": "images/1.png", "question": "What colour is the car? Answer with one word.", "answer": "red"}
    {"id": "q2", "image": ["a.png", "b.png"], "question": "Which picture is darker?", "choices": ["first", "second"], "answer": "first", "kind": "compare"}

* ``image``: a path relative to the JSONL file's folder (or absolute), or a list of them for a
  multi-image question (placed before the question, in order); may be omitted for a text-only item;
* ``question``: the user's turn, verbatim (the model's chat template wraps it; say "Answer with one
  word." in it where the reference is one word);
* ``answer``: the reference answer; with ``choices``, one of them;
* ``choices`` (optional): the answer choices of a multiple-choice item;
* ``id`` (optional, default ``"line-<n>"``), ``kind`` (optional: a group reported separately, e.g. a
  question type) and ``meta`` (optional: anything, carried to the predictions).

Unknown keys are refused (a misspelt ``answr`` must not silently become an unscored item).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from PIL import Image

from ..errors import OptionsError

__all__ = ["TaskItem", "Task", "load_task", "save_task"]

_KEYS = {"id", "image", "question", "answer", "choices", "kind", "meta"}


@dataclass(frozen=True)
class TaskItem:
    """One question of a task.

    Attributes:
        id: unique within the task.
        images: the item's images (PIL images, or paths opened when the item is run), in prompt order.
        question: the user's turn, verbatim.
        answer: the reference answer (one of ``choices`` when those are given).
        choices: the answer choices of a multiple-choice item, else ``None``.
        kind: the group the item is reported in (``""`` for none).
        meta: free-form data carried to the predictions.
    """

    id: str
    images: tuple[Image.Image | Path, ...]
    question: str
    answer: str
    choices: tuple[str, ...] | None = None
    kind: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.question.strip():
            raise OptionsError(f"item {self.id!r}: the question is empty")
        if self.choices is not None:
            if len(self.choices) < 2 or len(set(self.choices)) != len(self.choices):
                raise OptionsError(f"item {self.id!r}: choices must be at least two distinct strings, got {list(self.choices)}")
            if self.answer not in self.choices:
                raise OptionsError(f"item {self.id!r}: the answer {self.answer!r} is not one of its choices {list(self.choices)}")

    def open_images(self) -> list[Image.Image]:
        """The images as RGB PIL images (paths are opened now)."""
        opened = []
        for image in self.images:
            if isinstance(image, Path):
                try:
                    with Image.open(image) as file:
                        opened.append(file.convert("RGB"))
                except (OSError, ValueError) as exc:
                    raise OptionsError(f"item {self.id!r}: cannot read image {image}: {exc}") from None
            else:
                opened.append(image.convert("RGB"))
        return opened


@dataclass(frozen=True)
class Task:
    """A named list of :class:`TaskItem` with unique ids.

    Attributes:
        name: shown in reports (the JSONL file's stem for :func:`load_task`).
        items: the questions, in order.
        description: one line for reports (e.g. that a task is a synthetic proxy).
    """

    name: str
    items: tuple[TaskItem, ...]
    description: str = ""

    def __post_init__(self) -> None:
        if not self.items:
            raise OptionsError(f"task {self.name!r} has no items")
        seen: set[str] = set()
        for item in self.items:
            if item.id in seen:
                raise OptionsError(f"task {self.name!r}: item id {item.id!r} appears twice")
            seen.add(item.id)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def kinds(self) -> list[str]:
        """The item kinds in order of first appearance (``""`` included when some item has none)."""
        return list(dict.fromkeys(item.kind for item in self.items))

    def head(self, n: int | None) -> Task:
        """The first ``n`` items (all of them for ``None``)."""
        if n is None or n >= len(self.items):
            return self
        if n < 1:
            raise OptionsError(f"a task needs at least one item, asked for {n}")
        return Task(self.name, self.items[:n], self.description)

    @classmethod
    def from_items(cls, name: str, items: Iterable[TaskItem], description: str = "") -> Task:
        return cls(name, tuple(items), description)


def _strings(value: Any, what: str, line: int) -> tuple[str, ...]:
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) and v for v in values):
        raise OptionsError(f"line {line}: {what} must be a non-empty string or a list of them, got {value!r}")
    return tuple(values)


def load_task(path: str | Path, *, name: str | None = None) -> Task:
    """Read a JSONL task (see the module documentation for the format).

    Image paths are resolved against the file's folder and must exist; every line is validated and
    the first problem is reported with its line number."""
    path = Path(path)
    if not path.is_file():
        raise OptionsError(f"no task file {path}")
    items: list[TaskItem] = []
    for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise OptionsError(f"{path}:{number}: not JSON: {exc}") from None
        if not isinstance(record, dict):
            raise OptionsError(f"{path}:{number}: an item is a JSON object, got {type(record).__name__}")
        unknown = sorted(set(record) - _KEYS)
        if unknown:
            raise OptionsError(f"{path}:{number}: unknown keys {unknown}; an item has {sorted(_KEYS)}")
        for key in ("question", "answer"):
            if not isinstance(record.get(key), str):
                raise OptionsError(f"{path}:{number}: {key!r} must be a string")
        images: tuple[Path, ...] = ()
        if "image" in record:
            images = tuple(p if p.is_absolute() else path.parent / p for p in map(Path, _strings(record["image"], "image", number)))
            for image in images:
                if not image.is_file():
                    raise OptionsError(f"{path}:{number}: image {image} does not exist")
        choices = _strings(record["choices"], "choices", number) if "choices" in record else None
        meta = record.get("meta", {})
        if not isinstance(meta, dict):
            raise OptionsError(f"{path}:{number}: 'meta' must be an object")
        try:
            items.append(TaskItem(
                id=str(record.get("id", f"line-{number}")), images=images, question=record["question"],
                answer=record["answer"], choices=choices, kind=str(record.get("kind", "")), meta=meta,
            ))
        except OptionsError as exc:
            raise OptionsError(f"{path}:{number}: {exc}") from None
    return Task(name or path.stem, tuple(items))


def save_task(task: Task, path: str | Path, *, image_dir: str = "images") -> Path:
    """Write ``task`` as JSONL at ``path``, its in-memory images as PNG files under
    ``<path's folder>/<image_dir>/``; returns ``path``. The inverse of :func:`load_task`."""
    path = Path(path)
    folder = path.parent / image_dir
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for item in task.items:
        names: list[str] = []
        for index, image in enumerate(item.images):
            if isinstance(image, Path):
                names.append(str(image))
                continue
            file = folder / f"{item.id}-{index}.png"
            image.save(file)
            names.append(str(file.relative_to(path.parent)))
        record: dict[str, Any] = {"id": item.id, "question": item.question, "answer": item.answer}
        if names:
            record["image"] = names[0] if len(names) == 1 else names
        if item.choices is not None:
            record["choices"] = list(item.choices)
        if item.kind:
            record["kind"] = item.kind
        if item.meta:
            record["meta"] = item.meta
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path

