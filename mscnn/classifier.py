"""Classifiers on top of the ODE-ResNet.

``QuadratureClassifier``: the paper's ``logits = h^2 <W, y> + mu``, a midpoint rule for the
integral ``int w_j(x) y(x) dx`` on a grid of spacing ``h = 1/n``. ``W`` has the shape of an image
batch ``(classes, C, n, n)`` and moves between grids like one (``mscnn.hierarchy``).

``PoolClassifier``: global average pooling then a linear map (the paper's ImageNet variant); it does
not depend on the resolution at all.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CLASSIFIERS", "PoolClassifier", "QuadratureClassifier"]


class QuadratureClassifier(nn.Module):
    """``y: (B, C, n, n) -> logits (B, classes)``, ``logits = h^2 * <W, y> + mu`` with ``h = 1/n``."""

    def __init__(self, classes: int, channels: int, n: int) -> None:
        super().__init__()
        self.n = n
        self.W = nn.Parameter(torch.randn(classes, channels, n, n))
        self.mu = nn.Parameter(torch.zeros(classes))

    @property
    def h(self) -> float:
        return 1.0 / self.n

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if tuple(y.shape[1:]) != tuple(self.W.shape[1:]):
            raise ValueError(
                f"QuadratureClassifier: expected features (B, {', '.join(map(str, self.W.shape[1:]))}),"
                f" got {tuple(y.shape)}"
            )
        return self.h**2 * torch.einsum("bchw,kchw->bk", y, self.W) + self.mu


class PoolClassifier(nn.Module):
    """``y: (B, C, n, n) -> logits (B, classes)``: global average pooling, then ``W y + mu``."""

    def __init__(self, classes: int, channels: int, n: int | None = None) -> None:
        super().__init__()
        self.n = n
        self.linear = nn.Linear(channels, classes)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.linear(y.mean(dim=(-2, -1)))


CLASSIFIERS: dict[str, type[nn.Module]] = {
    "quadrature": QuadratureClassifier,
    "pool": PoolClassifier,
}
