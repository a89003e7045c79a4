"""Multi-resolution training: one set of parameters, trained on every level of an image pyramid.

Each mini-batch is drawn from a random pyramid level and classified by the *same* parameters moved to
that level's resolution with ``mscnn.hierarchy.resolution_state`` (Galerkin stencils and ``W``,
differentiable), run through ``torch.func.functional_call``. The trained network then serves every
resolution in the pyramid through ``to_resolution`` with the same transfer options, without
retraining. Parameters live at ``model.n``; the gradient of a batch at another resolution reaches
them through the (linear) transfer maps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch.func import functional_call

from mscnn.data import Split
from mscnn.hierarchy import LAYER_GROUPS, resolution_state
from mscnn.ode import ODENet
from mscnn.train import make_step, train_epoch

__all__ = ["LevelSampler", "MultiResolutionForward", "fit_multiresolution"]


class MultiResolutionForward:
    """``forward(x)`` for images of any resolution of the pyramid: ``model``'s parameters moved to
    ``x``'s ``n`` by ``resolution_state`` (differentiable; ``naive``, ``lam``, ``galerkin``,
    ``prefilter``, ``dilate`` as in ``to_resolution``) and run through ``functional_call``."""

    def __init__(self, model: ODENet, sizes, naive: bool = False, lam: float = 0.0,
                 galerkin: tuple[str, ...] | list[str] = LAYER_GROUPS, prefilter: float = 0.0,
                 dilate: bool = False) -> None:
        self.model, self.naive, self.lam, self.galerkin = model, naive, lam, tuple(galerkin)
        self.prefilter = prefilter  # to_resolution's: a model's input blur follows the pyramid's
        self.dilate = dilate  # to_resolution's: free stencils keep their taps' physical offsets
        # one template per resolution (its own parameters are never used: functional_call replaces them)
        self.templates = {n: ODENet(resolution_state(model, n, naive=True, prefilter=prefilter,
                                                     dilate=dilate)[0])
                          for n in sizes}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        _, state = resolution_state(self.model, n, naive=self.naive, lam=self.lam,
                                    galerkin=self.galerkin, prefilter=self.prefilter, dilate=self.dilate)
        return functional_call(self.templates[n], state, (x,))


class LevelSampler:
    """Batches from several pyramid levels: each batch from a level drawn uniformly at random
    (seeded), a fresh slice of that level's own shuffled order (reshuffled when used up).
    ``epoch()`` yields as many batches as one pass over the largest level; ``used`` counts the
    batches per level in the last epoch."""

    def __init__(self, levels: Mapping[int, Split], batch_size: int, seed: int = 0) -> None:
        self.levels, self.batch_size = levels, batch_size
        self.g = torch.Generator().manual_seed(seed)
        self.sizes = list(levels)
        self.orders = {n: torch.randperm(len(levels[n]), generator=self.g) for n in self.sizes}
        self.cursor = dict.fromkeys(self.sizes, 0)
        self.per_epoch = max(-(-len(d) // batch_size) for d in levels.values())
        self.used = dict.fromkeys(self.sizes, 0)

    def epoch(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.used = dict.fromkeys(self.sizes, 0)
        bs = self.batch_size
        for _ in range(self.per_epoch):
            n = self.sizes[int(torch.randint(len(self.sizes), (1,), generator=self.g))]
            if self.cursor[n] + bs > len(self.levels[n]):
                self.orders[n], self.cursor[n] = torch.randperm(len(self.levels[n]), generator=self.g), 0
            idx = self.orders[n][self.cursor[n] : self.cursor[n] + bs]
            self.cursor[n] += bs
            self.used[n] += 1
            yield self.levels[n].x[idx], self.levels[n].y[idx]


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
    of parameters (``model``'s, at ``model.n``, which need not be one of the levels): the batches
    of a ``LevelSampler`` through a ``MultiResolutionForward``, in ``mscnn.train.train_epoch``.
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
    sampler = LevelSampler(levels, batch_size, seed)
    forward = MultiResolutionForward(model, list(levels), naive, lam, galerkin)
    step = make_step(model, optimizer, lr, cosine, epochs * sampler.per_epoch, forward=forward)
    history = []
    for epoch in range(epochs):
        rec = train_epoch(step, sampler.epoch(), model)
        rec = {"epoch": epoch, **rec, "batches": dict(sampler.used)}
        history.append(rec)
        if on_epoch:
            on_epoch(epoch, rec)
    return history
