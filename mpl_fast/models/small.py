"""Small models for the embedded data sets: the paper's two-moons MLP and a CNN for 8x8 digits."""

from __future__ import annotations

import torch
from torch import nn


class TwoMoonsMLP(nn.Module):
    """Paper section 3.1: 2 inputs, two hidden layers of 8 sigmoid units, weights and biases U(-0.1, 0.1)."""

    def __init__(self, num_classes: int = 2, in_features: int = 2, hidden: int = 8):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.Sigmoid(),
                                 nn.Linear(hidden, hidden), nn.Sigmoid(),
                                 nn.Linear(hidden, num_classes))
        for p in self.parameters():
            nn.init.uniform_(p, -0.1, 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DigitsCNN(nn.Module):
    """A small CNN for 1x8x8 digits: conv16-conv32-pool-conv32, BN + ReLU, global pool, dropout, linear.

    About 15k parameters; small enough that an MPL step (two models, ~150 images) takes
    milliseconds on a laptop CPU.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, dropout: float = 0.0, width: int = 16):
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*conv(in_channels, width), *conv(width, 2 * width), nn.MaxPool2d(2),
                                      *conv(2 * width, 2 * width), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.dropout(self.features(x)))

    def activation_checkpoint_units(self) -> list[nn.Module]:
        """What --activation-checkpointing recomputes: the whole feature stack is one stage (the
        net has no residual blocks; splitting it would rename its parameters)."""
        return [self.features]
