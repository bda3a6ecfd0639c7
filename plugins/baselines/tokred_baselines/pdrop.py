"""``pdrop``: PyramidDrop, visual tokens dropped in stages (Xing et al., CVPR 2025).

Stage II only: gates at several decoder layers, each keeping a shrinking share of every image's
original tokens, ranked by the attention the last prompt token pays them. Code:
``Cooperx521/PyramidDrop@6444f304aee4b7edcb022839fb9e8cd07859704a``,
``llava/model/modeling_llama_pdrop.py`` (``pdrop_forward`` 1106-1288, ``pdrop_rank_drop`` 1291-1468),
configured by ``llava/eval/model_vqa_loader.py`` 84-96 and the eval scripts. What the code does,
which we follow:

* **where**: after the layers before ``layer_list = [8, 16, 24]`` of LLaVA's 32 (1220-1223): the
  depth fractions ``"1/4"``, ``"1/2"``, ``"3/4"``, resolved per model (floor);
* **how many**: stage ``s`` keeps ``int(N * ratio_s)`` of the image's *original* ``N`` tokens
  (1306-1307) with ``image_token_ratio_list = [0.5, 0.25, 0.125]``, i.e. ``lambda = 0.5`` per stage
  (576 -> 288 -> 144 -> 72); ``int()`` truncates, hence ``rounding="down"``;
* **score** (1320-1402): the *gate layer's own* ``input_layernorm``, ``q_proj``, ``k_proj`` and
  rotary embedding applied to the hidden states entering it, i.e. the attention the first layer of
  the next stage computes, not the attention of the layer just run; the query is the last prompt
  token (1390-1392); ``softmax(q k^T / sqrt(d))`` with the causal mask in float32, averaged over
  heads, restricted to the image's keys (1399-1401); the top ``keep`` stay, in sequence order
  (1405-1407).

tokred expresses this with gates of ``attention_layer = "own"`` (:attr:`tokred.Gate.attention_layer`):
before the gate at layer ``l`` decides, the runtime runs layer ``l``'s input norm and attention module
once on the hidden states entering it (the cache untouched) and ``state.attention("last", "visual")``
reads that. :func:`pdrop_scores` is the same score from the weights, a pure function tested against
the authors' fixtures. ``score_layer="previous"`` reads layer ``l - 1``'s attention instead (FastV's
convention, no extra attention call); see the method's documentation page for the measured cost of
each.

Where tokred's contract differs (documented, not options): the code renumbers positions
contiguously after every drop and shifts decoding positions by the dropped count (1259-1267, 1446);
tokred's gates keep every surviving token's original position. The code handles right padding
only; tokred's runtime handles left-padded batches. Ties go to the lower index (the code's ``topk``
leaves them unspecified).

Choices neither the paper nor the code fixes (**ours**): the budgets follow from the *last* stage's
``keep`` / ``keep_ratio`` (default ``0.125``, the code's last ratio) and ``ratio`` (``lambda``):
stage ``s`` of ``S`` keeps ``keep_ratio / lambda^(S-1-s)`` of ``N`` (at most all), or for an
absolute ``keep``, ``keep / lambda^(S-1-s)`` tokens rounded half up (at most all of them); with
``spread="tiles"`` each tile is ranked on its own.
"""

from __future__ import annotations

import math
from typing import Literal, TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: `tokred list` starts without it
    import torch
from pydantic import Field
from tokred import Budget, BudgetOptions, Gate, GateStage, GateState, Method, OptionsError, Schedule
from tokred.options import LayerSpec, Number

from ._common import Rounding, RoundingOption

__all__ = ["rms_norm", "rotary", "pdrop_scores", "PDropGate", "PDropMethod"]

