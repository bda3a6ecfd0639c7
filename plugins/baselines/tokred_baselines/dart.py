"""``dart``: DART, pruning by token duplication (Wen et al., EMNLP 2025; arXiv 2502.11494).

Stage II, a Gate at an early decoder layer ``K`` (default 2) that needs no attention weights: a few
pivot tokens are chosen by the size of their key states, and each pivot keeps the visual tokens
*least* similar to it (the ones it does not duplicate). Code: ``ZichenWen1/DART@5a19452fc173017191c247848673e0bde755695a``
(read from the fork ``xqy1111111/DART``, which contains it), ``llava/model/language_model/modeling_llama_self.py``
(``DART.forward`` 231-395, the pruning block 331-359, ``get_retained_image_token`` 397-449), and the
function of the same name in ``Qwen2_5-VL/Qwen2_5VL_DART/modeling_qwen2_5_vl_self.py`` (1553).
What the code does, which we follow:

* **when**: before decoder layer ``K``, during prefill only; the dropped tokens are gone for layers
  ``K, K+1, ...`` and for decoding; the survivors keep their original positions (359);
* **inputs** (340-341): layer ``K-1``'s key states after the rotary embedding, all heads
  concatenated per token (``[L, H * d]``), and layer ``K-1``'s output passed through the language
  model's **final** norm;
* **pivots** (419-428): the ``pivot_image_token`` image tokens and the ``pivot_text_token`` tokens
  after the image (the instruction and the assistant prefix) with the largest L1 norm of their keys
  (defaults 4 and 4);
* **duplication** (429-445): the image tokens other than the image pivots are candidates; for each
  pivot in turn, the ``TOKEN_TOPK`` candidates with the *lowest* cosine similarity to the pivot's
  normed hidden state are kept and leave the candidates;
* **kept**: the image pivots and every token a pivot kept (text pivots are not image tokens).

Where tokred's contract forces a difference, :func:`dart_retain` reproduces the authors' output
given their parameters (tested against their fixtures) and the registered gate uses tokred's rule:

* **budget**: the code keeps ``p_img + (p_img + p_txt) * TOKEN_TOPK`` tokens
  (:func:`dart_token_topk`: 132 for the scripts' "128", 324 for LLaVA-NeXT's "320"); tokred keeps
  exactly ``k``. The gate keeps ``min(p_img, k)`` image pivots and splits the other ``k - p_img``
  tokens over the pivots as evenly as possible, one more for the first ``(k - p_img) mod P`` pivots
  in visiting order (:func:`split_over_pivots`; **ours**);
* **visiting order**: the code visits the pivots in the iteration order of a Python ``set`` of their
  sequence positions (``list(indices_set)``, 430), which changes the result. ``pivot_order="python_set"``
  (default) does the same, on the positions of the sequence the layer sees without padding (the
  code's absolute positions for an unpadded prompt), so a prompt keeps the same tokens alone or in
  a padded batch; ``"position"`` (ours) visits them in sequence order;
* **pivot norm**: the code ranks pivots by the L1 norm of the post-rotary keys. A rotary embedding
  turns each pair of a key's coordinates by an angle that grows with the absolute position, which
  keeps the L2 norm but not the L1 norm, so the L1 ranking depends on where the prompt starts: a
  plain forward of a left-padded batch (no position ids: positions count padding) picked other
  pivots, and kept other tokens, for a prompt in the batch than alone (measured on the tiny LLaVA
  and InternVL models). tokred's conformance requires the same choice in both, so the gate ranks
  by the **L2** norm by default (``pivot_norm="l2"``, ours); ``pivot_norm="l1"`` is the code's rule
  (exact for a prompt whose positions start at 0, as under ``generate``) and :func:`dart_retain`
  takes either;
* ties in the top-k's go to the lower index (the code's ``topk`` leaves them unspecified), and the
  gate compares key norms at a relative precision of :data:`PIVOT_RESOLUTION` (``1e-4``, ours), so
  norms equal but for float noise tie; the candidate list is ascending, as the code's
  ``list(set)`` of small integers is.

Choices neither the paper nor the code fixes (**ours**): with several images, each image is pruned
on its own with its own image pivots and the sample's text pivots; a sample without instruction text
has no text pivots; with ``spread="tiles"`` every tile is pruned on its own.

Cost: ``O(L H d)`` for the pivot norms and ``O(P V D)`` for the similarities; no attention
probabilities are formed, so the gate runs unchanged under sdpa, eager or FlashAttention kernels
(the keys come from the observer that wraps the layer's kernel).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Sequence, TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: `tokred list` starts without it
    import torch
from pydantic import Field
from tokred import BudgetOptions, Gate, GateStage, GateState, Method, Schedule
from tokred.components import top_k_indices
from tokred.options import Integer, LayerSpec

__all__ = ["PIVOT_RESOLUTION", "DARTResult", "dart_pivots", "dart_visit_order", "dart_retain", "dart_token_topk", "split_over_pivots",
           "DARTGate", "DARTMethod"]

#: How the pivots are visited: CPython's set order of their positions (the code) or sequence order.
PivotOrder = Literal["python_set", "position"]
#: The norm of the key states that ranks pivot candidates.
PivotNorm = Literal["l1", "l2"]
#: Relative precision at which the gate compares key norms (ours): float noise between runs of the
#: same prompt (a padded batch and the prompt alone differ by about 1e-7 relative under sdpa) must
#: not reorder pivots whose norms are equal in exact arithmetic (Qwen3's per-head key norm makes
#: every key of a random-weight model the same length).
PIVOT_RESOLUTION = 1e-4


@dataclass(frozen=True)
class DARTResult:
    """What :func:`dart_retain` returns; every entry is a row (position) of its ``hidden`` input.

    Attributes:
        kept: ``[k]`` long, ascending: the image pivots and the tokens the pivots kept.
        image_pivots: ``[p_img]`` long, by decreasing key L1 norm.
        text_pivots: ``[p_txt]`` long, by decreasing key L1 norm.
        visit_order: ``[p_img + p_txt]`` long, the order in which the pivots chose tokens.
    """

    kept: torch.Tensor
    image_pivots: torch.Tensor
    text_pivots: torch.Tensor
    visit_order: torch.Tensor


def _key_norm(keys: torch.Tensor, rows: torch.Tensor, norm: PivotNorm) -> torch.Tensor:
    """``[n]``: the L1 (or L2) norm of each row's keys with all heads concatenated (``[H, L, d]`` ->
    ``[n]``), reshaped as the code does (``permute(0, 2, 1, 3).reshape(B, L, -1)``, 419) first."""
    import torch

    selected = keys[:, rows.to(keys.device)].float()                            # [H, n, d]
    flat = selected.permute(1, 0, 2).reshape(selected.shape[1], -1)             # [n, H * d]
    return torch.norm(flat, p=1 if norm == "l1" else 2, dim=-1).cpu()


def _quantised(scores: torch.Tensor, resolution: float | None) -> torch.Tensor:
    """``scores`` rounded to multiples of ``resolution`` times their largest magnitude (``None``:
    unchanged), so that values equal up to float noise tie exactly and the tie goes to the lower index."""
    import torch

    if resolution is None or scores.numel() == 0:
        return scores
    scale = float(scores.abs().max()) * resolution
    return scores if scale == 0 else torch.round(scores / scale)


def dart_pivots(keys: torch.Tensor, image: torch.Tensor, text: torch.Tensor, image_pivots: int,
                text_pivots: int, norm: PivotNorm = "l1", resolution: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The pivots (``modeling_llama_self.py`` 419-428): the ``image_pivots`` rows of ``image`` and
    the ``text_pivots`` rows of ``text`` whose keys ``[H, L, d]`` (post-rotary, heads concatenated)
    have the largest norm (``"l1"``, the code's; ``"l2"``, see :class:`DARTGate`), each by
    decreasing norm (ties to the lower index). Fewer when a set is smaller. With ``resolution``,
    norms are compared at that precision relative to the largest (see :class:`DARTGate`)."""
    image, text = image.cpu(), text.cpu()
    image_norms = _quantised(_key_norm(keys, image, norm), resolution)
    image_top = image[top_k_indices(image_norms, min(image_pivots, image.numel()))]
    if not text.numel():
        return image_top, text
    text_top = text[top_k_indices(_quantised(_key_norm(keys, text, norm), resolution), min(text_pivots, text.numel()))]
    return image_top, text_top


