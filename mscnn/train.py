"""The one training loop: ``train_epoch`` and ``evaluate`` over any iterable of ``(x, y)`` batches,
driven by a *step* -- anything with ``step(x, y) -> loss`` (the ``Step`` protocol).

Steps:

* ``TorchStep``: a ``torch.optim`` optimiser on the cross-entropy (plus a regulariser), optionally
  through another forward (a DDP wrapper, or ``mscnn.multires.MultiResolutionForward``), with a
  learning-rate scheduler and autocast;
* ``mscnn.optim.BCD``: the paper's block-coordinate Gauss-Newton/Newton iteration;
* ``make_step(model, name, ...)`` builds either by name (what schedules and the Ray stage use).

``fit`` is the epoch loop on tensors in memory (shuffled mini-batches, optional validation with
early stopping); ``mscnn.multires.fit_multiresolution`` and the Ray Train stage
(``pipelines.stage``) feed their own batches to the same ``train_epoch``. Per-epoch records are
returned (or passed to ``on_epoch``); logging to MLflow or Ray stays with the caller.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from mscnn.data import Split

__all__ = [
    "Step",
    "TorchStep",
    "accuracy",
    "eval_batch_size",
    "evaluate",
    "fit",
    "make_optimizer",
    "make_step",
    "split_batches",
    "train_epoch",
]

Batch = tuple[torch.Tensor, torch.Tensor]
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}


@runtime_checkable
class Step(Protocol):
    """One training step on a batch: updates the model in place and returns the batch's loss
    (a float or a 0-d tensor; the loop sums it weighted by the batch size)."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> float | torch.Tensor: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def make_optimizer(model: nn.Module, name: str = "adam", lr: float = 1e-3, **kw):
    """``torch.optim`` optimiser by name ("adam", "adamw", "sgd"); unknown names raise."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {sorted(OPTIMIZERS)}")
    return OPTIMIZERS[name](model.parameters(), lr=lr, **kw)


def _autocast(x: torch.Tensor, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, dtype)


class TorchStep:
    """``loss = CE(forward(x), y)`` (or ``objective(x, y)``); ``zero_grad``, ``backward`` of
    ``loss + regularizer(model)``, ``optimizer.step()``, ``scheduler.step()``. ``forward`` defaults
    to ``model`` (pass a DDP wrapper, or a multi-resolution forward). Returns the loss, detached
    (no host sync)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
                 regularizer: Callable[[nn.Module], torch.Tensor] | None = None,
                 forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 autocast: torch.dtype | None = None,
                 objective: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> None:
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.regularizer, self.forward, self.autocast = regularizer, forward or model, autocast
        self.objective = objective or (lambda x, y: F.cross_entropy(self.forward(x), y))

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with _autocast(x, self.autocast):
            loss = self.objective(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        (loss + self.regularizer(self.model) if self.regularizer else loss).backward()
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return loss.detach()

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler else None}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])


def make_step(model: nn.Module, name: str = "adam", lr: float = 1e-3, cosine: bool = True,
              total_steps: int | None = None, forward: Callable | None = None,
              regularizer: Callable | None = None, reduce: Callable | None = None,
              mge: dict | None = None, **options) -> Step:
    """The step named ``name``: a ``torch.optim`` optimiser (``adam``, ``adamw``, ``sgd``; cosine
    annealing to 0 over ``total_steps`` when ``cosine``) or ``bcd`` (``mscnn.optim.BCD`` on the
    unwrapped ``model``, with ``alpha_time``, ``alpha_space``, ``newton_steps``, ``cg_iters``,
    ``damping`` from ``options`` and ``reduce`` for data-parallel workers). Options that belong to
    the other kind (and ``batch_size``) are ignored, so a whole optimiser config can be passed."""
    options.pop("batch_size", None)
    bcd_keys = ("alpha_time", "alpha_space", "newton_steps", "cg_iters", "damping", "gn_batch")
    if name == "bcd":
        from mscnn.optim import BCD

        kw = {k: options[k] for k in bcd_keys if k in options}
        return BCD(model, **kw, **({"reduce": reduce} if reduce else {}))
    opt = make_optimizer(model, name, lr)
    sched = None
    if cosine:
        if not total_steps:
            raise ValueError("make_step: cosine annealing needs total_steps")
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total_steps)
    if mge:
        from mscnn.mge import MultilevelStep

        return MultilevelStep(model, opt, mge["sizes"], mge["batch_sizes"], sched,
                              move=mge.get("move", "galerkin"), sigma=mge.get("sigma", 1.0),
                              prefilter=mge.get("prefilter"))
    return TorchStep(model, opt, sched, regularizer, forward)


def split_batches(data: Split, batch_size: int, generator: torch.Generator | None = None,
                  device: torch.device | str | None = None,
                  augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
                  ) -> Iterator[Batch]:
    """Mini-batches of ``data``: shuffled with ``generator`` (in order without one), moved to
    ``device``, ``augment(x, generator)`` applied to each training batch."""
    order = (torch.randperm(len(data), generator=generator) if generator is not None
             else torch.arange(len(data)))
    for idx in order.split(batch_size):
        x, y = data.x[idx], data.y[idx]
        if device is not None:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if augment is not None:
            x = augment(x, generator)
        yield x, y


