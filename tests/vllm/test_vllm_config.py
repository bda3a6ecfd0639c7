"""The vLLM integration's configuration: engine-wide and per request, refusals, engine arguments.

These tests need no vLLM: ``tokred.integrations.vllm._config`` imports none.
"""

from __future__ import annotations

import pytest

import tokred
from tokred.integrations.vllm import CPU_WORKER, engine_args
from tokred.integrations.vllm._config import (
    TokredConfig,
    TokredRequestError,
    engine_config,
    request_config,
    split_request_kwargs,
)


class _HFConfig:
    def __init__(self, tokred_config: object = None) -> None:
        if tokred_config is not None:
            self.tokred = tokred_config


def test_engine_config_is_read_from_the_hf_config_and_absent_means_off() -> None:
    assert engine_config(_HFConfig()) is None
    config = engine_config(_HFConfig({"method": "random", "keep": 64}))
    assert config == TokredConfig("random", None, (("keep", 64),), "original")
    assert config.stage().budget.keep == 64


def test_the_schedule_equals_tokred_create_with_the_same_options() -> None:
    config = TokredConfig.parse({"method": "todre", "keep": 32, "stage2": False, "objective": "k_center"}, where="t")
    assert config.schedule() == tokred.create("todre", keep=32, stage2=False, objective="k_center").schedule()


def test_positions_is_carried_into_the_schedule() -> None:
    config = TokredConfig.parse({"method": "random", "keep": 8, "positions": "renumber"}, where="t")
    assert config.schedule().positions == "renumber"
    with pytest.raises(tokred.OptionsError, match="positions must be 'original' or 'renumber'"):
        TokredConfig.parse({"method": "random", "positions": "shifted"}, where="t")


def test_gates_are_refused_with_the_reason_and_the_fix() -> None:
    with pytest.raises(tokred.ScheduleError) as caught:
        engine_config(_HFConfig({"method": "todre", "keep": 64}))
    message = str(caught.value)
    assert "gate 'todre.migration'" in message and "decoder layer '7/8'" in message
    assert "paged attention" in message and '"stage2": false' in message
    with pytest.raises(tokred.ScheduleError, match="stage-II gates"):
        TokredConfig.parse({"method": "star", "keep": 16}, where="t").schedule()
    with pytest.raises(tokred.ScheduleError, match="stage-II gates"):  # fastv is a gate only
        TokredConfig.parse({"method": "fastv", "keep": 16}, where="t").schedule()


def test_unknown_methods_and_options_fail_with_the_registry_message() -> None:
    with pytest.raises(tokred.OptionsError, match="unknown method 'nope'"):
        engine_config(_HFConfig({"method": "nope"}))
    with pytest.raises(tokred.OptionsError, match="kep"):
        engine_config(_HFConfig({"method": "random", "kep": 3}))
    with pytest.raises(tokred.OptionsError, match='exactly one of "method"'):
        engine_config(_HFConfig({"keep": 3}))
    with pytest.raises(tokred.OptionsError, match="must be a mapping"):
        engine_config(_HFConfig("random"))


def test_a_registered_selector_runs_with_a_budget() -> None:
    config = TokredConfig.parse({"selector": "example.norm", "center": True, "keep_ratio": 0.25}, where="t")
    stage = config.stage()
    assert type(stage.selector).__name__ == "NormSelector" and stage.selector.center is True
    assert stage.budget.keep_ratio == 0.25
    with pytest.raises(tokred.OptionsError, match="needs a budget"):
        TokredConfig.parse({"selector": "example.norm"}, where="t").schedule()


def test_json_round_trip_is_exact() -> None:
    for raw in ({"method": "star", "keep": 64, "stage2": False, "positions": "renumber"},
                {"selector": "random", "seed": 3, "keep_ratio": 0.5}):
        config = TokredConfig.parse(raw, where="t")
        assert TokredConfig.from_json(config.to_json()) == config


def test_a_request_overrides_options_and_budget_keys_replace_each_other() -> None:
    engine = TokredConfig.parse({"method": "todre", "keep_ratio": 0.1, "stage2": False}, where="t")
    config = request_config(engine, {"tokred": {"keep": 32}, "other": 1})
    assert config is not None
    assert config.option_dict() == {"keep": 32, "stage2": False}
    config = request_config(engine, {"tokred": {"objective": "k_center"}})
    assert config is not None and config.option_dict() == {"keep_ratio": 0.1, "stage2": False, "objective": "k_center"}
    assert request_config(engine, {}) is engine


