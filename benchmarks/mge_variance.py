"""Can multilevel gradient estimation pay? The variance ratio rho = Var[g_h - g_2h] / Var[g_h] per
level pair, for networks with free stencils (moved naively and by Galerkin) and with
scale-consistent stencils, at initialisation and after training, on MNIST.

    python benchmarks/mge_variance.py [--train-count 20000] [--epochs 1] [--kinds free gaussian moment-blur]
        [--kinds free-dilated]

``free-dilated``: free stencils with the coarse footprint at 28x28 (``dilation=2``, the pyramid's
14x14 blur as ``input_blur``), moved to 14x14 by ``dilate`` (the same weights, taps one pixel apart).

MLMC theory (two levels, cost ratio 1/4 of the coarse level): the best MGE step costs about
``(sqrt(1.25 rho) + 0.5)^2`` of a plain fine step for the same variance -- below 1 only when rho is
below 0.2, and never below 1/4. The table gives rho and that predicted cost ratio.
"""

from __future__ import annotations

import argparse
import time

import torch
from common import ROOT, machine, metrics_of, publish

from mscnn.data import Split, coarsen, mnist_splits
from mscnn.hierarchy import pyramid_blur, to_resolution
from mscnn.mge import variance_ratio
from mscnn.ode import ODENet
from mscnn.train import fit


def predicted_cost(rho: float) -> float:
    return (1.25**0.5 * rho**0.5 + 0.5) ** 2


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", nargs="+", default=["free", "gaussian", "moment-blur"])
    ap.add_argument("--train-count", type=int, default=20_000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--batches", type=int, default=24)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--length", type=float, default=None,
                    help="consistent kinds: ODENetConfig.stencil_length (image widths)")
    ap.add_argument("--stem", default="mge_variance", help="results file name")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    d = mnist_splits()
    train = Split(d["train"].x[: args.train_count], d["train"].y[: args.train_count])
    at14 = coarsen(train, 1, 1.0)
    rows, t0 = [], time.perf_counter()
    for kind in args.kinds:
        torch.manual_seed(0)
        dilated = kind == "free-dilated"  # the coarse footprint: taps 2 pixels apart, the 14x14 blur
        net = ODENet(channels=16, steps=2, n=28, stencil="free" if dilated else kind,
                     dilation=2 if dilated else 1, input_blur=pyramid_blur(14, 28) if dilated else 0.0,
                     stencil_length=args.length)
        for when in ("init", "trained"):
            if when == "trained":
                fit(net, train, args.epochs, 1e-2, 128, 0)
            moves = (["dilate"] if dilated else ["naive", "galerkin"] if kind == "free" else ["consistent"])
            for move in moves:
                how = "galerkin" if move == "consistent" else move  # consistent kinds ignore the move
                r28 = variance_ratio(net, train, 28, 14, args.batch, args.batches, move=how)
                r14 = None  # a dilation-2 network at 14x14 has its taps 1 pixel apart: no grid below
                if not dilated:
                    r14 = variance_ratio(to_resolution(net, 14, naive=move == "naive"), at14, 14, 7,
                                         args.batch, args.batches, move=how)
                rows.append({"kind": kind, "move": move, "when": when, "rho_28_14": r28, "rho_14_7": r14})
                print(f"{kind} {move} {when}: rho(28,14) {r28:.3f}, rho(14,7) {r14}", flush=True)
    md = [f"MNIST, ODENet 16 channels 2 steps; rho from {args.batches} batches of {args.batch}; "
          f"trained {args.epochs} epoch(s) on {args.train_count} images (Adam 1e-2)"
          f"{f', stencil_length {args.length:g}' if args.length else ''}; {machine()}; "
          f"{time.perf_counter() - t0:.0f} s.", "",
          "| stencil | move | network | rho 28/14 | MGE cost ratio 28/14 | rho 14/7 | MGE cost ratio 14/7 |",
          "|---|---|---|---|---|---|---|"]
    for r in rows:
        r14 = ("n/a | n/a" if r["rho_14_7"] is None
               else f"{r['rho_14_7']:.3f} | {predicted_cost(r['rho_14_7']):.2f}")
        md.append(f"| {r['kind']} | {r['move']} | {r['when']} | {r['rho_28_14']:.3f} | "
                  f"{predicted_cost(r['rho_28_14']):.2f} | {r14} |")
    print("\n".join(md))
    metrics = metrics_of({f"{r['kind']}/{r['move']}/{r['when']}": {k: r[k] for k in ("rho_28_14", "rho_14_7")
                                                                   if r[k] is not None} for r in rows})
    publish(args.out, args.stem, "\n".join(md), {"args": vars(args), "rows": rows}, vars(args), metrics)


if __name__ == "__main__":
    main()
