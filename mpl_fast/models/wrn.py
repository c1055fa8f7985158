"""Wide ResNet 28-k (Zagoruyko & Komodakis), the CIFAR/SVHN network of the MPL paper.

Pre-activation blocks, leaky ReLU 0.1 and BN momentum 0.01 as in the official MPL/UDA code;
dropout before the classifier.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_BN_MOMENTUM = 0.01


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, activate_before_residual: bool):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin, momentum=_BN_MOMENTUM)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout, momentum=_BN_MOMENTUM)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = None if cin == cout and stride == 1 else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
        self.activate_before_residual = activate_before_residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.leaky_relu(self.bn1(x), 0.1)
        # The first block of a group shares the activation with its shortcut.
        residual = pre if (self.activate_before_residual or self.shortcut is not None) else x
        out = self.conv2(F.leaky_relu(self.bn2(self.conv1(pre)), 0.1))
        return out + (self.shortcut(residual) if self.shortcut is not None else residual)


class WideResNet(nn.Module):
    """WRN-depth-width for 32x32 inputs: 3 groups of (depth-4)/6 blocks, widths 16k, 32k, 64k."""

    def __init__(self, num_classes: int, depth: int = 28, width: int = 2, dropout: float = 0.0,
                 in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet: depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks = []
        for g in range(3):
            for i in range(n):
                cin = widths[g] if i == 0 else widths[g + 1]
                stride = (1 if g == 0 else 2) if i == 0 else 1
                blocks.append(_Block(cin, widths[g + 1], stride, activate_before_residual=(g == 0 and i == 0)))
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(widths[3], momentum=_BN_MOMENTUM)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(self.stem(x))
        x = F.leaky_relu(self.bn(x), 0.1)
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(self.dropout(x))
