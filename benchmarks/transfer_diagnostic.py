"""Why a network moved across resolution loses accuracy: input bandwidth, stability of the Euler
steps, or the missing continuum limit of free 3x3 stencils (issue 14, the diagnostic).

    python benchmarks/transfer_diagnostic.py --seeds 0 --pairs 14:28 7:28 [--kinds free gaussian]

Per seed and pair, one network trained at the coarse and one at the fine resolution (coarse images
= the pyramid's ``restrict(blur(x, 1 fine pixel))`` per level, ``mscnn.data.coarsen``); each moved
to the other grid without retraining by every stencil map x Euler steps after the move x (coarse
-> fine only) a prefilter of the fine input:

* maps: ``naive`` (stencils kept), ``galerkin`` (the paper), ``galerkin-steps`` (Galerkin on the
  Euler steps only, the opening layer kept), ``regularised`` (prolongation with ``lam``); a
  consistent stencil kind is re-discretised (``consistent``);
* steps: ``N``, ``2N``, ``4N`` (``to_depth``: ``T`` fixed, parameters interpolated in time) and
  ``cfl`` (``mscnn.diagnostics.cfl_steps``: as many as keep ``dt * ||L||`` at the source network's);
* prefilter: ``none``, ``PRx`` (the fine input restricted to the coarse grid and prolonged back: the
  coarse network's bandwidth exactly) and ``gaussian`` (blurred as the pyramid blurs, 1 pixel per
  level in quadrature).

With the ceiling rows (the input resampled to the network's own grid, the native network run) and,
for every moved network, ``dt * ||L||`` (largest over steps, ``mscnn.diagnostics.step_norms``) and
the RMS of the final state on 1,000 test images against the source network's on its own images.
The conclusion splits the loss (ceiling - best map at N steps, no prefilter, chosen on validation)
into what a prefilter recovers (bandwidth), what more steps recover (stability) and the rest.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import ROOT, machine, metrics_of, publish

from mscnn.data import Split, coarsen, mnist_splits
from mscnn.diagnostics import cfl_steps, state_rms, step_norms
from mscnn.hierarchy import to_depth, to_resolution
from mscnn.ode import ODENet
from mscnn.train import accuracy, fit
from mscnn.transfer import gaussian_blur, prolong_image, restrict_image

MAPS = {
    "naive": dict(naive=True),
    "galerkin": {},
    "galerkin-steps": dict(galerkin=["units"]),
    "regularised": dict(lam=0.3),
}
PREFILTERS = ("none", "PRx", "gaussian")


def _resample(x: torch.Tensor, levels: int) -> torch.Tensor:
    """``levels > 0``: prolong that many times; ``< 0``: restrict."""
    for _ in range(abs(levels)):
        x = prolong_image(x) if levels > 0 else restrict_image(x)
    return x


def _prefilter(name: str, d: Split, levels: int) -> Split:
    if name == "PRx":
        return Split(_resample(_resample(d.x, -levels), levels), d.y)
    if name == "gaussian":
        return Split(gaussian_blur(d.x, float(levels) ** 0.5), d.y)
    return d


def _moved_variants(src: ODENet, n: int, kind: str, lam: float):
    maps = (
        {k: v for k, v in MAPS.items() if n > src.n or k != "regularised"}
        if kind == "free"
        else {"consistent": {}}
    )
    for name, kw in maps.items():
        kw = dict(kw, lam=lam) if name == "regularised" else kw
        moved = to_resolution(src, n, **kw)
        N = moved.config.unit_steps[0]
        cfl = cfl_steps(moved, src)[0]
        for label, s in (("N", N), ("2N", 2 * N), ("4N", 4 * N), (f"cfl ({cfl})", cfl)):
            yield name, label, (moved if s == N else to_depth(moved, s))


def run_pair(kind: str, n_c: int, n_f: int, data: dict, args, seed: int) -> list[dict]:
    levels = (n_f // n_c).bit_length() - 1
    fine = {k: data[k] for k in ("train", "val", "test")}
    coarse = {k: coarsen(v, levels, 1.0) for k, v in fine.items()}
    nets = {}
    for n, d in ((n_c, coarse), (n_f, fine)):
        torch.manual_seed(seed)
        net = ODENet(channels=args.channels, steps=args.steps, n=n, stencil=kind, stencil_scale=args.scale)
        fit(net, d["train"], args.epochs, args.lr, 128, seed)
        nets[n] = net.eval()
    probe = {n: d["test"].x[:1000] for n, d in ((n_c, coarse), (n_f, fine))}
    rms_layers = {n: state_rms(nets[n], probe[n]) for n in nets}
    rms_src = {n: v[-1] for n, v in rms_layers.items()}
    rows = []

    def add(direction, method, steps, prefilter, net, split_of, src_n):
        r = {
            "kind": kind,
            "pair": f"{n_c}:{n_f}",
            "seed": seed,
            "direction": direction,
            "method": method,
            "steps": steps,
            "prefilter": prefilter,
        }
        for ev in ("val", "test"):
            r[ev] = accuracy(net, split_of(ev))
        if net is not nets.get(net.n):
            r["dt_rho"] = max(max(u) for u in step_norms(net))
            x = (
                probe[net.n]
                if prefilter == "none"
                else _prefilter(prefilter, Split(probe[net.n], fine["test"].y[:1000]), levels).x
            )
            layers = state_rms(net, x)  # opening, then every Euler step (the JSON keeps them all)
            r["rms_layers"], r["rms_src_layers"] = layers, rms_layers[src_n]
            r["rms_ratio"] = layers[-1] / rms_src[src_n]
        rows.append(r)
        print(
            f"seed {seed} {r['pair']} {kind:8s} {direction:13s} {method:15s} {steps:8s} {prefilter:9s} "
            f"test {100 * r['test']:6.2f}%  dt*rho {r.get('dt_rho', float('nan')):6.2f}  "
            f"rms {r.get('rms_ratio', float('nan')):5.2f}",
            flush=True,
        )

    src_rho = {n: max(max(u) for u in step_norms(nets[n])) for n in nets}
    add("coarse->fine", "ceiling", "N", "none", nets[n_c], lambda e: coarse[e], n_c)
    add(
        "fine->coarse",
        "ceiling",
        "N",
        "none",
        nets[n_f],
        lambda e: Split(_resample(coarse[e].x, levels), coarse[e].y),
        n_f,
    )
    for method, steps, net in _moved_variants(nets[n_c], n_f, kind, args.lam):
        for pf in PREFILTERS:
            add("coarse->fine", method, steps, pf, net, lambda e, pf=pf: _prefilter(pf, fine[e], levels), n_c)
    for method, steps, net in _moved_variants(nets[n_f], n_c, kind, args.lam):
        add("fine->coarse", method, steps, "none", net, lambda e: coarse[e], n_f)
    for r in rows:
        r["src_dt_rho"] = src_rho[n_c if r["direction"] == "coarse->fine" else n_f]
    return rows


def _mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if key in r]
    return statistics.mean(vals) if vals else float("nan")


def tables(rows: list[dict]) -> str:
    out = []
    for pair in dict.fromkeys(r["pair"] for r in rows):
        for kind in dict.fromkeys(r["kind"] for r in rows):
            sel = [r for r in rows if r["pair"] == pair and r["kind"] == kind]
            for direction in ("coarse->fine", "fine->coarse"):
                d = [r for r in sel if r["direction"] == direction]
                src = _mean([r for r in d if r["method"] == "ceiling"], "src_dt_rho")
                ceil = 100 * _mean([r for r in d if r["method"] == "ceiling"], "test")
                pfs = PREFILTERS if direction == "coarse->fine" else ("none",)
                out += [
                    f"**{pair}, {kind}, {direction}** (test %, mean over seeds; ceiling {ceil:.2f}; "
                    f"the source network's dt * rho {src:.2f})",
                    "",
                    "| map | steps | "
                    + " | ".join(f"prefilter {p}" for p in pfs)
                    + " | dt * rho | final-state RMS / source's |",
                    "|---|---|" + "---|" * len(pfs) + "---|---|",
                ]
                keys = dict.fromkeys(
                    (r["method"], r["steps"].split(" ")[0]) for r in d if r["method"] != "ceiling"
                )
                for m, s in keys:
                    cell = [r for r in d if r["method"] == m and r["steps"].split(" ")[0] == s]
                    accs = [
                        f"{100 * _mean([r for r in cell if r['prefilter'] == p], 'test'):.2f}" for p in pfs
                    ]
                    label = (
                        s
                        if s != "cfl"
                        else "cfl (" + "/".join(sorted({r["steps"][5:-1] for r in cell})) + ")"
                    )
                    none = [r for r in cell if r["prefilter"] == "none"]
                    out.append(
                        f"| {m} | {label} | {' | '.join(accs)} | {_mean(none, 'dt_rho'):.2f} | "
                        f"{_mean(none, 'rms_ratio'):.2f} |"
                    )
                out.append("")
    return "\n".join(out)


def shares(rows: list[dict]) -> str:
    """The loss of the best plain move (chosen on validation) split into what a prefilter and what
    more steps recover; 'rest' is what neither does (the continuum limit)."""
    out = [
        "| pair | stencil | ceiling | best plain move (map) | + best prefilter | + best steps | "
        "+ both | bandwidth share | stability share | rest |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pair in dict.fromkeys(r["pair"] for r in rows):
        for kind in dict.fromkeys(r["kind"] for r in rows):
            d = [
                r
                for r in rows
                if r["pair"] == pair and r["kind"] == kind and r["direction"] == "coarse->fine"
            ]
            ceil = _mean([r for r in d if r["method"] == "ceiling"], "test")
            moved = [r for r in d if r["method"] != "ceiling"]

            def best(pred, moved=moved):
                cells = {}
                for r in moved:
                    if pred(r):
                        cells.setdefault((r["method"], r["steps"].split(" ")[0], r["prefilter"]), []).append(
                            r
                        )
                k = max(cells, key=lambda c: _mean(cells[c], "val"))
                return _mean(cells[k], "test"), k

            base, bk = best(lambda r: r["steps"] == "N" and r["prefilter"] == "none")
            pf, _ = best(lambda r: r["steps"] == "N")
            st, _ = best(lambda r: r["prefilter"] == "none")
            both, _ = best(lambda r: True)
            loss = ceil - base
            if loss <= 0:
                continue
            bw, stab = max(0.0, pf - base), max(0.0, st - base)
            out.append(
                f"| {pair} | {kind} | {100 * ceil:.2f} | {100 * base:.2f} ({bk[0]}) | {100 * pf:.2f} | "
                f"{100 * st:.2f} | {100 * both:.2f} | {100 * bw / loss:.0f}% | {100 * stab / loss:.0f}% | "
                f"{100 * max(0.0, ceil - both) / loss:.0f}% |"
            )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kinds", nargs="+", default=["free"])
    ap.add_argument("--pairs", nargs="+", default=["14:28", "7:28"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-count", type=int, default=50_000)
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--scale", type=float, default=0.05, help="stencil_scale of the consistent kinds")
    ap.add_argument(
        "--lam", type=float, default=0.3, help="regularised prolongation (chosen on val, issue 9)"
    )
    ap.add_argument("--val-count", type=int, default=2_000, help="validation images used for choices")
    ap.add_argument("--stem", default="transfer_diagnostic", help="name of the result files")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    d = mnist_splits(args.data_dir)
    data = {
        "train": Split(d["train"].x[: args.train_count], d["train"].y[: args.train_count]),
        "val": Split(d["val"].x[: args.val_count], d["val"].y[: args.val_count]),
        "test": d["test"],
    }
    rows, t0 = [], time.perf_counter()
    for seed in args.seeds:
        for pair in args.pairs:
            n_c, n_f = (int(v) for v in pair.split(":"))
            for kind in args.kinds:
                rows += run_pair(kind, n_c, n_f, data, args, seed)
    head = (
        f"MNIST, networks trained at one resolution, moved without retraining: stencil map x Euler "
        f"steps after the move x prefilter; {len(data['train'])} training images, Adam lr {args.lr} "
        f"cosine, {args.epochs} epochs, {args.val_count} validation images, {args.channels} channels, "
        f"N = {args.steps} steps, lam "
        f"{args.lam}; seeds {args.seeds}; {machine()}; {time.perf_counter() - t0:.0f} s."
    )
    md = "\n\n".join(
        [
            head,
            "Where the loss goes (coarse -> fine; choices on validation, numbers on test):",
            shares(rows),
            tables(rows),
        ]
    )
    print("\n" + md)
    metrics = metrics_of(
        {
            f"{r['pair']}/{r['kind']}/{r['direction']}/{r['method']}/{r['steps'].split(' ')[0]}/"
            f"{r['prefilter']}/s{r['seed']}": {"test": r["test"]}
            for r in rows
        }
    )
    publish(args.out, args.stem, md, {"args": vars(args), "rows": rows}, vars(args), metrics)


if __name__ == "__main__":
    main()