def test_a_request_may_choose_another_method() -> None:
    engine = TokredConfig.parse({"method": "random", "keep": 64, "seed": 5}, where="t")
    config = request_config(engine, {"tokred": {"method": "example-norm", "keep": 16}})
    assert config == TokredConfig("example-norm", None, (("keep", 16),), "original")


def test_request_errors_are_value_errors_that_name_the_problem() -> None:
    engine = TokredConfig.parse({"method": "random", "keep": 64}, where="t")
    for raw, match in [({"method": "todre"}, "stage-II gates"), ({"seed": "x"}, "seed"),
                       ({"positions": "renumber"}, "positions is engine-wide"), ([1], "must be a mapping"),
                       ({"keep": None}, "'keep' is null; give a value, or leave the key out to keep the engine's"),
                       ({"method": "random", "keep": 8, "seed": None}, "'seed' is null")]:
        with pytest.raises(TokredRequestError, match=match) as caught:
            request_config(engine, {"tokred": raw})
        assert isinstance(caught.value, ValueError)
    with pytest.raises(TokredRequestError, match="needs an engine started with a tokred method"):
        request_config(None, {"tokred": {"keep": 3}})
    assert request_config(None, {"other": 1}) is None


def test_split_request_kwargs_keeps_tokred_away_from_the_hf_processor() -> None:
    assert split_request_kwargs({"tokred": {"keep": 1}, "do_resize": True}) == ({"keep": 1}, {"do_resize": True})


def test_engine_args_for_each_family_and_platform() -> None:
    llava = engine_args("LlavaForConditionalGeneration", cpu=True, method="random", keep=64)
    assert llava == {"hf_overrides": {"tokred": {"method": "random", "keep": 64}, "mrope_section": [1, 1, 1]},
                     "video_pruning_rate": 0.5, "worker_cls": CPU_WORKER}
    qwen = engine_args("Qwen2VLForConditionalGeneration", cpu=False, method="random", keep=64)
    assert qwen == {"hf_overrides": {"tokred": {"method": "random", "keep": 64}}, "video_pruning_rate": 0.5}
    renumbered = engine_args("LlavaNextForConditionalGeneration", cpu=True, method="random", keep=8, positions="renumber")
    assert renumbered == {"hf_overrides": {"tokred": {"method": "random", "keep": 8, "positions": "renumber"}}}
    with pytest.raises(ValueError, match="supports"):
        engine_args("InternVLChatModel", cpu=True, method="random")
    with pytest.raises(tokred.ScheduleError):
        engine_args("LlavaForConditionalGeneration", cpu=True, method="todre")


def test_the_serving_page_serve_command_uses_the_engine_args_flags() -> None:
    """docs/serving-vllm.md's ``vllm serve`` block passes exactly what ``engine_args`` gives (CPU)."""
    import json
    import re
    import shlex
    from pathlib import Path

    page = (Path(__file__).parents[2] / "docs/serving-vllm.md").read_text()
    block = re.search(r"<!-- vllm:serve-command -->\s*```bash\n(.*?)```", page, re.S)
    assert block, "docs/serving-vllm.md has no bash block after <!-- vllm:serve-command -->"
    words = shlex.split(block.group(1).replace("\\\n", " "))
    assert words[:2] == ["vllm", "serve"]
    words.remove("--trust-request-mm-kwargs")
    flags = dict(zip(words[3::2], words[4::2]))
    overrides = json.loads(flags["--hf-overrides"])
    expected = engine_args("LlavaForConditionalGeneration", cpu=True, **overrides["tokred"])
    assert overrides == expected["hf_overrides"]
    assert float(flags["--video-pruning-rate"]) == expected["video_pruning_rate"]
    assert flags["--worker-cls"] == expected["worker_cls"]


def test_selectors_that_need_what_vllm_cannot_give_are_refused_at_engine_start() -> None:
    pytest.importorskip("tokred_baselines", reason="the baselines plugin is not installed")
    with pytest.raises(tokred.ScheduleError) as caught:
        engine_config(_HFConfig({"method": "cdpruner", "keep": 32}))
    assert "selector 'cdpruner'" in str(caught.value) and "instruction's embeddings" in str(caught.value)
    with pytest.raises(tokred.ScheduleError, match="needs vision_keys, which tokred's vLLM models do not capture"):
        engine_config(_HFConfig({"method": "visionzip", "keep": 32}))
    for method in ("divprune", "pool"):  # the image alone decides: accepted
        assert engine_config(_HFConfig({"method": method, "keep": 32})).stage().budget.keep == 32
