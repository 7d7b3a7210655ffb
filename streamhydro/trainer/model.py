"""The network. Built in every trainer rank (training) and by rank 0 for ONNX export; the
benchmark builds it in a plain process. The standardization is part of the module, so the exported
graph takes raw feature values, exactly as events carry them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Standardize(nn.Module):
    """``(x - mean) / std`` with the training set's statistics held as buffers (saved, exported)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def mlp(mean: Sequence[float], std: Sequence[float], hidden: Sequence[int], classes: int) -> nn.Sequential:
    """Standardize, then Linear+ReLU per hidden width, then a Linear to one logit per class."""
    layers: list[nn.Module] = [Standardize(mean, std)]
    width = len(mean)
    for size in hidden:
        layers += [nn.Linear(width, size), nn.ReLU()]
        width = size
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


class Probabilities(nn.Module):
    """The exported form: the logits network followed by a softmax, one probability per class."""

    def __init__(self, logits: nn.Module) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.logits(x), dim=1)
