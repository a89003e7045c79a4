"""Algorithm 1 vs single-scale training on MNIST (or Imagenette): wall-clock and fine-grid-equivalent
compute to reach validation accuracy targets, with 1, 2 and 3 levels.

    python benchmarks/multiscale_training.py [--epochs 8 4 6] [--targets 0.97 0.98 0.99] \
        [--stencils free gaussian] [--repeats 3] [--plans 1 2]
    python benchmarks/multiscale_training.py --data imagenette --size 128 --channels 16 32 64 ...

``--data imagenette``: the staged Imagenette folder (``train/``, ``val/``; ``MSCNN_DATA_DIR`` or
``--data-dir``) read at ``--size`` (fine) in RGB; levels at size/2 and size/4. Below, "28" stands for
the fine size.

Plain PyTorch (``mscnn.train.fit``; the Ray pipeline runs the same per-level loop, see
``system_overhead.py`` for its cost). 1 level: ``--epochs[0]`` epochs at 28x28. 2 levels:
``--epochs[1]`` at 14x14, ``to_resolution`` (``--transfer``), then ``--epochs[2]`` at 28x28. 3 levels:
``--epochs[1]`` at 7x7 and at 14x14, then ``--epochs[2]`` at 28x28. Adam lr 1e-2, cosine per level,
batch 128, 50,000 training images (coarse = full-weighting restriction of the blurred image, sigma
1, as in the pyramid); validation accuracy on 10,000 images after every epoch. Compute counts an
epoch at ``n`` as ``(n / 28)^2`` fine epochs. ``--stencils``: the networks' stencil kinds, each
plan run with each (``mscnn.stencils``; consistent kinds are moved by re-discretisation,
``--transfer`` applies to ``free``). ``--repeats R``: the plans run R times in alternating
order (A B A B ...), and the table gives the median time to each target with its min-max
spread, so the ratios are fair on a noisy machine. ``--prefilter 0 1``: each multilevel plan also
with the prefiltered handover (``to_resolution(prefilter=1)``: the moved network blurs its input as
the pyramid blurred the coarse images, ``ODENetConfig.input_blur``, and keeps doing so).
``--transfer dilate``: free stencils keep their taps' physical offsets (``to_resolution(dilate=True)``).
``--dilation 2``: networks started at the fine grid get the coarse footprint (taps 2 pixels apart,
the pyramid's blur as input blur), the network the dilating handover gives. ``--mge 96 32``: one
more plan, the single level trained by multilevel gradient estimation (``mscnn.mge``; 96 images at
the coarse grid, 32 at both grids per batch; compute counts its pixels).
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from pathlib import Path

import torch
from common import ROOT, alternate, fmt_ratio, machine, paired_ratio, publish, unit_channels

from mscnn.data import (
    Split,
    coarsen,
    find_data_dir,
    load_image_folder,
    mnist_splits,
    stratified_limit,
)
from mscnn.hierarchy import pyramid_blur, to_resolution
from mscnn.mge import mge_pixels
from mscnn.ode import ODENet
from mscnn.train import accuracy, fit, make_step


def run(name: str, plan: list[tuple[int, int]], data: dict, args, stencil: str = "free",
        prefilter: bool = False, mge: list[int] | None = None) -> dict:
    torch.manual_seed(args.seed)
    net, t_train, compute, curve = None, 0.0, 0.0, []
    fine_n = max(data)
    for n, epochs in plan:
        if net is None:
            # --dilation: a network at the fine grid gets the coarse footprint (taps `dilation`
            # pixels apart, the pyramid's blur between the grids); coarser starts get what the
            # dilating handover would leave them
            dil = max(1, args.dilation * n // fine_n)
            net = ODENet(n=n, channels=unit_channels(args.channels), steps=args.steps, stencil=stencil,
                         T=args.T, activation=args.activation, in_channels=data[n][0].x.shape[1],
                         classes=int(max(s_.y.max() for s_ in data[n])) + 1, dilation=dil,
                         subgrid_connectives=args.subgrid_connectives, stencil_length=args.length,
                         pair=args.pair, stencil_scale_growth=args.scale_growth,
                         input_blur=pyramid_blur(n // dil, n) if dil > 1 else 0.0)
        elif net.n != n:
            net = to_resolution(net, n, naive=args.transfer == "naive", lam=args.lam,
                                prefilter=args.prefilter_sigma if prefilter else 0.0,
                                dilate=args.transfer == "dilate" and stencil == "free")
            curve.append({"n": n, "epoch": -1, "seconds": t_train, "fine_equiv": compute,
                          "val_acc": accuracy(net, data[n][1]), "event": "transferred"})
        train, val = data[n]
        sizes = [n >> k for k in reversed(range(len(mge or [])))]
        share = mge_pixels(sizes, mge) / (sum(mge) * n**2) if mge else 1.0  # an MGE batch's pixels

        def on_epoch(e, rec, n=n, val=val, net=net, share=share):
            nonlocal t_train, compute
            t_train += rec["seconds"]
            compute += share * (n / fine_n) ** 2
            curve.append({"n": n, "epoch": e, "seconds": t_train, "fine_equiv": compute,
                          "val_acc": accuracy(net, val)})
            print(f"  {name}: n={n} epoch {e} val {100 * curve[-1]['val_acc']:.2f}% "
                  f"({t_train:.0f} s, {compute:.2f} fine epochs)", flush=True)

        # --fine-lr: a multilevel plan's fine level starts from a trained network, so its cosine
        # cycle may start lower than a network trained from random weights
        lr = args.fine_lr if args.fine_lr and len(plan) > 1 and n == fine_n else args.lr
        step = None
        if mge:  # multilevel gradient estimation at this grid (mscnn.mge), free stencils moved by `move`
            move = ("dilate" if net.config.dilation > 1
                    else "naive" if args.transfer == "naive" else "galerkin")
            step = make_step(net, "adam", lr, True, epochs * -(-len(train) // args.batch_size),
                             mge={"sizes": sizes, "batch_sizes": mge, "move": move})
        fit(net, train, epochs, lr, args.batch_size, args.seed, on_epoch=on_epoch, step=step)
    fine = [c for c in curve if c["n"] == fine_n]
    moved = [c["val_acc"] for c in fine if c.get("event") == "transferred"]
    out = {"name": name, "plan": plan, "curve": curve, "final": fine[-1]["val_acc"],
           "handover": moved[-1] if moved else None,
           "best": max(c["val_acc"] for c in fine), "seconds": t_train, "fine_equiv": compute}
    for t in args.targets:  # counted only on the fine grid's accuracy
        hit = next((c for c in fine if c["val_acc"] >= t), None)
        out[f"to_{t:g}"] = None if hit is None else {"seconds": hit["seconds"],
                                                     "fine_equiv": hit["fine_equiv"]}
    return out


def _median_row(rs: list[dict], targets) -> dict:
    """One row from repeated runs of a plan: accuracies of the first run (same seed: the same
    numbers), times to each target as the median with a min-max spread (None unless every repeat
    reached it)."""
    out = dict(rs[0], repeats=[{k: r[k] for k in r if k != "curve"} for r in rs])
    out["seconds"] = statistics.median(r["seconds"] for r in rs)
    for t in targets:
        hits = [r[f"to_{t:g}"] for r in rs]
        if any(h is None for h in hits):
            out[f"to_{t:g}"] = None
            continue
        secs = [h["seconds"] for h in hits]
        out[f"to_{t:g}"] = {"seconds": statistics.median(secs), "fine_equiv": hits[0]["fine_equiv"],
                            "spread": f"{min(secs):.0f}-{max(secs):.0f}", "all_seconds": secs}
    return out


def ratio_lines(rows: list[dict], base: dict, targets, keep: bool = False) -> list[str]:
    """Markdown lines: each row's wall-clock to each target over ``base``'s in the same round
    (median [min-max] of the per-round ratios); a bound where ``base`` never got there. ``keep``
    stores the ratios in the rows (the json's and MLflow's ``ratio`` is against the first single)."""
    md = ["", f"Per round, wall-clock to each target / `{base['name']}`'s (median [min-max]):", ""]
    for r in rows:
        if r["name"] == base["name"]:
            continue
        cells = []
        for t in targets:
            a, b = r[f"to_{t:g}"], base[f"to_{t:g}"]
            if a and b:
                ratio = paired_ratio(a["all_seconds"], b["all_seconds"])
                cells.append(f"to {100 * t:g}%: {fmt_ratio(ratio)}")
                if keep:
                    a["ratio"] = ratio
            elif a and all(rep[f"to_{t:g}"] is None for rep in base["repeats"]):
                # the baseline never got there: its whole run's time bounds the ratio from above
                bound = paired_ratio(a["all_seconds"], [rep["seconds"] for rep in base["repeats"]])
                cells.append(f"to {100 * t:g}%: below {fmt_ratio(bound)} (`{base['name']}` "
                             "never reached it: the bound is against its whole run)")
                if keep:
                    a["ratio_bound"] = bound
            else:
                cells.append(f"to {100 * t:g}%: no ratio (not reached in every round)")
        md.append(f"- {r['name']}: " + "; ".join(cells))
    return md


def ratios_from(path: str) -> None:
    """``--ratios-from JSON``: a finished run's per-round ratios against every single-scale plan."""
    import json

    d = json.loads(Path(path).read_text())
    rows, targets = d["rows"], d["args"]["targets"]
    for base in (r for r in rows if r["name"].startswith("1 level") and "mge" not in r["name"]):
        print("\n".join(ratio_lines(rows, base, targets)))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, nargs=3, default=[8, 4, 6],
                    metavar=("SINGLE", "COARSE", "FINE_AFTER"))
    ap.add_argument("--targets", type=float, nargs="+", default=[0.97, 0.98, 0.99])
    ap.add_argument("--two-level", nargs="+", default=[], metavar="COARSE:FINE",
                    help="more 2-level plans in the same alternation, each with its own epochs at "
                         "the coarse and the fine grid (e.g. 4:2)")
    ap.add_argument("--one-level", type=int, nargs="+", default=[], metavar="EPOCHS",
                    help="more single-scale plans with these epochs (the shortest single-scale schedule "
                         "that reaches a target is the fair baseline); the table gives every plan's ratios "
                         "against the first single-scale plan and the multilevel plans' against each")
    ap.add_argument("--transfer", choices=["galerkin", "naive", "dilate"], default="galerkin",
                    help="how free stencils move to the finer grid (dilate: to_resolution(dilate=True),"
                         " the fine network keeps the coarse taps' physical offsets)")
    ap.add_argument("--stencils", nargs="+", default=["free"],
                    help="ODENetConfig.stencil of the networks; each plan runs with each")
    ap.add_argument("--prefilter", type=int, nargs="+", choices=[0, 1], default=[0],
                    help="multilevel plans without (0) and/or with (1) the prefiltered handover")
    ap.add_argument("--prefilter-sigma", type=float, default=1.0,
                    help="the prefiltered handover's blur in fine pixels (1: the pyramid's sigma, as "
                         "the pipeline's prefilter; 1.2247: handover_sigma(1, full-weighting))")
    ap.add_argument("--repeats", type=int, default=1, help="alternating repeats of the plans")
    ap.add_argument("--plans", type=int, nargs="+", default=[1, 2, 3], help="level counts to run")
    ap.add_argument("--lam", type=float, default=0.0)
    ap.add_argument("--dilation", type=int, default=1,
                    help="free stencils at the fine grid with taps this many pixels apart (the coarse "
                         "footprint, with the pyramid's blur); plans starting coarser get 1")
    ap.add_argument("--mge", type=int, nargs="+", default=None, metavar="BATCH",
                    help="also a single-level plan whose steps are multilevel gradient estimates: "
                         "images per grid, coarsest first (they add up to --batch-size); free "
                         "stencils moved by dilate when --dilation > 1, else by --transfer")
    ap.add_argument("--subgrid-connectives", action="store_true",
                    help="ODENetConfig.subgrid_connectives: a dilated network's connectives restrict "
                         "each sub-grid on its own (the dilating move of several units is then exact)")
    ap.add_argument("--channels", type=int, nargs="+", default=[16],
                    help="one per unit (several: units joined by connective restriction)")
    ap.add_argument("--steps", type=int, default=2, help="Euler steps per unit")
    ap.add_argument("--length", type=float, default=None,
                    help="consistent kinds: ODENetConfig.stencil_length (image widths)")
    ap.add_argument("--scale-growth", type=float, default=1.0,
                    help="consistent kinds: ODENetConfig.stencil_scale_growth (unit u: sigma * growth**u)")
    ap.add_argument("--pair", default="full-weighting",
                    help="transfer pair of the pyramid and the networks (full-weighting-neumann: "
                         "Neumann boundaries)")
    ap.add_argument("--T", type=float, default=2.0, help="final time per unit")
    ap.add_argument("--activation", default="tanh")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--data", choices=["mnist", "imagenette"], default="mnist")
    ap.add_argument("--size", type=int, default=None,
                    help="fine n (default: 28 mnist, 128 imagenette; mnist above 28: zero-padded)")
    ap.add_argument("--train-count", type=int, default=50_000, help="training images (a subset: checks)")
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--fine-lr", type=float, default=None,
                    help="Adam's starting lr on a multilevel plan's fine level (default: --lr)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--stem", default=None, help="results file name (default: from data and transfer)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--n-val", type=int, default=10_000,
                    help="--data mnist (any MNIST-format folder): validation images from the training file")
    ap.add_argument("--score-on", choices=["val", "test"], default="val",
                    help="--data mnist: score the schedules on the validation split or on the test file "
                         "(for a data set whose validation split shares photos with its training split)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--ratios-from", metavar="JSON", default=None,
                    help="train nothing: print a finished run's per-round ratios against each "
                         "single-scale plan (its results json)")
    args = ap.parse_args(argv)
    if args.ratios_from:
        return ratios_from(args.ratios_from)
    torch.set_num_threads(args.threads)
    size = args.size or (28 if args.data == "mnist" else 128)
    if args.data == "mnist":
        d = mnist_splits(args.data_dir, n_val=args.n_val)
        if args.score_on == "test":  # scored on the test file, which shares no photo with training
            d["val"] = d["test"]
        if size < 28 or size % 2:
            raise SystemExit("--data mnist: --size must be 28, or an even size above it (zero-padded)")
        pad = (size - 28) // 2  # e.g. 32: padded as LeNet-5 did, so three units (n % 4 == 0) fit 16x16
        d = {k: Split(torch.nn.functional.pad(v.x, (pad,) * 4), v.y) for k, v in d.items()}
    else:
        root, tried = find_data_dir("imagenet10", args.data_dir, lambda p: (p / "train").is_dir())
        if root is None:
            raise SystemExit(f"Imagenette folder (train/, val/) not found; looked in {tried}")
        d = {s_: load_image_folder(root / s_, size)[1] for s_ in ("train", "val")}
    keep = (slice(0, args.train_count) if args.data == "mnist"
            else torch.from_numpy(stratified_limit(d["train"].y.numpy(), args.train_count)))
    d["train"] = Split(d["train"].x[keep], d["train"].y[keep])
    data = {size: (d["train"], d["val"])}
    for lv in (1, 2):
        data[size >> lv] = tuple(coarsen(s_, lv, 1.0, args.pair) for s_ in (d["train"], d["val"]))
    single, coarse, after = args.epochs
    f, h, q = size, size // 2, size // 4
    plans = {f"1 level ({f})": [(f, single)],
             f"2 levels ({h}, {f})": [(h, coarse), (f, after)],
             f"3 levels ({q}, {h}, {f})": [(q, coarse), (h, coarse), (f, after)]}
    for spec in args.two_level:
        try:
            c_ep, f_ep = (int(v) for v in spec.split(":"))
        except ValueError:
            raise SystemExit(f"--two-level {spec!r}: expected COARSE:FINE epochs, e.g. 4:2") from None
        plans[f"2 levels ({h}, {f}) {c_ep}+{f_ep} epochs"] = [(h, c_ep), (f, f_ep)]
    for ep in args.one_level:
        plans[f"1 level ({f}) {ep} epochs"] = [(f, ep)]
    plans = {f"{k}, {st}{', prefilter' if pf else ''}": (st, v, pf, None) for st in args.stencils
             for k, v in plans.items() if int(k[0]) in args.plans or "epochs" in k
             for pf in (args.prefilter if int(k[0]) > 1 else [0])}
    if args.mge:  # one more plan per stencil kind: the single level's steps by MGE
        plans |= {f"1 level ({f}), {st}, mge {'/'.join(map(str, args.mge))}": (st, [(f, single)], 0, args.mge)
                  for st in args.stencils}
    from mscnn.ode import ODENetConfig

    channels = unit_channels(args.channels)
    for name, (_, plan, _, _) in plans.items():  # before any training: every level must hold the net
        for n, _ in plan:
            try:
                ODENetConfig(n=n, channels=channels, steps=args.steps)
            except ValueError as e:
                raise SystemExit(f"plan {name!r}: {e}") from None
    t0 = time.perf_counter()
    # A B A B ..., each round starting one plan later: machine noise hits every plan alike
    runs = alternate({name: (lambda name=name, st=st, plan=plan, pf=pf, mge=mge:
                             run(name, plan, data, args, st, bool(pf), mge))
                      for name, (st, plan, pf, mge) in plans.items()}, args.repeats)
    rows = [_median_row(rs, args.targets) for rs in runs.values()]
    head = (f"{args.data}{f' ({args.data_dir})' if args.data_dir else ''} {size}x{size} "
            f"({len(d['train'].y)} training images"
            f"{', scored on the test file' * (args.score_on == 'test')}), ODENet channels "
            f"{args.channels} {args.steps} steps per unit T {args.T:g} {args.activation}, batch "
            f"{args.batch_size}, stencils {args.stencils}, Adam lr {args.lr} cosine per level"
            f"{f' (fine level of multilevel plans: {args.fine_lr:g})' if args.fine_lr else ''}, "
            f"transfer: free {args.transfer}"
            f"{f', fine networks dilation {args.dilation}' if args.dilation > 1 else ''}"
            f"{', sub-grid connectives' if args.subgrid_connectives else ''}"
            f"{f', MGE plan batch sizes {args.mge}' if args.mge else ''}"
            f"{f', prefilter {args.prefilter_sigma:g} px' if args.prefilter_sigma != 1.0 else ''}"
            f"{f' lam={args.lam:g}' if args.lam else ''}, consistent kinds re-discretised"
            f"{f' (stencil_length {args.length:g})' if args.length else ''}"
            f"{f', growth {args.scale_growth:g} per unit' if args.scale_growth != 1 else ''}, "
            f"pair {args.pair}, "
            f"seed {args.seed}, {args.repeats} alternating repeat(s) (times: median [min-max]); "
            f"{machine()}; {time.perf_counter() - t0:.0f} s.")
    cols = "".join(f" to {100 * t:g}%: s / fine epochs |" for t in args.targets)
    md = [head, "", f"| schedule | final val % | best val % | val % moved to {size}, before its epochs | "
          f"train s | fine epochs |{cols}", "|---|---|---|---|---|---|" + "---|" * len(args.targets)]
    for r in rows:
        hits = "".join(" not reached |" if r[f"to_{t:g}"] is None else
                       f" {r[f'to_{t:g}']['seconds']:.0f} [{r[f'to_{t:g}']['spread']}] / "
                       f"{r[f'to_{t:g}']['fine_equiv']:.2f} |" for t in args.targets)
        moved = "" if r["handover"] is None else f"{100 * r['handover']:.2f}"
        md.append(f"| {r['name']} | {100 * r['final']:.2f} | {100 * r['best']:.2f} | {moved} | "
                  f"{r['seconds']:.0f} | {r['fine_equiv']:.2f} |{hits}")
    singles = [r for r in rows if r["name"].startswith("1 level") and "mge" not in r["name"]]
    if singles and args.repeats > 1:  # wall-clock to each target over the same round's
        md += ratio_lines(rows, singles[0], args.targets, keep=True)
        for other in singles[1:]:  # --one-level: the multilevel plans against each shorter single
            md += ratio_lines([r for r in rows if not r["name"].startswith("1 level")], other, args.targets)
    metrics = {}
    for r in rows:
        key = r["name"].split(" (")[0].replace(" ", "_") + "." + r["name"].split(", ")[-1]
        if m := re.search(r"(\d+)\+(\d+) epochs", r["name"]):  # a --two-level plan
            key += f".{m[1]}+{m[2]}_epochs"
        elif m := re.search(r"\) (\d+) epochs", r["name"]):  # a --one-level plan
            key += f".{m[1]}_epochs"
        key = re.sub(r"[^A-Za-z0-9_.\- /:]", "", key)  # MLflow's metric names
        metrics[f"{key}.final_val_acc"] = r["final"]
        metrics[f"{key}.train_seconds"] = r["seconds"]
        for t in args.targets:
            if r[f"to_{t:g}"]:
                metrics[f"{key}.seconds_to_{t:g}"] = r[f"to_{t:g}"]["seconds"]
            if r[f"to_{t:g}"] and "ratio" in r[f"to_{t:g}"]:
                metrics[f"{key}.ratio_to_{t:g}"] = r[f"to_{t:g}"]["ratio"]["median"]
    stem = "multiscale_training_" + ("" if args.data == "mnist" else f"{args.data}{size}_")
    stem += "_".join(st if st != "free" else args.transfer for st in args.stencils)
    stem += "_prefilter" if 1 in args.prefilter else ""
    publish(args.out, args.stem or stem, "\n".join(md),
            {"args": vars(args), "rows": rows}, vars(args), metrics)


if __name__ == "__main__":
    main()
