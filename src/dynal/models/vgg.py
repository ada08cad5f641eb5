"""CIFAR-style VGG-11 with batch normalization and a width multiplier."""

from __future__ import annotations

import torch
from torch import nn

# Channels of VGG-11; "M" is a 2x2 max-pool.
_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11BN(nn.Module):
    """VGG-11-BN for small images: 3x3 convs, global pooling and a linear head.

    A max-pool is skipped once the feature map is 1x1, so any input size works.

    Parameters
    ----------
    input_shape : (C, H, W)
    n_classes : number of logits
    width : multiplier on the channel counts
    dropout : dropout rate before the head (0 = none)
    """

    def __init__(self, input_shape: tuple[int, ...], n_classes: int, width: float = 1.0, dropout: float = 0.0) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"VGG11BN needs (C, H, W) inputs, got shape {input_shape}")
        c_in, size = input_shape[0], min(input_shape[1:])
        layers: list[nn.Module] = []
        for item in _VGG11:
            if item == "M":
                if size >= 2:
                    layers.append(nn.MaxPool2d(2))
                    size //= 2
                continue
            c_out = max(1, int(round(item * width)))
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``h``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
