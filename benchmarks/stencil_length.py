"""How the consistent kinds' normalising length ``L`` (``ODENetConfig.stencil_length``) changes their
native accuracy: the choice of ``L`` made on validation, against free 3x3 stencils.

    python benchmarks/stencil_length.py [--n 14] [--kinds moment-blur gaussian] \\
        [--lengths 0 0.07 0.1 0.14 0.2] [--seeds 0] [--epochs 3] [--threads 1]

Every ``L`` spans the same operators (``theta_a L^|a|`` is what acts: tests/test_stencils.py); it only
sets how large a derivative term one optimiser step makes. The networks and data are
``consistent_stencils.py``'s (16 channels, 2 Euler steps, tanh, Adam 1e-2 cosine, batch 128, the
pyramid's split; at ``n`` < 28 the pyramid's ``restrict(blur(x, 1 px))`` images); ``0`` in
``--lengths`` is the default (``L = stencil_scale``). Rows: validation and test accuracy per seed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import ROOT, machine, metrics_of, publish

from mscnn.data import coarsen, mnist_splits
from mscnn.ode import ODENet
from mscnn.train import accuracy, fit


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=14, choices=[7, 14, 28])
    ap.add_argument("--kinds", nargs="+", default=["moment-blur", "gaussian"])
    ap.add_argument("--lengths", type=float, nargs="+", default=[0, 0.07, 0.1, 0.14, 0.2])
    ap.add_argument("--scale", type=float, default=0.05, help="stencil_scale (the Gaussian's sigma)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--stem", default="stencil_length")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    levels = (28 // args.n).bit_length() - 1
    data = {k: coarsen(v, levels, 1.0) if levels else v for k, v in mnist_splits(args.data_dir).items()}
    variants = [("free", None)] + [(k, L or None) for k in args.kinds for L in args.lengths]
    rows, t0 = [], time.perf_counter()
    for seed in args.seeds:
        for kind, length in variants:
            torch.manual_seed(seed)
            net = ODENet(channels=16, steps=2, n=args.n, activation="tanh", stencil=kind,
                         stencil_scale=args.scale, stencil_length=length)
            fit(net, data["train"], args.epochs, 1e-2, 128, seed)
            r = {"kind": kind, "length": length, "seed": seed,
                 "val": accuracy(net, data["val"]), "test": accuracy(net, data["test"])}
            shown = "-" if kind == "free" else f"{length or args.scale:g}"
            print(f"seed {seed} {kind:11s} L={shown:<6s} val {100 * r['val']:.2f}% "
                  f"test {100 * r['test']:.2f}%", flush=True)
            rows.append(r)
    head = (f"MNIST at {args.n}x{args.n}, native accuracy per stencil_length L (image widths; "
            f"{args.n * args.scale:g} px is sigma = stencil_scale {args.scale:g}), {args.epochs} epochs, "
            f"seeds {args.seeds}; {machine()}; {time.perf_counter() - t0:.0f} s.")
    out = [head, "", "| stencil | L (widths) | L (px) | val % (mean) | test % (mean) | per seed, val / test |"
           "\n|---|---|---|---|---|---|"]
    for kind, length in variants:
        rs = [r for r in rows if r["kind"] == kind and r["length"] == length]
        L = length or args.scale
        out.append(f"| {kind} | {'-' if kind == 'free' else f'{L:g}'} | "
                   f"{'-' if kind == 'free' else f'{L * args.n:.2f}'} | "
                   f"{100 * statistics.mean(r['val'] for r in rs):.2f} | "
                   f"{100 * statistics.mean(r['test'] for r in rs):.2f} | "
                   + ", ".join(f"{100 * r['val']:.2f} / {100 * r['test']:.2f}" for r in rs) + " |")
    md = "\n".join(out)
    metrics = metrics_of({f"{r['kind']}/L{r['length'] or args.scale:g}/s{r['seed']}":
                          {"val": r["val"], "test": r["test"]} for r in rows})
    publish(args.out, args.stem, md, {"args": vars(args), "rows": rows}, vars(args), metrics)


if __name__ == "__main__":
    main()
