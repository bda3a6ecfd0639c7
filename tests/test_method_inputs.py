"""What the runtime gives methods beyond features and attention, checked against the model itself.

* Selector inputs: ``vision_keys`` (the feature layer's key states, head mean) and ``project`` (the
  model's projector) next to ``pre_projector``; refusals through ``required_inputs``;
* Gate inputs: ``GateState.keys`` (post-rotary keys of the observed layer), ``normed_hidden_states``
  (the final norm) and ``positions``; ``Gate.attention_layer = "own"`` (the gate layer's own
  attention, computed on its input without touching the cache);
* ``Budget.rounding``; the conformance suite's refusals and its rule for text-conditioned selectors.
"""

from __future__ import annotations

from typing import Any, ClassVar

import pytest
import torch

import tokred
from tokred.testing import check_method, make_gate_state, tiny_inputs, tiny_model


class _Spy(tokred.Selector):
    """Keeps the first k tokens and remembers what it was given."""

    inputs: ClassVar[frozenset[str]] = frozenset({"pre_projector", "vision_keys", "cls_attention"})
    seen: ClassVar[list[tokred.VisualTokens]] = []

    def select(self, tokens: tokred.VisualTokens, k: int) -> torch.Tensor:
        type(self).seen.append(tokens)
        return torch.arange(k)


def _stage1_tokens(family: str) -> tuple[Any, dict, tokred.VisualTokens]:
    model, processor = tiny_model(family)
    inputs = tiny_inputs(processor, ["What is shown?"])
    _Spy.seen.clear()
    schedule = tokred.Schedule(selector=tokred.SelectorStage(selector=_Spy(), budget=tokred.Budget(keep_ratio=1.0)))
    with tokred.apply(model, schedule), torch.no_grad():
        model(**inputs)
    return model, inputs, _Spy.seen[0]