def dart_visit_order(image_pivots: torch.Tensor, text_pivots: torch.Tensor, order: PivotOrder) -> torch.Tensor:
    """The order in which pivots choose tokens: ``"python_set"`` is the code's
    ``list(set(image_indices + query_indices))`` (430, CPython's iteration order of a set of ints,
    built in the same insertion order); ``"position"`` is increasing position."""
    import torch

    positions = [int(p) for p in image_pivots] + [int(p) for p in text_pivots]
    if order == "python_set":
        visited = list(set(positions))
    elif order == "position":
        visited = sorted(set(positions))
    else:
        raise ValueError(f"pivot order must be 'python_set' or 'position', got {order!r}")
    return torch.tensor(visited, dtype=torch.long)


def dart_retain(hidden: torch.Tensor, keys: torch.Tensor, image: torch.Tensor, text: torch.Tensor, *,
                per_pivot: int | Sequence[int], image_pivots: int = 4, text_pivots: int = 4,
                visit: PivotOrder | torch.Tensor = "python_set", norm: PivotNorm = "l1",
                resolution: float | None = None) -> DARTResult:
    """DART's choice for one image (``get_retained_image_token``, ``modeling_llama_self.py`` 397-449).

    Args:
        hidden: ``[L, D]`` layer ``K-1``'s output through the final norm (the code's
            ``last_layer_state[0]``).
        keys: ``[H, L, d]`` layer ``K-1``'s key states after the rotary embedding (``any_states[0]``).
        image: ``[V]`` long, the rows of the image's tokens, ascending.
        text: ``[T]`` long, the rows of the text pivots' candidates (the code: every token after the
            image).
        per_pivot: how many tokens each pivot keeps: one count for all (the code's ``TOKEN_TOPK``,
            :func:`dart_token_topk`) or one per pivot in visiting order (:func:`split_over_pivots`).
        image_pivots, text_pivots: how many pivots of each kind.
        visit: ``"python_set"`` (the code), ``"position"``, or an explicit ``[P]`` order of the
            pivot rows.
        norm: the key norm that ranks pivots, ``"l1"`` (the code) or ``"l2"``.
        resolution: ``None`` (the code: exact comparison) or the relative precision at which key
            norms are compared (:data:`PIVOT_RESOLUTION` in the gate).

    Returns:
        A :class:`DARTResult`.
    """
    import torch
    import torch.nn.functional as F

    image, text = image.cpu().long(), text.cpu().long()
    image_top, text_top = dart_pivots(keys, image, text, image_pivots, text_pivots, norm, resolution)
    order = dart_visit_order(image_top, text_top, visit) if isinstance(visit, str) else visit.cpu().long()
    counts = [int(per_pivot)] * int(order.numel()) if isinstance(per_pivot, int) else [int(c) for c in per_pivot]
    if len(counts) != order.numel():
        raise ValueError(f"per_pivot gives {len(counts)} counts for {order.numel()} pivots")
    is_pivot = torch.zeros(image.numel(), dtype=torch.bool)
    is_pivot[torch.isin(image, image_top)] = True
    candidates = image[~is_pivot]                                               # ascending, as the code's list(set)
    normed = hidden.detach().float()
    chosen = [image_top]
    for pivot, count in zip(order.tolist(), counts):
        if count == 0 or candidates.numel() == 0:
            continue
        if count > candidates.numel():
            raise ValueError(f"a pivot is to keep {count} tokens but only {candidates.numel()} candidates are left")
        similarity = F.cosine_similarity(normed[pivot][None], normed[candidates.to(normed.device)], dim=-1)  # [n]
        picked = top_k_indices(-similarity.cpu(), count)                        # the least similar
        chosen.append(candidates[picked])
        left = torch.ones(candidates.numel(), dtype=torch.bool)
        left[picked] = False
        candidates = candidates[left]
    kept = torch.sort(torch.cat(chosen)).values
    return DARTResult(kept, image_top, text_top, order)


