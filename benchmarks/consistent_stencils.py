"""Networks trained at one resolution, moved to another without retraining: stencil kinds
(``ODENetConfig.stencil``) against the paper's Galerkin transfer and the naive one, with the
ceiling rows and a prefilter, on MNIST.

    python benchmarks/consistent_stencils.py --kinds free moment gaussian moment-blur \\
        --pairs 14:28 7:28 --epochs 3 --seeds 0 [--train-count 50000] [--threads 2]

For each kind and seed: one network trained at the coarse and one at the fine resolution of each
pair (coarse images = the pyramid's ``restrict(blur(x, 1 fine pixel))`` per level, ``coarsen``),
then every row on the test file (and val):

* ``native``: each network on its own images;
* ``ceiling``: resample the input to the network's own grid and run the native network
  (coarse->fine: the coarse network on the restricted fine images, i.e. its native accuracy;
  fine->coarse: the fine network on prolonged coarse images);
* moved networks: ``free`` with ``naive`` and ``galerkin`` (``to_resolution``); consistent kinds
  with ``to_resolution`` (re-discretised, nothing to choose); each coarse->fine move also with a
  ``prefilter``: the moved network's own input blur (``to_resolution(prefilter=1)``, the pyramid's
  blur between the two grids: 1 px for 14 -> 28, 2.24 px for 7 -> 28); ``free`` coarse->fine also
  ``dilate`` (``to_resolution(dilate=True)``: the stencils' taps kept at their physical offsets),
  with and without the same prefilter;
* ``--fine-blur``: one more fine network per kind, trained on its own grid with the coarse
  bandwidth built in (``ODENetConfig.input_blur`` = the pyramid's blur between the grids), moved
  down with ``prefilter=1`` (the blur taken off): rows ``<method> (fine net: coarse bandwidth)``;
* ``--fine-dilated`` (free stencils): one more fine network trained on its own grid with the coarse
  bandwidth and the coarse footprint (``dilation`` = the grid ratio: taps as far apart as the coarse
  grid's pixels), moved down by ``dilate`` with the blur taken off. ``--fine-sigma`` sets the
  per-level blur built into these two networks (default 1 px, the pyramid's Gaussian;
  ``handover_sigma``, 1.2247 px, adds the full-weighting restriction's own smoothing).

Also per kind: training images/s at each resolution (the same loop, ``mscnn.train.fit``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import ROOT, machine, metrics_of, publish, unit_channels

from mscnn.data import Split, coarsen, mnist_splits
from mscnn.hierarchy import pyramid_blur, to_resolution
from mscnn.ode import ODENet
from mscnn.train import accuracy, fit
from mscnn.transfer import prolong_image


def _prolong(d: Split, levels: int) -> Split:
    x = d.x
    for _ in range(levels):
        x = prolong_image(x)
    return Split(x, d.y)


def run_pair(kind: str, n_c: int, n_f: int, data: dict, args, seed: int) -> list[dict]:
    levels = (n_f // n_c).bit_length() - 1
    fine = {k: data[k] for k in ("train", "val", "test")}
    coarse = {k: coarsen(v, levels, 1.0, args.pair) for k, v in fine.items()}
    nets, speed = {}, {}
    nets_to_train = [(n_c, coarse, 0.0, 1), (n_f, fine, 0.0, 1)]
    if args.fine_blur:
        nets_to_train.append((n_f, fine, pyramid_blur(n_c, n_f, args.fine_sigma), 1))
    if args.fine_dilated and kind == "free":
        nets_to_train.append((n_f, fine, pyramid_blur(n_c, n_f, args.fine_sigma), 2**levels))
    for n, d, input_blur, dilation in nets_to_train:
        torch.manual_seed(seed)
        net = ODENet(channels=unit_channels(args.channels), steps=args.steps, n=n, stencil=kind,
                     activation=args.activation,
                     stencil_scale=args.scale, stencil_length=args.length, input_blur=input_blur,
                     pair=args.pair, stencil_scale_growth=args.scale_growth,
                     dilation=dilation,
                     subgrid_connectives=args.subgrid_connectives)
        t0 = time.perf_counter()
        hist = fit(net, d["train"], args.epochs, args.lr, 128, seed)
        key = n if not input_blur else f"{n} blurred" + " dilated" * (dilation > 1)
        speed[key] = {"images_per_s": statistics.median(h["images_per_s"] for h in hist),
                      "seconds": time.perf_counter() - t0}
        nets[key] = net
    rows = []

    def row(direction, method, net, split_of):
        for ev in ("val", "test"):
            rows.append({"kind": kind, "pair": f"{n_c}:{n_f}", "seed": seed, "direction": direction,
                         "method": method, "eval": ev, "accuracy": accuracy(net, split_of(ev))})

    row("coarse", "native", nets[n_c], lambda e: coarse[e])
    row("fine", "native", nets[n_f], lambda e: fine[e])
    row("coarse->fine", "ceiling", nets[n_c], lambda e: coarse[e])
    row("fine->coarse", "ceiling", nets[n_f], lambda e: _prolong(coarse[e], levels))
    if args.fine_blur:
        row("fine", "native (fine net: coarse bandwidth)", nets[f"{n_f} blurred"], lambda e: fine[e])
    moves = [("naive", True), ("galerkin", False)] if kind == "free" else [("consistent", False)]
    for method, naive in moves:
        row("coarse->fine", method, to_resolution(nets[n_c], n_f, naive=naive), lambda e: fine[e])
        # the moved network's own input blur: the same prefilter as the dilate row's
        row("coarse->fine", method + " + prefilter",
            to_resolution(nets[n_c], n_f, naive=naive, prefilter=args.up_sigma), lambda e: fine[e])
        row("fine->coarse", method, to_resolution(nets[n_f], n_c, naive=naive), lambda e: coarse[e])
        if args.fine_blur:
            bl = nets[f"{n_f} blurred"]
            row("fine->coarse", f"{method} (fine net: coarse bandwidth)",
                to_resolution(bl, n_c, naive=naive, prefilter=args.fine_sigma), lambda e: coarse[e])
    if f"{n_f} blurred dilated" in nets:
        dl = nets[f"{n_f} blurred dilated"]
        row("fine", "native (fine net: dilated, coarse bandwidth)", dl, lambda e: fine[e])
        row("fine->coarse", "dilate (fine net: dilated, coarse bandwidth)",
            to_resolution(dl, n_c, dilate=True, prefilter=args.fine_sigma), lambda e: coarse[e])
    if kind == "free":
        up = to_resolution(nets[n_c], n_f, dilate=True)
        row("coarse->fine", "dilate", up, lambda e: fine[e])
        up = to_resolution(nets[n_c], n_f, dilate=True, prefilter=args.up_sigma)
        row("coarse->fine", "dilate + prefilter", up, lambda e: fine[e])
    for r in rows:
        r["speed"] = speed
    return rows


def table(rows: list[dict], ev: str) -> str:
    keys = list(dict.fromkeys((r["pair"], r["direction"], r["kind"], r["method"]) for r in rows))
    out = [f"| pair | direction | stencil | method | {ev} accuracy % (mean +- sd) | seeds |",
           "|---|---|---|---|---|---|"]
    for k in keys:
        accs = [100 * r["accuracy"] for r in rows
                if (r["pair"], r["direction"], r["kind"], r["method"]) == k and r["eval"] == ev]
        sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
        out.append(f"| {' | '.join(k)} | {statistics.mean(accs):.2f} +- {sd:.2f} | {len(accs)} |")
    return "\n".join(out)


def speed_table(rows: list[dict]) -> str:
    """Images/s inside the training runs, for scale only: the kinds ran one after another, so no
    ratio between them is given here (the alternating table gives those)."""
    out = ["| stencil | pair | resolution | training images/s (median epoch) |", "|---|---|---|---|"]
    seen = {}
    for r in rows:
        for n, s in r["speed"].items():
            seen.setdefault((r["kind"], r["pair"], n), []).append(s["images_per_s"])
    for (kind, pair, n), v in seen.items():
        out.append(f"| {kind} | {pair} | {n} | {statistics.median(v):.0f} |")
    return "\n".join(out)


def speed_alternating(kinds: list[str], sizes: list[int], args, batches: int = 20) -> str:
    """Training images/s of each kind, measured A B C A B C ... (``--speed-repeats`` rounds of
    ``batches`` Adam steps each, batch 128) so machine noise hits every kind alike; the ratio to
    ``free`` is per round, reported as median [min-max]."""
    from mscnn.train import TorchStep

    out = ["| resolution | stencil | images/s (median) | vs free: median [min-max] |", "|---|---|---|---|"]
    for n in sizes:
        nets, rate = {}, {k: [] for k in kinds}
        for k in kinds:
            torch.manual_seed(0)
            net = ODENet(channels=unit_channels(args.channels), steps=args.steps, n=n, stencil=k,
                         stencil_scale=args.scale, stencil_scale_growth=args.scale_growth,
                         pair=args.pair, activation=args.activation)
            nets[k] = (net, TorchStep(net, torch.optim.Adam(net.parameters(), 1e-3)))
        x, y = torch.randn(128, 1, n, n), torch.randint(0, 10, (128,))
        for _ in range(args.speed_repeats):
            for k in kinds:
                net, step = nets[k]
                step(x, y)  # warm
                t0 = time.perf_counter()
                for _ in range(batches):
                    step(x, y)
                rate[k].append(128 * batches / (time.perf_counter() - t0))
        for k in kinds:
            ratios = [a / b for a, b in zip(rate[k], rate.get("free", rate[k]), strict=True)]
            out.append(f"| {n} | {k} | {statistics.median(rate[k]):.0f} | {statistics.median(ratios):.2f}x "
                       f"[{min(ratios):.2f}-{max(ratios):.2f}] |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", nargs="+", default=["free", "moment", "gaussian", "moment-blur"])
    ap.add_argument("--pairs", nargs="+", default=["14:28", "7:28"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-count", type=int, default=50_000)
    ap.add_argument("--channels", type=int, nargs="+", default=[16], help="channels per unit")
    ap.add_argument("--subgrid-connectives", action="store_true",
                    help="ODENetConfig.subgrid_connectives (several units: a dilated network's "
                         "connectives restrict each sub-grid on its own)")
    ap.add_argument("--activation", default="tanh")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--scale", type=float, default=0.05, help="stencil_scale (image widths)")
    ap.add_argument("--scale-growth", type=float, default=1.0,
                    help="stencil_scale_growth: unit u's sigma is scale * growth**u")
    ap.add_argument("--pair", default="full-weighting",
                    help="transfer pair of the pyramid and the networks (full-weighting-neumann: "
                         "no darkened border, Neumann boundaries in the consistent stencils)")
    ap.add_argument("--up-sigma", type=float, default=1.0,
                    help="the coarse -> fine moves' prefilter in fine pixels (1.2247: handover_sigma)")
    ap.add_argument("--length", type=float, default=None,
                    help="stencil_length (image widths): the consistent kinds' normalising length")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--speed-repeats", type=int, default=5, help="alternating speed rounds (0: none)")
    ap.add_argument("--speed-only", action="store_true", help="only the alternating speed table")
    ap.add_argument("--fine-blur", action="store_true",
                    help="also a fine network trained with the coarse bandwidth built in, moved down")
    ap.add_argument("--fine-dilated", action="store_true",
                    help="also a free fine network with the coarse footprint and bandwidth, moved down")
    ap.add_argument("--fine-sigma", type=float, default=1.0,
                    help="per-level blur (px) built into the --fine-blur/--fine-dilated networks and "
                         "taken off on their way down: 1 = the pyramid's Gaussian, 1.2247 = "
                         "handover_sigma (the Gaussian and the full-weighting restriction)")
    ap.add_argument("--stem", default="consistent_stencils", help="results file name")
    ap.add_argument("--n-val", type=int, default=10_000,
                    help="validation images drawn from the training file (mnist_splits)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    sizes = sorted({int(v) for p in args.pairs for v in p.split(":")})
    speed = speed_alternating(args.kinds, sizes, args) if args.speed_repeats else ""
    if args.speed_only:
        head = (f"Training images/s per stencil kind, alternating, {args.speed_repeats} rounds of 20 Adam "
                f"steps (batch 128), {args.channels} channels, {args.steps} steps; {machine()}.")
        publish(args.out, "consistent_stencils_speed", head + "\n\n" + speed, {"args": vars(args)},
                vars(args), {})
        return
    d = mnist_splits(args.data_dir, n_val=args.n_val)
    data = {"train": Split(d["train"].x[: args.train_count], d["train"].y[: args.train_count]),
            "val": d["val"], "test": d["test"]}
    rows, t0 = [], time.perf_counter()
    for seed in args.seeds:
        for pair in args.pairs:
            n_c, n_f = (int(v) for v in pair.split(":"))
            for kind in args.kinds:
                new = run_pair(kind, n_c, n_f, data, args, seed)
                for r in new:
                    if r["eval"] == "test":
                        print(f"seed {seed} {pair} {kind:11s} {r['direction']:13s} {r['method']:22s} "
                              f"{100 * r['accuracy']:6.2f}%", flush=True)
                rows += new
    head = (f"{args.data_dir or 'MNIST'}, networks trained at one resolution and moved without retraining; "
            f"{len(data['train'])} training images, Adam lr {args.lr} cosine, {args.epochs} epochs, "
            f"{args.channels} channels, {args.steps} steps, {args.activation}, "
            f"{'sub-grid connectives, ' if args.subgrid_connectives else ''}"
            f"{f'fine nets blurred {args.fine_sigma} px per level, ' if args.fine_sigma != 1 else ''}"
            f"stencil_scale {args.scale}{f', stencil_length {args.length}' if args.length else ''}"
            f"{f', growth {args.scale_growth} per unit' if args.scale_growth != 1 else ''}, "
            f"pair {args.pair}, "
            f"coarse -> fine prefilter {args.up_sigma} px; seeds "
            f"{args.seeds}; {machine()}; {time.perf_counter() - t0:.0f} s.")
    md = "\n\n".join([head, "Test file:", table(rows, "test"), "Validation:", table(rows, "val"),
                      "Cost inside the training runs above (not alternated):", speed_table(rows),
                      "Cost, alternating (fair ratios):", speed])
    print("\n" + md)
    metrics = metrics_of({f"{r['pair']}/{r['kind']}/{r['direction']}/{r['method']}/{r['eval']}/s{r['seed']}":
                          {"accuracy": r["accuracy"]} for r in rows})
    publish(args.out, args.stem, md, {"args": vars(args), "rows": rows}, vars(args), metrics)


if __name__ == "__main__":
    main()
