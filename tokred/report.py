"""What a run measured: visual tokens per layer, kept indices per image, time spent deciding."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["RunReport", "ImageRecord"]


@dataclass
class ImageRecord:
    """One image (or video) of one prefill.

    Attributes:
        sample: batch row.
        image: the image's number within its row (images and videos are numbered together, in
            sequence order).
        num_tokens: visual tokens the model produced for it.
        kept_stage1: indices (into the image's tokens, increasing) that entered the LLM.
        kept_final: indices that survived every gate.
        kept_per_layer: for each decoder layer, how many of its tokens that layer saw.
        tile_sizes: tokens per tile, indexed by tile (one entry for untiled images; for a video,
            tokens per frame: every frame is a tile).
        thumbnail_tile: the tile holding the whole-image thumbnail of a tiled image, else ``None``.
        kept_per_tile: how many of each tile's (a video's: frame's) tokens survived every gate
            (``kept_final`` per tile).
        kept_after_gates: ``(layer, indices)`` for every gate in layer order: the tokens alive from
            that decoder layer on (the last entry's indices are ``kept_final``).
        kind: ``"image"`` or ``"video"``.
    """

    sample: int
    image: int
    num_tokens: int
    kept_stage1: list[int]
    kept_final: list[int]
    kept_per_layer: list[int] = field(default_factory=list)
    tile_sizes: list[int] = field(default_factory=list)
    thumbnail_tile: int | None = None
    kept_per_tile: list[int] = field(default_factory=list)
    kept_after_gates: list[tuple[int, list[int]]] = field(default_factory=list)
    kind: str = "image"


@dataclass
class RunReport:
    """Measurements of the most recent prefill of a run (see :attr:`tokred.Run.report`).

    Attributes:
        family: the adapter's model family.
        method: the method's name, or ``"schedule"`` for a hand-built schedule.
        num_layers: decoder layers.
        visual_tokens_input: per sample, visual tokens the model produced (before stage I).
        visual_tokens_per_layer: ``[layer][sample]`` visual tokens each decoder layer received.
        images: one :class:`ImageRecord` per image.
        selection_seconds: wall time spent in stage-I selectors.
        gating_seconds: wall time spent in gates (attention slices included).
        prefills: prefills seen by the run so far (every ``generate`` call starts one).
    """

    family: str
    method: str
    num_layers: int
    visual_tokens_input: list[int] = field(default_factory=list)
    visual_tokens_per_layer: list[list[int]] = field(default_factory=list)
    images: list[ImageRecord] = field(default_factory=list)
    selection_seconds: float = 0.0
    gating_seconds: float = 0.0
    prefills: int = 0

    @property
    def equivalent_visual_tokens(self) -> list[float]:
        """Per sample, the visual tokens averaged over decoder layers: the constant count that would
        cost the decoder the same (visual-token x layer) work."""
        if not self.visual_tokens_per_layer:
            return []
        layers = len(self.visual_tokens_per_layer)
        return [sum(per_layer[s] for per_layer in self.visual_tokens_per_layer) / layers
                for s in range(len(self.visual_tokens_per_layer[0]))]

    @property
    def kept_indices(self) -> list[list[int]]:
        """Per image (in report order), the token indices that survived every stage."""
        return [image.kept_final for image in self.images]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["equivalent_visual_tokens"] = self.equivalent_visual_tokens
        return data

    def summary(self) -> str:
        """A short human-readable table."""
        lines = [f"tokred run: {self.method} on {self.family} ({self.num_layers} decoder layers)"]
        for s, n in enumerate(self.visual_tokens_input):
            per_layer = [layer[s] for layer in self.visual_tokens_per_layer]
            lines.append(
                f"  sample {s}: {n} visual tokens in; per layer {_compress(per_layer)}; "
                f"equivalent {self.equivalent_visual_tokens[s]:.1f} ({_share(self.equivalent_visual_tokens[s], n)})"
            )
        for image in self.images:
            if image.kind == "video":
                lines.append(
                    f"  sample {image.sample} video {image.image}: kept per frame {image.kept_per_tile} of "
                    f"{image.tile_sizes} ({len(image.kept_final)} of {image.num_tokens})"
                )
            elif image.thumbnail_tile is not None:
                lines.append(
                    f"  sample {image.sample} image {image.image}: kept per tile {image.kept_per_tile} of "
                    f"{image.tile_sizes} (thumbnail: tile {image.thumbnail_tile})"
                )
        lines.append(f"  selection {self.selection_seconds * 1e3:.2f} ms, gating {self.gating_seconds * 1e3:.2f} ms")
        return "\n".join(lines)


def _compress(values: list[int]) -> str:
    """``[576, 576, 64, 64, 64]`` -> ``576 x2, 64 x3``."""
    parts: list[str] = []
    i = 0
    while i < len(values):
        j = i
        while j < len(values) and values[j] == values[i]:
            j += 1
        parts.append(f"{values[i]} x{j - i}" if j - i > 1 else str(values[i]))
        i = j
    return ", ".join(parts)


def _share(part: float, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "n/a"
