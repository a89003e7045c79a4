"""Cross-resolution transfer methods on MNIST (issue 9): what moves a network across resolutions.

    python benchmarks/transfer_methods.py --seeds 0 1 2 --coarse 14 7 --jobs 2

Per seed: a fine (28x28) and a coarse (14x14 or 7x7, full-weighting restriction without blur)
network trained natively (Adam, 3 epochs); each moved to the other resolution without retraining by
every method of ``mscnn.hierarchy.to_resolution`` (naive, Galerkin, Galerkin on the propagation
steps or the opening layer only, regularised prolongation for each ``--lams``), plus the classifier
re-fit baseline (300 Adam steps on the new resolution, from the naive transfer), and networks
trained for transferability: multi-resolution training (``mscnn.multires``, fine and coarse data,
``--mr-epochs`` epochs = the two native trainings together) and coarse-data-only multi-resolution
training (levels 7 and 14, then used at 28). Everything is evaluated on the validation split (the
last 10,000 training images) *and* the MNIST test file; ``lam`` is chosen on validation.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import time

import torch
from common import ROOT, machine, mean_sd, publish

from mscnn.data import coarsen, mnist_splits
from mscnn.hierarchy import to_resolution
from mscnn.multires import fit_multiresolution
from mscnn.ode import ODENet
from mscnn.recalibrate import refit_classifier
from mscnn.train import accuracy, fit

PAIR = "full-weighting"
ARCH = dict(channels=16, steps=2, T=2.0, activation="tanh", pair=PAIR)
PAPER = {("coarse->fine", "galerkin"): 91.02, ("coarse->fine", "naive"): 61.02,
         ("fine->coarse", "galerkin"): 94.92, ("fine->coarse", "naive"): 84.09,
         ("fine", "native"): 98.18, ("coarse", "native"): 98.28}


def run_seed(job: tuple[int, argparse.Namespace]) -> list[dict]:
    seed, args = job
    torch.set_num_threads(args.threads)
    d = mnist_splits(args.data_dir)
    tr = d["train"]
    evals = {"val": d["val"], "test": d["test"]}
    rows: list[dict] = []

    def add(n_c, direction, method, net, n):
        for split, data in evals.items():
            data = data if n == 28 else coarsen(data, (28 // n).bit_length() - 1, 0.0, PAIR)
            rows.append(dict(seed=seed, coarse=n_c, direction=direction, method=method, split=split,
                             accuracy=accuracy(net, data)))

    def train(n, data, epochs):
        torch.manual_seed(seed)
        net = ODENet(n=n, **ARCH)
        fit(net, data, epochs, args.lr, 128, seed)
        return net

    t0 = time.perf_counter()
    fine = train(28, tr, args.epochs)
    for n_c in args.coarse:
        levels = (28 // n_c).bit_length() - 1
        tr_c = coarsen(tr, levels, 0.0, PAIR)
        coarse = train(n_c, tr_c, args.epochs)
        add(n_c, "fine", "native", fine, 28)
        add(n_c, "coarse", "native", coarse, n_c)
        for src, n_to, direction in ((coarse, 28, "coarse->fine"), (fine, n_c, "fine->coarse")):
            methods = {"naive": dict(naive=True), "galerkin": {},
                       "galerkin units only": dict(galerkin=["units"]),
                       "galerkin opening only": dict(galerkin=["opening"])}
            if direction == "coarse->fine":
                methods |= {f"regularised lam={lam:g}": dict(lam=lam) for lam in args.lams}
            for method, kw in methods.items():
                add(n_c, direction, method, to_resolution(src, n_to, **kw), n_to)
            refit = to_resolution(src, n_to, naive=True)
            data_to = tr if n_to == 28 else tr_c
            refit_classifier(refit, data_to, steps=300, lr=1e-2, seed=seed)
            add(n_c, direction, "naive + classifier re-fit (300 steps)", refit, n_to)
        for naive in (True, False) if n_c == 14 else (True,):
            torch.manual_seed(seed)
            mr = ODENet(n=n_c, **ARCH)
            fit_multiresolution(mr, {n_c: tr_c, 28: tr}, args.mr_epochs, args.lr, 128, seed,
                                naive=naive)
            name = f"multi-resolution training ({'naive' if naive else 'galerkin'})"
            add(n_c, "coarse", name, mr, n_c)
            add(n_c, "coarse->fine", name, to_resolution(mr, 28, naive=naive), 28)
        if n_c == 14:  # coarse data only: levels 7 and 14, then used at 28
            torch.manual_seed(seed)
            mr = ODENet(n=14, **ARCH)
            fit_multiresolution(mr, {7: coarsen(tr_c, 1, 0.0, PAIR), 14: tr_c}, args.epochs + 1,
                                args.lr, 128, seed, naive=True)
            add(n_c, "coarse", "multi-resolution on coarse data only (7, 14; naive)", mr, 14)
            add(n_c, "coarse->fine", "multi-resolution on coarse data only (7, 14; naive)",
                to_resolution(mr, 28, naive=True), 28)
    print(f"seed {seed} done in {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def table(rows: list[dict], n_c: int, best_lam: dict[str, str]) -> str:
    out = ["| images | network / method | val % | test % | paper % |", "|---|---|---|---|---|"]
    keys = list(dict.fromkeys((r["direction"], r["method"]) for r in rows if r["coarse"] == n_c))
    for direction, method in keys:
        acc = {s: [100 * r["accuracy"] for r in rows if (r["coarse"], r["direction"], r["method"],
                                                          r["split"]) == (n_c, direction, method, s)]
               for s in ("val", "test")}
        images = {"fine": "28 (native)", "coarse": f"{n_c} (native net)", "coarse->fine":
                  f"28, {n_c}-net moved up", "fine->coarse": f"{n_c}, 28-net moved down"}[direction]
        if direction == "coarse" and method != "native":
            images = f"{n_c}"
        mark = " (lam chosen on val)" if method == best_lam.get(str(n_c)) else ""
        paper = PAPER.get((direction, method.split(" ")[0]), "") if n_c == 14 and (
            method in ("naive", "galerkin", "native")) else ""
        out.append(f"| {images} | {method}{mark} | {mean_sd(acc['val'])} | {mean_sd(acc['test'])} "
                   f"| {paper} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--coarse", type=int, nargs="+", default=[14, 7], choices=[14, 7])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--mr-epochs", type=int, default=6)
    ap.add_argument("--lams", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--jobs", type=int, default=1, help="seeds run in parallel processes")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per job (0: cores/jobs)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    args.threads = args.threads or max(1, (mp.cpu_count() or 1) // args.jobs)
    t0 = time.perf_counter()
    jobs = [(s, args) for s in args.seeds]
    if args.jobs > 1:
        with mp.get_context("spawn").Pool(args.jobs) as pool:
            rows = [r for rs in pool.map(run_seed, jobs) for r in rs]
    else:
        rows = [r for j in jobs for r in run_seed(j)]
    best_lam = {}
    for n_c in args.coarse:
        cand = {r["method"] for r in rows if r["coarse"] == n_c and r["method"].startswith("regul")}
        val = {m: sum(r["accuracy"] for r in rows if (r["coarse"], r["method"], r["split"],
                                                      r["direction"]) == (n_c, m, "val", "coarse->fine"))
               for m in cand}
        if val:
            best_lam[str(n_c)] = max(val, key=val.get)
    head = (f"MNIST 28x28 <-> coarse, full-weighting restriction without blur, 50,000 training images; "
            f"val = last 10,000 training images, test = the MNIST test file (10,000). Networks: 16 "
            f"channels, 2 steps, tanh, quadrature classifier; Adam lr {args.lr} cosine, batch 128, "
            f"{args.epochs} epochs (multi-resolution: {args.mr_epochs}); mean +- sd over seeds "
            f"{args.seeds}. {machine()}; {time.perf_counter() - t0:.0f} s with {args.jobs} jobs.")
    md = head + "\n"
    for n_c in args.coarse:
        md += f"\n### 28x28 <-> {n_c}x{n_c}\n\n" + table(rows, n_c, best_lam) + "\n"
    metrics = {}
    for r in rows:
        if r["split"] == "test":
            key = f"test_acc.{r['coarse']}.{r['direction']}.{r['method']}".replace(" ", "_")
            key = "".join(c if c.isalnum() or c in "._-/" else "_" for c in key)
            metrics.setdefault(key, []).append(r["accuracy"])
    publish(args.out, "transfer_methods", md, {"args": vars(args), "rows": rows, "best_lam": best_lam},
            vars(args), {k: sum(v) / len(v) for k, v in metrics.items()})


if __name__ == "__main__":
    main()
