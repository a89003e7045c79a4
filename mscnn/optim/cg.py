"""Conjugate gradients for ``A x = b`` with ``A`` symmetric positive (semi)definite, given as a
matrix-vector product."""

from __future__ import annotations

from collections.abc import Callable

import torch


def conjugate_gradient(Av: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor,
                       iters: int = 20, tol: float = 1e-10) -> torch.Tensor:
    """Approximate ``A^{-1} b`` from ``x = 0`` with at most ``iters`` CG steps; stops when the
    residual norm falls below ``tol * |b|`` or a direction of non-positive curvature appears.

    >>> A = torch.tensor([[4.0, 1.0], [1.0, 3.0]], dtype=torch.float64)
    >>> conjugate_gradient(lambda v: A @ v, torch.tensor([1.0, 2.0], dtype=torch.float64))
    tensor([0.0909, 0.6364], dtype=torch.float64)
    """
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rr = r @ r
    stop = (tol * b.norm()) ** 2
    for _ in range(iters):
        if rr <= stop:
            break
        Ap = Av(p)
        pAp = p @ Ap
        if pAp <= 0:
            break
        a = rr / pAp
        x = x + a * p
        r = r - a * Ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p
        rr = rr_new
    return x
