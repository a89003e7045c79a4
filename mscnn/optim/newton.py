"""Newton steps on a smooth function of a flat parameter vector, with Hessian-vector products
(``torch.func``), CG and an Armijo line search."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.func import grad, jvp

from mscnn.optim.cg import conjugate_gradient

Reduce = Callable[[torch.Tensor], torch.Tensor]


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def armijo(f: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor, fval: torch.Tensor,
           g: torch.Tensor, d: torch.Tensor, c: float = 1e-4, max_halvings: int = 30
           ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Backtracking from step 1 until ``f(theta + t d) <= f(theta) + c t g.d``; returns
    ``(theta_new, f_new, t)`` (``t = 0`` and ``theta`` unchanged when no step decreases ``f``)."""
    slope = g @ d
    t = 1.0
    for _ in range(max_halvings):
        new = theta + t * d
        fn = f(new)
        if torch.isfinite(fn) and fn <= fval + c * t * slope:
            return new, fn, t
        t /= 2
    return theta, fval, 0.0


def newton_step(f: Callable[[torch.Tensor], torch.Tensor], theta: torch.Tensor,
                cg_iters: int = 20, damping: float = 0.0, reduce: Reduce = _identity
                ) -> tuple[torch.Tensor, dict]:
    """One damped Newton step on ``f`` (its value, gradient and Hessian products averaged across
    workers with ``reduce``). Returns the new point and ``{loss, grad_norm, step}``."""
    fval = reduce(f(theta).detach())
    g = reduce(grad(f)(theta))

    def Hv(v: torch.Tensor) -> torch.Tensor:
        return reduce(jvp(grad(f), (theta,), (v,))[1]) + damping * v

    d = conjugate_gradient(Hv, -g, cg_iters)
    if g @ d >= 0:  # not a descent direction (should not happen for convex f): use -g
        d = -g
    new, fnew, t = armijo(lambda th: reduce(f(th).detach()), theta, fval, g, d)
    return new, {"loss": float(fnew), "grad_norm": float(g.norm()), "step": t}
