"""What Ray costs: a Ray Train stage vs a plain PyTorch loop with the same model, data, threads.

    python benchmarks/system_overhead.py [--epochs 3] [--threads 2] [--repeats 3]
        [--device cpu|cuda] [--pyramid pyramid_mnist.yaml] [--paths worker plain ...]
        [--config imagenet10_resnet.yaml --n 224]

The data are level 0 (28x28) of the demo pyramid (``configs/pyramid_mnist_demo.yaml``, 8,000
training images; built if missing; ``--pyramid`` another, e.g. all of MNIST). With ``--device
cuda`` (the GPU machine, ``benchmarks/gpu/ray_stage.sh``) the stage runs with ``use_gpu: true``
and the plain loop holds the level on the GPU, as the stage's worker cache does; ``--paths`` runs
a subset of the paths (``worker``, ``worker_off``, ``ray_data``, ``in_ray``, ``plain_val``,
``plain``);
``--config``/``--n`` take the network, optimiser and batch of another schedule's level (e.g. the
ResNet-34 at 224), trained as one level; each path's mean GPU utilisation is sampled (NVML) where
there is a GPU. The Ray side is ``pipelines.schedule.run_schedule`` of
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
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from common import ROOT, alternate, fmt_ratio, machine, paired_ratio, publish

from mscnn.data import Split
from mscnn.models import build_model
from mscnn.train import accuracy, eval_batch_size, fit

PATHS = {"worker": "Ray Train stage, worker reads",
         "worker_off": "Ray Train stage, worker reads, Train extras off",
         "ray_data": "Ray Train stage, Ray Data",
         "in_ray": "plain loop in a Ray task (no Ray Train)",
         "plain_val": "plain PyTorch loop, validating every epoch",
         "plain": "plain PyTorch loop"}


def _plain_loop(pyramid, scale, model_cfg, epochs: int, optim: dict, seed: int, threads: int,
                device: str = "cpu", level: int = 0, validate: bool = False) -> dict:
    """``mscnn.train.fit`` on the level's Parquet shards read into memory (on ``device``),
    ``threads`` torch threads (in this process, or in a Ray task: the same loop with Ray's
    processes around it); with ``validate`` also on the validation split after every epoch (and
    once before), as the stage does."""
    from pipelines.pyramid import level_tensors

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    tr = level_tensors(pyramid, level, "train")
    tr = Split((tr.x * scale).to(device), tr.y.to(device))
    va = None
    if validate:
        va = level_tensors(pyramid, level, "val")
        va = Split((va.x * scale).to(device), va.y.to(device))
    torch.manual_seed(seed)
    net = build_model(model_cfg).to(device)
    if validate:  # the incoming network, as the stage's init_validation
        accuracy(net, va, eval_batch_size(net, va.x[:1], 2 * optim["batch_size"]))
    t1 = time.perf_counter()
    ph = fit(net, tr, epochs, optim["lr"], optim["batch_size"], seed, optimizer=optim["name"],
             device=device, val=va)
    if device != "cpu":
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    count = len(tr.y)
    return {"loop": statistics.median(count / h["seconds"] for h in ph),
            "e2e": count * epochs / total, "seconds": total, "fixed": t1 - t0, "history": ph}


def _with_gpu_util(fn, device: str, every_s: float = 0.2):
    """``fn`` whose result also holds ``gpu_util``: the GPU's mean utilisation (%, NVML, sampled
    every ``every_s`` from this process: it counts the stage's worker too) while it ran; None on
    the CPU or without NVML. Each result is printed as it comes (a run cut short keeps them)."""
    def run() -> dict:
        out = _sampled()
        util = "-" if out["gpu_util"] is None else f"{out['gpu_util']:.0f}%"
        print(f"  loop {out['loop']:,.0f} images/s, end to end {out['e2e']:,.0f} images/s, "
              f"{out['seconds']:.1f} s, GPU utilisation {util}", flush=True)
        return out

    def _sampled() -> dict:
        if device == "cpu":
            return fn() | {"gpu_util": None}
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except (ImportError, OSError, RuntimeError) as e:  # NVMLError derives from Exception
            print(f"no GPU utilisation: {e}", file=sys.stderr)
            return fn() | {"gpu_util": None}
        samples, stop = [], threading.Event()

        def sample():
            while not stop.wait(every_s):
                samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        t = threading.Thread(target=sample, daemon=True)
        t.start()
        try:
            out = fn()
        finally:
            stop.set()
            t.join()
        return out | {"gpu_util": statistics.mean(samples) if samples else None}
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds (at least 3)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--pyramid", help="pyramid config of the data (default: the demo schedule's)")
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    ap.add_argument("--config", default="demo_single.yaml", help="schedule whose level is trained")
    ap.add_argument("--n", type=int, help="that level's resolution (default: the schedule's last)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if "plain" not in args.paths:
        ap.error("--paths: the ratios need the plain loop ('plain')")
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA device")

    import ray

    from pipelines.config import ScheduleConfig, load_config
    from pipelines.pyramid import build_pyramid, input_scale, level_for, read_manifest
    from pipelines.schedule import run_schedule

    tmp = Path(tempfile.mkdtemp(prefix="mscnn-overhead-"))

    src = load_config(ROOT / "configs" / args.config, ScheduleConfig,
                      {"pyramid": args.pyramid} if args.pyramid else {})
    lv = next((x for x in src.levels if x.n == args.n), None) if args.n else src.levels[-1]
    if lv is None:
        ap.error(f"--n {args.n}: {args.config} has no level at n={args.n}")
    one = {"n": lv.n, "epochs": args.epochs, "optim": lv.optim.model_dump()}
    if src.model.arch == "odenet":
        one["steps"] = lv.steps

    def cfg_for(tag: str, reader: str, extras: str = "on"):
        return load_config(ROOT / "configs" / args.config, ScheduleConfig, {
            "name": f"overhead-{tag}", "storage_path": str(tmp / "runs"), "kind": "single",
            "experiment": "mscnn-benchmarks", "levels": [one],
            **({"pyramid": args.pyramid} if args.pyramid else {}),
            "scaling": {"num_workers": 1, "cpus_per_worker": args.threads, "reader": reader,
                        "train_extras": extras, "use_gpu": args.device == "cuda"}})

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

    level = level_for(m, lv.n, "--n")
    job = (pyramid, scale, base.model_config_for(0), args.epochs, lv.optim.model_dump(),
           base.seed, args.threads, args.device, level)
    in_ray = ray.remote(num_cpus=args.threads, num_gpus=int(args.device == "cuda"))(_plain_loop)
    paths = {"worker": ray_path("worker"), "worker_off": ray_path("worker", "off"),
             "ray_data": ray_path("ray_data"), "in_ray": lambda: ray.get(in_ray.remote(*job)),
             "plain_val": lambda: _plain_loop(*job, validate=True),
             "plain": lambda: _plain_loop(*job)}
    runs = alternate({PATHS[k]: _with_gpu_util(paths[k], args.device) for k in PATHS if k in args.paths},
                     args.repeats)
    ray.shutdown()
    plain_runs = runs["plain PyTorch loop"]
    head = (f"{args.config} at {lv.n}x{lv.n} ({base.model.arch}), pyramid {base.pyramid.name} ({count} "
            f"training images), {lv.optim.name} batch {lv.optim.batch_size}, {args.epochs} epochs, "
            f"{args.threads} threads, device {args.device}; "
            f"{machine()}; {args.repeats} alternating rounds; ray.init {t_init:.1f} s (not counted). "
            "Each cell: median [min-max] over the rounds.")
    md = [head, "", "| | images/s in the epoch loop | images/s end to end | seconds end to end | "
          "fixed seconds (not epochs) | loop / plain | end to end / plain | GPU utilisation % |",
          "|---|---|---|---|---|---|---|---|"]
    ratios, ok = {}, True
    for name, rs in runs.items():
        def cell(key, pat="{:,.0f}", rs=rs):
            v = [r[key] for r in rs if r.get(key) is not None]
            if not v:
                return "-"
            return f"{pat.format(statistics.median(v))} [{pat.format(min(v))}-{pat.format(max(v))}]"
        loop_r = paired_ratio([r["loop"] for r in rs], [r["loop"] for r in plain_runs])
        e2e_r = paired_ratio([r["e2e"] for r in rs], [r["e2e"] for r in plain_runs])
        ratios[name] = {"loop": loop_r, "e2e": e2e_r}
        same = name == "plain PyTorch loop"
        if not same:
            ok = ok and loop_r["conclusive"] and e2e_r["conclusive"]
        md.append(f"| {name} | {cell('loop')} | {cell('e2e')} | {cell('seconds', '{:.1f}')} | "
                  f"{cell('fixed', '{:.1f}')} | {'' if same else fmt_ratio(loop_r)} | "
                  f"{'' if same else fmt_ratio(e2e_r)} | {cell('gpu_util', '{:.0f}')} |")
    w, rd, off = (runs.get(PATHS[k]) for k in ("worker", "ray_data", "worker_off"))
    reader = extras = None
    if w and rd:
        reader = {"e2e": paired_ratio([r["e2e"] for r in w], [r["e2e"] for r in rd]),
                  "fixed": paired_ratio([r["fixed"] for r in rd], [r["fixed"] for r in w])}
        md += ["", f"Worker reads / Ray Data, end to end: {fmt_ratio(reader['e2e'])}; Ray Data's "
               f"fixed seconds / the worker's: {fmt_ratio(reader['fixed'])}."]
    pv = runs.get(PATHS["plain_val"])
    if w and pv:
        same_job = paired_ratio([r["e2e"] for r in w], [r["e2e"] for r in pv])
        ratios["stage vs plain validating"] = {"e2e": same_job}
        ok = ok and same_job["conclusive"]
        md += ["", "The same job (the incoming network validated, then every epoch trained and "
               f"validated), stage / plain loop, end to end: {fmt_ratio(same_job)}."]
    if w and off:
        extras = {"loop": paired_ratio([r["loop"] for r in off], [r["loop"] for r in w]),
                  "fixed": paired_ratio([r["fixed"] for r in w], [r["fixed"] for r in off])}
        md += ["", f"Train extras off / on (the default), in the epoch loop: {fmt_ratio(extras['loop'])}; "
               f"fixed seconds on / off: {fmt_ratio(extras['fixed'])}."]
    md += ["", f"Load average (1 min) at the end: {os.getloadavg()[0]:.2f}. Every epoch of a stage also "
           "validates, checkpoints and reports; MLflow is written by the stage's callback in Ray "
           "Train's controller."]
    data = {"args": vars(args), "ray_init_s": t_init, "runs": runs, "ratios": ratios,
            "worker_vs_ray_data": reader, "extras_off_vs_on": extras}
    metrics = {re.sub(r"[^A-Za-z0-9_]+", "_", k.lower()).strip("_") + f"_{a}_ratio": v[a]["median"]
               for k, v in ratios.items() if k != "plain PyTorch loop" for a in ("loop", "e2e") if a in v}
    publish(args.out, "system_overhead", "\n".join(md), data, vars(args), metrics)
    if not ok:
        print("INCONCLUSIVE: a ratio's spread is wider than its effect (see the table)", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