def test_llava_vision_keys_are_the_feature_layers_keys_averaged_over_heads() -> None:
    model, inputs, tokens = _stage1_tokens("llava")
    tower = getattr(model.model.vision_tower, "vision_model", model.model.vision_tower)  # 5.x flattened it at some point
    layer_index = len(tower.encoder.layers) + model.config.vision_feature_layer   # -2: the penultimate layer
    layer = tower.encoder.layers[layer_index]
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda m, args, kwargs: captured.append(args[0] if args else kwargs["hidden_states"]),
                                             with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    with torch.no_grad():
        keys = layer.self_attn.k_proj(layer.layer_norm1(captured[0]))[0]         # [1 + N, H * d]
    heads = layer.self_attn.num_heads
    expected = keys.view(keys.shape[0], heads, -1).mean(dim=1)[1:]             # the [CLS] row is not a visual token
    assert tokens.vision_keys is not None and tokens.vision_keys.shape == expected.shape
    torch.testing.assert_close(tokens.vision_keys, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llava", "llava_next", "internvl"])
def test_project_maps_pre_projector_rows_to_the_features(family: str) -> None:
    _, _, tokens = _stage1_tokens(family)
    assert tokens.project is not None and tokens.pre_projector is not None
    with torch.no_grad():
        torch.testing.assert_close(tokens.project(tokens.pre_projector), tokens.features, rtol=1e-5, atol=1e-6)


def test_projecting_does_not_add_to_the_captured_probes() -> None:
    model, inputs, _ = _stage1_tokens("llava_next")
    calls: list[int] = []

    class _Projecting(_Spy):
        def select(self, tokens: tokred.VisualTokens, k: int) -> torch.Tensor:
            assert tokens.project is not None
            tokens.project(tokens.pre_projector[:3])
            calls.append(1)
            return torch.arange(k)

    schedule = tokred.Schedule(selector=tokred.SelectorStage(selector=_Projecting(), budget=tokred.Budget(keep=8)))
    with tokred.apply(model, schedule), torch.no_grad():
        model(**inputs)
        model(**inputs)
    assert len(calls) == 2  # the second prefill's probes were not polluted by the first's projection


def test_internvl_vision_keys_concatenate_the_four_merged_patches() -> None:
    model, inputs, tokens = _stage1_tokens("internvl")
    encoder = model.model.vision_tower.encoder.layer
    layer = encoder[len(encoder) + model.config.vision_feature_layer if model.config.vision_feature_layer < 0
                    else model.config.vision_feature_layer]
    captured: list[torch.Tensor] = []

    def on_attention(module: Any, args: tuple, kwargs: dict) -> None:
        captured.append(args[0] if args else kwargs["hidden_states"])

    handle = layer.attention.register_forward_pre_hook(on_attention, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    attention = layer.attention
    with torch.no_grad():
        keys = attention.k_proj(captured[0])                                    # [tiles, 1 + s * s, H * d]
        keys = attention.k_norm(keys) if hasattr(attention, "k_norm") else keys
    heads = attention.num_heads
    patch_keys = keys.view(keys.shape[0], keys.shape[1], heads, -1).mean(dim=2)[:, 1:]   # [tiles, s * s, d]
    side = int(patch_keys.shape[1] ** 0.5)
    d = patch_keys.shape[-1]
    first_token = tokens.vision_keys[0].view(4, d)                             # token 0 of tile 0
    patches = patch_keys[0].view(side, side, d)[:2, :2].reshape(4, d)          # its 2x2 block of patches
    for row in patches:  # every patch of the block is one of the token's four slices
        assert min(float((row - piece).abs().max()) for piece in first_token) < 1e-5


def test_required_inputs_refuse_models_that_lack_them() -> None:
    class _NeedsKeys(_Spy):
        inputs: ClassVar[frozenset[str]] = frozenset({"vision_keys"})

        def required_inputs(self) -> frozenset[str]:
            return self.inputs

    model, _ = tiny_model("qwen2_vl")
    schedule = tokred.Schedule(selector=tokred.SelectorStage(selector=_NeedsKeys(), budget=tokred.Budget(keep=4)))
    with pytest.raises(tokred.ScheduleError, match="needs vision_keys, which the qwen2_vl adapter cannot provide"):
        tokred.apply(model, schedule)
    llava, _ = tiny_model("llava")
    assert "vision_keys" in tokred.default_registry().adapter_for(llava).available_inputs()


# --------------------------------------------------------------------------- gates


class _GateSpy(tokred.Gate):
    """Keeps everything and records keys, normed hidden states and attention of its state."""

    requires_budget: ClassVar[bool] = False
    seen: ClassVar[list[dict[str, torch.Tensor]]] = []
    source: ClassVar[str] = "previous"

    @property
    def attention_layer(self) -> str:  # type: ignore[override]
        return type(self).source

    def select(self, state: tokred.GateState) -> torch.Tensor:
        type(self).seen.append({
            "keys": state.keys(None), "visual_keys": state.keys("visual"), "normed": state.normed_hidden_states(),
            "positions": state.positions("visual"), "last": state.attention("last", "visual"),
            "hidden": state.hidden_states.clone(),
        })
        return torch.arange(state.num_visual)


def _rope_keys(layer: Any, hidden: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and key states of a Llama decoder layer's attention on its input ``hidden`` ``[1, L, D]``."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    attention = layer.self_attn
    x = layer.input_layernorm(hidden)
    d = attention.head_dim
    q = attention.q_proj(x).view(1, x.shape[1], -1, d).transpose(1, 2)
    k = attention.k_proj(x).view(1, x.shape[1], -1, d).transpose(1, 2)
    cos, sin = position_embeddings
    return apply_rotary_pos_emb(q, k, cos, sin)


@pytest.mark.parametrize("source", ["previous", "own"])
@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_gate_state_keys_norm_and_attention_match_the_model(source: str, attn_implementation: str) -> None:
    model, processor = tiny_model("llava", attn_implementation=attn_implementation)
    inputs = tiny_inputs(processor, ["What is shown?"])
    gate_layer = 3
    observed = gate_layer if source == "own" else gate_layer - 1
    _GateSpy.seen.clear()
    _GateSpy.source = source
    lm = model.model.language_model
    captured: dict[str, Any] = {}

    def on_layer(module: Any, args: tuple, kwargs: dict) -> None:
        captured["hidden"] = args[0] if args else kwargs["hidden_states"]
        captured["rope"] = kwargs["position_embeddings"]

    handle = lm.layers[observed].register_forward_pre_hook(on_layer, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)                                                    # the unmodified model
    finally:
        handle.remove()
    with torch.no_grad():
        q, k = _rope_keys(lm.layers[observed], captured["hidden"], captured["rope"])
    schedule = tokred.Schedule(gates=(tokred.GateStage(layer=gate_layer, gate=_GateSpy()),))
    with tokred.apply(model, schedule), torch.no_grad():
        model(**inputs)
    seen = _GateSpy.seen[0]
    torch.testing.assert_close(seen["keys"], k[0].float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["visual_keys"], k[0][:, seen["positions"]].float(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(seen["normed"], lm.norm(seen["hidden"]), rtol=1e-6, atol=1e-6)
    # The last token's attention, recomputed from the observed layer's query and key states.
    heads = q.shape[1]
    keys = k[0].repeat_interleave(heads // k.shape[1], dim=0)
    logits = (q[0, :, -1:] @ keys.transpose(-1, -2)) * lm.layers[observed].self_attn.scaling
    expected = torch.softmax(logits.float(), dim=-1)[:, :, seen["positions"]]
    torch.testing.assert_close(seen["last"], expected, rtol=1e-5, atol=1e-6)


def test_own_attention_leaves_the_cache_and_the_output_alone() -> None:
    """A gate that keeps everything while reading its own layer's attention changes nothing: the
    extra attention call writes no cache entry, and generation with the cache is unchanged."""
    model, processor = tiny_model("llava")
    inputs = tiny_inputs(processor, ["What is shown?"])
    with torch.no_grad():
        expected = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        logits = model(**inputs).logits
    _GateSpy.source = "own"
    schedule = tokred.Schedule(gates=(tokred.GateStage(layer=2, gate=_GateSpy()), tokred.GateStage(layer=3, gate=_GateSpy())))
    with tokred.apply(model, schedule), torch.no_grad():
        got = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        torch.testing.assert_close(model(**inputs).logits, logits, rtol=0, atol=1e-5)
    assert torch.equal(got, expected)


def test_an_own_gate_and_a_previous_gate_share_one_observed_layer() -> None:
    model, processor = tiny_model("llava")
    inputs = tiny_inputs(processor, ["What is shown?"])

    class _Own(_GateSpy):
        @property
        def attention_layer(self) -> str:  # type: ignore[override]
            return "own"

    class _Previous(_GateSpy):
        @property
        def attention_layer(self) -> str:  # type: ignore[override]
            return "previous"

    _GateSpy.seen.clear()
    schedule = tokred.Schedule(gates=(tokred.GateStage(layer=2, gate=_Own()), tokred.GateStage(layer=3, gate=_Previous())))
    with tokred.apply(model, schedule), torch.no_grad():
        model(**inputs)
    own, previous = _GateSpy.seen
    # Both read layer 2: the own gate before it runs, the previous gate from its forward; nothing
    # was dropped in between, so the keys agree.
    torch.testing.assert_close(own["keys"], previous["keys"], rtol=1e-5, atol=1e-6)


def test_make_gate_state_slices_keys_and_applies_the_norm() -> None:
    keys = torch.randn(2, 6, 3)
    hidden = torch.randn(6, 4)
    state = make_gate_state(torch.softmax(torch.randn(1, 6, 6), -1), visual=[1, 2, 3], instruction=[4, 5], system=[0],
                            keys=keys, hidden_states=hidden, final_norm=lambda rows: 2 * rows)
    assert torch.equal(state.keys("visual"), keys[:, 1:4])
    assert torch.equal(state.keys(None), keys)
    assert torch.equal(state.normed_hidden_states("instruction"), 2 * hidden[4:])
    assert state.positions("system").tolist() == [0]


# --------------------------------------------------------------------------- budgets and conformance


@pytest.mark.parametrize(("rounding", "expected"), [("half_up", 13), ("half_even", 12), ("down", 12)])
def test_budget_rounding(rounding: str, expected: int) -> None:
    budget = tokred.Budget(keep_ratio=0.1953125, rounding=rounding)               # 0.1953125 * 64 = 12.5
    assert budget.tokens_for(64) == expected
    assert tokred.Budget(keep_ratio=0.001, rounding=rounding).tokens_for(64) == 1   # never below one token
    assert tokred.Budget(keep_ratio=0.7, rounding=rounding).tokens_for(145) == (102 if rounding != "down" else 101)


def test_check_method_reports_refusals_and_runs_elsewhere() -> None:
    refused = check_method("visionzip", families=["qwen2_vl", "llava"], attn_implementations=["sdpa"],
                           checks=["text_only_and_errors"])
    assert [(r.family, r.attn_implementation) for r in refused] == [("qwen2_vl", "sdpa")]
    assert "vision_keys" in refused[0].message
