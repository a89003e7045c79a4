"""Moving a whole trained ``ODENet`` across resolution and depth.

``to_resolution(model, n)``: every 3x3 stencil by Galerkin restriction/prolongation
(``mscnn.transfer``), the quadrature classifier's ``W`` like an image; 1x1 kernels, biases and the
pooling classifier unchanged. The input images are never touched: the new model takes ``n x n``.

``to_depth(model, steps)``: ``T`` fixed, the stacked parameters of each unit interpolated linearly
in time (the paper's Sec. 3.3). Step ``k`` of a unit with ``N`` steps acts at ``t_k = k T / N``
(forward Euler evaluates the right-hand side at the left end of each step); new steps at
``t'_j = j T / N'`` take the piecewise-linear interpolant through ``(t_k, theta_k)``, extended
linearly past ``t_{N-1}``. Constants stay exactly constant and linear functions of time stay on
their line.
"""

from __future__ import annotations

import math

import torch

from mscnn.ode import ODENet
from mscnn.transfer import prolong_image, prolong_stencil, restrict_image, restrict_stencil

__all__ = ["interpolate_in_time", "levels_between", "to_depth", "to_resolution"]


def levels_between(n_from: int, n_to: int) -> int:
    """``k`` with ``n_to = n_from * 2**k`` (``k < 0``: coarser); ``ValueError`` if there is none.

    >>> levels_between(28, 7), levels_between(14, 28)
    (-2, 1)
    """
    if n_from < 1 or n_to < 1:
        raise ValueError(f"resolutions must be >= 1, got {n_from} -> {n_to}")
    k = round(math.log2(n_to / n_from))
    if n_from * 2.0**k != n_to:
        raise ValueError(f"resolution {n_to} is not {n_from} * 2**k for an integer k")
    return k


def _move(t: torch.Tensor, k: int, down, up, pair: str) -> torch.Tensor:
    for _ in range(abs(k)):
        t = down(t, pair) if k < 0 else up(t, pair)
    return t


@torch.no_grad()
def to_resolution(model: ODENet, n: int, naive: bool = False, pair: str | None = None) -> ODENet:
    """A new ``ODENet`` for ``n x n`` images (``n = model.n * 2**k``), no retraining.

    ``naive=True`` keeps the stencils and moves only ``W`` (the paper's baseline). ``pair`` defaults
    to the model's transfer pair. The result is on the device and dtype of ``model``.
    """
    cfg = model.config
    k = levels_between(cfg.n, n)
    pair = pair or cfg.pair
    try:
        new_cfg = cfg.replace(n=n, pair=pair)
    except ValueError as e:
        raise ValueError(
            f"to_resolution: cannot move a {cfg.n}x{cfg.n} network to {n}x{n}: {e}"
        ) from None
    p = next(model.parameters())
    new = ODENet(new_cfg).to(device=p.device, dtype=p.dtype)
    state = {}
    for name, t in model.state_dict().items():
        if t.dim() >= 2 and tuple(t.shape[-2:]) == (3, 3) and not naive:
            t = _move(t, k, restrict_stencil, prolong_stencil, pair)
        elif name == "classifier.W":
            t = _move(t, k, restrict_image, prolong_image, pair)
        state[name] = t
    new.load_state_dict(state)
    return new


def interpolate_in_time(theta: torch.Tensor, steps: int) -> torch.Tensor:
    """Resample parameters stacked over time: ``theta: (N, ...) -> (steps, ...)``.

    ``theta[k]`` sits at ``t_k = k / N`` (in units of ``T``); the result at ``j / steps`` is the
    piecewise-linear interpolant, extended linearly past the last node.

    >>> interpolate_in_time(torch.tensor([0.0, 1.0]), 4)
    tensor([0.0000, 0.5000, 1.0000, 1.5000])
    """
    N = theta.shape[0]
    if steps < 1:
        raise ValueError(f"interpolate_in_time: steps must be >= 1, got {steps}")
    if N == 1:
        return theta.expand(steps, *theta.shape[1:]).clone()
    s = torch.arange(steps, dtype=torch.float64) * (N / steps)  # new times in old step units
    i = s.floor().long().clamp(max=N - 2)
    w = (s - i).to(theta.dtype).to(theta.device).view(-1, *([1] * (theta.dim() - 1)))
    return (1 - w) * theta[i] + w * theta[i + 1]


@torch.no_grad()
def to_depth(model: ODENet, steps: int | list[int]) -> ODENet:
    """A new ``ODENet`` with ``steps`` Euler steps per unit (an int, or one per unit), ``T`` fixed.

    >>> net = ODENet(channels=4, steps=2, n=8)
    >>> to_depth(net, 8).units[0].K.shape
    torch.Size([8, 4, 4, 3, 3])
    """
    cfg = model.config
    units = len(cfg.unit_channels)
    new_steps = [int(steps)] * units if isinstance(steps, int) else [int(s) for s in steps]
    if len(new_steps) != units:
        raise ValueError(f"to_depth: expected {units} step counts (one per unit), got {steps!r}")
    p = next(model.parameters())
    new = ODENet(cfg.replace(steps=new_steps if units > 1 else new_steps[0]))
    new = new.to(device=p.device, dtype=p.dtype)
    state = model.state_dict()
    for u, N in enumerate(new_steps):
        for key in ("K", "b"):
            name = f"units.{u}.{key}"
            state[name] = interpolate_in_time(state[name], N)
    new.load_state_dict(state)
    return new
