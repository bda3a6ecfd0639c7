"""What a selector or gate receives, built by hand: for unit tests of a method, without a model.

The runtime builds :class:`~tokred.VisualTokens` and :class:`~tokred.GateState` from a forward pass;
a method's own tests want to call ``score``/``select`` on inputs they control (a crafted attention
pattern, features with known norms). These two functions build them with the same meaning the
runtime gives every field.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..tokens import AttentionRole, GateState, ImageLayout, VisualTokens

__all__ = ["make_visual_tokens", "make_gate_state"]


def make_visual_tokens(
    features: torch.Tensor,
    *,
    grid: tuple[int, int] | None = None,
    layout: ImageLayout | None = None,
    cls_attention: torch.Tensor | None = None,
    pre_projector: torch.Tensor | None = None,
    instruction_embeddings: torch.Tensor | None = None,
    vision_keys: torch.Tensor | None = None,
    project: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> VisualTokens:
    """One image's tokens as a Selector sees them.

    Args:
        features: ``[N, D]`` projected features (the language model's input embeddings).
        grid: ``(rows, cols)`` of an untiled image with ``rows * cols == N``; default: one row.
        layout: an explicit :class:`~tokred.ImageLayout` instead of ``grid`` (tiled images).
        cls_attention: ``[N]`` vision [CLS] attention, or ``None`` (encoders without [CLS]).
        pre_projector: ``[N, D_v]`` vision features before the projector, or ``None``.
        instruction_embeddings: ``[T, D]`` input embeddings of the sample's instruction text, or
            ``None``.
        vision_keys: ``[N, D_k]`` the vision encoder's key states (head mean), or ``None``.
        project: the projector, ``[n, D_v] -> [n, D]``, or ``None``.
    """
    n = int(features.shape[0])
    if layout is None:
        rows, cols = grid if grid is not None else (1, n)
        if rows * cols != n:
            raise ValueError(f"a {rows}x{cols} grid holds {rows * cols} tokens, not {n}")
        layout = ImageLayout.grid(rows, cols)
    elif layout.num_tokens != n:
        raise ValueError(f"the layout holds {layout.num_tokens} tokens, the features {n}")
    return VisualTokens(features=features, layout=layout, pre_projector=pre_projector, cls_attention=cls_attention,
                        instruction_embeddings=instruction_embeddings, vision_keys=vision_keys, project=project)


def make_gate_state(
    attention: torch.Tensor,
    *,
    visual: Sequence[int],
    instruction: Sequence[int] = (),
    system: Sequence[int] = (),
    keep_per_image: list[int] | None = None,
    visual_image: Sequence[int] | None = None,
    visual_tile: Sequence[int] | None = None,
    keep_per_tile: list[list[int]] | None = None,
    hidden_states: torch.Tensor | None = None,
    layer: int = 1,
    keys: torch.Tensor | None = None,
    final_norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> GateState:
    """One sample's state at a gate layer, with the attention of the layer before given as a whole.

    Args:
        attention: ``[H, L, L]`` attention probabilities of the sample's ``L`` positions (each row
            normalised over the keys its query sees: causal and padding already applied), from
            which :meth:`GateState.attention` slices ``[H, Q, K]`` by role.
        visual: positions (in ``0..L-1``, increasing) of the visual tokens still alive.
        instruction: positions of the instruction text (after the first image).
        system: positions of the text before the first image.
        keep_per_image: the gate's budget per image, or ``None`` for a gate without one.
        visual_image: ``[V]`` image of each alive visual token (default: all image 0).
        visual_tile: ``[V]`` tile of each alive visual token (default: all tile 0).
        keep_per_tile: the budget per tile of each image (``Budget(spread="tiles")``), or ``None``.
        hidden_states: ``[L, D]`` hidden states entering the layer (default: zeros, ``D = 1``).
        layer: the decoder layer the gate acts at.
        keys: ``[H_kv, L, d]`` key states of the observed layer, from which :meth:`GateState.keys`
            slices by role, or ``None``.
        final_norm: what :meth:`GateState.normed_hidden_states` applies (``[n, D] -> [n, D]``), or
            ``None``.

    The roles are those the runtime gives: ``"visual"`` (``visual``), ``"instruction"``, ``"system"``,
    ``"text"`` (system and instruction, in sequence order) and ``"last"`` (position ``L - 1``).
    Positions are rows of ``hidden_states`` (:meth:`GateState.positions` returns them as given).
    """
    if attention.dim() != 3 or attention.shape[1] != attention.shape[2]:
        raise ValueError(f"attention must be [H, L, L], got shape {tuple(attention.shape)}")
    length = int(attention.shape[1])
    visual_positions = torch.as_tensor(list(visual), dtype=torch.long)
    roles = {
        "visual": visual_positions,
        "instruction": torch.as_tensor(list(instruction), dtype=torch.long),
        "system": torch.as_tensor(list(system), dtype=torch.long),
        "last": torch.tensor([length - 1]),
    }
    roles["text"] = torch.sort(torch.cat([roles["system"], roles["instruction"]])).values
    for name, positions in roles.items():
        if positions.numel() and (int(positions.min()) < 0 or int(positions.max()) >= length):
            raise ValueError(f"{name} positions must lie in 0..{length - 1}")
    v = visual_positions.numel()

    def slice_attention(queries: AttentionRole, keys: AttentionRole) -> torch.Tensor:
        if queries not in roles or keys not in roles:
            raise ValueError(f"attention roles are {sorted(roles)}, got {queries!r} -> {keys!r}")
        return attention[:, roles[queries]][:, :, roles[keys]].float()

    def positions(role: AttentionRole) -> torch.Tensor:
        if role not in roles:
            raise ValueError(f"roles are {sorted(roles)}, got {role!r}")
        return roles[role]

    key_source = None
    if keys is not None:
        if keys.dim() != 3 or keys.shape[1] != length:
            raise ValueError(f"keys must be [H_kv, {length}, d], got shape {tuple(keys.shape)}")
        key_states = keys

        def key_source(role: AttentionRole | None) -> torch.Tensor:
            return (key_states if role is None else key_states[:, positions(role)]).float()

    return GateState(
        layer=layer, sample_index=0,
        visual_image=torch.as_tensor(list(visual_image) if visual_image is not None else [0] * v, dtype=torch.long),
        visual_token=torch.arange(v),
        keep_per_image=keep_per_image,
        num_instruction=int(roles["instruction"].numel()), num_system=int(roles["system"].numel()),
        hidden_states=hidden_states if hidden_states is not None else torch.zeros(length, 1),
        visual_tile=torch.as_tensor(list(visual_tile) if visual_tile is not None else [0] * v, dtype=torch.long),
        keep_per_tile=keep_per_tile,
        attention_source=slice_attention,
        positions_source=positions,
        key_source=key_source,
        final_norm=final_norm,
    )
