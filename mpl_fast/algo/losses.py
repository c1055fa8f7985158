"""Cross-entropies of MPL: against hard labels (indices) or soft labels (distributions)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Mean CE of ``logits`` against class indices (int64, shape (N,)) or distributions (shape (N, C))."""
    if target.dtype == torch.int64:
        return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
    if label_smoothing:
        target = target * (1 - label_smoothing) + label_smoothing / target.shape[1]
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


def pseudo_labels(teacher_logits: torch.Tensor, kind: str, soft_temperature: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """The teacher's pseudo labels y_hat_u from its (detached) logits on the strong view.

    hard:   argmax (class indices);
    sample: a class drawn from softmax(logits) (the paper's y_hat ~ T(x_u));
    soft:   softmax(logits / soft_temperature), a distribution. With temperature 1 the MPL term
            CE(y_hat, T(x)) would have zero gradient (the target equals the prediction), so soft
            labels are sharpened: the MPL term then moves the teacher towards (h > 0) or away
            from (h < 0) its own sharpened prediction.
    """
    logits = teacher_logits.detach().float()
    if kind == "hard":
        return logits.argmax(1)
    if kind == "sample":
        return torch.multinomial(torch.softmax(logits, 1), 1, generator=generator).squeeze(1)
    if kind == "soft":
        return torch.softmax(logits / soft_temperature, 1)
    raise ValueError(f"pseudo_labels: kind must be 'hard', 'sample' or 'soft', got {kind!r}")
