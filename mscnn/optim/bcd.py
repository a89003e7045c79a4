"""Block-coordinate descent (the paper's Sec. 4.1): per iteration one Gauss-Newton step for the
propagation parameters (opening, Euler units, connectives) on a sub-sampled batch, then Newton
steps for the classifier ``(W, mu)`` with the propagation fixed. ``J^T H J`` is applied through
``torch.func`` jvp/vjp (``J`` is never formed) and solved with a few CG iterations; both blocks
use an Armijo line search. Under DDP pass ``reduce`` (an all-reduce mean): gradients, curvature
products and line-search values are then averaged across workers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vjp

from mscnn.ode import ODENet
from mscnn.optim.cg import conjugate_gradient
from mscnn.optim.newton import Reduce, _identity, armijo, newton_step
from mscnn.regularizers import space_smoothness, time_smoothness

__all__ = ["BCD"]


class BCD:
    """``BCD(model).step(x, y)`` updates ``model`` in place and returns the objective value."""

    def __init__(self, model: ODENet, alpha_time: float = 1e-3, alpha_space: float = 1e-4,
                 newton_steps: int = 5, cg_iters: int = 10, damping: float = 1e-3,
                 gn_batch: int | None = None, reduce: Reduce = _identity) -> None:
        self.model = model
        self.alpha_time, self.alpha_space = alpha_time, alpha_space
        self.newton_steps, self.cg_iters, self.damping = newton_steps, cg_iters, damping
        self.gn_batch, self.reduce = gn_batch, reduce
        self.prop_names = [k for k, _ in model.named_parameters() if not k.startswith("classifier.")]
        self.cls_names = [k for k, _ in model.named_parameters() if k.startswith("classifier.")]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """The ``mscnn.train.Step`` interface: one iteration, returning the loss."""
        return self.step(x, y)["loss"]

    def state_dict(self) -> dict:  # BCD keeps no state between iterations
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    # ---------------------------------------------------------------- flat views
    def _flat(self, names: list[str]) -> torch.Tensor:
        params = dict(self.model.named_parameters())
        return torch.cat([params[k].detach().reshape(-1) for k in names])

    def _unflat(self, names: list[str], flat: torch.Tensor) -> dict[str, torch.Tensor]:
        params = dict(self.model.named_parameters())
        out, i = {}, 0
        for k in names:
            n = params[k].numel()
            out[k] = flat[i : i + n].view_as(params[k])
            i += n
        return out

    def _assign(self, names: list[str], flat: torch.Tensor) -> None:
        with torch.no_grad():
            params = dict(self.model.named_parameters())
            for k, v in self._unflat(names, flat).items():
                params[k].copy_(v)

    # ---------------------------------------------------------------- blocks
    def _time_reg(self, p: dict[str, torch.Tensor]) -> torch.Tensor:
        total = next(iter(p.values())).new_zeros(())
        for u, unit in enumerate(self.model.units):
            total = total + time_smoothness(p[f"units.{u}.K"], unit.T)
            total = total + time_smoothness(p[f"units.{u}.b"], unit.T)
        return self.alpha_time * total

    def gauss_newton_direction(self, x: torch.Tensor, y: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, callable]:
        """``(theta, g, d, objective)`` for the propagation block: ``d`` solves
        ``(J^T H J + R'' + damping I) d = -g`` approximately with CG."""
        theta = self._flat(self.prop_names)
        cls = {k: v.detach() for k, v in self.model.named_parameters() if k in self.cls_names}
        B = x.shape[0]

        def logits(th):
            return functional_call(self.model, {**self._unflat(self.prop_names, th), **cls}, (x,))

        def objective(th):
            return F.cross_entropy(logits(th), y) + self._time_reg(self._unflat(self.prop_names, th))

        g = self.reduce(grad(objective)(theta))
        z, vjp_fn = vjp(logits, theta)
        p = torch.softmax(z.detach(), dim=1)

        def reg(th):
            return self._time_reg(self._unflat(self.prop_names, th))

        def GNv(v):
            Jv = jvp(logits, (theta,), (v,))[1]
            HJv = (p * Jv - p * (p * Jv).sum(1, keepdim=True)) / B  # softmax CE Hessian per sample
            out = vjp_fn(HJv)[0]
            if self.alpha_time:
                out = out + jvp(grad(reg), (theta,), (v,))[1]
            return self.reduce(out) + self.damping * v

        d = conjugate_gradient(GNv, -g, self.cg_iters)
        return theta, g, d, objective

    def step(self, x: torch.Tensor, y: torch.Tensor) -> dict:
        """One BCD iteration on the batch ``(x, y)``; returns ``{loss, gn_step, newton_steps}``."""
        xs, ys = (x, y) if not self.gn_batch else (x[: self.gn_batch], y[: self.gn_batch])
        theta, g, d, objective = self.gauss_newton_direction(xs, ys)
        f0 = self.reduce(objective(theta).detach())
        new, _, t = armijo(lambda th: self.reduce(objective(th).detach()), theta, f0, g, d)
        self._assign(self.prop_names, new)

        with torch.no_grad():
            feats = self.model.features(x)
        clf = self.model.classifier
        names = self.cls_names

        def cls_objective(th):
            prm = self._unflat(names, th)
            logits = functional_call(clf, {k.removeprefix("classifier."): v for k, v in prm.items()},
                                     (feats,))
            loss = F.cross_entropy(logits, y)
            if self.alpha_space and "classifier.W" in prm:
                loss = loss + self.alpha_space * space_smoothness(prm["classifier.W"])
            return loss

        th = self._flat(names)
        info = {}
        for _ in range(self.newton_steps):
            th, info = newton_step(cls_objective, th, self.cg_iters, reduce=self.reduce)
        self._assign(names, th)
        return {"loss": info.get("loss", float(f0)), "gn_step": t, "newton_grad_norm":
                info.get("grad_norm")}