ScoreLayer = Literal["own", "previous"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm: ``weight * x / sqrt(mean(x^2) + eps)`` over the last axis, in float32."""
    import torch

    x = x.float()
    return weight.float() * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotary(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama's default rotary embedding (rotate-half form) of ``x`` ``[H, L, d]`` at ``positions``
    ``[L]`` with base ``theta``."""
    import torch

    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))   # [d/2]
    freqs = positions.float()[:, None] * inv_freq[None, :]                    # [L, d/2]
    emb = torch.cat([freqs, freqs], dim=-1)                                   # [L, d]
    cos, sin = emb.cos(), emb.sin()
    half = d // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def pdrop_scores(features: torch.Tensor, position_ids: torch.Tensor, query_position: int, image: torch.Tensor, *,
                 ln_weight: torch.Tensor, ln_eps: float, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 num_heads: int, num_kv_heads: int | None = None, rope_theta: float = 10000.0) -> torch.Tensor:
    """PyramidDrop's score of each image token (``modeling_llama_pdrop.py`` 1320-1402).

    Args:
        features: ``[L, D]`` hidden states entering the scoring layer ``rank_layer``.
        position_ids: ``[L]`` their position ids.
        query_position: the row of the query, the last prompt token.
        image: ``[n]`` long, the rows of the image tokens (keys to score).
        ln_weight, ln_eps: the scoring layer's input RMSNorm.
        q_weight, k_weight: its query and key projections, ``[H * d, D]`` and ``[H_kv * d, D]``
            (no bias, as in Llama).
        num_heads, num_kv_heads: query and key-value heads (grouped heads are repeated).
        rope_theta: the rotary base.

    Returns:
        ``[n]`` float32: the query's softmax attention to each image token (over every key at or
        before it), averaged over heads.
    """
    import torch

    kv_heads = num_kv_heads or num_heads
    x = rms_norm(features, ln_weight, ln_eps)                                  # [L, D]
    length = x.shape[0]
    head_dim = q_weight.shape[0] // num_heads
    q = (x[query_position:query_position + 1] @ q_weight.float().T).view(1, num_heads, head_dim).transpose(0, 1)
    k = (x @ k_weight.float().T).view(length, kv_heads, head_dim).transpose(0, 1)         # [H_kv, L, d]
    q = rotary(q, position_ids[query_position:query_position + 1], rope_theta)            # [H, 1, d]
    k = rotary(k, position_ids, rope_theta).repeat_interleave(num_heads // kv_heads, dim=0)  # [H, L, d]
    logits = (q @ k.transpose(-1, -2))[:, 0, :query_position + 1] / math.sqrt(head_dim)   # [H, keys]
    probabilities = torch.softmax(logits.float(), dim=-1)
    return probabilities.mean(dim=0)[image.to(probabilities.device)]


class PDropGate(Gate):
    """PyramidDrop's ranking (Xing et al., CVPR 2025): keep the visual tokens the prompt's last
    token attends to most, with the attention of the gate's own layer (default) or the layer before.

    ``score(state)`` is ``state.attention("last", "visual")`` ``[H, 1, V]`` averaged over heads,
    ``[V]``; the base class keeps each image's (tile's) budget.
    """

    score_layer: ScoreLayer = Field(
        "own",
        description="Whose attention scores the tokens: 'own' (the gate layer's own attention on its input, as the code "
        "computes it; one extra attention call per gate) or 'previous' (layer l-1's, tokred's convention, free).",
    )

    @property
    def attention_layer(self) -> ScoreLayer:  # type: ignore[override]
        """The gate's :attr:`tokred.Gate.attention_layer`: ``score_layer``."""
        return self.score_layer

    def score(self, state: GateState) -> torch.Tensor:
        """``[V]`` float32: the last prompt token's attention to each alive visual token, head mean."""
        return state.attention("last", "visual").mean(dim=0)[0]


class PDropMethod(RoundingOption, BudgetOptions, Method):
    """PyramidDrop: drop visual tokens in stages at 1/4, 1/2 and 3/4 of the depth by last-token attention (Xing et al., CVPR 2025).

    Options: ``keep`` / ``keep_ratio`` of the last stage (default ``keep_ratio=0.125``), ``ratio``
    (``lambda``, 0.5: each earlier stage keeps twice as many), ``layers`` (``"1/4"``, ``"1/2"``,
    ``"3/4"``), ``score_layer`` (``"own"``), ``rounding`` (``"down"``: the code's ``int()``) and
    ``spread``.
    """

    default_keep_ratio = 0.125

    layers: tuple[LayerSpec, ...] = Field(
        ("1/4", "1/2", "3/4"),
        description="Decoder layers of the stages (ints or depth fractions), increasing; default the code's 8/16/24 of 32.",
    )
    ratio: Number = Field(
        0.5, gt=0.0, le=1.0,
        description="lambda: each stage keeps this share of the stage before's budget (the code's 0.5); the last stage "
        "keeps keep / keep_ratio.",
    )
    score_layer: ScoreLayer = Field(
        "own",
        description="'own': each gate layer's own attention on its input (the code); 'previous': the layer before's "
        "(tokred's convention, no extra attention call).",
    )
    rounding: Rounding = Field(
        "down",
        description="How a stage's keep_ratio * N becomes a count: 'down' (default: the code's int()), 'half_up' "
        "(tokred's rule) or 'half_even'.",
    )

    @property
    def budget(self) -> Budget:
        return self.rounded(super().budget)

    def stage_budgets(self) -> list[Budget]:
        """Each stage's per-image budget, first to last; the last is ``keep`` / ``keep_ratio``."""
        final = self.budget
        stages = len(self.layers)
        budgets = []
        for stage in range(stages):
            factor = self.ratio ** (stages - 1 - stage)
            if stage == stages - 1:
                budgets.append(final)
            elif final.keep_ratio is not None:
                budgets.append(final.model_copy(update={"keep_ratio": min(1.0, final.keep_ratio / factor)}))
            else:
                assert final.keep is not None
                keep = math.floor(final.keep / factor + 0.5)
                budgets.append(Budget(keep=keep, at_most_all=True, spread=final.spread))  # derived, not typed
        return budgets

    def schedule(self) -> Schedule:
        if not self.layers:
            raise OptionsError("pdrop needs at least one layer in layers")
        gate = PDropGate(score_layer=self.score_layer)
        return Schedule(gates=tuple(GateStage(layer=layer, gate=gate, budget=budget)
                                    for layer, budget in zip(self.layers, self.stage_budgets())))

    def keep_everything(self) -> PDropMethod:
        """Every stage keeps all tokens (``keep_ratio=1.0``, ``ratio=1.0``); every gate still scores."""
        return self.model_copy(update={"keep": None, "keep_ratio": 1.0, "ratio": 1.0})
