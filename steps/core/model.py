"""The networks. Pure ``nn.Module`` definitions: no I/O, no tracking.

Every network takes raw pixels (0-255, float or uint8, shape (N, 28, 28) or (N, 1, 28, 28))
and normalises inside ``forward``, so a logged model needs no client-side preprocessing.

This file imports nothing but torch: ``train`` copies it into the logged classifier
(``code_paths``), where it rebuilds the network from its weights without this project.
"""

from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 10

# MNIST's pixel statistics. Fixed constants rather than per-dataset ones: the model must
# carry them, and a constant affine rescaling is all the optimiser needs.
PIXEL_MEAN = 0.1307 * 255.0
PIXEL_STD = 0.3081 * 255.0


class Normalize(nn.Module):
    """Raw 0-255 pixels in any of the accepted layouts -> normalised float (N, 1, 28, 28)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], 1, 28, 28).to(torch.float32)
        return (x - PIXEL_MEAN) / PIXEL_STD


class MLP(nn.Module):
    """784-256-128-10, the network of the tutorials this project grew from."""

    def __init__(self, hidden: tuple[int, int] = (256, 128)) -> None:
        super().__init__()
        self.normalize = Normalize()
        self.layers = nn.Sequential(
            nn.Flatten(),
            nn.Linear(28 * 28, hidden[0]),
            nn.ReLU(),
            nn.Linear(hidden[0], hidden[1]),
            nn.ReLU(),
            nn.Linear(hidden[1], NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.normalize(x))


class CNN(nn.Module):
    """Two conv blocks and a small head: about 10x fewer weights than the MLP, more accurate."""

    def __init__(self, channels: tuple[int, int] = (16, 32), hidden: int = 64) -> None:
        super().__init__()
        c1, c2 = channels
        self.normalize = Normalize()
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * 7 * 7, hidden),
            nn.ReLU(),
            nn.Linear(hidden, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(self.normalize(x)))


class Probabilities(nn.Module):
    """Wraps a logits network so the logged model answers with class probabilities."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.net(x), dim=1)


def build_model(arch: str, hidden: tuple[int, int] | None = None) -> nn.Module:
    """A fresh network of kind ``arch``; ``hidden`` sizes the two hidden layers / channels."""
    if arch == "mlp":
        return MLP(hidden or (256, 128))
    if arch == "cnn":
        return CNN(hidden or (16, 32))
    raise ValueError(f"unknown arch {arch!r}; choose mlp or cnn")
