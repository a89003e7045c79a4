"""Multilevel gradient estimation (MGE; Zakariaei, Ahamed, Haber, Eliasof, arXiv 2501.12739): the
fine-grid gradient written as a telescoping sum, as in multilevel Monte Carlo,

    g_L = g_0 + sum_{l=1..L} (g_l - g_{l-1}),

each term on its own independent samples: ``g_0`` on the coarsest images (cheap: many samples),
each correction ``g_l - g_{l-1}`` on the *same* samples at grid ``l`` and at grid ``l - 1`` (few
samples where the levels agree, i.e. where the variance ratio ``rho_l = Var[g_l - g_{l-1}] /
Var[g_l]`` is small). One set of parameters lives at the finest grid (``model.n``); every level
runs it through ``mscnn.multires.MultiResolutionForward`` (``resolution_state``: free stencils
naive, Galerkin or dilated -- ``move`` -- or a scale-consistent stencil kind re-discretised).
``move="dilate"`` needs a fine network whose taps are ``2**(levels-1)`` pixels apart
(``ODENetConfig.dilation``): each coarser level then runs the same weights with the taps one grid
closer, the sub-grid network of ``to_resolution(dilate=True)``. Coarse images are made inside the
step the way the pyramid makes them (``mscnn.data.coarsen``: blur 1 pixel, restrict).

``MultilevelStep`` is one more ``mscnn.train.Step``: it takes a fine batch, splits it into the
per-level sample sets (``batch_sizes``, coarsest first), forms the telescoping loss and takes one
optimiser step on its gradient. ``pixels`` counts what a step costs (sum of batch x n^2 over the
forward passes); ``variance_ratio`` measures ``rho`` per level pair.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mscnn.data import Split
from mscnn.hierarchy import levels_between
from mscnn.multires import MultiResolutionForward
from mscnn.ode import ODENet
from mscnn.train import TorchStep
from mscnn.transfer import gaussian_blur, restrict_image

__all__ = ["MOVES", "MultilevelStep", "mge_loss", "mge_pixels", "variance_ratio"]


MOVES = ("galerkin", "naive", "dilate")


def _move(move: str) -> dict:
    """``MultiResolutionForward``'s options for a free-stencil ``move`` (consistent kinds ignore it)."""
    if move not in MOVES:
        raise ValueError(f"mge: unknown move {move!r}; valid: {list(MOVES)}")
    return {"naive": move == "naive", "dilate": move == "dilate"}


def _down(x: torch.Tensor, times: int, sigma: float, pair: str) -> torch.Tensor:
    """``x`` coarsened ``times`` times the way the pyramid does it (blur, then restrict)."""
    for _ in range(times):
        x = restrict_image(gaussian_blur(x, sigma), pair)
    return x


def mge_pixels(sizes: list[int], batch_sizes: list[int]) -> int:
    """What one MGE batch costs in pixels: set 0 at ``sizes[0]``, set ``l`` at ``sizes[l]`` and at
    ``sizes[l - 1]``.

    >>> mge_pixels([4, 8], [24, 8])
    1024
    """
    return batch_sizes[0] * sizes[0] ** 2 + sum(
        b * (sizes[i] ** 2 + sizes[i - 1] ** 2) for i, b in enumerate(batch_sizes) if i)


def mge_loss(forward: MultiResolutionForward, x: torch.Tensor, y: torch.Tensor, sizes: list[int],
             batch_sizes: list[int], sigma: float = 1.0, pair: str = "full-weighting"
             ) -> tuple[torch.Tensor, dict]:
    """The telescoping loss whose gradient is the MGE estimate, on the fine batch ``(x, y)``:
    sample set 0 (the first ``batch_sizes[0]`` images) at ``sizes[0]``; set ``l`` at ``sizes[l]``
    minus the same set at ``sizes[l - 1]``. Returns ``(loss, info)``; ``info["pixels"]`` is the
    cost in pixels (``mge_pixels``)."""
    if any(b != 2 * a for a, b in zip(sizes, sizes[1:], strict=False)):
        raise ValueError(f"mge: sizes {sizes} must double from level to level (coarsest first)")
    if len(batch_sizes) != len(sizes) or sum(batch_sizes) > len(y):
        raise ValueError(f"mge: batch_sizes {batch_sizes} need one entry per level {sizes} and at "
                         f"most {len(y)} images in all")
    loss, start, top = 0.0, 0, len(sizes) - 1
    for lvl, b in enumerate(batch_sizes):
        xs, ys = x[start : start + b], y[start : start + b]
        start += b
        xs = _down(xs, top - lvl, sigma, pair)  # this set at its own grid, sizes[lvl]
        loss = loss + F.cross_entropy(forward(xs), ys)
        if lvl:  # minus the same samples one grid coarser
            loss = loss - F.cross_entropy(forward(_down(xs, 1, sigma, pair)), ys)
    return loss, {"pixels": mge_pixels(sizes, batch_sizes)}


