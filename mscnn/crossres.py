"""The paper's Sec. 4.1 experiment: classify images across resolutions without retraining.

Train one network on fine images and one on coarse images (coarse = ``restrict_image`` of a
Gaussian-blurred fine image, per transfer pair), then move each to the other resolution with
``to_resolution`` (Galerkin) and with ``naive=True`` (same stencils, only ``W`` moved), and measure
accuracy on the evaluation split at the resolution of the images.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from mscnn.data import Split
from mscnn.hierarchy import to_resolution
from mscnn.ode import ODENet
from mscnn.train import accuracy, fit
from mscnn.transfer import gaussian_blur, restrict_image

__all__ = ["CrossResConfig", "coarsen", "cross_resolution", "transfer_rows"]


@dataclass(frozen=True)
class CrossResConfig:
    channels: int = 16
    steps: int = 2
    T: float = 2.0
    activation: str = "tanh"
    n: int = 28
    levels: int = 1  # coarse n = n / 2**levels
    sigma: float = 1.0  # Gaussian blur (fine pixels) before each restriction
    epochs: int = 3
    lr: float = 1e-2
    batch_size: int = 128
    seed: int = 0
    pairs: tuple[str, ...] = ("full-weighting", "average")


def coarsen(data: Split, levels: int, sigma: float, pair: str) -> Split:
    """``levels`` times ``restrict_image(gaussian_blur(x, sigma), pair)``, in chunks."""
    xs = []
    for x in data.x.split(4096):
        for _ in range(levels):
            x = restrict_image(gaussian_blur(x, sigma), pair)
        xs.append(x)
    return Split(torch.cat(xs), data.y)


def cross_resolution(
    train: Split, evaluate: Split, cfg: CrossResConfig, log: Callable[[str], None] = print
) -> list[dict]:
    """Rows ``{pair, direction, method, accuracy}`` of the Sec. 4.1 table, plus native accuracies
    and training seconds. ``direction`` is "fine" / "coarse" (native) or "coarse->fine" /
    "fine->coarse"; ``method`` is "native", "galerkin" or "naive"."""
    n_c = cfg.n // 2**cfg.levels
    arch = dict(channels=cfg.channels, steps=cfg.steps, T=cfg.T, activation=cfg.activation)

    def train_net(n: int, data: Split, pair: str) -> tuple[ODENet, float]:
        torch.manual_seed(cfg.seed)
        net = ODENet(in_channels=data.x.shape[1], n=n, pair=pair, **arch)
        t0 = time.perf_counter()
        fit(net, data, cfg.epochs, cfg.lr, cfg.batch_size, cfg.seed)
        return net, time.perf_counter() - t0

    log(f"training the fine network ({cfg.n}x{cfg.n}, {cfg.epochs} epochs, {len(train)} images)")
    fine, t_fine = train_net(cfg.n, train, cfg.pairs[0])
    rows = []
    for pair in cfg.pairs:
        tr_c, ev_c = (coarsen(d, cfg.levels, cfg.sigma, pair) for d in (train, evaluate))
        log(f"training the coarse network ({n_c}x{n_c}, pair {pair})")
        coarse, t_coarse = train_net(n_c, tr_c, pair)
        new = transfer_rows(fine, coarse, evaluate, ev_c, pair)
        for r in new:
            r |= {"seed": cfg.seed, "seconds": {"fine": t_fine, "coarse": t_coarse}.get(r["direction"])}
            log(f"  {pair:15s} {r['direction']:13s} {r['method']:9s} {100 * r['accuracy']:6.2f}%")
        rows += new
    return rows


def transfer_rows(fine: ODENet, coarse: ODENet, fine_eval: Split, coarse_eval: Split,
                  pair: str) -> list[dict]:
    """Native accuracy of both networks, and each moved to the other's resolution with Galerkin
    stencils and naively (``pair`` for both stencils and ``W``). Rows ``{pair, direction, method,
    accuracy}``."""
    rows = [
        dict(pair=pair, direction="fine", method="native", accuracy=accuracy(fine, fine_eval)),
        dict(pair=pair, direction="coarse", method="native", accuracy=accuracy(coarse, coarse_eval)),
    ]
    for naive in (False, True):
        method = "naive" if naive else "galerkin"
        up = to_resolution(coarse, fine.n, naive=naive, pair=pair)
        rows.append(dict(pair=pair, direction="coarse->fine", method=method,
                         accuracy=accuracy(up, fine_eval)))
        down = to_resolution(fine, coarse.n, naive=naive, pair=pair)
        rows.append(dict(pair=pair, direction="fine->coarse", method=method,
                         accuracy=accuracy(down, coarse_eval)))
    return rows
