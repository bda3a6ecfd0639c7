"""The decisions of the latest prefill, replayed while a run is frozen (``Run.frozen``).

Both kinds name visual tokens without positions, so they replay onto the same images in a sequence
of another length or padding (a prompt decided alone, then scored with each answer choice):

* stage I: ``(sample, image) -> (N, Selection)``: the kept indices within the image (and any
  replacement features), with the image's token count to check the replay against;
* gates: ``(layer, sample) -> [k]`` codes ``image * CODE + token`` of the visual tokens kept.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import RuntimeStateError

if TYPE_CHECKING:
    import torch

    from ..tokens import Selection

__all__ = ["Decisions", "CODE", "source_row"]

#: ``image * CODE + token`` identifies a visual token of a sample independently of its position.
CODE = 1 << 32


@dataclass
class Decisions:
    """What one prefill decided (see the module documentation)."""

    stage1: dict[tuple[int, int], tuple[int, Selection]] = field(default_factory=dict)
    gates: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def record_selection(self, sample: int, image: int, num_tokens: int, selection: Selection) -> None:
        self.stage1[(sample, image)] = (num_tokens, selection)

    def replay_selection(self, source: int, sample: int, image: int, num_tokens: int) -> Selection:
        """Row ``source``'s stage-I decision for ``image``, replayed on row ``sample``."""
        if (source, image) not in self.stage1:
            raise RuntimeStateError(f"frozen run has no stage-I decision for sample {source} image {image}")
        decided_n, decided = self.stage1[(source, image)]
        if decided_n != num_tokens:
            raise RuntimeStateError(
                f"frozen run: image {image} of row {sample} has {num_tokens} visual tokens, but the decision it "
                f"replays (row {source}) was made on {decided_n}; replay a row onto the same images"
            )
        return decided

    def record_gate(self, layer: int, sample: int, kept_codes: torch.Tensor) -> None:
        self.gates[(layer, sample)] = kept_codes

    def replay_gate(self, layer: int, source: int, codes: torch.Tensor) -> torch.Tensor:
        """``[V]`` bool: which of the alive visual tokens ``codes`` row ``source``'s gate kept."""
        import torch

        if (layer, source) not in self.gates:
            raise RuntimeStateError(f"frozen run has no decision for the gate at layer {layer}, sample {source}")
        return torch.isin(codes, self.gates[(layer, source)])


def source_row(rows: list[int] | None, sample: int) -> int:
    """The row of the deciding prefill whose decisions row ``sample`` replays (``rows`` from
    ``Run.frozen(rows=...)``; ``None``: the same row)."""
    if rows is None:
        return sample
    if sample >= len(rows):
        raise RuntimeStateError(f"frozen(rows=...) names {len(rows)} rows, but this prefill has row {sample}")
    return rows[sample]
