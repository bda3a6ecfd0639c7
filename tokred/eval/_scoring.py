"""Scoring answers: exact match of generated text, and multiple choice by log-likelihood on a
reduced sequence.

**Exact match.** The generated text and the reference are normalised alike (:func:`normalise`:
lower case, whitespace collapsed, surrounding quotes and trailing punctuation removed) and compared
whole. A multiple-choice item scored by generation is right when the normalised text equals the
normalised answer; text matching no choice is wrong (and counted as ``invalid``).

**Log-likelihood.** The score of a choice is the sum of the log-probabilities of its tokens as the
continuation of the prompt (lm-eval's ``acc``); the highest-scoring choice is the prediction. Under
a reduction the language model sees a shorter sequence, so the logits are read through
:attr:`tokred.Run.output_positions`: the output is left-packed and text is never dropped, so the
continuation's ``C`` tokens and the position before them are the last ``C + 1`` output positions of
each row, which is checked, not assumed. The reduction is decided on the prompt alone (a prefill of
the prompts), then every choice is scored under those decisions (``Run.frozen(rows=...)``), as in
generation, where the decisions are made before the answer exists: a gate must not see the choice
it is scoring.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch

from ..errors import TokredError

__all__ = ["normalise", "continuation_logprobs", "common_prefix_length", "real_ids"]

_SPACE = re.compile(r"\s+")
_EDGE = " \t\n\"'`.,;:!?"


def normalise(text: str) -> str:
    """``"  The Red. "`` -> ``"the red"``: lower case, whitespace collapsed, surrounding quotes and
    punctuation stripped. Only the first line counts (models often continue after the answer)."""
    first = text.strip().split("\n", 1)[0] if text.strip() else ""
    return _SPACE.sub(" ", first.lower()).strip(_EDGE)


def continuation_logprobs(logits: torch.Tensor, output_positions: torch.Tensor | None, input_ids: torch.Tensor,
                          continuation_lengths: Sequence[int]) -> list[float]:
    """Per row, the summed log-probability of its last ``C_r`` input tokens given what precedes them.

    Args:
        logits: ``[R, L', V]`` the model's output over the (possibly reduced) sequence.
        output_positions: ``[R, L']`` the input column of each output position
            (:attr:`tokred.Run.output_positions`), or ``None`` when nothing was reduced
            (``L' == L``, output position ``j`` is input column ``j``).
        input_ids: ``[R, L]`` the left-padded input.
        continuation_lengths: ``C_r`` per row, each at least 1 and less than the row's real tokens.

    Raises:
        TokredError: the last ``C_r + 1`` output positions of a row are not its last ``C_r + 1``
            input columns (the continuation or the token before it was dropped, or the layout is not
            left-packed): reading them anyway would score the wrong tokens.
    """
    rows, length = input_ids.shape
    if output_positions is None:
        output_positions = torch.arange(length).expand(rows, -1)
    if logits.shape[:2] != output_positions.shape:
        raise TokredError(f"logits {tuple(logits.shape[:2])} do not match the output layout {tuple(output_positions.shape)}")
    scores: list[float] = []
    for row, count in enumerate(continuation_lengths):
        if count < 1:
            raise TokredError(f"row {row}: a continuation needs at least one token")
        expected = torch.arange(length - count - 1, length)
        got = output_positions[row, -(count + 1):].cpu()
        if got.numel() != count + 1 or not torch.equal(got, expected):
            raise TokredError(
                f"row {row}: the last {count + 1} output positions hold input columns {got.tolist()}, not "
                f"{expected.tolist()}: the continuation (or the token before it) did not survive as expected"
            )
        predicting = logits[row, -(count + 1):-1].float()                      # [C, V]: each predicts the next
        targets = input_ids[row, -count:].to(predicting.device)                # [C]
        scores.append(float(torch.log_softmax(predicting, dim=-1).gather(1, targets[:, None]).sum()))
    return scores


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def real_ids(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[list[int]]:
    """Each row's real (unpadded) token ids."""
    if attention_mask is None:
        return input_ids.tolist()
    return [row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask)]

