"""Smoothness regularisers, discretisations of continuous functionals, so one weight serves every
grid and every depth.

``time_smoothness(theta, T)``: ``int_0^T |theta'(t)|^2 dt`` for parameters stacked over time
``theta: (N, ...)`` at ``t_k = k T / N``. Discretised as ``T / (N-1) * sum_k |theta_{k+1} -
theta_k|^2 / dt^2`` (the paper's ``sum_k |theta_{k+1}-theta_k|^2 / dt`` times ``N / (N-1)``): exact
for parameters linear in time, hence unchanged by ``mscnn.hierarchy.to_depth`` for them.

``space_smoothness(W)``: ``int |grad w(x)|^2 dx`` for a classifier weight ``W: (..., n, n)`` holding
the values of ``w`` on a grid of spacing ``h = 1/n``: ``h^2 * sum |grad_h W|^2`` with forward
differences ``grad_h W = (W[i+1] - W[i]) / h``; ``h`` cancels, so the value is the same on any grid
for the same smooth ``w``.
"""

from __future__ import annotations

import torch

from mscnn.ode import ODENet
from mscnn.transfer import high_frequency_matrix

__all__ = ["network_regularizer", "space_smoothness", "stencil_smoothness", "time_smoothness"]


def time_smoothness(theta: torch.Tensor, T: float) -> torch.Tensor:
    """``theta: (N, ...) -> ()``; 0 for ``N = 1``.

    >>> time_smoothness(torch.tensor([0.0, 1.0, 2.0, 3.0]), T=2.0)  # theta(t) = 2t: int 4 dt = 8
    tensor(8.)
    """
    N = theta.shape[0]
    if N < 2:
        return theta.new_zeros(())
    dt = T / N
    return T / (N - 1) * ((theta[1:] - theta[:-1]) ** 2).sum() / dt**2


def space_smoothness(W: torch.Tensor) -> torch.Tensor:
    """``W: (..., n, n) -> ()``: ``h^2 * |grad_h W|^2`` (forward differences, ``h = 1/n``).

    >>> x = (torch.arange(8.) + 0.5) / 8                      # w(x, y) = x on an 8x8 grid
    >>> space_smoothness(x.view(1, 8).expand(8, 8))           # int |grad w|^2 = 1, less one column
    tensor(0.8750)
    """
    n = W.shape[-1]
    h = 1.0 / n
    gx = (W[..., :, 1:] - W[..., :, :-1]) / h
    gy = (W[..., 1:, :] - W[..., :-1, :]) / h
    return h**2 * (gx.pow(2).sum() + gy.pow(2).sum())


def stencil_smoothness(s: torch.Tensor) -> torch.Tensor:
    """``s: (..., 3, 3) -> ()``: ``sum s^T Q s`` over the stencils, ``Q`` the high-frequency energy.

    >>> stencil_smoothness(torch.tensor([[0., 0, 0], [0, 2, 0], [0, 0, 0]]))  # 2 * identity: 4
    tensor(4.)
    """
    v = s.reshape(-1, 9)
    Q = high_frequency_matrix().to(dtype=v.dtype, device=v.device)
    return ((v @ Q) * v).sum()


def network_regularizer(model: ODENet, alpha_time: float = 0.0, alpha_space: float = 0.0,
                        alpha_stencil: float = 0.0) -> torch.Tensor:
    """``alpha_time * sum over units of time_smoothness(K) + time_smoothness(b)`` plus
    ``alpha_space * space_smoothness(W)`` (the quadrature classifier's weights) plus
    ``alpha_stencil * stencil_smoothness`` of every 3x3 stencil (opening layer and units)."""
    total = next(model.parameters()).new_zeros(())
    if alpha_stencil:
        total = total + alpha_stencil * (stencil_smoothness(model.opening.weight) + sum(
            stencil_smoothness(u.K) for u in model.units))
    if alpha_time:
        for unit in model.units:
            total = total + alpha_time * (time_smoothness(unit.K, unit.T)
                                          + time_smoothness(unit.b, unit.T))
    W = getattr(model.classifier, "W", None)
    if alpha_space and W is not None:
        total = total + alpha_space * space_smoothness(W)
    return total
