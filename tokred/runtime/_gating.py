"""Gates at decoder layers during a prefill: each sample's state, its attention slice, the decision.

A gate at layer ``l`` decides from the attention computed in layer ``l - 1`` (an observer on that
layer's attention module stashes its post-rotary query and key states, :mod:`._attention`) and its
survivors are all that layers ``l, l+1, ...`` see. A gate with ``attention_layer = "own"`` reads
layer ``l``'s attention instead: :func:`probe_own_attention` runs that layer's input norm and
attention module once on the hidden states entering it, under the observer and without the cache,
before the gate decides. Per sample, :func:`gate_state` builds the
:class:`~tokred.GateState` (alive visual tokens, text roles, budget per image and tile, a lazy
attention slice, key states and final-normed hidden states on demand),
:func:`tokred.decisions.decide_gate` checks the gate's choice, and the layout shrinks; while the
run is frozen, the recorded choice is replayed instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Literal

import torch

from .. import compat
from ..compat import Keyword
from ..decisions import decide_gate, gate_budget
from ..errors import RuntimeStateError
from ..tokens import GateState
from ._frozen import CODE, source_row
from ._sequence import left_pack

if TYPE_CHECKING:
    from ..budget import Budget
    from ._prefill import Prefill
    from ._state import RunState

__all__ = ["run_gate", "probe_own_attention", "gate_state", "attention_slice", "stash_for", "observed_layers", "AttentionLayer"]

#: Where a gate reads its attention from (:attr:`tokred.Gate.attention_layer`).
AttentionLayer = Literal["previous", "own"]

#: What an attention observer stashes for a gate: ``(query [B, H, L, d], key [B, H_kv, L, d], scaling)``.
Stash = tuple[torch.Tensor, torch.Tensor, float]

#: Upper bound on the ``[H, q, L]`` fp32 score block formed at once by :func:`attention_slice`
#: (64 Mi elements, 256 MiB): visual-to-text attention on a 2,900-token LLaVA-NeXT image with 32 heads
#: would otherwise be a 1 GiB temporary.
SCORE_BLOCK_ELEMENTS = 1 << 26


def stash_for(current: Callable[[], RunState],
              served: dict[int, AttentionLayer]) -> Callable[[torch.Tensor, torch.Tensor, float], None]:
    """The observer callback of one decoder layer's attention module: keep its query and key states
    for the gates it serves (only in a prefill that decides, not in a frozen replay).

    ``served`` maps a gate's layer to where that gate reads attention from this module: ``"previous"``
    (this is layer ``gate - 1``; stashed while the layer runs its forward) or ``"own"`` (this is the
    gate's layer; stashed only during the extra call :func:`probe_own_attention` makes, never during
    the layer's forward, which runs after the gate decided)."""
    def stash(query: torch.Tensor, key: torch.Tensor, scaling: float) -> None:
        state = current()  # the calling thread's run state
        prefill = state.prefill
        if state.mode != "prefill" or prefill is None or state.frozen:
            return
        for gate_layer, source in served.items():
            if (prefill.probing == gate_layer) if source == "own" else (prefill.probing is None):
                prefill.stash[gate_layer] = (query, key, scaling)

    return stash


def observed_layers(gate_layers: list[int], attention_layers: list[AttentionLayer]) -> dict[int, dict[int, AttentionLayer]]:
    """``{decoder layer whose attention is observed: {gate layer: source}}`` for gates at
    ``gate_layers`` reading attention from ``attention_layers`` (:attr:`tokred.Gate.attention_layer`);
    one module may serve two gates (an ``"own"`` gate at ``l`` and a ``"previous"`` gate at ``l + 1``)."""
    observed: dict[int, dict[int, AttentionLayer]] = {}
    for layer, source in zip(gate_layers, attention_layers):
        observed.setdefault(layer if source == "own" else layer - 1, {})[layer] = source
    return observed


def probe_own_attention(state: RunState, layer: int, hidden: torch.Tensor, layer_kwargs: dict[str, Any]) -> None:
    """Run decoder layer ``layer``'s input norm and attention module on ``hidden`` ``[B, L', D]``
    (the hidden states entering it, current layout), so that its observer stashes the query and
    key states for a gate with ``attention_layer = "own"``. ``layer_kwargs`` are the layer's inputs
    reduced to the current layout (position embeddings, mask, ...); the cache is not passed, so it
    is left untouched, and the output is discarded."""
    prefill = state.prefill
    assert prefill is not None
    adapter = state.adapter
    decoder_layer = adapter.decoder_layers()[layer]
    skip = {*compat.CACHE_KEYWORDS, Keyword.HIDDEN_STATES, Keyword.USE_CACHE}
    arguments = {name: value for name, value in layer_kwargs.items() if name not in skip}
    prefill.probing = layer
    try:
        with torch.no_grad():
            normed = adapter.attention_input_norm(decoder_layer)(hidden)
            adapter.self_attention(decoder_layer)(hidden_states=normed, **arguments)
    finally:
        prefill.probing = None
    if layer not in prefill.stash:
        raise RuntimeStateError(f"running the attention of layer {layer} captured no query and key states")


def run_gate(state: RunState, layer: int, prefill: Prefill, hidden: torch.Tensor) -> torch.Tensor:
    """Run the gate at ``layer`` on every sample; return the packed local indices ``[B, L']``."""
    stage = state.schedule.gates[prefill.gate_layers[layer]]
    current = prefill.current
    origin = current.origin
    valid = current.valid
    keep = valid.clone()
    stash = prefill.stash.pop(layer, None)
    for sample in range(origin.shape[0]):
        row_origin = origin[sample].clamp(min=0)
        visual_local = torch.nonzero(valid[sample] & prefill.visual[sample, row_origin]).flatten()
        if visual_local.numel() == 0:
            continue
        visual_origin = origin[sample, visual_local]
        codes = prefill.image_of[sample, visual_origin] * CODE + prefill.token_of[sample, visual_origin]   # [V]
        if state.frozen:
            kept_local = visual_local[state.decisions.replay_gate(layer, source_row(state.frozen_rows, sample), codes)]
        else:
            gate_input = gate_state(layer, sample, prefill, stage.budget, visual_local, valid[sample], hidden, stash,
                                    final_norm=state.adapter.final_norm)
            chosen = decide_gate(stage.gate, gate_input, describe=state.describe)
            kept_local = visual_local[chosen]
            state.decisions.record_gate(layer, sample, codes[chosen])
        keep[sample, visual_local] = False
        keep[sample, kept_local] = True
        _update_final(state, sample, prefill, origin[sample, kept_local])
    for record in state.report.images:
        record.kept_after_gates.append((layer, list(record.kept_final)))
    return left_pack(keep)


def _update_final(state: RunState, sample: int, prefill: Prefill, kept_origin: torch.Tensor) -> None:
    for record in state.report.images:
        if record.sample == sample:
            mine = kept_origin[prefill.image_of[sample, kept_origin] == record.image]
            record.kept_final = sorted(int(t) for t in prefill.token_of[sample, mine])
            record.kept_per_tile = torch.bincount(prefill.tile_of[sample, mine], minlength=len(record.tile_sizes)).tolist()


def gate_state(layer: int, sample: int, prefill: Prefill, budget: Budget | None, visual_local: torch.Tensor,
               valid: torch.Tensor, hidden: torch.Tensor, stash: Stash | None, *,
               final_norm: Callable[[], torch.nn.Module] | None = None) -> GateState:
    """One sample's :class:`~tokred.GateState` at ``layer``: ``visual_local`` ``[V]`` are the alive
    visual tokens' positions in the current layout, ``valid`` ``[L']`` its real positions.
    ``final_norm`` gives the language model's final norm, looked up only if the gate asks."""
    origin = prefill.current.origin[sample].clamp(min=0)
    visual_image = prefill.image_of[sample, origin[visual_local]]
    visual_token = prefill.token_of[sample, origin[visual_local]]
    visual_tile = prefill.tile_of[sample, origin[visual_local]]
    keep_per_image, keep_per_tile = gate_budget(budget, prefill.image_sizes[sample], visual_image, visual_tile,
                                                prefill.tile_counts[sample], layer=layer, sample=sample)
    roles = {
        "instruction": torch.nonzero(valid & prefill.instruction[sample, origin]).flatten(),
        "system": torch.nonzero(valid & prefill.system[sample, origin]).flatten(),
        "visual": visual_local,
        "last": torch.nonzero(valid).flatten()[-1:],
    }
    roles["text"] = torch.sort(torch.cat([roles["system"], roles["instruction"]])).values

    valid_local = torch.nonzero(valid).flatten()
    rank = torch.cumsum(valid.long(), dim=0) - 1                               # local position -> row of hidden_states

    def check_role(role: str) -> None:
        if role not in roles:
            raise ValueError(f"roles are {sorted(roles)}, got {role!r}")

    def captured() -> Stash:
        if stash is None:
            raise RuntimeStateError(f"no attention was captured for the gate at layer {layer}")
        return stash

    def attention(queries: str, keys: str) -> torch.Tensor:
        if queries not in roles or keys not in roles:
            raise ValueError(f"attention roles are {sorted(roles)}, got {queries!r} -> {keys!r}")
        return attention_slice(captured(), sample, roles[queries], roles[keys], valid)

    def positions(role: str) -> torch.Tensor:
        check_role(role)
        return rank[roles[role]]

    def keys(role: str | None) -> torch.Tensor:
        key = captured()[1]                                                     # [B, H_kv, L', d]
        if role is not None:
            check_role(role)
        local = valid_local if role is None else roles[role]
        return key[sample][:, local.to(key.device)].float()                    # [H_kv, n, d]

    def normed(rows: torch.Tensor) -> torch.Tensor:
        if final_norm is None:
            raise RuntimeStateError(f"the gate at layer {layer} has no final norm to apply")
        return final_norm()(rows)

    return GateState(
        layer=layer, sample_index=sample, visual_image=visual_image, visual_token=visual_token,
        keep_per_image=keep_per_image, visual_tile=visual_tile, keep_per_tile=keep_per_tile,
        num_instruction=int(roles["instruction"].numel()), num_system=int(roles["system"].numel()),
        hidden_states=hidden[sample, valid.to(hidden.device)], attention_source=attention,
        positions_source=positions, key_source=keys, final_norm=normed,
    )


def attention_slice(stash: Stash, sample: int, query_local: torch.Tensor, key_local: torch.Tensor, valid: torch.Tensor,
                    block_elements: int = SCORE_BLOCK_ELEMENTS) -> torch.Tensor:
    """``[H, Q, K]`` attention probabilities of one sample, normalised over every visible key.

    Queries are processed in blocks so that no intermediate exceeds ``block_elements`` scores
    (``[H, q, L]``) besides the ``[H, Q, K]`` result. Each query's softmax is over its own row, so
    blocks agree with one large product up to float rounding (matmul kernels vary with the shape)."""
    query, key, scaling = stash
    device = query.device
    k = key[sample].float()                                                    # [H_kv, L, d]
    heads = query.shape[1]
    k = k.repeat_interleave(heads // k.shape[0], dim=0)                        # grouped KV heads -> [H, L, d]
    key_pos = torch.arange(k.shape[1], device=device)
    key_index = key_local.to(device)
    valid = valid.to(device)
    query_local = query_local.to(device)
    block = max(1, block_elements // max(1, heads * k.shape[1]))
    parts = []
    for start in range(0, query_local.numel(), block):
        rows = query_local[start:start + block]
        q = query[sample, :, rows].float()                                     # [H, q, d]
        scores = torch.matmul(q, k.transpose(-1, -2)) * scaling                # [H, q, L]
        visible = (key_pos[None, :] <= rows[:, None]) & valid[None, :]
        scores = scores.masked_fill(~visible[None], float("-inf"))
        parts.append(torch.softmax(scores, dim=-1)[:, :, key_index])
    if not parts:
        return torch.zeros(heads, 0, key_index.numel(), device=device)
    return torch.cat(parts, dim=1)
