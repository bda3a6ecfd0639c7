"""tokred's contract with transformers internals (:mod:`tokred.compat`): every name it depends on
exists in the installed release, both cache spellings work, and calls tokred cannot classify fail
loudly instead of reducing nothing."""

from __future__ import annotations

import importlib.metadata
import inspect
import re

import pytest
import torch
from transformers import DynamicCache

import tokred
from tokred import compat
from tokred.testing import tiny_inputs, tiny_model

PROMPT = "What is shown in this image?"


@pytest.mark.parametrize("requirement", compat.REQUIREMENTS, ids=lambda r: r.name[:60])
def test_installed_transformers_has_every_name_tokred_depends_on(requirement: compat.Requirement) -> None:
    problem = requirement.check()
    assert problem is None, f"transformers {compat.transformers_version()}: {requirement.name}: {problem}"


def test_the_installed_release_is_within_the_tested_range(tested_release: str) -> None:
    # The fixture skips outside the range (a release installed on purpose), or fails under CI's
    # TOKRED_REQUIRE_TESTED_RANGE=1; inside it, the check itself must agree.
    assert compat.in_tested_range(tested_release)
    assert not compat.warn_if_untested(tested_release)


def test_tested_range_is_exactly_the_declared_range() -> None:
    """pyproject.toml declares transformers>=OLDEST,<=NEWEST, the bounds of TESTED_TRANSFORMERS: pip
    never installs an untested release (tests/test_release_range.py checks the source files too; this
    checks the installed distribution's metadata)."""
    from packaging.requirements import Requirement  # (a requirement of transformers)

    requires = importlib.metadata.requires("tokred") or []
    spec = Requirement(next(r for r in requires if re.match(r"transformers\b", r)))
    declared = {(s.operator, compat._release(s.version)) for s in spec.specifier}
    low, high = compat.TESTED_TRANSFORMERS
    assert declared == {(">=", compat._release(low)), ("<=", compat._release(high))}, (
        f"the installed tokred declares {spec} but TESTED_TRANSFORMERS is {compat.TESTED_TRANSFORMERS}; after a "
        "pull that moved the range, reinstall (pip install -c constraints.txt -e .): an editable install's "
        "metadata is written at install time")


def test_apply_warns_once_per_process_outside_the_tested_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compat, "TESTED_TRANSFORMERS", ("5.0.0", "5.1.0"))
    monkeypatch.setattr(compat, "_warned_releases", set())
    model, processor = tiny_model("llava")
    method = tokred.create("random", keep=8)
    with pytest.warns(tokred.UntestedReleaseWarning) as caught:
        with tokred.apply(model, method):
            pass
    message = str(caught[0].message)
    assert len(caught) == 1 and caught[0].filename == __file__  # points at the caller of apply
    assert f"transformers {compat.transformers_version()} is outside" in message
    assert "5.0.0 to 5.1.0" in message and "pip install 'transformers>=5.0.0,<=5.1.0'" in message
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second apply in the same process warns no more
        with tokred.apply(model, method):
            pass
    assert compat.warn_if_untested() is True  # still outside; said once


def test_no_warning_inside_the_tested_range(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compat, "_warned_releases", set())
    low, high = compat.TESTED_TRANSFORMERS
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert compat.warn_if_untested(low) is False and compat.warn_if_untested(high) is False


