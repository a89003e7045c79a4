"""The paper's Sec. 4.1 table with our numbers: MNIST across resolutions, no retraining.

    python benchmarks/cross_resolution.py --seeds 0 1 2 --epochs 3 [--data-dir DIR] [--eval val]

Prints a markdown table (mean +- sd over seeds) and writes it, with every row as JSON, under
``--out`` (default ``outputs/benchmarks``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from mscnn.data import Split, coarsen, mnist_splits
from mscnn.ode import ODENet
from mscnn.train import fit
from pipelines.evaluate import transfer_rows

PAPER = {  # Sec. 4.1 (BCD optimiser, 2 layers)
    ("fine", "native"): 98.18, ("coarse", "native"): 98.28,
    ("coarse->fine", "galerkin"): 91.02, ("coarse->fine", "naive"): 61.02,
    ("fine->coarse", "galerkin"): 94.92, ("fine->coarse", "naive"): 84.09,
}


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


def table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys((r["pair"], r["direction"], r["method"]) for r in rows))
    out = ["| pair | images | network | method | accuracy % (mean +- sd) | seeds | paper % |",
           "|---|---|---|---|---|---|---|"]
    for pair, direction, method in keys:
        accs = [100 * r["accuracy"] for r in rows
                if (r["pair"], r["direction"], r["method"]) == (pair, direction, method)]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        images, net = {"fine": ("fine", "fine"), "coarse": ("coarse", "coarse"),
                       "coarse->fine": ("fine", "coarse, prolonged"),
                       "fine->coarse": ("coarse", "fine, restricted")}[direction]
        paper = PAPER.get((direction, method), "")
        out.append(f"| {pair} | {images} | {net} | {method} | {statistics.mean(accs):.2f} +- "
                   f"{sd:.2f} | {len(accs)} | {paper} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--levels", type=int, default=1)
    ap.add_argument("--train-count", type=int, default=50_000)
    ap.add_argument("--sigma", type=float, default=1.0, help="blur before each restriction")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--eval", choices=["val", "test"], default="val")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="outputs/benchmarks")
    args = ap.parse_args(argv)

    data = mnist_splits(args.data_dir)
    train = Split(data["train"].x[: args.train_count], data["train"].y[: args.train_count])
    base = CrossResConfig(epochs=args.epochs, levels=args.levels, sigma=args.sigma, lr=args.lr)
    rows, t0 = [], time.perf_counter()
    for seed in args.seeds:
        print(f"seed {seed}")
        rows += cross_resolution(train, data[args.eval], replace(base, seed=seed))
    md = table(rows)
    head = (f"MNIST {base.n}x{base.n} <-> {base.n >> args.levels}x{base.n >> args.levels}, "
            f"{len(train)} training images, evaluated on '{args.eval}' ({len(data[args.eval])}); "
            f"Adam lr {base.lr} cosine, {args.epochs} epochs, {base.channels} channels, "
            f"{base.steps} steps, tanh, sigma {base.sigma}; torch {torch.__version__}, "
            f"{platform.processor() or platform.machine()}, {time.perf_counter() - t0:.0f} s")
    print("\n" + head + "\n\n" + md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"cross_resolution_L{args.levels}_{args.eval}_sigma{args.sigma:g}"
    (out / f"{stem}.md").write_text(head + "\n\n" + md + "\n")
    (out / f"{stem}.json").write_text(json.dumps({"config": asdict(base), "args": vars(args),
                                                  "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