class MultilevelStep:
    """``step(x, y)``: one optimiser step on the MGE gradient of the fine batch ``(x, y)`` (see the
    module docstring). ``sizes``: the grids, coarsest first, the last one ``model.n``;
    ``batch_sizes``: samples per level (coarsest first; their sum at most the batch); ``move``: how
    free stencils reach the coarser grids (``MOVES``; ``dilate`` for a dilated network)."""

    def __init__(self, model: ODENet, optimizer: torch.optim.Optimizer, sizes: list[int],
                 batch_sizes: list[int], scheduler=None, move: str = "galerkin", lam: float = 0.0,
                 sigma: float = 1.0, prefilter: float | None = None) -> None:
        if sizes[-1] != model.n:
            raise ValueError(f"MultilevelStep: the finest size {sizes[-1]} must be model.n={model.n}")
        self.model = model
        self.sizes, self.batch_sizes, self.sigma = list(sizes), list(batch_sizes), sigma
        # the coarse samples are blurred and restricted as the pyramid's (``sigma``); a network
        # carrying an input blur (a prefiltered handover of ``prefilter`` px per level, default
        # ``sigma``) loses it on those grids, as to_resolution does
        self.prefilter = sigma if prefilter is None else prefilter
        self.forward = MultiResolutionForward(model, sizes, lam=lam, prefilter=self.prefilter, **_move(move))
        self.pixels = 0  # total cost so far
        # the optimiser step itself is mscnn.train's one TorchStep, on the telescoping loss
        self.step = TorchStep(model, optimizer, scheduler, objective=self._loss)

    def _loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        sizes = self.batch_sizes
        if len(y) < sum(sizes):  # a short last batch: the same shares, at least one image each
            sizes = [max(1, b * len(y) // sum(sizes)) for b in sizes]
            sizes[0] = max(1, len(y) - sum(sizes[1:]))
        loss, info = mge_loss(self.forward, x, y, self.sizes, sizes, self.sigma, self.model.config.pair)
        self.pixels += info["pixels"]
        return loss

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.step(x, y)

    def state_dict(self) -> dict:
        return self.step.state_dict() | {"pixels": self.pixels}

    def load_state_dict(self, state: dict) -> None:
        self.step.load_state_dict(state)
        self.pixels = state.get("pixels", 0)


def _grad(model: ODENet, loss: torch.Tensor) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def variance_ratio(model: ODENet, data: Split, fine: int, coarse: int, batch_size: int = 32,
                   batches: int = 16, move: str = "galerkin", sigma: float = 1.0, seed: int = 0) -> float:
    """``rho = E||(g_f - g_c) - mean||^2 / E||g_f - mean||^2`` over ``batches`` mini-batch
    gradients (``data`` at ``fine``; the same samples coarsened to ``coarse``): below about 1 the
    coarse gradient is a useful control variate, near 0 the levels agree."""
    forward = MultiResolutionForward(model, [coarse, fine], prefilter=sigma, **_move(move))
    g = torch.Generator().manual_seed(seed)
    gf, gd = [], []
    for _ in range(batches):
        idx = torch.randint(len(data), (batch_size,), generator=g)
        x, y = data.x[idx], data.y[idx]
        xc = _down(x, levels_between(coarse, fine), sigma, model.config.pair)
        f = _grad(model, F.cross_entropy(forward(x), y))
        c = _grad(model, F.cross_entropy(forward(xc), y))
        gf.append(f)
        gd.append(f - c)
    gf, gd = torch.stack(gf), torch.stack(gd)
    var = lambda t: (t - t.mean(0)).pow(2).sum(1).mean()  # noqa: E731
    return float(var(gd) / var(gf))
