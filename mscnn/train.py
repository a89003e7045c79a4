"""A plain PyTorch training loop and evaluation, used by the experiments and the Ray Train stages."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mscnn.data import Split

__all__ = ["accuracy", "fit", "make_optimizer"]


def make_optimizer(model: nn.Module, name: str = "adam", lr: float = 1e-3, **kw):
    """``torch.optim`` optimiser by name ("adam", "adamw", "sgd"); unknown names raise."""
    table = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
    if name not in table:
        raise ValueError(f"unknown optimizer {name!r}; valid: {sorted(table)}")
    return table[name](model.parameters(), lr=lr, **kw)


@torch.no_grad()
def accuracy(model: nn.Module, data: Split, batch_size: int = 1000) -> float:
    """Fraction of ``data`` that ``model`` classifies correctly (in eval mode)."""
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(data), batch_size):
        logits = model(data.x[i : i + batch_size])
        correct += (logits.argmax(1) == data.y[i : i + batch_size]).sum().item()
    model.train(was)
    return correct / max(len(data), 1)


def fit(
    model: nn.Module,
    train: Split,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    optimizer: str = "adam",
    cosine: bool = True,
    on_epoch: Callable[[int, dict], None] | None = None,
    regularizer: Callable[[nn.Module], torch.Tensor] | None = None,
) -> list[dict]:
    """Minimise the cross-entropy of ``model`` on ``train`` with mini-batches (shuffled with
    ``seed``), the learning rate annealed to 0 on a cosine over all steps when ``cosine``; plus
    ``regularizer(model)`` in every step when given (``loss`` records the cross-entropy only).
    Returns one record per epoch: ``epoch``, ``loss`` (mean over the epoch), ``seconds``."""
    opt = make_optimizer(model, optimizer, lr)
    total_steps = epochs * -(-len(train) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps) if cosine else None
    g = torch.Generator().manual_seed(seed)
    history = []
    model.train()
    for epoch in range(epochs):
        t0, total, count = time.perf_counter(), 0.0, 0
        for idx in torch.randperm(len(train), generator=g).split(batch_size):
            loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
            opt.zero_grad(set_to_none=True)
            (loss + regularizer(model) if regularizer else loss).backward()
            opt.step()
            if sched:
                sched.step()
            total += loss.item() * len(idx)
            count += len(idx)
        rec = {"epoch": epoch, "loss": total / count, "seconds": time.perf_counter() - t0}
        history.append(rec)
        if on_epoch:
            on_epoch(epoch, rec)
    return history
