"""What happens to an ``ODENet`` when it moves across resolution: the stability of its Euler steps
and the size of its states, and the CFL rule that picks the number of steps after a move.

* ``operator_norm``: ``||L||_2`` of one step's spatial operator ``L y = conv(y, K)`` on the
  ``n x n`` grid it runs on (zero padding, any stencil kind), by power iteration on ``L^T L``;
* ``step_norms``: ``dt * ||L_k||_2`` for every Euler step of every unit, the quantity a CFL rule
  bounds (forward Euler on ``y' = act(L y + b)`` is stable for ``dt * rho`` of order 1 or less);
* ``cfl_steps``: steps per unit after a move so that the moved network's largest ``dt * ||L||``
  is no larger than the reference network's (``T`` fixed, parameters interpolated in time by
  ``mscnn.hierarchy.to_depth``);
* ``state_rms``: the root-mean-square of the state after the opening layer and after every Euler
  step (per pixel and channel, so grids of different size compare).
"""

from __future__ import annotations

import math

import torch

from mscnn.ode import ODENet, activation
from mscnn.stencils import stencil_conv

__all__ = ["cfl_steps", "operator_norm", "state_rms", "step_norms"]


@torch.no_grad()
def operator_norm(
    weight: torch.Tensor, n: int, kind: str = "free", scale: float = 0.05, iters: int = 100, seed: int = 0,
    length: float | None = None, boundary: str = "zero",
) -> float:
    """The spectral norm of ``y -> stencil_conv(y, weight)`` (no bias) on ``n x n`` images with
    zero padding. ``weight``: ``(C, C, 3, 3)`` (free) or ``(C, C, 6)`` (consistent kinds).

    >>> lap = torch.tensor([[0., 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3)
    >>> round(operator_norm(lap, 8), 4) == round(4 + 4 * math.cos(math.pi / 9), 4)
    True
    """
    w = weight.detach().double()
    c_in = w.shape[1]
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(1, c_in, n, n, generator=g, dtype=torch.float64)
    v /= v.norm()
    norm = 0.0
    for _ in range(iters):
        x = v.clone().requires_grad_(True)
        with torch.enable_grad():
            out = stencil_conv(x, w, None, kind, scale, length=length, boundary=boundary)
            (u,) = torch.autograd.grad(out, x, out)  # L^T L v
        norm = u.norm().item() ** 0.5
        if norm == 0:
            return 0.0
        v = u / u.norm()
    return norm


def step_norms(model: ODENet) -> list[list[float]]:
    """``dt * ||L_k||_2`` for each Euler step ``k`` of each unit, on the grid the unit runs on."""
    cfg, out = model.config, []
    for u, unit in enumerate(model.units):
        n = cfg.n // 2**u
        out.append(
            [unit.dt * operator_norm(unit.K[k], n, unit.stencil, unit.scale, length=unit.length,
                                        boundary=unit.boundary)
             for k in range(unit.steps)]
        )
    return out


def cfl_steps(model: ODENet, reference: ODENet) -> list[int]:
    """Steps per unit for ``model`` (typically ``reference`` moved to another grid) so that its
    largest ``dt * ||L||`` per unit is at most ``reference``'s: ``ceil(N * r_model / r_ref)``,
    never fewer than ``model`` has (the rule only adds steps)."""
    got, ref = step_norms(model), step_norms(reference)
    out = []
    for unit, a, b in zip(model.units, got, ref, strict=True):
        need = unit.steps * max(a) / max(b) if max(b) > 0 else unit.steps
        out.append(max(unit.steps, math.ceil(need * (1 - 1e-4))))  # power-iteration slack
    return out


@torch.no_grad()
def state_rms(model: ODENet, x: torch.Tensor) -> list[float]:
    """The RMS of the state after the opening layer and after each Euler step of each unit (the
    connective layers' outputs are not listed), as in ``ODENet.features``."""
    cfg = model.config
    act = activation(cfg.activation)
    y = act(model.opening(x))
    rms = [y.pow(2).mean().sqrt().item()]
    for u, unit in enumerate(model.units):
        if u:
            y = model.connectives[u - 1](y)
        for k in range(unit.steps):
            y = y + unit.dt * act(stencil_conv(y, unit.K[k], unit.b[k], unit.stencil, unit.scale,
                                               length=unit.length, boundary=unit.boundary))
            rms.append(y.pow(2).mean().sqrt().item())
    return rms
