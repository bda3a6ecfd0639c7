"""The objects that selectors and gates receive and return.

Selectors see one image at a time (:class:`VisualTokens`); gates see one sample at one decoder layer
(:class:`GateState`). Both are plain tensors plus a small context; nothing model-specific leaks in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Literal

if TYPE_CHECKING:
    import torch

__all__ = ["ImageLayout", "VisualTokens", "Selection", "GateState", "AttentionRole"]

#: Which positions of a sample an attention query or key set refers to (see :meth:`GateState.attention`).
AttentionRole = Literal["instruction", "system", "text", "visual", "last"]


@dataclass(frozen=True)
class ImageLayout:
    """Where each visual token of one image (or one video) sits.

    A **video** is a sequence of frames, each a grid of tokens: what the model calls a frame (Qwen-VL
    merges two sampled frames into one temporal patch, which is one frame here; LLaVA-OneVision and
    LLaVA-NeXT-Video pool each frame's grid). Every frame of a video is also a tile of its own, so
    whatever works per tile works per frame: ``Budget(spread="tiles")`` gives per-frame budgets,
    :meth:`tile_view` is one frame, ``tokred show`` draws the frames as a strip of panels. A video has
    no global view (``thumbnail_tile is None``), and :attr:`frame` numbers each token's frame in time
    order, for selectors with a temporal rule (``evs`` compares every token with the same cell of the
    previous frame).

    Attributes:
        tile: ``[N]`` long, the tile each token belongs to (0 for untiled images; the frame for videos).
        row: ``[N]`` long, the token's row inside its tile's grid.
        col: ``[N]`` long, the token's column inside its tile's grid.
        grids: ``(rows, cols)`` of every tile, indexed by tile number.
        thumbnail_tile: the tile that holds the global (whole-image) view, or ``None`` when there is
            none (tiled images without a thumbnail, videos). For an untiled image the single tile
            *is* the whole image, so this is 0.
        extra: ``[N]`` bool, tokens that are not grid cells (e.g. LLaVA-NeXT row separators).
        frame: ``[N]`` long, for a video the frame (``0 .. F-1``, in time order) each token belongs
            to; ``None`` for a still image. Tokens that are not grid cells (``extra``) carry the frame
            they follow.
    """

    tile: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    grids: tuple[tuple[int, int], ...]
    thumbnail_tile: int | None = 0
    extra: torch.Tensor | None = None
    frame: torch.Tensor | None = None

    @classmethod
    def grid(cls, rows: int, cols: int, *, leading_extra: int = 0) -> ImageLayout:
        """Layout of one untiled ``rows x cols`` grid in row-major order.

        ``leading_extra`` tokens that precede the grid (a vision [CLS] token kept as a visual token)
        are marked in :attr:`extra` and placed at row/col -1.
        """
        import torch

        n = rows * cols
        idx = torch.arange(n)
        row = torch.cat([torch.full((leading_extra,), -1), idx // cols])
        col = torch.cat([torch.full((leading_extra,), -1), idx % cols])
        extra = torch.cat([torch.ones(leading_extra, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)])
        return cls(
            tile=torch.zeros(n + leading_extra, dtype=torch.long),
            row=row,
            col=col,
            grids=((rows, cols),),
            thumbnail_tile=0,
            extra=extra if leading_extra else None,
        )

    @classmethod
    def video(cls, frames: int, rows: int, cols: int, *, trailing_extra: int = 0) -> ImageLayout:
        """Layout of a video of ``frames`` frames of ``rows x cols`` tokens each, frame after frame,
        row-major within a frame (Qwen-VL, LLaVA-NeXT-Video, InternVL), followed by
        ``trailing_extra`` tokens that are not grid cells (LLaVA-OneVision's newline after the last
        frame; marked in :attr:`extra`, at row/col -1, in the last frame)."""
        import torch

        per_frame = rows * cols
        cells = torch.arange(frames * per_frame)
        frame = torch.cat([cells // per_frame, torch.full((trailing_extra,), max(frames - 1, 0))])
        within = cells % per_frame
        extra = torch.cat([torch.zeros(cells.numel(), dtype=torch.bool), torch.ones(trailing_extra, dtype=torch.bool)])
        return cls(
            tile=frame.clone(),
            row=torch.cat([within // cols, torch.full((trailing_extra,), -1)]),
            col=torch.cat([within % cols, torch.full((trailing_extra,), -1)]),
            grids=((rows, cols),) * frames,
            thumbnail_tile=None,
            extra=extra if trailing_extra else None,
            frame=frame,
        )

    @property
    def num_tokens(self) -> int:
        return int(self.tile.numel())

    @property
    def num_tiles(self) -> int:
        return len(self.grids)

    @property
    def is_video(self) -> bool:
        """Whether these are the tokens of a video (:attr:`frame` is set)."""
        return self.frame is not None

    @property
    def num_frames(self) -> int:
        """Frames of a video (each one a tile); 1 for a still image."""
        return self.num_tiles if self.frame is not None else 1

    def subset(self, index: torch.Tensor) -> ImageLayout:
        """The layout of the tokens ``index`` ``[n]`` (increasing) of this one: same tiles, grids,
        thumbnail and frames, the other tokens left out (LLaVA-NeXT's newline tokens, say)."""
        return ImageLayout(
            tile=self.tile[index], row=self.row[index], col=self.col[index], grids=self.grids,
            thumbnail_tile=self.thumbnail_tile,
            extra=None if self.extra is None else self.extra[index],
            frame=None if self.frame is None else self.frame[index],
        )

    def tile_view(self, tile: int) -> tuple[torch.Tensor, ImageLayout]:
        """The tokens of one tile (of a video: one frame): their indices ``[n]`` into this layout
        and the layout of that tile seen as an image of its own (one tile, which is its own whole
        view)."""
        import torch

        index = torch.nonzero(self.tile == tile).flatten()
        return index, ImageLayout(
            tile=torch.zeros(index.numel(), dtype=torch.long),
            row=self.row[index],
            col=self.col[index],
            grids=(self.grids[tile],),
            thumbnail_tile=0,
            extra=None if self.extra is None else self.extra[index],
        )

    def thumbnail_mask(self) -> torch.Tensor:
        """``[N]`` bool: the tokens of the global view (all tokens when untiled, and for layouts
        without a global view: videos, tiled images without a thumbnail)."""
        import torch

        if self.thumbnail_tile is None:
            return torch.ones(self.num_tokens, dtype=torch.bool)
        return self.tile == self.thumbnail_tile


@dataclass
class VisualTokens:
    """The visual tokens of one image, as a Selector sees them (stage I, before the LLM).

    Attributes:
        features: ``[N, D]`` projected features, i.e. the LLM input embeddings of the image.
        layout: where each token sits (:class:`ImageLayout`).
        pre_projector: ``[N, D_v]`` vision-encoder features before the projector, when the
            adapter can provide them, else ``None``.
        cls_attention: ``[N]`` attention from the vision encoder's [CLS] token to each token at the
            feature layer the model uses (averaged over heads), or ``None`` for encoders without
            [CLS] (Qwen-VL). Selectors must document their fallback.
        sample_index: the batch row the image belongs to.
        image_index: the image's number within its sample (0 for the first image of a row).
        instruction_embeddings: ``[T, D]`` the language model's input embeddings of the sample's
            instruction text (the ``"instruction"`` role of :meth:`GateState.attention`: the text
            after the first image), in sequence order, for instruction-conditioned selectors;
            ``[0, D]`` when the sample has none. The same for every image of a sample. Always
            filled; a selector whose choice depends on it lists ``"instruction_embeddings"`` in
            :attr:`Selector.inputs`, so that tools comparing runs know its decisions read the text.
        vision_keys: ``[N, D_k]`` the vision encoder's key states at the feature layer (the same
            layer and attention module as :attr:`cls_attention`), averaged over heads, one row per
            token, when the selector asked for ``"vision_keys"`` and the adapter captures them, else
            ``None``. Tokens that merge several patches (InternVL's 2x2 pixel shuffle) concatenate
            their patches' rows the way their features are concatenated.
        project: ``[n, D_v] -> [n, D]``, the model's own multimodal projector applied to
            pre-projector rows (what turns :attr:`pre_projector` into :attr:`features`), for
            selectors that merge tokens before the projector; set when the selector asked for
            ``"pre_projector"`` and the model has such a projector, else ``None``.
    """

    features: torch.Tensor
    layout: ImageLayout
    pre_projector: torch.Tensor | None = None
    cls_attention: torch.Tensor | None = None
    sample_index: int = 0
    image_index: int = 0
    instruction_embeddings: torch.Tensor | None = None
    vision_keys: torch.Tensor | None = None
    project: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.features.shape[0])


@dataclass
class Selection:
    """What a Selector returns: the indices to keep, optionally with replacement features.

    Attributes:
        indices: ``[k]`` long, indices into the image's ``N`` tokens; any order, no duplicates.
        features: ``[k, D]`` replacement features for the kept tokens (merging selectors), aligned
            with ``indices``; ``None`` keeps the original features.
    """

    indices: torch.Tensor
    features: torch.Tensor | None = None


@dataclass
class GateState:
    """One sample's state at a decoder layer, as a Gate sees it (stage II, inside the LLM).

    Indices of visual tokens are *alive-relative*: ``0 .. V-1`` enumerate the visual tokens still
    present at this layer, in sequence order. ``visual_image`` and ``visual_token`` map each of them
    back to its image and to its index within that image.

    Attributes:
        layer: the decoder layer the gate acts at (tokens dropped here are absent from this layer on).
        sample_index: the batch row.
        visual_image: ``[V]`` long, the image (within the sample) of each alive visual token.
        visual_token: ``[V]`` long, each alive visual token's index within its image.
        keep_per_image: the number of tokens to keep for each image of the sample (from the gate's
            budget), or ``None`` when the gate has no budget and decides itself (all-or-none gates).
        visual_tile: ``[V]`` long, the tile (within its image) of each alive visual token; 0 for
            untiled images.
        keep_per_tile: with a budget spread over tiles (``Budget(spread="tiles")``), for each image
            the number of tokens to keep of each of its tiles (indexed by tile; they sum to
            ``keep_per_image``), else ``None``. :meth:`Gate.select` ranks within each tile then.
        num_instruction: number of instruction-text positions.
        num_system: number of system-text positions.
        hidden_states: ``[L, D]`` this sample's hidden states entering the layer (padding removed).
        attention_source: ``(queries, keys) -> [heads, Q, K]``, what :meth:`attention` returns; the
            runtime computes it from the query and key states of the layer named by the gate's
            :attr:`~tokred.Gate.attention_layer` (the previous layer by default).
            :func:`tokred.testing.make_gate_state` builds one from a given attention matrix.
        positions_source: ``role -> [n]`` long, what :meth:`positions` returns.
        key_source: ``role -> [H_kv, n, d]``, what :meth:`keys` returns (``None`` role: every
            position); the runtime reads it from the same observed layer as :attr:`attention_source`.
        final_norm: the language model's final normalisation (``[n, D] -> [n, D]``), what
            :meth:`normed_hidden_states` applies.
    """

    layer: int
    sample_index: int
    visual_image: torch.Tensor
    visual_token: torch.Tensor
    keep_per_image: list[int] | None
    num_instruction: int
    num_system: int
    hidden_states: torch.Tensor
    visual_tile: torch.Tensor | None = None
    keep_per_tile: list[list[int]] | None = None
    attention_source: Callable[[AttentionRole, AttentionRole], torch.Tensor] | None = field(repr=False, default=None)
    positions_source: Callable[[AttentionRole], torch.Tensor] | None = field(repr=False, default=None)
    key_source: Callable[[AttentionRole | None], torch.Tensor] | None = field(repr=False, default=None)
    final_norm: Callable[[torch.Tensor], torch.Tensor] | None = field(repr=False, default=None)

    @property
    def num_visual(self) -> int:
        return int(self.visual_image.numel())

    def positions(self, role: AttentionRole) -> torch.Tensor:
        """``[n]`` long: the positions of ``role`` (the roles of :meth:`attention`) as indices into
        :attr:`hidden_states`, increasing. ``positions("visual")[i]`` is alive-relative visual token
        ``i``."""
        if self.positions_source is None:
            raise RuntimeError("this GateState has no positions source (see tokred.testing.make_gate_state)")
        return self.positions_source(role)

    def keys(self, role: AttentionRole | None = "visual") -> torch.Tensor:
        """``[H_kv, n, d]`` float32: the key states of the observed layer (the layer before by
        default, see :attr:`~tokred.Gate.attention_layer`) at the positions of ``role``, in
        sequence order; ``None`` gives every position of the sample (``n = L``). Keys are taken
        after the rotary embedding, one row per key-value head (grouped heads are not expanded).

        They come from the attention observer that wraps the layer's kernel without changing it, so
        a gate that reads only keys (and hidden states) runs under any attention implementation
        and never forms attention probabilities."""
        if self.key_source is None:
            raise RuntimeError("this GateState has no key states (see tokred.testing.make_gate_state)")
        return self.key_source(role)

    def normed_hidden_states(self, role: AttentionRole | None = None) -> torch.Tensor:
        """``[n, D]``: :attr:`hidden_states` at the positions of ``role`` (``None``: all ``L``)
        passed through the language model's final normalisation (the norm before the LM head), as
        if the decoder ended here. Computed on demand for the requested rows only."""
        if self.final_norm is None:
            raise RuntimeError("this GateState has no final norm (see tokred.testing.make_gate_state)")
        hidden = self.hidden_states if role is None else self.hidden_states[self.positions(role).to(self.hidden_states.device)]
        return self.final_norm(hidden)

    def attention(self, queries: AttentionRole = "instruction", keys: AttentionRole = "visual") -> torch.Tensor:
        """Attention probabilities of the observed layer from ``queries`` to ``keys``: the layer
        before the gate's by default, the gate's own layer on its input for gates with
        ``attention_layer = "own"`` (:attr:`~tokred.Gate.attention_layer`).

        Returns ``[heads, Q, K]`` float32: the softmax-normalised attention (normalised over every
        key the query can see, causal mask and padding included), restricted to the requested query
        and key positions. It is computed on demand from that layer's own query and key states
        (rotary embedding applied, grouped KV heads expanded) while the model keeps running its
        attention kernel; no full ``L x L`` matrix is formed.

        The roles name sets of the sample's positions, each in sequence order (which positions are
        which text comes from the model's adapter, ``Adapter.text_roles``, never from prompt-layout
        constants):

        * ``"visual"``: the visual tokens still alive at this layer (``V`` of them; index ``i`` is
          alive-relative visual token ``i``, as in :attr:`visual_image`);
        * ``"instruction"``: the instruction text, every real text token after the sample's first
          image (the question, the chat template's turn markers, the assistant prefix);
        * ``"system"``: every real text token before the first image (BOS, system prompt, role tags);
        * ``"text"``: ``"system"`` and ``"instruction"`` together;
        * ``"last"``: the sample's last position, the one whose output predicts the next token.

        Queries see only keys before them: in image-first templates visual queries see the system
        text but never the instruction, so their probabilities on instruction keys are 0.
        """
        if self.attention_source is None:
            raise RuntimeError("this GateState has no attention source (see tokred.testing.make_gate_state)")
        return self.attention_source(queries, keys)
