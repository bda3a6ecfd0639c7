"""A hostile third-party plugin, for tests: the registry-side mistakes (or attacks) a plugin can make.

``tests/test_hostile_plugin.py`` installs it as the entry point ``hostile`` of a distribution
``tokred-hostile`` and asserts the exact errors it earns; ``docs/troubleshooting.md`` ("A plugin's
registrations are refused") shows the same texts. What it tries:

* a clash through aliases with first-party names: the method ``hostile-nan`` asks for the aliases
  ``fastv`` (tokred's FastV) and ``todre`` (tokred-todre's ToDRE);
* a clash with another third party: the selector ``hostile.nan`` asks for the alias
  ``example.norm``, the example plugin's selector, so both lose that name;
* hooks pluggy would never call: ``tokred_register_method`` (no ``s``, marked) and
  ``tokred_register_gates`` (right name, not marked);
* bad option models: a selector option without a description, a method option without a default.

What stays registered is the selector ``hostile.nan``, whose scores are all NaN, and the method
``hostile-nan`` that uses it: they are for the runtime's check of non-finite scores, which refuses
them when a run selects (``Registry(plugins=[tokred_hostile])`` registers them in-process).
"""

from __future__ import annotations

from typing import Callable

import torch
from pydantic import Field

import tokred

Register = Callable[..., None]


class NanScoreSelector(tokred.Selector):
    """Scores every token NaN, so its top-k is meaningless: the runtime must refuse it."""

    def score(self, tokens: tokred.VisualTokens) -> torch.Tensor:
        return torch.full((tokens.num_tokens,), float("nan"), device=tokens.features.device)  # [N]


class NanMethod(tokred.BudgetOptions, tokred.Method):
    """The NaN selector before the LLM, with the usual keep / keep_ratio budget."""

    def schedule(self) -> tokred.Schedule:
        return tokred.Schedule(selector=tokred.SelectorStage(selector=NanScoreSelector(), budget=self.budget))


class UndescribedSelector(NanScoreSelector):
    """An option without a description: ``tokred list`` would show ``"description": null``."""

    strength: float = 1.0


class RequiredMethod(NanMethod):
    """An option without a default: ``tokred.create("hostile.required")`` could never work."""

    strength: float = Field(description="How strongly to prune.")


@tokred.hookimpl
def tokred_register_selectors(register: Register) -> None:
    register("hostile.nan", NanScoreSelector, aliases=("example.norm",))
    register("hostile.undescribed", UndescribedSelector)


@tokred.hookimpl
def tokred_register_methods(register: Register) -> None:
    register("hostile-nan", NanMethod, aliases=("fastv", "todre"))
    register("hostile.required", RequiredMethod)


@tokred.hookimpl
def tokred_register_method(register: Register) -> None:  # misspelled: pluggy would never call it
    register("hostile.never", NanMethod)


def tokred_register_gates(register: Register) -> None:  # not marked @tokred.hookimpl: never called
    register("hostile.never", NanScoreSelector)
