"""The one interface between data and trainer: whatever the source (embedded arrays, CIFAR
pickles, an ImageFolder through DALI or a DataLoader), the trainer receives a DataStreams."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

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
    """

    labeled: Iterator[Batch]
    unlabeled: Iterator[Batch]
    val: Iterable[Batch]
    test: Iterable[Batch]
    num_classes: int
    input_shape: tuple[int, ...]
    split: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)  # e.g. corrupt images skipped
