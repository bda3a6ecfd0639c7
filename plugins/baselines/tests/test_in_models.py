"""The registered components inside real (tiny) models: what the runtime hands them is what the pure
functions, tested against the authors' code, expect; and the conformance suite on variants."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import tokred
from tokred.testing import check_method, conformance_cases, tiny_inputs, tiny_model
from tokred_baselines import dart_retain, pdrop_scores, split_over_pivots
from tokred_baselines.dart import PIVOT_RESOLUTION

METHODS = ("divprune", "visionzip", "dart", "pdrop", "cdpruner", "pool")
PROMPT = ["What is shown in this image?"]


def _layer_inputs(model: Any, inputs: dict, layer: int) -> dict[str, Any]:
    """The hidden states and keyword inputs decoder ``layer`` receives in an unmodified forward."""
    captured: dict[str, Any] = {}

    def hook(module: Any, args: tuple, kwargs: dict) -> None:
        captured["hidden"] = (args[0] if args else kwargs["hidden_states"])[0]
        captured.update(kwargs)

    handle = model.model.language_model.layers[layer].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    return captured


def test_refused_exactly_where_documented() -> None:
    """VisionZip needs a vision [CLS] token (Qwen-VL's and LLaVA-OneVision's SigLIP towers have none);
    every other baseline runs on every family."""
    refused = {name: sorted(case.family for case in conformance_cases(name, attn_implementations=["sdpa"])
                            if case.refusal() is not None) for name in METHODS}
    assert refused == {name: (["llava_onevision", "qwen2_5_vl", "qwen2_vl", "qwen3_vl"] if name == "visionzip" else []) for name in METHODS}


def test_pdrop_gate_keeps_the_top_tokens_of_the_authors_score() -> None:
    """The gate at layer 4 reads layer 4's own attention on its input ("own"); its kept tokens are
    the top of ``pdrop_scores`` computed from layer 4's weights on the same input."""
    model, processor = tiny_model("llava")
    inputs = tiny_inputs(processor, PROMPT)
    method = tokred.create("pdrop", layers=(4,), keep_ratio=0.25)
    captured = _layer_inputs(model, inputs, 4)
    layer = model.model.language_model.layers[4]
    config = model.config.text_config
    ids = inputs["input_ids"][0]
    image = torch.nonzero(ids == model.config.image_token_id).flatten()
    scores = pdrop_scores(captured["hidden"], torch.arange(ids.numel()), ids.numel() - 1, image,
                          ln_weight=layer.input_layernorm.weight, ln_eps=config.rms_norm_eps,
                          q_weight=layer.self_attn.q_proj.weight, k_weight=layer.self_attn.k_proj.weight,
                          num_heads=config.num_attention_heads, num_kv_heads=config.num_key_value_heads,
                          rope_theta=config.rope_parameters["rope_theta"])
    with tokred.apply(model, method) as run, torch.no_grad():
        model(**inputs)
    expected = sorted(torch.topk(scores, 144).indices.tolist())
    assert run.report.images[0].kept_final == expected


def test_dart_gate_is_dart_retain_on_the_layer_states() -> None:
    """The gate at layer 2: layer 1's post-rotary keys and layer 2's input through the final norm."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model, processor = tiny_model("llava")
    inputs = tiny_inputs(processor, PROMPT)
    before = _layer_inputs(model, inputs, 1)
    entering = _layer_inputs(model, inputs, 2)
    layer = model.model.language_model.layers[1]
    with torch.no_grad():
        x = layer.input_layernorm(before["hidden"][None])
        d = layer.self_attn.head_dim
        k = layer.self_attn.k_proj(x).view(1, x.shape[1], -1, d).transpose(1, 2)
        cos, sin = before["position_embeddings"]
        _, keys = apply_rotary_pos_emb(k, k, cos, sin)
        normed = model.model.language_model.norm(entering["hidden"])
    ids = inputs["input_ids"][0]
    image = torch.nonzero(ids == model.config.image_token_id).flatten()
    text = torch.arange(int(image[-1]) + 1, ids.numel())
    p, counts = split_over_pivots(128, 4, 8)
    expected = dart_retain(normed, keys[0], image, text, per_pivot=counts, image_pivots=p, norm="l2",
                           resolution=PIVOT_RESOLUTION).kept - int(image[0])
    for impl in ("sdpa", "eager"):
        model_impl, _ = tiny_model("llava", attn_implementation=impl)
        with tokred.apply(model_impl, tokred.create("dart", keep=128)) as run, torch.no_grad():
            model_impl(**inputs)
        assert run.report.images[0].kept_final == expected.tolist()


def test_visionzip_feeds_the_projected_merges_to_the_language_model() -> None:
    model, processor = tiny_model("llava")
    inputs = tiny_inputs(processor, PROMPT)
    fed: list[torch.Tensor] = []
    handle = model.model.language_model.register_forward_pre_hook(
        lambda m, a, k: fed.append(k["inputs_embeds"][0].clone()), with_kwargs=True)
    try:
        with tokred.apply(model, tokred.create("visionzip", keep=64)) as run, torch.no_grad():
            model(**inputs)
        with torch.no_grad():
            model(**inputs)
    finally:
        handle.remove()
    reduced, full = fed[0], fed[1]
    ids = inputs["input_ids"][0]
    start = int(torch.nonzero(ids == model.config.image_token_id)[0])
    kept = run.report.images[0].kept_stage1
    visual = reduced[start:start + 64]
    unchanged = [(visual[i] - full[start + t]).abs().max().item() < 1e-6 for i, t in enumerate(kept)]
    assert len(kept) == 64 and sum(unchanged) == 64 - 10                     # 10 contextual tokens are merges


VARIANTS = [
    ("divprune", {"positions": "renumber"}),
    ("pdrop", {"score_layer": "previous", "keep": 64}),
    ("dart", {"pivot_order": "position", "gate_layer": "1/2"}),
    ("visionzip", {"spread": "image", "keep": 100}),
    ("cdpruner", {"relevance": "none", "spread": "image"}),
    ("pool", {"keep": 35}),
]


@pytest.mark.parametrize(("name", "options"), VARIANTS, ids=[name for name, _ in VARIANTS])
def test_variants_pass_the_conformance_suite(name: str, options: dict) -> None:
    families = ["llava", "llava_next"] if name in ("visionzip", "cdpruner", "pool") else ["llava"]
    skipped = check_method(tokred.create(name, **options), families=families, attn_implementations=["sdpa"])
    # Nothing refused; the one property that may not apply is beam search for selectors reading the
    # vision tower's [CLS] attention, refused by the run where generate() encodes each image once.
    assert all(refusal.check == "beam_search" and "num_beams" in refusal.message for refusal in skipped), skipped
