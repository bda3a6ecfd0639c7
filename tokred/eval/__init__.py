"""Evaluation: how many answers a reduced model keeps right, next to how much faster it is.

``evaluate(model, processor, task, methods, budgets)`` answers every item of a task with the
unreduced model and with every method at every budget, on the same prompts, batches and scoring,
and reports accuracy, retention (% of the unreduced accuracy), agreement with the unreduced
answers, visual tokens kept and prefill speed-up measured in the same process. ``tokred eval`` is
its command line. Tasks are JSONL files (:func:`load_task`); :mod:`tokred.eval.proxy` ships a
trained, offline SYNTHETIC PROXY model and task whose answers depend on the image.
"""

from ._evaluate import EvalResult, Prediction, Setting, SettingResult, evaluate, settings_for
from ._plot import plot_accuracy
from ._inputs import chat_prompt, encode
from ._scoring import ContinuationScore, continuation_logprobs, normalise, score_continuations
from ._task import Task, TaskItem, load_task, save_task

__all__ = [
    "evaluate", "settings_for", "EvalResult", "SettingResult", "Setting", "Prediction",
    "Task", "TaskItem", "load_task", "save_task", "normalise", "continuation_logprobs", "score_continuations",
    "ContinuationScore", "chat_prompt", "encode", "plot_accuracy",
]