def train_epoch(step: Callable[[torch.Tensor, torch.Tensor], float | torch.Tensor],
                batches: Iterable[Batch], model: nn.Module | None = None,
                on_batch: Callable[[int], None] | None = None) -> dict:
    """One pass of ``step`` over ``batches``; ``model`` (when given) is put in training mode.
    ``on_batch(i)`` runs after the ``i``-th step. Returns ``loss`` (mean over images), ``images``,
    ``batches``, ``seconds`` and ``images_per_s``."""
    if model is not None:
        model.train()
    t0, total, count, i = time.perf_counter(), 0.0, 0, 0
    for i, (x, y) in enumerate(batches, 1):
        loss = step(x, y)
        total = total + (loss.detach() if torch.is_tensor(loss) else float(loss)) * len(y)
        count += len(y)
        if on_batch is not None:
            on_batch(i)
    loss = float(total) / max(count, 1)  # one host sync per epoch
    seconds = time.perf_counter() - t0
    return {"loss": loss, "images": count, "batches": i, "seconds": seconds,
            "images_per_s": count / seconds if seconds > 0 else 0.0}


@torch.no_grad()
def evaluate(model: Callable[[torch.Tensor], torch.Tensor], batches: Iterable[Batch],
             autocast: torch.dtype | None = None) -> dict:
    """Cross-entropy and accuracy of ``model`` (in eval mode, restored after) over ``batches``.
    Returns the sums ``loss_sum``, ``correct``, ``count`` (to all-reduce across workers) and the
    means ``loss``, ``accuracy``."""
    was = getattr(model, "training", None)
    if was is not None:
        model.eval()
    loss = correct = 0.0
    count = 0
    try:
        for x, y in batches:
            with _autocast(x, autocast):
                logits = model(x)
            loss = loss + F.cross_entropy(logits.float(), y, reduction="sum")
            correct = correct + (logits.argmax(1) == y).sum()
            count += len(y)
    finally:
        if was is not None:
            model.train(was)
    out = {"loss_sum": float(loss), "correct": float(correct), "count": count}
    return out | {"loss": out["loss_sum"] / max(count, 1), "accuracy": out["correct"] / max(count, 1)}


@torch.no_grad()
def eval_batch_size(model: nn.Module, example: torch.Tensor, cap: int = 1000,
                    cpu_bytes: int = 2 * 2**20) -> int:
    """The batch to evaluate ``model`` in, from one ``example`` input (shape ``(1, C, n, n)``): on a
    CPU the largest batch whose widest activation (the largest output of any submodule, measured
    by one forward of the example) stays within ``cpu_bytes`` (the size of a core's caches; at
    least 16, at most ``cap``), elsewhere ``cap``. On a 2-core CPU the demo network validated
    2.9x faster in batches of 64 than of 1,000 (``benchmarks/eval_batch.py``): a batch whose
    activations outgrow the caches runs at memory speed."""
    if example.device.type != "cpu":
        return cap
    widest = [0]

    def hook(_m, _i, out):
        if torch.is_tensor(out):
            widest[0] = max(widest[0], out.nelement() * out.element_size())
    was = getattr(model, "training", None)
    handles = [m.register_forward_hook(hook) for m in model.modules()] if isinstance(model, nn.Module) else []
    try:
        if was is not None:
            model.eval()
        model(example[:1])
    finally:
        for h in handles:
            h.remove()
        if was is not None:
            model.train(was)
    return max(16, min(cap, cpu_bytes // max(widest[0], 1)))


def accuracy(model: nn.Module, data: Split, batch_size: int | None = None) -> float:
    """Fraction of ``data`` that ``model`` classifies correctly (in eval mode), in batches of
    ``batch_size`` (default ``eval_batch_size``)."""
    if batch_size is None:
        batch_size = eval_batch_size(model, data.x[:1])
    return evaluate(model, split_batches(data, batch_size))["accuracy"]


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
    step: Step | None = None,
    val: Split | None = None,
    patience: int | None = None,
    device: torch.device | str | None = None,
    augment: Callable | None = None,
    autocast: torch.dtype | None = None,
) -> list[dict]:
    """Minimise the cross-entropy of ``model`` on ``train`` with mini-batches (shuffled with
    ``seed``). The step is ``step`` when given, else ``make_step(model, optimizer, lr, cosine)``
    annealed over all ``epochs`` (plus ``regularizer(model)`` in every step; ``loss`` records the
    cross-entropy only). With ``val``, each record has ``val_accuracy`` and ``val_loss``; with
    ``patience`` too, training stops after that many epochs without a better validation accuracy
    and the model ends with its best weights. Returns one record per epoch: ``epoch``, ``loss``
    (mean over the epoch), ``seconds`` (training only), ``images_per_s``."""
    if step is None:
        total = epochs * -(-len(train) // batch_size)
        step = make_step(model, optimizer, lr, cosine, total, regularizer=regularizer)
    g = torch.Generator().manual_seed(seed)
    history, best, best_state, bad = [], -1.0, None, 0
    if val is not None:
        vb = eval_batch_size(model, val.x[:1].to(device) if device else val.x[:1], 2 * batch_size)
    for epoch in range(epochs):
        rec = train_epoch(step, split_batches(train, batch_size, g, device, augment), model)
        rec = {"epoch": epoch, **rec}
        if val is not None:
            v = evaluate(model, split_batches(val, vb, device=device), autocast)
            rec |= {"val_accuracy": v["accuracy"], "val_loss": v["loss"]}
        history.append(rec)
        if on_epoch:
            on_epoch(epoch, rec)
        if val is not None and patience is not None:
            if rec["val_accuracy"] > best:
                best, bad = rec["val_accuracy"], 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
                if bad >= patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    return history
