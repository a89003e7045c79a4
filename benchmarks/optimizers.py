"""The paper's BCD optimiser vs Adam on MNIST 28x28, and shallow-to-deep with BCD.

    python benchmarks/optimizers.py [--budget 150] [--batch 512] [--depth-levels 2 4 8 16] [--depth-iters 5]

Part 1: the same network (16 channels, 2 steps, tanh, h^2 classifier) trained by BCD (one
Gauss-Newton step + 5 Newton steps per iteration, batch ``--batch``) and by Adam (lr 1e-2, batch
128) for the same wall-clock budget each; validation accuracy (2,000 held-out images) every few
iterations; iterations and seconds to each accuracy threshold. Part 2: depths ``--depth-levels``
(T fixed), ``--depth-iters`` BCD iterations per level, starting from the previous level
interpolated in time (to_depth) vs from random weights; loss and accuracy per iteration.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from common import machine, publish

from mscnn.data import Split, mnist_splits
from mscnn.hierarchy import to_depth
from mscnn.ode import ODENet
from mscnn.optim import BCD
from mscnn.train import TorchStep, accuracy


def _batches(train: Split, size: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(0, len(train), (size,), generator=g).to(train.x.device)
        yield train.x[idx], train.y[idx]


def race(name: str, step, val: Split, budget: float, every: int) -> list[dict]:
    out, it = [], 0
    spent = 0.0
    while spent < budget:
        t = time.perf_counter()
        loss = step()
        spent += time.perf_counter() - t
        it += 1
        if it % every == 0:
            out.append({"iter": it, "seconds": spent, "loss": loss, "val_accuracy": accuracy(*val)})
            print(f"  {name:5s} it {it:5d} {spent:6.1f} s loss {loss:.4f} "
                  f"val {100 * out[-1]['val_accuracy']:.2f}%", flush=True)
    if it and (not out or out[-1]["iter"] != it):  # the budget ended between records
        out.append({"iter": it, "seconds": spent, "loss": loss, "val_accuracy": accuracy(*val)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budget", type=float, default=150.0, help="seconds per optimiser")
    ap.add_argument("--batch", type=int, default=512, help="BCD batch")
    ap.add_argument("--depth-levels", type=int, nargs="*", default=[2, 4, 8, 16],
                    help="part 2 (none: skip it)")
    ap.add_argument("--depth-iters", type=int, default=5)
    ap.add_argument("--shallow-iters", type=int, default=None,
                    help="part 2: BCD iterations on every level but the deepest (the multilevel "
                         "chain's cheap path; default --depth-iters)")
    ap.add_argument("--seed", type=int, default=0,
                    help="part 2: initial weights and batches (0: the runs in RESULTS.md)")
    ap.add_argument("--random-deepest-only", action="store_true",
                    help="part 2: random initialisation only at the deepest level (all the "
                         "compute-to-target comparison needs)")
    ap.add_argument("--depth-batch", type=int, default=256)
    ap.add_argument("--val-count", type=int, default=2000, help="validation images per evaluation")
    ap.add_argument("--optimizers", nargs="+", choices=["bcd", "adam"], default=["bcd", "adam"],
                    help="part 1: which optimisers race")
    ap.add_argument("--alpha-time", type=float, default=1e-3, help="BCD (part 1)")
    ap.add_argument("--alpha-space", type=float, default=1e-4, help="BCD (part 1)")
    ap.add_argument("--damping", type=float, default=1e-3, help="BCD (part 1)")
    ap.add_argument("--cg-iters", type=int, default=10, help="BCD (part 1)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (the data moves there once)")
    ap.add_argument("--out", default="outputs/benchmarks/optimizers.json")
    args = ap.parse_args()
    torch.manual_seed(0)
    d = mnist_splits()
    dev = torch.device(args.device)
    train = Split(d["train"].x.to(dev), d["train"].y.to(dev))
    val = Split(d["val"].x[: args.val_count].to(dev), d["val"].y[: args.val_count].to(dev))
    res = {}

    if args.budget > 0:
        part1(args, train, val, res)
    depth = part2(args, train, val, res)
    report(args, res, depth)


def part1(args, train: Split, val: Split, res: dict) -> None:
    print("part 1: BCD vs Adam, same wall-clock budget")
    torch.manual_seed(0)
    net_b = ODENet(channels=16, steps=2, n=28).to(train.x.device)
    net_a = ODENet(channels=16, steps=2, n=28).to(train.x.device)
    net_a.load_state_dict(net_b.state_dict())
    if "bcd" in args.optimizers:
        bcd = BCD(net_b, args.alpha_time, args.alpha_space, cg_iters=args.cg_iters, damping=args.damping)
        gen_b = _batches(train, args.batch, 0)
        res["bcd"] = race("bcd", lambda: bcd.step(*next(gen_b))["loss"], (net_b, val), args.budget, 2)
    if "adam" not in args.optimizers:
        return
    adam, gen_a = TorchStep(net_a, torch.optim.Adam(net_a.parameters(), 1e-2)), _batches(train, 128, 0)

    def adam_step():
        return float(adam(*next(gen_a)))

    res["adam"] = race("adam", adam_step, (net_a, val), args.budget, 50)


def part2(args, train: Split, val: Split, res: dict) -> dict:
    depth = {"multilevel": [], "random": []}
    if not args.depth_levels:
        return depth
    print("part 2: shallow to deep with BCD, multilevel vs random initialisation")
    prev = None
    deepest = max(args.depth_levels)
    for N in args.depth_levels:
        modes = ("multilevel",) if args.random_deepest_only and N != deepest else ("multilevel", "random")
        iters = args.depth_iters if (N == deepest or args.shallow_iters is None) else args.shallow_iters
        for mode in modes:
            torch.manual_seed(N + 1000 * args.seed)
            net = ODENet(channels=16, steps=N, n=28).to(train.x.device) \
                if (mode == "random" or prev is None) else to_depth(prev, N)
            opt, gen = BCD(net), _batches(train, args.depth_batch, N + 1000 * args.seed)
            x0, y0 = next(_batches(train, 2000, 99))
            with torch.no_grad():
                init_loss = F.cross_entropy(net(x0), y0).item()
            rec = {"steps": N, "init_loss": init_loss, "init_val_accuracy": accuracy(net, val),
                   "iters": []}
            for it in range(iters if mode == "multilevel" else args.depth_iters):
                t = time.perf_counter()
                loss = opt.step(*next(gen))["loss"]
                rec["iters"].append({"iter": it + 1, "loss": loss, "seconds": time.perf_counter() - t,
                                     "val_accuracy": accuracy(net, val)})
            print(f"  N={N:3d} {mode:10s} start loss {init_loss:.3f} acc "
                  f"{100 * rec['init_val_accuracy']:.2f}% -> after {len(rec['iters'])} it: loss "
                  f"{rec['iters'][-1]['loss']:.3f} acc {100 * rec['iters'][-1]['val_accuracy']:.2f}%",
                  flush=True)
            depth[mode].append(rec)
            if mode == "multilevel":
                prev = net
        res["depth"] = depth
        report(args, res, depth, quiet=True)  # what is done so far survives a stop or a timeout
    return depth


def compute_to_target(depth: dict) -> dict | None:
    """Compute to the random-init final accuracy at the deepest level done: the random network's
    seconds (and step-iterations: BCD iterations x Euler steps, the machine-free count) over its
    iterations, against the multilevel chain's over every shallower level plus its deepest level
    until it first reaches that accuracy (None where it never does)."""
    if not depth["random"] or not depth["multilevel"] \
            or depth["random"][-1]["steps"] != depth["multilevel"][-1]["steps"]:
        return None
    rnd, ml = depth["random"][-1], depth["multilevel"]
    target = rnd["iters"][-1]["val_accuracy"]
    before = sum(it["seconds"] for r in ml[:-1] for it in r["iters"])
    work_before = sum(r["steps"] * len(r["iters"]) for r in ml[:-1])
    spent, work, hit = before, work_before, None
    if ml[-1]["init_val_accuracy"] >= target:  # already there when moved to this depth
        hit = {"iter": 0, "seconds": spent, "step_iters": work}
    for it in ml[-1]["iters"] if hit is None else []:
        spent += it["seconds"]
        work += ml[-1]["steps"]
        if it["val_accuracy"] >= target:
            hit = {"iter": it["iter"], "seconds": spent, "step_iters": work}
            break
    return {"steps": rnd["steps"], "target": target,
            "random_seconds": sum(it["seconds"] for it in rnd["iters"]),
            "random_iters": len(rnd["iters"]), "random_step_iters": rnd["steps"] * len(rnd["iters"]),
            "multilevel_shallower_seconds": before, "multilevel_shallower_step_iters": work_before,
            "multilevel_hit": hit}


def plot_depth(depth: dict, path: Path) -> None:
    """Validation accuracy and loss per BCD iteration, levels side by side on one axis (iteration 0
    of a level is its starting point), multilevel vs random."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_a, ax_l) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    for mode, style in (("multilevel", "-"), ("random", "--")):
        x0 = 0
        for i, r in enumerate(depth[mode]):
            xs = [x0] + [x0 + it["iter"] for it in r["iters"]]
            acc = [r["init_val_accuracy"]] + [it["val_accuracy"] for it in r["iters"]]
            loss = [r["init_loss"]] + [it["loss"] for it in r["iters"]]
            kw = dict(color="C0" if mode == "multilevel" else "C1", ls=style,
                      label=mode if i == 0 else None)
            ax_a.plot(xs, [100 * a for a in acc], **kw)
            ax_l.plot(xs, loss, **kw)
            if mode == "multilevel":
                ax_a.annotate(f"N={r['steps']}", (x0, 100 * acc[0]), fontsize=8)
            x0 = xs[-1] + 1
    ax_a.set_ylabel("val accuracy %")
    ax_l.set_ylabel("loss")
    ax_l.set_xlabel("BCD iteration (levels in order)")
    ax_a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report(args, res: dict, depth: dict, quiet: bool = False) -> None:
    race_lines = []
    if any(k in res for k in ("bcd", "adam")):
        race_lines = ["| optimiser | iterations | seconds | best val acc | first it >= 90% | s to 90% | "
                      "first it >= 95% | s to 95% | first it >= 98% | s to 98% |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
    for name in [k for k in ("bcd", "adam") if k in res]:
        r = res[name]
        row = [name, r[-1]["iter"], f"{r[-1]['seconds']:.0f}",
               f"{100 * max(p['val_accuracy'] for p in r):.2f}%"]
        for thr in (0.90, 0.95, 0.98):
            hit = next((p for p in r if p["val_accuracy"] >= thr), None)
            row += [hit["iter"] if hit else "-", f"{hit['seconds']:.0f}" if hit else "-"]
        race_lines.append("| " + " | ".join(map(str, row)) + " |")
    lines = ["| steps | init | loss at start | val acc at start | iterations | loss after | "
             "val acc after | best val acc | seconds |", "|---|---|---|---|---|---|---|---|---|"]
    rows = sorted([(r["steps"], mode, r) for mode in ("multilevel", "random") for r in depth[mode]],
                  key=lambda t: (t[0], t[1] != "multilevel"))
    for _, mode, r in rows:
        lines.append(f"| {r['steps']} | {mode} | {r['init_loss']:.3f} | "
                     f"{100 * r['init_val_accuracy']:.2f}% | {len(r['iters'])} | "
                     f"{r['iters'][-1]['loss']:.3f} | {100 * r['iters'][-1]['val_accuracy']:.2f}% | "
                     f"{100 * max(it['val_accuracy'] for it in r['iters']):.2f}% | "
                     f"{sum(it['seconds'] for it in r['iters']):.1f} |")
    c = compute_to_target(depth)
    if c:
        res["compute_to_random_final"] = c
        hit = c["multilevel_hit"]
        lines += ["", f"Random init at {c['steps']} steps ends at {100 * c['target']:.2f}% after "
                  f"{c['random_iters']} iterations, {c['random_seconds']:.1f} s. The multilevel chain "
                  + (f"reaches it at iteration {hit['iter']} of {c['steps']} steps, {hit['seconds']:.1f} s "
                     f"in all ({c['multilevel_shallower_seconds']:.1f} s of it on shallower levels): "
                     f"{hit['seconds'] / c['random_seconds']:.2f}x the random run's time."
                     if hit else f"does not reach it at {c['steps']} steps "
                     f"({c['multilevel_shallower_seconds']:.1f} s on shallower levels).")]
    if not depth["multilevel"]:
        lines = []
    text = f"{machine()}; {vars(args)}\n\n" + "\n".join(race_lines + [""] + lines)
    out_path = Path(args.out)
    if quiet:  # a partial result, rewritten after every depth
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.with_suffix(".md").write_text(text + "\n")
        out_path.write_text(json.dumps(res, indent=1))
        return
    metrics = {f"{mode}.{r['steps']}.val_accuracy": r["iters"][-1]["val_accuracy"]
               for mode in depth for r in depth[mode]}
    metrics.update({f"{k}.best_val_accuracy": max(p["val_accuracy"] for p in res[k])
                    for k in ("bcd", "adam") if k in res})
    if depth["multilevel"]:
        plot_depth(depth, out_path.with_suffix(".png"))
    publish(out_path.parent, out_path.stem, text, res, vars(args), metrics)


if __name__ == "__main__":
    main()
