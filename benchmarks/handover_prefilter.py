"""How much the dilating handover loses, by the prefilter's width (issue 14/15).

    python benchmarks/handover_prefilter.py [--seeds 0 1 2] [--channels 16 32] [--activation relu]

A network trained ``--epochs`` epochs at 14x14 (the pyramid's images: ``restrict(blur(x, 1 px))``,
full weighting) exactly as ``multiscale_training.py`` trains its coarse level (same seed, data and
loop, so its rows reproduce that benchmark's "moved to 28" column), then moved to 28x28 by
``to_resolution(dilate=True, prefilter=sigma)`` for each ``--sigmas`` (fine pixels; 0: none; 1: the
pyramid's blur, what the pipeline's ``prefilter: true`` uses; ``handover_sigma(1, full-weighting)`` =
1.2247: that blur and the restriction's own [1, 2, 1] / 4 smoothing), and validated at 28x28 before
any fine epoch. Validation: the 10,000-image split of ``mnist_splits``. Accuracies only, no timing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import mean_sd, publish, unit_channels

from mscnn.data import coarsen, mnist_splits
from mscnn.hierarchy import handover_sigma, to_resolution
from mscnn.ode import ODENet
from mscnn.train import accuracy, fit


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--channels", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--activation", default="relu")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=3, help="at 14x14")
    ap.add_argument("--sigmas", type=float, nargs="+",
                    default=[0.0, 1.0, round(handover_sigma(1.0, "full-weighting"), 4), 1.5])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    d = mnist_splits(args.data_dir)
    train, val = d["train"], d["val"]
    train14, val14 = coarsen(train, 1, 1.0), coarsen(val, 1, 1.0)
    rows = {"coarse network at 14x14": []} | {f"moved to 28, prefilter {s:g} px": [] for s in args.sigmas}
    t0 = time.perf_counter()
    for seed in args.seeds:
        torch.manual_seed(seed)
        net = ODENet(n=14, channels=unit_channels(args.channels), steps=args.steps,
                     activation=args.activation, in_channels=1, classes=10)
        fit(net, train14, args.epochs, 1e-2, 128, seed)
        rows["coarse network at 14x14"].append(accuracy(net, val14))
        for s in args.sigmas:
            rows[f"moved to 28, prefilter {s:g} px"].append(
                accuracy(to_resolution(net, 28, dilate=True, prefilter=s), val))
        print(f"seed {seed}: " + ", ".join(f"{k} {100 * v[-1]:.2f}%" for k, v in rows.items()), flush=True)
    head = (f"MNIST, ODENet channels {args.channels} {args.activation} {args.steps} steps per unit, "
            f"{args.epochs} epochs at 14x14 (Adam 1e-2 cosine, batch 128), moved by dilation; seeds "
            f"{args.seeds}; {time.perf_counter() - t0:.0f} s")
    md = [head, "", "| network | " + " | ".join(f"seed {s}" for s in args.seeds) + " | mean +- sd |",
          "|---|" + "---|" * (len(args.seeds) + 1)]
    for k, v in rows.items():
        md.append(f"| {k} | " + " | ".join(f"{100 * a:.2f}" for a in v) + f" | "
                  f"{mean_sd([100 * a for a in v])} |")
    metrics = {f"sigma_{s:g}.mean_val_acc": statistics.mean(rows[f"moved to 28, prefilter {s:g} px"])
               for s in args.sigmas}
    publish(args.out, "handover_prefilter", "\n".join(md), {"args": vars(args), "rows": rows},
            vars(args), metrics)


if __name__ == "__main__":
    main()
