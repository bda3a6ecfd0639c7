"""The ``star`` method: STAR's two stages as one tokred Schedule.

Guo et al., "STAR: Stage-Wise Attention-Guided Token Reduction for Efficient Large Vision-Language
Models Inference", arXiv 2505.12359. Stage I (:class:`~tokred_star.SelfAttentionSelector`) keeps
the visual tokens with the most visual self-attention before the language model; stage II
(:class:`~tokred_star.CrossAttentionGate`) keeps, from decoder layer ``K`` on, the ones the
instruction text attends to most.

The paper publishes no per-model setting we could read for the split of the budget between the
stages or for the layer ``K``; every default below is ours and is an option:

* final budget (``keep`` / ``keep_ratio``): ``keep_ratio=0.25`` of each image's tokens;
* stage-I budget: twice the final budget, capped at all of the image's tokens;
* ``gate_layer="1/4"``: a quarter of the way into the decoder (layer 8 of LLaVA-1.5-7B's 32, 7 of
  Qwen2.5-VL-7B's 28). FastV (Chen et al. 2024) observes that attention to image tokens is broad in
  the first two layers and selective after them; a quarter of the depth is past that point and
  still leaves three quarters of the decoder running on the final budget.

Budgets are per image. The run report's ``equivalent_visual_tokens`` counts both stages: with ``L``
decoder layers, a stage-I budget ``k1`` and a final budget ``k`` from layer ``K`` on, each image
costs ``(K * k1 + (L - K) * k) / L`` tokens (``1.25 k`` with the defaults).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field
from tokred import Budget, BudgetError, BudgetOptions, GateStage, Method, OptionsError, Schedule, SelectorStage
from tokred.options import Integer, LayerSpec, Number

from ._cross_attention import CrossAttentionGate
from ._self_attention import SelfAttentionSelector

__all__ = ["StarMethod"]


class StarMethod(BudgetOptions, Method):
    """STAR: visual self-attention before the LLM, then cross-modal attention at layer K (Guo et al. 2025).

    ``tokred.create("star", keep=64)`` keeps 128 tokens per image before the language model and 64
    from the gate layer on. ``stage1=False`` runs stage II alone (the final budget at ``gate_layer``);
    ``stage2=False`` runs stage I alone, which then keeps the final budget itself.
    """

    default_keep_ratio = 0.25

    stage1_keep: Integer | None = Field(
        None,
        description="Visual tokens per image that stage I keeps (absolute). Default: twice the final budget, "
        "at most all tokens (ours). Excludes stage1_keep_ratio; only with both stages on.",
    )
    stage1_keep_ratio: Number | None = Field(
        None,
        description="Fraction of each image's visual tokens that stage I keeps, in (0, 1]. Excludes stage1_keep; "
        "only with both stages on.",
    )
    gate_layer: LayerSpec = Field(
        "1/4",
        description="Decoder layer K (int, negative from the end, or depth fraction like '1/4') from which only the "
        "final budget remains; scored with layer K-1's attention. Default ours: the paper gives none we could use.",
    )
    stage1: bool = Field(True, description="Run stage I: visual self-attention selection before the language model.")
    stage2: bool = Field(True, description="Run stage II: instruction-to-visual attention gate at gate_layer.")
    stage1_features: Literal["projected", "pre_projector"] = Field(
        "projected",
        description="Stage-I embeddings: 'projected' (language-model input embeddings) or 'pre_projector' "
        "(vision-encoder output, where the adapter captures it). Default ours.",
    )
    stage1_include_self: bool = Field(
        False,
        description="Stage I counts each token's attention to itself (the literal formula). Default ours: False, "
        "attention received from the other tokens only.",
    )

    def _check_stages(self) -> None:
        """Clear errors for option combinations that make no sense; run by :meth:`schedule`, which
        tokred's Method base validates at construction (so they fail at ``create``)."""
        if not (self.stage1 or self.stage2):
            raise OptionsError("star needs at least one stage: stage1 and stage2 cannot both be False")
        explicit_stage1 = self.stage1_keep is not None or self.stage1_keep_ratio is not None
        if explicit_stage1 and not (self.stage1 and self.stage2):
            raise OptionsError(
                "stage1_keep / stage1_keep_ratio set stage I's budget in a two-stage run; with one stage switched "
                "off the remaining stage keeps the final budget (keep / keep_ratio)"
            )
        if not self.stage2 and "gate_layer" in self.model_fields_set:
            raise OptionsError("gate_layer places stage II, which stage2=False switches off")
        if self.stage1_keep is not None and self.stage1_keep_ratio is not None:
            raise BudgetError(
                f"give either stage1_keep or stage1_keep_ratio, not both (got stage1_keep={self.stage1_keep}, "
                f"stage1_keep_ratio={self.stage1_keep_ratio})"
            )
        first, final = self.stage1_budget, self.budget
        if first is not None and self.stage2 and (
            (first.keep is not None and final.keep is not None and first.keep < final.keep)
            or (first.keep_ratio is not None and final.keep_ratio is not None and first.keep_ratio < final.keep_ratio)
        ):
            raise BudgetError(
                f"stage I keeps {first.describe()} per image, fewer than the final budget {final.describe()} "
                "that stage II must keep"
            )

    @property
    def stage1_budget(self) -> Budget | None:
        """Stage I's per-image budget, or ``None`` when ``stage1=False``.

        Explicit ``stage1_keep`` / ``stage1_keep_ratio`` when given; the final budget when stage II
        is off; otherwise twice the final budget (ours): ``keep_ratio=min(1, 2 r)`` for a final
        ``keep_ratio=r``, and ``2 k`` tokens capped at the image's token count for a final ``keep=k``.
        """
        if not self.stage1:
            return None
        if not self.stage2:
            return self.budget
        if self.stage1_keep is not None or self.stage1_keep_ratio is not None:
            return Budget(keep=self.stage1_keep, keep_ratio=self.stage1_keep_ratio, spread=self.spread)
        final = self.budget
        if final.keep_ratio is not None:
            return Budget(keep_ratio=min(1.0, 2 * final.keep_ratio), spread=self.spread)
        assert final.keep is not None
        return Budget(keep=2 * final.keep, at_most_all=True, spread=self.spread)  # derived, never what the user typed

    def schedule(self) -> Schedule:
        """Stage I as the Selector stage, stage II as one GateStage at ``gate_layer`` (each if switched on)."""
        self._check_stages()
        first = self.stage1_budget
        selector = None
        if first is not None:
            selector = SelectorStage(
                selector=SelfAttentionSelector(features=self.stage1_features, include_self=self.stage1_include_self),
                budget=first,
            )
        gates = (GateStage(layer=self.gate_layer, gate=CrossAttentionGate(), budget=self.budget),) if self.stage2 else ()
        return Schedule(selector=selector, gates=gates)

    def keep_everything(self) -> StarMethod:
        """These options with ``keep_ratio=1.0`` at every stage (both stages still select and score)."""
        options = self.model_dump(exclude_unset=True, exclude={"keep", "keep_ratio", "stage1_keep", "stage1_keep_ratio"})
        return type(self)(**options, keep_ratio=1.0)
