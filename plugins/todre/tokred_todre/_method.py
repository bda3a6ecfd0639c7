"""``todre``: the ToDRE preset (Li, Yang, Lu, arXiv 2505.18757 v2).

Stage I (:class:`~tokred_todre.DiversitySelector`) keeps a diverse ``keep`` / ``keep_ratio`` of each
image's visual tokens before the language model (default 10%, the paper's headline setting);
stage II (:class:`~tokred_todre.InformationMigrationGate`) drops all remaining visual tokens of a
sample at ``gate_layer`` (default depth 7/8) when attention has stopped flowing between text and
image (both shares below ``tau = 0.10``). ``stage1=False`` / ``stage2=False`` run one stage alone,
as in the paper's ablations.
"""

from __future__ import annotations

from pydantic import Field, model_validator
from tokred import BudgetOptions, GateStage, Method, OptionsError, Schedule, SelectorStage
from tokred.options import LayerSpec, Number

from ._gate import InformationMigrationGate
from ._selector import DiversitySelector, Objective, PivotRule

__all__ = ["ToDREMethod"]

_STAGE1_OPTIONS = ("keep", "keep_ratio", "objective", "pivot")
_STAGE2_OPTIONS = ("tau", "gate_layer")


class ToDREMethod(BudgetOptions, Method):
    """ToDRE: diversity selection before the LLM, then an information-migration gate (arXiv 2505.18757 v2).

    Options (every default that the paper does not state is ours and marked so):

    * ``keep`` / ``keep_ratio``: stage-I budget per image; default ``keep_ratio=0.1`` (paper).
    * ``objective``: ``"max_sum"`` (v2, default) or ``"k_center"`` (v1).
    * ``pivot``: ``"cls_attention"`` (paper), ``"max_norm"`` or ``"index:<i>"`` (ours).
    * ``tau``: stage-II threshold, default 0.10 (paper).
    * ``gate_layer``: the layer from which a firing gate removes the visual tokens, an int or a depth
      fraction; default ``"7/8"`` (paper's depth), rounded down per model; the ratios are read from
      the layer before it (tokred's gate convention, ours).
    * ``stage1`` / ``stage2``: run either stage alone (paper's ablations); at least one must be on,
      and options of a stage that is off are refused rather than ignored (ours).
    """

    default_keep_ratio = 0.1

    objective: Objective = Field(
        "max_sum", description="Stage-I greedy rule: 'max_sum' (ToDRE v2, default) or 'k_center' (ToDRE v1)."
    )
    pivot: PivotRule = Field(
        "cls_attention",
        description="Stage-I first token: 'cls_attention' (paper; 'max_norm' when the encoder has no [CLS]), "
        "'max_norm' or 'index:<i>'.",
    )
    tau: Number = Field(
        0.10, ge=0.0, le=1.0,
        description="Stage-II threshold: a sample's visual tokens are dropped when both the text->visual and "
        "the visual->text attention shares are below it.",
    )
    gate_layer: LayerSpec = Field(
        "7/8",
        description="Stage-II layer from which a firing gate removes the visual tokens (int, negative from "
        "the end, or a depth fraction such as '7/8', rounded down); it decides from the layer before.",
    )
    stage1: bool = Field(True, description="Run stage I (diversity selection before the LLM).")
    stage2: bool = Field(True, description="Run stage II (the information-migration gate).")

    @model_validator(mode="after")
    def _check_stages(self) -> ToDREMethod:
        if not (self.stage1 or self.stage2):
            raise OptionsError("todre needs at least one stage: stage1 and stage2 are both False")
        for stage, on, names in (("stage1", self.stage1, _STAGE1_OPTIONS), ("stage2", self.stage2, _STAGE2_OPTIONS)):
            given = [name for name in names if name in self.model_fields_set]
            if not on and given:
                verb = "configures" if len(given) == 1 else "configure"
                raise OptionsError(f"{', '.join(given)} {verb} {stage}, which is off ({stage}=False)")
        self.schedule()  # validates the gate layer and the components now, before any model call
        return self

    def schedule(self) -> Schedule:
        selector = None
        if self.stage1:
            selector = SelectorStage(
                selector=DiversitySelector(objective=self.objective, pivot=self.pivot), budget=self.budget
            )
        gates: tuple[GateStage, ...] = ()
        if self.stage2:
            gates = (GateStage(layer=self.gate_layer, gate=InformationMigrationGate(tau=self.tau), budget=None),)
        return Schedule(selector=selector, gates=gates)

    def keep_everything(self) -> ToDREMethod:
        """These options with stage I keeping every token (``keep_ratio=1.0``) and stage II never
        firing (``tau=0.0``: no share is below 0); both stages still run their code."""
        update: dict[str, object] = {}
        if self.stage1:
            update.update(keep=None, keep_ratio=1.0)
        if self.stage2:
            update["tau"] = 0.0
        return self.model_copy(update=update)
