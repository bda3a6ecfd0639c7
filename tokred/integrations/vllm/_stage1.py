"""Stage I inside vLLM: the one place where the integration runs a tokred Selector.

It calls :func:`tokred.decisions.select_image_tokens`, the engine-neutral function that tokred's
``transformers`` runtime calls too, with the same :class:`~tokred.VisualTokens` the transformers
adapters build, so a method keeps the same tokens in both engines. Nothing here imports vLLM.

What a Selector receives in vLLM, compared with the transformers runtime:

* ``features``, ``layout``, ``cls_attention``, ``pre_projector``: the same (where the family module
  provides them; see ``llava`` and ``qwen_vl``);
* ``sample_index`` and ``image_index``: 0. vLLM encodes the images of many requests in one batch,
  and caches an image's encoder output across requests; tokred's contract already says a score may
  depend on the image only, never on its place in a batch;
* ``instruction_embeddings``: ``None``. vLLM runs the vision encoder once per image and caches its
  output for every request showing that image, before and apart from the prompt's text, so a
  selection that depends on the instruction would be cached under the wrong key.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import torch

from ...decisions import Describe, check_image_budgets, image_record, select_image_tokens
from ...report import ImageRecord
from ...schedule import Schedule
from ...tokens import ImageLayout, VisualTokens

__all__ = ["Reduction", "ReductionLog", "reduce_image"]


@dataclass(frozen=True)
class Reduction:
    """What stage I did to one image inside vLLM.

    Attributes:
        config: the request's ``TokredConfig`` as JSON.
        record: tokred's :class:`~tokred.report.ImageRecord` (``kept_stage1``: indices into the
            image's ``N`` candidate tokens, increasing; ``sample`` and ``image`` are 0).
        kept_in_run: indices into the image's placeholder run (candidates plus tokens that always
            stay, such as LLaVA-NeXT's newlines), increasing: the embeddings handed to the LLM.
        seconds: time spent in the selector call.
    """

    config: str
    record: ImageRecord
    kept_in_run: list[int]
    seconds: float


class ReductionLog(deque):  # type: ignore[type-arg]
    """The latest :class:`Reduction` records of one model instance (bounded; read them with
    ``LLM.apply_model(lambda model: list(model.tokred_log))``)."""

    def __init__(self, maxlen: int = 4096) -> None:
        super().__init__(maxlen=maxlen)


def reduce_image(schedule: Schedule, run: torch.Tensor, *, keep: int, layout: ImageLayout,
                 candidates: torch.Tensor | None = None, cls_attention: torch.Tensor | None = None,
                 pre_projector: torch.Tensor | None = None, describe: Describe | None = None,
                 label: str = "") -> tuple[torch.Tensor, Reduction]:
    """Stage I of ``schedule`` on one image.

    Args:
        schedule: the request's schedule (:meth:`TokredConfig.schedule`); its stage I runs.
        run: ``[R, D]`` the embeddings of the image's whole placeholder run, in sequence order.
        keep: the placeholders the processor left for the image (kept candidates plus the tokens
            that always stay); the selection must fill exactly these.
        layout: the layout of the ``N`` candidates (:class:`~tokred.ImageLayout`).
        candidates: ``[N]`` increasing indices of the candidates in the run; ``None``: all ``R``.
        cls_attention: ``[N]`` vision [CLS] attention per candidate, or ``None``.
        pre_projector: ``[N, D_v]`` vision features before the projector, or ``None``.
        describe: names components in errors (default: the registry's ``describe``).
        label: what the :class:`Reduction` record names as its config (the config's JSON).

    Returns:
        ``(kept, reduction)``: ``kept`` ``[keep, D]`` the embeddings for the placeholders (the
        selector's replacement features where it merged), and the :class:`Reduction` record.
    """
    from ...registry import default_registry

    describe = describe or default_registry().describe
    stage = schedule.selector
    if stage is None:
        raise ValueError("reduce_image needs a schedule with a stage-I selector")
    index = torch.arange(run.shape[0]) if candidates is None else candidates.cpu().long()
    n = int(index.numel())
    check_image_budgets(schedule, [], n, f"an image has {n} visual tokens")
    device_index = index.to(run.device)
    tokens = VisualTokens(features=run[device_index], layout=layout, pre_projector=pre_projector,
                          cls_attention=cls_attention, instruction_embeddings=None)
    start = time.perf_counter()
    selection = select_image_tokens(stage, tokens, describe=describe)
    seconds = time.perf_counter() - start
    chosen = index[selection.indices]                                       # [k] run indices
    staying = torch.ones(run.shape[0], dtype=torch.bool)
    staying[index] = False                                                  # non-candidates always stay
    kept_in_run = torch.sort(torch.cat([torch.nonzero(staying).flatten(), chosen])).values
    if kept_in_run.numel() != keep:
        raise RuntimeError(
            f"tokred: the processor left {keep} placeholders for an image but stage I keeps {kept_in_run.numel()} "
            f"tokens ({label or stage.budget.describe()}); the front end and the worker disagree on the budget"
        )
    kept = run[kept_in_run.to(run.device)]
    if selection.features is not None:
        slots = torch.searchsorted(kept_in_run, chosen)
        kept = kept.clone()
        kept[slots.to(run.device)] = selection.features.to(device=run.device, dtype=run.dtype)
    record = image_record(0, 0, layout, selection.indices)
    return kept, Reduction(label, record, kept_in_run.tolist(), seconds)
