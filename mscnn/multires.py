"""Multi-resolution training: one set of parameters, trained on every level of an image pyramid.

Each mini-batch is drawn from a random pyramid level and classified by the *same* parameters moved to
that level's resolution with ``mscnn.hierarchy.resolution_state`` (Galerkin stencils and ``W``,
differentiable), run through ``torch.func.functional_call``. The trained network then serves every
resolution in the pyramid through ``to_resolution`` with the same transfer options, without
retraining. Parameters live at ``model.n``; the gradient of a batch at another resolution reaches
them through the (linear) transfer maps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch.func import functional_call

from mscnn.data import Split
from mscnn.hierarchy import LAYER_GROUPS, resolution_state
from mscnn.ode import ODENet
from mscnn.train import make_optimizer

__all__ = ["fit_multiresolution"]


def fit_multiresolution(
    model: ODENet,
    levels: Mapping[int, Split],
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 128,
    seed: int = 0,
    lam: float = 0.0,
    galerkin: tuple[str, ...] | list[str] = LAYER_GROUPS,
    naive: bool = False,
    optimizer: str = "adam",
    cosine: bool = True,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Minimise the cross-entropy over all ``levels`` (``{n: Split of n x n images}``) with one set
    of parameters (``model``'s, at ``model.n``, which need not be one of the levels).

    An epoch is as many mini-batches as one pass over the largest level; each batch comes from a
    level drawn uniformly at random (seeded) and is a fresh slice of that level's own shuffled order.
    Returns one record per epoch: ``epoch``, ``loss``, ``seconds`` and ``batches`` per level.
    """
    if not levels:
        raise ValueError("fit_multiresolution: levels is empty; give {n: Split} for each resolution")
    for n, data in levels.items():
        if data.x.dim() != 4 or tuple(data.x.shape[-2:]) != (n, n):
            raise ValueError(
                f"fit_multiresolution: level {n} holds images of shape {tuple(data.x.shape)}, "
                f"expected (B, C, {n}, {n})"
            )
    # one template per resolution (its own parameters are never used: functional_call replaces them)
    templates = {n: ODENet(resolution_state(model, n, naive=True)[0]) for n in levels}
    opt = make_optimizer(model, optimizer, lr)
    per_epoch = max(-(-len(d) // batch_size) for d in levels.values())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * per_epoch) if cosine else None
    g = torch.Generator().manual_seed(seed)
    sizes = list(levels)
    orders = {n: torch.randperm(len(levels[n]), generator=g) for n in sizes}
    cursor = dict.fromkeys(sizes, 0)
    history = []
    model.train()
    for epoch in range(epochs):
        t0, total, count = time.perf_counter(), 0.0, 0
        used = dict.fromkeys(sizes, 0)
        for _ in range(per_epoch):
            n = sizes[int(torch.randint(len(sizes), (1,), generator=g))]
            if cursor[n] + batch_size > len(levels[n]):
                orders[n], cursor[n] = torch.randperm(len(levels[n]), generator=g), 0
            idx = orders[n][cursor[n] : cursor[n] + batch_size]
            cursor[n] += batch_size
            _, state = resolution_state(model, n, naive=naive, lam=lam, galerkin=galerkin)
            logits = functional_call(templates[n], state, (levels[n].x[idx],))
            loss = F.cross_entropy(logits, levels[n].y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched:
                sched.step()
            total += loss.item() * len(idx)
            count += len(idx)
            used[n] += 1
        rec = {"epoch": epoch, "loss": total / count, "seconds": time.perf_counter() - t0,
               "batches": used}
        history.append(rec)
        if on_epoch:
            on_epoch(epoch, rec)
    return history
