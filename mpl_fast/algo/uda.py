"""UDA consistency (Xie et al. 2020) on the teacher: its strong-view prediction is pulled
towards its sharpened weak-view prediction, on confident samples only."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def uda_consistency(weak_logits: torch.Tensor, strong_logits: torch.Tensor, temperature: float,
                    threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, fraction of samples kept): mean over the batch of mask * CE(sharpen(weak), strong).

    The weak-view target is detached and sharpened by ``temperature``; samples whose weak-view
    confidence is below ``threshold`` are masked out (they still count in the mean, as in UDA).
    """
    with torch.no_grad():
        weak = weak_logits.float()
        target = torch.softmax(weak / temperature, 1)
        mask = (torch.softmax(weak, 1).amax(1) >= threshold).float()
    per_sample = -(target * F.log_softmax(strong_logits.float(), 1)).sum(1)
    return (per_sample * mask).mean(), mask.mean()
