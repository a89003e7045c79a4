"""Where a consistent network moved coarse -> fine loses accuracy: one network per seed and
``stencil_scale``, trained at the coarse grid only, then, without retraining, on the fine grid:

    python benchmarks/move_gap.py --data-dir outputs/imagenette28 --scales 0.05 0.07 --seeds 0 1 2

Rows per network (validation split and test file):

* ``ceiling``: the network on the coarse images (the pyramid's ``coarsen``: its native accuracy);
* ``prefilter sigma``: moved by ``to_resolution(prefilter=sigma)`` for each ``--sigmas`` (pixels per
  level; ``handover_sigma`` is 1.2247), and the one **chosen on validation** (``choose_prefilter``)
  reported on the test file;
* ``on P(coarse)``: the moved network (no prefilter) on the coarse images prolonged -- the same
  information as the ceiling's input, so what is lost here is the network's own inconsistency
  between the two grids, not the input's bandwidth;
* ``x2 steps``: the val-chosen move with twice the Euler steps (``to_depth``, ``T`` fixed): does a
  smaller step (stability, ``dt * rho``) recover the loss?
* the layer trace: relative error, layer by layer, between the coarse network's states on coarse
  images and the moved network's states on the prolonged images, restricted (``restrict_image``).

Defaults are the Imagenette-28 settings of benchmarks/RESULTS.md ("Boundaries"): two ReLU units
16/32, Gaussian stencils, ``stencil_length`` 0.14, growth 2, the ``full-weighting-neumann`` pair.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import ROOT, machine, mean_sd, metrics_of, publish, unit_channels

from mscnn.data import Split, coarsen, mnist_splits
from mscnn.hierarchy import choose_prefilter, to_depth, to_resolution
from mscnn.ode import ODENet, activation
from mscnn.stencils import stencil_conv
from mscnn.train import accuracy, fit
from mscnn.transfer import prolong_image, restrict_image


@torch.no_grad()
def states(net: ODENet, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """``net``'s state after the opening, each connective and each Euler step, and its logits."""
    c, act = net.config, activation(net.config.activation)
    if c.input_blur:
        raise ValueError("move_gap.states: traces networks without an input blur")
    y = act(net.opening(x))
    out = [("opening", y)]
    for u, unit in enumerate(net.units):
        if u:
            y = net.connectives[u - 1](y)
            out.append((f"connective {u}", y))
        for k in range(unit.steps):
            y = y + unit.dt * act(stencil_conv(y, unit.K[k], unit.b[k], unit.stencil, unit.scale,
                                               unit.dilation, unit.length, unit.boundary))
            out.append((f"unit {u} step {k}", y))
    out.append(("logits", net.classifier(y)))
    return out


