"""The one interface between data and trainer: whatever the source (embedded arrays, CIFAR
pickles, an ImageFolder through DALI or a DataLoader), the trainer receives a DataStreams."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

from mpl_fast.data.bad_data import corrupt_state, restore_corrupt

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class DataStreams:
    """What one MPL step consumes, plus the finite sets the trainer evaluates on.

    labeled:   infinite iterator of (x, y): x float32 model input (B, ...), y int64 (B,).
    unlabeled: infinite iterator of (weak, strong): two views of the same mu*B unlabeled
               samples, float32 model inputs of identical shape.
    val:       finite iterable of (x, y) carved from the *training* data: model selection.
    test:      finite iterable of (x, y): reported only, never used to select.
    split:     what reproduces the labeled/unlabeled/val split (indices or file lists);
               saved with the run.
    stats:     what the pipeline met so far (loader, corrupt images, skipped files); the
               corrupt-image record goes into a checkpoint through corrupt_state() and comes
               back through load_corrupt_state().
    """

    labeled: Iterator[Batch]
    unlabeled: Iterator[Batch]
    val: Iterable[Batch]
    test: Iterable[Batch]
    num_classes: int
    input_shape: tuple[int, ...]
    split: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)  # e.g. corrupt images skipped

    def corrupt_counts(self) -> dict[str, int]:
        """{"corrupt_images": distinct corrupt files met, "corrupt_skips": times one was
        skipped}, for a metrics line (this rank's; zeros for in-memory data)."""
        state = corrupt_state(self.stats)
        return {"corrupt_images": state["corrupt_images"], "corrupt_skips": state["corrupt_skips"]}

    def corrupt_state(self) -> dict:
        """This rank's corrupt-image record, for a checkpoint (ints and strings only)."""
        return corrupt_state(self.stats)

    def load_corrupt_state(self, state: dict) -> None:
        """Continues the record of a resumed run (call once, right after building the streams)."""
        restore_corrupt(self.stats, state)
