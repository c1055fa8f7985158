"""The reduced teacher T_R of Reduced Meta Pseudo Labels: a small MLP that reads the large
teacher's stored distribution p of an image and returns logits for the student's pseudo label.

    z = log(max(p, min_prob))                  (T's log-probabilities)
    T_R(p) = z + W2 act(W1 z + b1) + b2         (a residual on log-probabilities)

W2 and b2 start at zero, so at initialisation softmax(T_R(p)) = p exactly, apart from classes
with p < min_prob, which are lifted to min_prob (then renormalised by the softmax). Since the
large teacher is already good, the feedback h only has to nudge T_R away from the identity.

What the paper fixes (Appendix E): T_R is small, takes the large teacher's prediction as input,
is trained with the student by the MPL feedback. What is ours: the residual form, the
zero-initialised output layer, the log-probability input, one hidden layer (GELU) and the
default width.
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_MIN_PROB = 1e-8  # below the smallest normal fp16 (6.1e-5) and its subnormals' resolution


class ReducedTeacher(nn.Module):
    """T_R: (B, num_classes) probabilities -> (B, num_classes) logits; identity at init."""

    def __init__(self, num_classes: int, hidden: int = 128, min_prob: float = DEFAULT_MIN_PROB):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"the reduced teacher needs at least 2 classes, got {num_classes}")
        if hidden < 1:
            raise ValueError(f"the reduced teacher's hidden width must be >= 1, got {hidden}")
        if not 0.0 < min_prob < 1.0 / num_classes:
            raise ValueError(f"min_prob must be in (0, 1/num_classes), got {min_prob}")
        self.num_classes, self.min_prob = num_classes, min_prob
        self.hidden = nn.Linear(num_classes, hidden)
        self.act = nn.GELU()
        self.out = nn.Linear(hidden, num_classes)
        self.reset_to_identity()

    def reset_to_identity(self) -> None:
        """Zero the output layer: T_R reproduces its input distribution again."""
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, probs: torch.Tensor) -> torch.Tensor:
        if probs.dim() != 2 or probs.shape[1] != self.num_classes:
            raise ValueError(f"the reduced teacher takes (batch, {self.num_classes}) distributions, "
                             f"got shape {tuple(probs.shape)}")
        z = probs.float().clamp(min=self.min_prob).log()
        return z + self.out(self.act(self.hidden(z)))
