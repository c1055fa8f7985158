"""UDA consistency (Xie et al. 2020) on the teacher: its strong-view prediction is pulled
towards its sharpened weak-view prediction, on confident samples only."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def uda_consistency(weak_logits: torch.Tensor, strong_logits: torch.Tensor, temperature: float,
                    threshold: float, mask_on: str = "sharpened") -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, fraction of samples kept): mean over the batch of mask * CE(sharpen(weak), strong).

    The weak-view target is detached and sharpened by ``temperature``; samples whose weak-view
    confidence is below ``threshold`` are masked out (they still count in the mean, as in UDA).
    ``mask_on``: "sharpened" tests the largest probability of that sharpened target (MPL's
    official code), "unsharpened" the plain softmax's (UDA's own code).
    """
    if mask_on not in ("sharpened", "unsharpened"):
        raise ValueError(f"uda_consistency: mask_on must be 'sharpened' or 'unsharpened', got {mask_on!r}")
    with torch.no_grad():
        weak = weak_logits.float()
        target = torch.softmax(weak / temperature, 1)
        confidence = target if mask_on == "sharpened" else torch.softmax(weak, 1)
        mask = (confidence.amax(1) >= threshold).float()
    per_sample = -(target * F.log_softmax(strong_logits.float(), 1)).sum(1)
    return (per_sample * mask).mean(), mask.mean()