@pytest.mark.parametrize(("version", "inside"), [
    ("5.17.0", True), ("5.20.2", True), ("5.24.0", True), ("5.16.1", False), ("5.25.0", False),
    ("6.0.0", False), ("5.24.0.dev0", True), ("5.17.0rc1", True), ("garbage", False),
])
def test_in_tested_range_compares_release_numbers(version: str, inside: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(compat, "TESTED_TRANSFORMERS", ("5.17.0", "5.24.0"))  # the cases above, whatever the range is
    assert compat.in_tested_range(version) is inside


def test_find_cache_reads_both_spellings_and_refuses_two() -> None:
    cache = DynamicCache()
    for name in compat.CACHE_KEYWORDS:
        assert compat.find_cache({name: cache, "input_ids": None}, call="test") is cache
    assert compat.find_cache({"input_ids": None}, call="test") is None
    with pytest.raises(tokred.TransformersInterfaceError, match="one KV cache keyword"):
        compat.find_cache({name: cache for name in compat.CACHE_KEYWORDS}, call="test")


def test_a_cache_under_an_unknown_keyword_fails_loudly_naming_the_release() -> None:
    with pytest.raises(tokred.TransformersInterfaceError) as info:
        compat.find_cache({"kv_state": DynamicCache()}, call="LlavaModel.forward")
    message = str(info.value)
    assert f"transformers {compat.transformers_version()}" in message
    assert "'kv_state'" in message and "past_key_values" in message


def test_an_unreadable_cache_fails_loudly() -> None:
    class Opaque:
        pass

    with pytest.raises(tokred.TransformersInterfaceError, match="get_seq_length"):
        compat.cache_length(Opaque())

    class Broken:
        def get_seq_length(self, layer: int) -> int:  # a changed signature
            return 0

    with pytest.raises(tokred.TransformersInterfaceError, match="raised TypeError"):
        compat.cache_length(Broken())


def test_output_cache_reads_the_field_of_either_release() -> None:
    model, processor = tiny_model("llava")
    inputs = tiny_inputs(processor, [PROMPT])
    with torch.no_grad():
        out = model(**inputs, use_cache=True)
    cache = compat.output_cache(out)
    assert isinstance(cache, DynamicCache) and compat.cache_length(cache) == inputs["input_ids"].shape[1]


def test_cache_keyword_is_what_the_language_model_takes() -> None:
    from transformers import LlamaModel

    assert compat.cache_keyword() in inspect.signature(LlamaModel.forward).parameters


@pytest.mark.parametrize("spelling", compat.CACHE_KEYWORDS)
def test_decoding_on_a_reduced_cache_works_with_either_cache_spelling(spelling: str) -> None:
    """A manual decoding step passing the cache under either keyword continues on the reduced cache:
    5.24 still accepts the deprecated ``past_key_values`` (releases before it know only that one),
    and tokred reads both."""
    model, processor = tiny_model("llava")
    inputs = tiny_inputs(processor, [PROMPT])
    if spelling not in inspect.signature(type(model).forward).parameters and spelling != "past_key_values":
        pytest.skip(f"transformers {compat.transformers_version()} does not accept {spelling!r}")
    with tokred.apply(model, tokred.create("random", keep=16)) as run, torch.no_grad():
        out = model(**inputs, use_cache=True)
        cache = compat.output_cache(out)
        assert compat.cache_length(cache) == inputs["input_ids"].shape[1] - 576 + 16
        token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(token)], dim=1)
        step = model(input_ids=token, attention_mask=mask, use_cache=True, **{spelling: cache})
    assert run.report.visual_tokens_input == [576]
    assert step.logits.shape[1] == 1


def test_a_continuation_without_a_cache_is_refused_not_taken_for_a_prefill() -> None:
    """The failure 5.24 exposed: a decoding step whose cache tokred does not see looks like a new
    one-token prefill. Its position ids betray it."""
    model, processor = tiny_model("llava")
    inputs = tiny_inputs(processor, [PROMPT])
    length = inputs["input_ids"].shape[1]
    with tokred.apply(model, tokred.create("random", keep=16)), torch.no_grad():
        model(**inputs)
        with pytest.raises(tokred.TransformersInterfaceError, match=r"start at \[%d\]" % length):
            model(input_ids=inputs["input_ids"][:, -1:], position_ids=torch.tensor([[length]]))


def test_report_never_claims_zero_visual_tokens_after_generate() -> None:
    model, processor = tiny_model("llava")
    inputs = tiny_inputs(processor, [PROMPT, PROMPT + " Please."])
    with tokred.apply(model, tokred.create("todre", keep=8)) as run, torch.no_grad():
        model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert run.report.visual_tokens_input == [576, 576]
    assert run.report.prefills == 1
    assert all(image.kept_stage1 and len(image.kept_stage1) == 8 for image in run.report.images)


def test_the_observed_attention_name_is_registered_only_while_a_run_is_active() -> None:
    """Nothing global outlives a run: the attention implementation a gate's observer needs is in
    transformers' registry while the run is active, and gone after it (also after an exception)."""
    from tokred.runtime._attention import OBSERVED_IMPLEMENTATION

    model, processor = tiny_model("llava")
    inputs = tiny_inputs(processor, [PROMPT])
    assert OBSERVED_IMPLEMENTATION not in compat.attention_functions()
    with tokred.apply(model, tokred.create("fastv")), torch.no_grad():
        assert OBSERVED_IMPLEMENTATION in compat.attention_functions()
        model(**inputs)
    assert OBSERVED_IMPLEMENTATION not in compat.attention_functions()
    second, _ = tiny_model("llava")
    with tokred.apply(model, tokred.create("fastv")):
        with tokred.apply(second, tokred.create("star")):
            pass
        assert OBSERVED_IMPLEMENTATION in compat.attention_functions()  # the first run still observes
    assert OBSERVED_IMPLEMENTATION not in compat.attention_functions()
    with pytest.raises(ZeroDivisionError), tokred.apply(model, tokred.create("fastv")):
        1 / 0  # noqa: B018
    assert OBSERVED_IMPLEMENTATION not in compat.attention_functions()
