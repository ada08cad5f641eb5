"""A small convolutional network for 28x28-scale images."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two conv-BN-ReLU-pool blocks, then the flattened feature map into a hidden linear layer.

    Parameters
    ----------
    input_shape : (C, H, W)
    n_classes : number of logits
    width : channels of the first conv block (the second has twice as many)
    hidden : size of the penultimate layer
    dropout : dropout rate before the head (0 = none)
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        n_classes: int,
        width: int = 32,
        hidden: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ValueError(f"SmallCNN needs (C, H, W) inputs, got shape {input_shape}")
        c, rows, cols = input_shape
        pooled = ((rows + 3) // 4) * ((cols + 3) // 4)  # positions left after two ceil-mode 2x2 pools
        self.body = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2, ceil_mode=True),
            nn.Flatten(),
            nn.Linear(2 * width * pooled, hidden),
            nn.ReLU(),
        )
        if dropout > 0:
            self.body.append(nn.Dropout(dropout))
        self.head = nn.Linear(hidden, n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``h``."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