def trace(coarse: ODENet, moved: ODENet, xc: torch.Tensor, pair: str) -> dict[str, float]:
    """Relative error per layer: coarse states vs the moved network's on ``P xc``, restricted."""
    out = {}
    levels = (moved.config.n // coarse.config.n).bit_length() - 1
    xf = xc
    for _ in range(levels):
        xf = prolong_image(xf, pair)
    for (name, a), (_, b) in zip(states(coarse, xc), states(moved, xf), strict=True):
        while b.dim() == 4 and b.shape[-1] > a.shape[-1]:
            b = restrict_image(b, pair)
        out[name] = float((a - b).norm() / a.norm())
    return out


def run(scale: float, seed: int, fine: dict, args) -> dict:
    levels = (args.fine // args.coarse).bit_length() - 1
    coarse = {k: coarsen(v, levels, 1.0, args.pair) for k, v in fine.items()}
    torch.manual_seed(seed)
    net = ODENet(channels=unit_channels(args.channels), steps=args.steps, n=args.coarse,
                 stencil=args.kind, activation=args.activation, stencil_scale=scale,
                 stencil_length=args.length, stencil_scale_growth=args.growth, pair=args.pair)
    t0 = time.perf_counter()
    fit(net, coarse["train"], args.epochs, args.lr, 128, seed)
    net.eval()
    r = {"scale": scale, "seed": seed, "train_s": time.perf_counter() - t0}
    r["ceiling"] = {e: accuracy(net, coarse[e]) for e in ("val", "test")}
    best, scores = choose_prefilter(net, args.fine, fine["val"], args.sigmas)
    r["prefilter"] = {str(s): {"val": scores[s], "test": accuracy(to_resolution(net, args.fine, prefilter=s),
                                                                   fine["test"])} for s in args.sigmas}
    r["chosen_sigma"] = best
    moved = to_resolution(net, args.fine)
    r["on_P_coarse"] = {e: accuracy(moved, _prolonged(coarse[e], levels, args.pair)) for e in ("val", "test")}
    deeper = to_depth(to_resolution(net, args.fine, prefilter=best), 2 * args.steps)
    r["x2_steps"] = {e: accuracy(deeper, fine[e]) for e in ("val", "test")}
    r["trace"] = trace(net, moved, coarse["val"].x, args.pair)
    return r


def _prolonged(d: Split, levels: int, pair: str) -> Split:
    x = d.x
    for _ in range(levels):
        x = prolong_image(x, pair)
    return Split(x, d.y)


def tables(results: list[dict], args) -> str:
    out = ["| stencil_scale | ceiling (coarse net on coarse) | moved, prefilter 1.2247 | moved, prefilter "
           "chosen on val (sigmas chosen) | under ceiling | moved on P(coarse) | chosen, x2 Euler steps |",
           "|---|---|---|---|---|---|---|"]
    for scale in args.scales:
        rs = [r for r in results if r["scale"] == scale]

        def pct(vals):
            return mean_sd([100 * v for v in vals])

        ceil = [r["ceiling"]["test"] for r in rs]
        chosen = [r["prefilter"][str(r["chosen_sigma"])]["test"] for r in rs]
        hs = [r["prefilter"]["1.2247"]["test"] for r in rs] if "1.2247" in rs[0]["prefilter"] else None
        gap = statistics.mean(ceil) - statistics.mean(chosen)
        out.append(f"| {scale} | {pct(ceil)} | {pct(hs) if hs else '-'} | {pct(chosen)} "
                   f"({', '.join(str(r['chosen_sigma']) for r in rs)}) | {100 * gap:.2f} | "
                   f"{pct([r['on_P_coarse']['test'] for r in rs])} | "
                   f"{pct([r['x2_steps']['test'] for r in rs])} |")
    layers = list(results[0]["trace"])
    out += ["", "Layer trace (validation images): relative error of the moved network's restricted states "
            "against the coarse network's, mean over seeds:", "",
            "| stencil_scale | " + " | ".join(layers) + " |", "|---|" + "---|" * len(layers)]
    for scale in args.scales:
        rs = [r for r in results if r["scale"] == scale]
        out.append(f"| {scale} | " + " | ".join(f"{statistics.mean(r['trace'][k] for r in rs):.3f}"
                                                for k in layers) + " |")
    out += ["", "Prefilter sweep, test file % (validation %), per seed:", "",
            "| stencil_scale | seed | " + " | ".join(f"sigma {s}" for s in args.sigmas) + " |",
            "|---|---|" + "---|" * len(args.sigmas)]
    for r in results:
        out.append(f"| {r['scale']} | {r['seed']} | " + " | ".join(
            f"{100 * r['prefilter'][str(s)]['test']:.2f} ({100 * r['prefilter'][str(s)]['val']:.1f})"
            for s in args.sigmas) + " |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-dir", default=None, help="an MNIST-format IDX folder (default: MNIST)")
    ap.add_argument("--scales", type=float, nargs="+", default=[0.05, 0.07])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sigmas", type=float, nargs="+", default=[0.8, 1.0, 1.2247, 1.5, 1.8, 2.2])
    ap.add_argument("--coarse", type=int, default=14)
    ap.add_argument("--fine", type=int, default=28)
    ap.add_argument("--kind", default="gaussian")
    ap.add_argument("--channels", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--activation", default="relu")
    ap.add_argument("--length", type=float, default=0.14)
    ap.add_argument("--growth", type=float, default=2.0)
    ap.add_argument("--pair", default="full-weighting-neumann")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--n-val", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--stem", default="move_gap")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    d = mnist_splits(args.data_dir, n_val=args.n_val)
    fine = {k: d[k] for k in ("train", "val", "test")}
    t0, results = time.perf_counter(), []
    for scale in args.scales:
        for seed in args.seeds:
            r = run(scale, seed, fine, args)
            print(f"scale {scale} seed {seed}: ceiling {100 * r['ceiling']['test']:.2f}, chosen sigma "
                  f"{r['chosen_sigma']} -> {100 * r['prefilter'][str(r['chosen_sigma'])]['test']:.2f}, "
                  f"on P(coarse) {100 * r['on_P_coarse']['test']:.2f}", flush=True)
            results.append(r)
    head = (f"{args.data_dir or 'MNIST'}: {args.kind} networks trained at {args.coarse}x{args.coarse} only "
            f"({len(fine['train'])} images, {args.epochs} epochs, Adam {args.lr} cosine, "
            f"channels {args.channels}, "
            f"{args.steps} steps, {args.activation}, stencil_length {args.length}, growth {args.growth}, "
            f"pair {args.pair}), moved to {args.fine}x{args.fine} without retraining; seeds {args.seeds}; "
            f"{machine()}; {time.perf_counter() - t0:.0f} s.")
    md = head + "\n\nTest file % (mean +- sd over seeds):\n\n" + tables(results, args)
    keep = ("ceiling", "on_P_coarse", "x2_steps")
    metrics = metrics_of({f"s{r['scale']}/seed{r['seed']}": {k: r[k] for k in keep} for r in results})
    publish(args.out, args.stem, md, {"args": vars(args), "results": results}, vars(args), metrics)


if __name__ == "__main__":
    main()
