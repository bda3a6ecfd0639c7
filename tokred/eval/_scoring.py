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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..errors import TokredError
from ._inputs import encode

if TYPE_CHECKING:
    import torch.nn as nn

    from ..runtime import Run

__all__ = ["normalise", "continuation_logprobs", "score_continuations", "ContinuationScore", "common_prefix_length",
           "real_ids"]

_SPACE = re.compile(r"\s+")
_EDGE = " \t\n\"'`.,;:!?"


def normalise(text: str) -> str:
    """``"  The Red. "`` -> ``"the red"``: lower case, whitespace collapsed, surrounding quotes and
    punctuation stripped. Only the first line counts (models often continue after the answer)."""
    first = text.strip().split("\n", 1)[0] if text.strip() else ""
    return _SPACE.sub(" ", first.lower()).strip(_EDGE)


@dataclass(frozen=True)
class ContinuationScore:
    """How a model scores one continuation of a prompt.

    Attributes:
        logprob: the summed log-probability of its tokens.
        greedy: whether every one of its tokens is the model's most likely next token.
        tokens: how many tokens it has.
    """

    logprob: float
    greedy: bool
    tokens: int


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
    return [score.logprob for score in _scores(logits, output_positions, input_ids, continuation_lengths)]


def _scores(logits: torch.Tensor, output_positions: torch.Tensor | None, input_ids: torch.Tensor,
            continuation_lengths: Sequence[int]) -> list[ContinuationScore]:
    rows, length = input_ids.shape
    if output_positions is None:
        output_positions = torch.arange(length).expand(rows, -1)
    if logits.shape[:2] != output_positions.shape:
        raise TokredError(f"logits {tuple(logits.shape[:2])} do not match the output layout {tuple(output_positions.shape)}")
    scores: list[ContinuationScore] = []
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
        log_probs = torch.log_softmax(logits[row, -(count + 1):-1].float(), dim=-1)    # [C, V]: each predicts the next
        targets = input_ids[row, -count:].to(log_probs.device)                         # [C]
        scores.append(ContinuationScore(float(log_probs.gather(1, targets[:, None]).sum()),
                                        bool((log_probs.argmax(dim=-1) == targets).all()), count))
    return scores


def score_continuations(model: nn.Module, processor: Any, prompts: Sequence[str], images: Sequence[Sequence[Any]],
                        continuations: Sequence[Sequence[str]], run: Run | None) -> list[list[ContinuationScore]]:
    """Score every continuation of every prompt, the reduction decided on the prompt alone.

    Args:
        model: the model (inside ``run``'s ``with`` block when ``run`` is given).
        processor: its processor.
        prompts: the full prompt texts (chat template applied), one per item.
        images: each prompt's images, in order.
        continuations: each prompt's continuations, appended to the prompt text verbatim (give the
            separating space yourself, e.g. ``" red"``).
        run: the active tokred run, or ``None`` for the unreduced model.

    Returns:
        Per prompt, one :class:`ContinuationScore` per continuation. The continuation's tokens are
        those after the longest common prefix of the tokenised prompt and prompt + continuation (a
        tokenizer that merges across the boundary makes the first of them span it).

    Under a run, one prefill of the prompts decides (stage I and every gate), then every
    continuation row is scored under its prompt's decisions (``Run.frozen(rows=...)``): a gate must
    not see the continuation it scores, exactly as in generation. When every continuation is one
    token appended to its prompt's tokens (one-word choices of a word-level vocabulary, "A"/"B"
    with many tokenizers), that prefill's logits at each prompt's last position already score them
    all, and no continuation row is run.
    """
    if len(prompts) != len(images) or len(prompts) != len(continuations):
        raise TokredError("prompts, images and continuations must have one entry per prompt")
    rows, texts, row_images = [], [], []
    for index, (prompt, choices) in enumerate(zip(prompts, continuations)):
        if not choices:
            raise TokredError(f"prompt {index} has no continuation to score")
        for choice in choices:
            rows.append(index)
            texts.append(prompt + choice)
            row_images.extend(images[index])
    prompt_inputs = encode(processor, model, prompts, [image for item in images for image in item])
    row_inputs = encode(processor, model, texts, row_images)
    prompt_ids = real_ids(prompt_inputs["input_ids"], prompt_inputs.get("attention_mask"))
    row_ids = real_ids(row_inputs["input_ids"], row_inputs.get("attention_mask"))
    lengths = [len(ids) - common_prefix_length(ids, prompt_ids[row]) for ids, row in zip(row_ids, rows)]
    if any(n < 1 for n in lengths):
        raise TokredError("a continuation adds no token to its prompt; give non-empty continuations")
    if _one_token_each(row_ids, prompt_ids, rows, lengths):
        return _one_token_scores(model, prompt_inputs, [ids[-1] for ids in row_ids], rows, continuations, run)
    with torch.no_grad():
        if run is not None:
            model(**prompt_inputs)                                              # the decisions, made on the prompts
            with run.frozen(rows=rows):
                out = model(**row_inputs)
            positions = run.output_positions
        else:
            out = model(**row_inputs)
            positions = None
    flat = _scores(out.logits, positions, row_inputs["input_ids"], lengths)
    return _grouped(flat, continuations)


def _grouped(flat: Sequence[ContinuationScore], continuations: Sequence[Sequence[str]]) -> list[list[ContinuationScore]]:
    """``flat`` (one score per continuation row, prompt by prompt) regrouped per prompt."""
    result: list[list[ContinuationScore]] = []
    start = 0
    for choices in continuations:
        result.append(list(flat[start:start + len(choices)]))
        start += len(choices)
    return result


def _one_token_each(row_ids: Sequence[Sequence[int]], prompt_ids: Sequence[Sequence[int]], rows: Sequence[int],
                    lengths: Sequence[int]) -> bool:
    """Whether every continuation row is its prompt's tokens plus exactly one token."""
    return all(n == 1 and len(ids) == len(prompt_ids[row]) + 1 for ids, row, n in zip(row_ids, rows, lengths))


def _one_token_scores(model: nn.Module, prompt_inputs: dict[str, torch.Tensor], tokens: Sequence[int],
                      rows: Sequence[int], continuations: Sequence[Sequence[str]], run: Run | None
                      ) -> list[list[ContinuationScore]]:
    """Scores of continuations that are each one token appended to their prompt's tokens, read from
    the prompts' own prefill: causal attention makes the logits at a prompt's last position the
    same whatever follows it, and under a run that prefill is the one that decides, so the
    continuation rows would compute exactly these logits there (under the same kept tokens).

    ``tokens`` ``[R]``: each continuation row's token; ``rows`` ``[R]``: its prompt."""
    with torch.no_grad():
        out = model(**prompt_inputs)
    length = prompt_inputs["input_ids"].shape[1]
    positions = run.output_positions if run is not None else None
    if positions is not None:
        last = positions[:, -1].cpu()
        if not torch.all(last == length - 1):
            raise TokredError(f"the last output positions hold input columns {last.tolist()}, not {length - 1}: the "
                              "prompt's last token did not survive as expected")
    log_probs = torch.log_softmax(out.logits[:, -1].float(), dim=-1)                  # [P, V]
    best = log_probs.argmax(dim=-1)
    flat = [ContinuationScore(float(log_probs[row, token]), bool(best[row] == token), 1) for token, row in zip(tokens, rows)]
    return _grouped(flat, continuations)


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