def dart_token_topk(image_tokens: int, *, pivots: int = 8, max_num_trunction: int | None = None,
                    reduction_ratio: float = 0.778, variant: Literal["llava", "llava_next", "qwen"] = "llava",
                    image_pivots: int = 4, retain_token_num_for_llava_next: int = 320) -> int:
    """The code's per-pivot count ``TOKEN_TOPK`` for an image of ``image_tokens`` tokens.

    * ``"llava"`` (``modeling_llama_self.py`` 409): ``ceil(max_num_trunction // pivots)``, or with
      ``max_num_trunction=None``, ``ceil((N * (1 - reduction_ratio)) // pivots)``;
    * ``"llava_next"`` (412-417, when ``config.text_length`` is set):
      ``int(min(retain_token_num_for_llava_next, N - image_pivots) // pivots)``;
    * ``"qwen"`` (Qwen2.5-VL file 1563): ``int(N * (1 - reduction_ratio) / pivots)``.

    The code then keeps ``image_pivots + pivots * TOKEN_TOPK`` tokens."""
    if variant == "llava":
        base = max_num_trunction if max_num_trunction is not None else image_tokens * (1 - reduction_ratio)
        return math.ceil(base // pivots)
    if variant == "llava_next":
        return int(min(retain_token_num_for_llava_next, image_tokens - image_pivots) // pivots)
    if variant == "qwen":
        return int(image_tokens * (1 - reduction_ratio) / pivots)
    raise ValueError(f"variant must be 'llava', 'llava_next' or 'qwen', got {variant!r}")


def split_over_pivots(k: int, image_pivots: int, pivots: int) -> tuple[int, list[int]]:
    """tokred's exact budget (ours): ``(p, counts)`` such that ``p`` image pivots plus
    ``sum(counts)`` tokens kept by the ``pivots`` pivots (in visiting order) make exactly ``k``.

    ``p = min(image_pivots, k)``; the ``k - p`` others go to the pivots as evenly as possible, the
    first ``(k - p) mod pivots`` one more."""
    p = min(image_pivots, k)
    rest = k - p
    if pivots == 0:
        if rest:
            raise ValueError(f"{rest} tokens to keep but no pivot to keep them")
        return p, []
    base, extra = divmod(rest, pivots)
    return p, [base + (1 if i < extra else 0) for i in range(pivots)]


class DARTGate(Gate):
    """DART (Wen et al., EMNLP 2025): keep the pivot tokens and, for each pivot, the visual tokens
    least similar to it, at layer ``K``.

    Reads ``state.keys(None)`` (``[H_kv, L, d]``, layer ``K-1``'s post-rotary keys) and
    ``state.normed_hidden_states()`` (``[L, D]``), never attention probabilities. For each image (or
    tile, with ``spread="tiles"``) it keeps exactly its budget: :func:`split_over_pivots` and
    :func:`dart_retain` on the image's alive visual tokens with the instruction text as text pivot
    candidates.
    """

    image_pivots: Integer = Field(4, ge=1, description="Image pivots per image (the code's pivot_image_token, 4).")
    text_pivots: Integer = Field(4, ge=0, description="Text pivots among the instruction tokens (pivot_text_token, 4).")
    pivot_order: PivotOrder = Field(
        "python_set",
        description="Order in which pivots choose tokens: 'python_set' (the code's set iteration order of their "
        "positions) or 'position' (sequence order, ours).",
    )
    pivot_norm: PivotNorm = Field(
        "l2",
        description="Norm of the post-rotary keys that ranks pivots: 'l2' (default, ours: unchanged by a shift of all "
        "positions, so a prompt picks the same pivots alone and in a left-padded batch) or 'l1' (the code's).",
    )

    def select(self, state: GateState) -> torch.Tensor:
        import torch

        if state.keep_per_image is None:
            raise ValueError("dart needs a budget")
        keys = state.keys(None)                                                # [H_kv, L, d]
        hidden = state.normed_hidden_states()                                  # [L, D]
        visual_rows = state.positions("visual")                                # [V]
        text_rows = state.positions("instruction") if self.text_pivots else torch.zeros(0, dtype=torch.long)
        groups: list[tuple[torch.Tensor, int]] = []
        for image, k in enumerate(state.keep_per_image):
            in_image = state.visual_image == image
            if state.keep_per_tile is None or state.visual_tile is None:
                groups.append((torch.nonzero(in_image).flatten(), k))
            else:
                groups += [(torch.nonzero(in_image & (state.visual_tile == tile)).flatten(), k_tile)
                           for tile, k_tile in enumerate(state.keep_per_tile[image])]
        kept = []
        for members, k in groups:
            if k == 0:
                continue
            rows = visual_rows[members]
            pivots = min(self.image_pivots, k, rows.numel()) + min(self.text_pivots, text_rows.numel())
            p, counts = split_over_pivots(k, self.image_pivots, pivots)
            result = dart_retain(hidden, keys, rows, text_rows, per_pivot=counts, image_pivots=p,
                                 text_pivots=self.text_pivots, visit=self.pivot_order, norm=self.pivot_norm,
                                 resolution=PIVOT_RESOLUTION)
            kept.append(members[torch.searchsorted(rows.cpu(), result.kept)])
        return torch.cat(kept) if kept else torch.zeros(0, dtype=torch.long)


class DARTMethod(BudgetOptions, Method):
    """DART: keep pivot tokens and the visual tokens least duplicated by them, at layer 2 (Wen et al., EMNLP 2025).

    Options: ``keep`` / ``keep_ratio`` (default ``keep_ratio=0.222``: the code's
    ``reduction_ratio=0.778``), ``gate_layer`` (default 2, the code's ``K``), ``image_pivots`` and
    ``text_pivots`` (4 and 4), ``pivot_order`` (``"python_set"``, the code's), ``pivot_norm``
    (``"l2"``, ours; the code's is ``"l1"``) and ``spread``.
    """

    default_keep_ratio = 0.222

    gate_layer: LayerSpec = Field(2, description="Decoder layer K from which only the kept tokens remain (the code's K, 2).")
    image_pivots: Integer = Field(4, ge=1, description="Image pivots per image (the code's pivot_image_token, 4).")
    text_pivots: Integer = Field(4, ge=0, description="Text pivots among the instruction tokens (pivot_text_token, 4).")
    pivot_order: PivotOrder = Field(
        "python_set",
        description="Order in which pivots choose tokens: 'python_set' (the code's) or 'position' (ours).",
    )
    pivot_norm: PivotNorm = Field(
        "l2",
        description="Norm of the post-rotary keys that ranks pivots: 'l2' (default, ours: position-shift invariant) or "
        "'l1' (the code's).",
    )

    def schedule(self) -> Schedule:
        gate = DARTGate(image_pivots=self.image_pivots, text_pivots=self.text_pivots, pivot_order=self.pivot_order,
                        pivot_norm=self.pivot_norm)
        return Schedule(gates=(GateStage(layer=self.gate_layer, gate=gate, budget=self.budget),))
