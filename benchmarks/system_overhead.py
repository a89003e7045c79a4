"""What Ray costs: a Ray Train stage vs a plain PyTorch loop with the same model, data, threads.

    python benchmarks/system_overhead.py [--epochs 3] [--threads 2] [--repeats 3]

The data are level 0 (28x28) of the demo pyramid (``configs/pyramid_mnist_demo.yaml``, 8,000
training images; built if missing). The Ray side is ``pipelines.schedule.run_schedule`` of
``configs/demo_single.yaml`` with one worker holding ``--threads`` CPUs (Ray sets the worker's
torch threads from it), once with the worker reading the level itself with pyarrow into its tensor
cache (``scaling.reader: worker``, what ``auto`` picks for a level this size) and once through Ray
Data (``reader: ray_data``: the driver materialises the level, the worker's first pass streams it
into the same cache, ``scaling.worker_cache_mb``); the plain side is ``mscnn.train.fit`` on the
same Parquet shards read into memory, with ``torch.set_num_threads(--threads)``, run in this
process and in a Ray task holding ``--threads`` CPUs (the same loop with Ray's processes around it
and none of Ray Train's: what is left of the stage's loop deficit when the plain loop, too, runs
inside Ray). The paths alternate (A B C D ..., ``--repeats`` rounds, one ``ray.init`` for all, not
counted); the ratios are the median of the per-round ratios with their min-max spread and the load
average. Printed: images/s inside the epoch loop (what the stage reports), images/s end to end
(the stage from submission to result: worker start, data materialisation, checkpoints, MLflow),
the stage's fixed cost (end to end minus the epochs), and the ratios. The process exits with
status 3 when a ratio's spread is wider than its effect.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, alternate, fmt_ratio, machine, paired_ratio, publish

from mscnn.data import Split
from mscnn.ode import ODENet
from mscnn.train import fit


def _plain_loop(pyramid, scale, model_cfg, epochs: int, batch: int, seed: int, threads: int) -> dict:
    """``mscnn.train.fit`` on the level's Parquet shards read into memory, ``threads`` torch threads
    (in this process, or in a Ray task: the same loop with Ray's processes around it)."""
    from pipelines.pyramid import level_tensors

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    tr = level_tensors(pyramid, 0, "train")
    tr = Split(tr.x * scale, tr.y)
    torch.manual_seed(seed)
    net = ODENet(model_cfg)
    t1 = time.perf_counter()
    ph = fit(net, tr, epochs, 0.01, batch, seed)
    total = time.perf_counter() - t0
    count = len(tr.y)
    return {"loop": statistics.median(count / h["seconds"] for h in ph),
            "e2e": count * epochs / total, "seconds": total, "fixed": t1 - t0, "history": ph}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds (at least 3)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)

    import ray

    from pipelines.config import ScheduleConfig, load_config
    from pipelines.pyramid import build_pyramid, input_scale, read_manifest
    from pipelines.schedule import run_schedule

    tmp = Path(tempfile.mkdtemp(prefix="mscnn-overhead-"))

    def cfg_for(tag: str, reader: str, extras: str = "on"):
        return load_config(ROOT / "configs" / "demo_single.yaml", ScheduleConfig, {
            "name": f"overhead-{tag}", "storage_path": str(tmp / "runs"),
            "experiment": "mscnn-benchmarks", "levels": [{"n": 28, "steps": 2, "epochs": args.epochs,
                                                          "optim": {"lr": 0.01}}],
            "scaling": {"num_workers": 1, "cpus_per_worker": args.threads,
                        "reader": reader, "train_extras": extras}})

    base = cfg_for("x", "auto")
    t0 = time.perf_counter()
    ray.init(num_cpus=max(args.threads, 2), include_dashboard=False, log_to_driver=False)
    t_init = time.perf_counter() - t0
    pyramid, _ = build_pyramid(base.pyramid, Path(base.pyramid_root).resolve())
    m = read_manifest(pyramid)
    count = m["counts"]["train"]["total"]
    scale = torch.tensor(input_scale(m)).view(1, -1, 1, 1)
    rounds = {}

    def ray_path(reader: str, extras: str = "on"):
        tag = f"{reader}-{extras}"

        def run() -> dict:
            rounds[tag] = rounds.get(tag, 0) + 1
            cfg = cfg_for(f"{tag}{rounds[tag]}", reader, extras)  # a fresh run folder each round
            t0 = time.perf_counter()
            res = run_schedule(cfg, log=lambda s: None)
            total = time.perf_counter() - t0
            hist = res["stages"][0]["history"]
            return {"loop": statistics.median(h["images_per_s"] for h in hist),
                    "e2e": count * args.epochs / total, "seconds": total,
                    "fixed": total - hist[-1]["stage_seconds"], "history": hist}
        return run

    job = (pyramid, scale, base.model_config_for(0), args.epochs, base.levels[0].optim.batch_size,
           base.seed, args.threads)
    in_ray = ray.remote(num_cpus=args.threads)(_plain_loop)

    runs = alternate({"Ray Train stage, worker reads": ray_path("worker"),
                      "Ray Train stage, worker reads, Train extras off": ray_path("worker", "off"),
                      "Ray Train stage, Ray Data": ray_path("ray_data"),
                      "plain loop in a Ray task (no Ray Train)": lambda: ray.get(in_ray.remote(*job)),
                      "plain PyTorch loop": lambda: _plain_loop(*job)}, args.repeats)
    ray.shutdown()
    plain_runs = runs["plain PyTorch loop"]
    head = (f"MNIST 28x28 demo level ({count} training images), ODENet 16 channels 2 steps, batch "
            f"{base.levels[0].optim.batch_size}, {args.epochs} epochs, {args.threads} threads; "
            f"{machine()}; {args.repeats} alternating rounds; ray.init {t_init:.1f} s (not counted). "
            "Each cell: median [min-max] over the rounds.")
    md = [head, "", "| | images/s in the epoch loop | images/s end to end | seconds end to end | "
          "fixed seconds (not epochs) | loop / plain | end to end / plain |", "|---|---|---|---|---|---|---|"]
    ratios, ok = {}, True
    for name, rs in runs.items():
        def cell(key, pat="{:,.0f}", rs=rs):
            v = [r[key] for r in rs]
            return f"{pat.format(statistics.median(v))} [{pat.format(min(v))}-{pat.format(max(v))}]"
        loop_r = paired_ratio([r["loop"] for r in rs], [r["loop"] for r in plain_runs])
        e2e_r = paired_ratio([r["e2e"] for r in rs], [r["e2e"] for r in plain_runs])
        ratios[name] = {"loop": loop_r, "e2e": e2e_r}
        same = name == "plain PyTorch loop"
        if not same:
            ok = ok and loop_r["conclusive"] and e2e_r["conclusive"]
        md.append(f"| {name} | {cell('loop')} | {cell('e2e')} | {cell('seconds', '{:.1f}')} | "
                  f"{cell('fixed', '{:.1f}')} | {'' if same else fmt_ratio(loop_r)} | "
                  f"{'' if same else fmt_ratio(e2e_r)} |")
    w, rd = runs["Ray Train stage, worker reads"], runs["Ray Train stage, Ray Data"]
    reader = {"e2e": paired_ratio([r["e2e"] for r in w], [r["e2e"] for r in rd]),
              "fixed": paired_ratio([r["fixed"] for r in rd], [r["fixed"] for r in w])}
    off = runs["Ray Train stage, worker reads, Train extras off"]
    extras = {"loop": paired_ratio([r["loop"] for r in off], [r["loop"] for r in w]),
              "fixed": paired_ratio([r["fixed"] for r in w], [r["fixed"] for r in off])}
    md += ["", f"Worker reads / Ray Data, end to end: {fmt_ratio(reader['e2e'])}; Ray Data's fixed "
           f"seconds / the worker's: {fmt_ratio(reader['fixed'])}. Train extras off / on (the "
           f"default), in the epoch loop: {fmt_ratio(extras['loop'])}; fixed seconds on / off: "
           f"{fmt_ratio(extras['fixed'])}. Load average (1 min) at the end: "
           f"{reader['e2e']['load_avg_1m']:.2f}. Every epoch of a stage also validates, checkpoints "
           "and reports; MLflow is written by the driver-side callback."]
    data = {"args": vars(args), "ray_init_s": t_init, "runs": runs, "ratios": ratios,
            "worker_vs_ray_data": reader, "extras_off_vs_on": extras}
    metrics = {re.sub(r"[^A-Za-z0-9_]+", "_", k.lower()).strip("_") + f"_{a}_ratio": v[a]["median"]
               for k, v in ratios.items() if k != "plain PyTorch loop" for a in ("loop", "e2e")}
    publish(args.out, "system_overhead", "\n".join(md), data, vars(args), metrics)
    if not ok:
        print("INCONCLUSIVE: a ratio's spread is wider than its effect (see the table)", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
