"""Cheap recalibration at a new resolution: what a transfer must beat to be worth its name.

``refit_classifier``: keep the feature extractor, re-fit only the classifier on data at the new
resolution (a few hundred Adam steps). ``recalibrate_batchnorm``: recompute batch-norm running
statistics on data at the new resolution (the parameters are untouched).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from mscnn.data import Split
from mscnn.train import TorchStep

__all__ = ["recalibrate_batchnorm", "refit_classifier"]


def refit_classifier(
    model: nn.Module,
    data: Split,
    steps: int = 300,
    lr: float = 1e-2,
    batch_size: int = 128,
    seed: int = 0,
    head: str = "classifier",
) -> list[float]:
    """Train only ``model.<head>`` (Adam, ``steps`` mini-batches of ``data``) in place; every other
    parameter is left exactly as it was. Returns the loss of each step."""
    if not hasattr(model, head):
        raise ValueError(f"refit_classifier: the model has no submodule {head!r}")
    params = list(getattr(model, head).parameters())
    frozen = [p for p in model.parameters() if all(p is not q for q in params)]
    flags = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    step = TorchStep(model, torch.optim.Adam(params, lr=lr))
    g = torch.Generator().manual_seed(seed)
    losses = []
    was = model.training
    model.eval()  # batch-norm statistics (where present) stay as they are
    try:
        for _ in range(steps):
            idx = torch.randint(len(data), (batch_size,), generator=g)
            losses.append(float(step(data.x[idx], data.y[idx])))
    finally:
        for p, f in zip(frozen, flags, strict=True):
            p.requires_grad_(f)
        model.train(was)
    return losses


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor] | Split,
                          batch_size: int = 256) -> int:
    """Recompute the running mean and variance of every batch-norm layer as the exact average over
    ``batches`` (input tensors, or a ``Split`` cut into ``batch_size`` pieces); returns the number
    of batches seen. Raises if the model has no batch-norm layer."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        raise ValueError("recalibrate_batchnorm: the model has no batch-norm layer")
    if isinstance(batches, Split):
        batches = batches.x.split(batch_size)
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the exact mean over the batches
    was = model.training
    model.train()
    seen = 0
    try:
        for x in batches:
            model(x)
            seen += 1
    finally:
        for m, mom in zip(bns, momenta, strict=True):
            m.momentum = mom
        model.train(was)
    if not seen:
        raise ValueError("recalibrate_batchnorm: no batches given")
    return seen
