"""Methods: named, registered presets that build a :class:`~tokred.schedule.Schedule` from options.

A method is a small pydantic model: its fields are the user-facing options (validated,
``extra="forbid"``, each with a description) and :meth:`Method.schedule` turns them into a Schedule.
``tokred.create("fastv", keep=64)`` instantiates the registered class; ``tokred.apply`` runs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .options import Integer, Number
from .budget import Budget
from .errors import BudgetError

if TYPE_CHECKING:  # a method builds a Schedule; importing it here would close a circle through the registry
    from .schedule import Schedule

__all__ = ["Method", "BudgetOptions"]


class Method(BaseModel):
    """Base of every registered method. Subclasses add option fields and implement :meth:`schedule`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: One line shown by ``tokred list``; defaults to the first line of the class docstring.
    summary: ClassVar[str] = ""

    def schedule(self) -> Schedule:
        """The Schedule these options describe."""
        raise NotImplementedError

    @model_validator(mode="after")
    def _schedule_is_buildable(self) -> Method:
        # Options that cannot form a schedule (a gate at layer 0, a gate budget above the
        # selector's) fail at create(), not at the first forward pass.
        self.schedule()
        return self

    def keep_everything(self) -> Method:
        """This method with options under which it keeps every visual token.

        The conformance suite checks that such a run gives exactly the unmodified model's logits,
        with all of the method's code paths still running (selectors select, gates score).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement keep_everything()")

    @classmethod
    def describe(cls) -> str:
        """``summary``, or else the first paragraph of the class docstring, on one line."""
        paragraph = (cls.__doc__ or "").strip().split("\n\n")[0]
        return cls.summary or " ".join(paragraph.split())


class BudgetOptions(BaseModel):
    """The ``keep`` / ``keep_ratio`` pair shared by methods with one final budget.

    Exactly one may be given; when neither is, the method's ``default_keep_ratio`` applies.
    """

    default_keep_ratio: ClassVar[float] = 0.25

    keep: Integer | None = Field(None, description="Visual tokens to keep per image (absolute). Excludes keep_ratio.")
    keep_ratio: Number | None = Field(
        None, description="Fraction of each image's visual tokens to keep, in (0, 1]. Excludes keep."
    )
    spread: Literal["image", "tiles"] = Field(
        "image",
        description="'image': rank all of an image's tokens together; 'tiles': split each image's budget over "
        "its tiles in proportion to their token counts and reduce every tile on its own (tiled models).",
    )

    @model_validator(mode="after")
    def _check_budget(self) -> BudgetOptions:
        if self.keep is not None and self.keep_ratio is not None:
            raise BudgetError(f"give either keep or keep_ratio, not both (got keep={self.keep}, keep_ratio={self.keep_ratio})")
        self.budget  # noqa: B018 - validates the values now, before any model call
        return self

    def keep_everything(self) -> BudgetOptions:
        """These options with ``keep_ratio=1.0``. Methods with further ways of dropping tokens (an
        all-or-none gate, say) extend this to switch those off as well."""
        return self.model_copy(update={"keep": None, "keep_ratio": 1.0})

    @property
    def budget(self) -> Budget:
        if self.keep is None and self.keep_ratio is None:
            return Budget(keep_ratio=type(self).default_keep_ratio, spread=self.spread)
        return Budget(keep=self.keep, keep_ratio=self.keep_ratio, spread=self.spread)
