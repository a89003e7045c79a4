"""Where a Ray Train stage's fixed time goes (issue 18): the pieces of a 1-epoch demo stage.

    python benchmarks/stage_fixed_cost.py [--repeats 2]

Level 0 (28x28) of the demo pyramid, one worker with 2 CPUs. Per repeat: Ray Data's
``materialize`` of the level's train and val splits, an empty ``TorchTrainer.fit`` (worker group
start and teardown, no data), the same with the materialised datasets, and a whole 1-epoch stage
through ``run_schedule`` (with the epoch's own time, training and validation, as the stage
reports it). Printed only (a profile, not a result to compare).

    python benchmarks/stage_fixed_cost.py --compare [--what extras|readers|worker_group|poll] [--repeats 3]

Alternates whole 1-epoch demo stages (each in a fresh subprocess with its own local Ray) under
settings that cut fixed cost: ``--what readers``: how the worker gets the level
(``scaling.reader``: Ray Data, materialised by the driver, or the worker's own pyarrow read into its
cache); ``--what extras``: Ray Train's preemption watcher and metrics callbacks on (Ray's default)
or off (``scaling.train_extras``), both with the worker reader; ``--what worker_group``: the demo's
whole multiscale schedule (14x14 then 28x28) with a Ray Train worker group per level against one
for the schedule (``scaling.worker_group``); ``--what poll``: that schedule with Ray Train's
controller polling its workers every 2 s (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, Ray's default) or
0.5 s. Reports the stage's
wall-clock outside the epoch and its phases (``pipelines.stage.stage_phases``), median [min-max]
per setting, and the paired ratios. (Session 7 compared the poll interval on a one-level stage:
inconclusive, not adopted.)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import ROOT

# (not compared: materialize_data false with this 1 worker x 2 CPUs on 2 CPUs hangs, the stage's
# streaming reads find no CPU left; that is why the default materialises)
COMPARISONS = {  # --what: the scaling settings compared, the first is the reference
    "readers": {"reader ray_data (materialised)": {"reader": "ray_data"},
                "reader worker (pyarrow into the cache)": {"reader": "worker"}},
    "extras": {"Train extras on (Ray's default)": {"reader": "worker", "train_extras": "on"},
               "Train extras off": {"reader": "worker", "train_extras": "off"}},
    "worker_group": {"a worker group per level": {"worker_group": "level"},
                     "one worker group for the schedule": {"worker_group": "schedule"}},
    # "env": variables set in the child before Ray starts (Ray Train propagates this one to its
    # controller, which polls the workers at that interval: their start, reports and end)
    "poll": {"Train polls every 2 s (Ray's default)": {"env": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "2"}},
             "Train polls every 0.5 s": {"env": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}}},
}
# the schedule a comparison runs (default: the 1-epoch demo stage): worker groups are compared on
# the demo's whole multiscale schedule (3 epochs at 14x14, 1 at 28x28)
SCHEDULES = {"worker_group": "demo_multiscale.yaml", "poll": "demo_multiscale.yaml"}


def _child(scaling: dict, schedule: str | None = None) -> dict:
    """One 1-epoch demo stage in this process (or the whole ``schedule``, a config file's name),
    with its own local Ray and ``scaling`` settings."""
    import os

    import ray

    from pipelines.config import ScheduleConfig, load_config
    from pipelines.schedule import run_schedule

    scaling = dict(scaling)
    os.environ.update(scaling.pop("env", {}))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="mscnn-fixed-"))
    one_stage = {"levels": [{"n": 28, "steps": 2, "epochs": 1, "optim": {"lr": 0.01}}]}
    cfg = load_config(ROOT / "configs" / (schedule or "demo_single.yaml"), ScheduleConfig, {
        "name": "fixed", "storage_path": str(tmp / "runs"), "experiment": "mscnn-benchmarks",
        **({} if schedule else one_stage), "scaling": {"num_workers": 1, "cpus_per_worker": 2, **scaling}})
    from pipelines.pyramid import build_pyramid

    build_pyramid(cfg.pyramid, Path(cfg.pyramid_root).resolve())
    t = time.perf_counter()
    res = run_schedule(cfg, log=lambda s: None)
    total = time.perf_counter() - t
    epochs = sum(s["seconds"] for s in res["stages"])  # training and validation, every level
    ray.shutdown()
    phases = {k: sum(s["phases"][k] for s in res["stages"]) for k in res["stages"][0]["phases"]}
    return {"stage_s": total, "epoch_s": epochs, "outside_epoch_s": total - epochs, "phases": phases,
            "final_val_accuracy": res["final_val_accuracy"]}


def compare(repeats: int, what: str) -> None:
    import json
    import os
    import statistics
    import subprocess
    import sys

    from common import alternate, fmt_ratio, paired_ratio

    settings = COMPARISONS[what]

    def run(scaling: dict):
        def go() -> dict:
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps(scaling),
                                  *(["--schedule", SCHEDULES[what]] if what in SCHEDULES else [])],
                                 capture_output=True, text=True, timeout=400)
            line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                raise SystemExit(f"child failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
            return json.loads(line[7:])
        return go

    runs = alternate({k: run(v) for k, v in settings.items()}, repeats)
    what_ran = (f"the schedule {SCHEDULES[what]} (every level's phases added up)" if what in SCHEDULES
                else "1-epoch demo stage (28x28)")
    print(f"\n{what_ran}, 1 worker x 2 CPUs, {repeats} alternating rounds, "
          f"load average {os.getloadavg()[0]:.1f}; seconds median [min-max]")
    print("| setting | stage s | epoch s | outside the epoch s | final val accuracy |")
    print("|---|---|---|---|---|")
    for k, rs in runs.items():
        cells = []
        for key in ("stage_s", "epoch_s", "outside_epoch_s"):
            v = [r[key] for r in rs]
            cells.append(f"{statistics.median(v):.1f} [{min(v):.1f}-{max(v):.1f}]")
        cells.append(" / ".join(f"{r['final_val_accuracy']:.4f}" for r in rs))
        print(f"| {k} | " + " | ".join(cells) + " |")
    phases = list(next(iter(runs.values()))[0]["phases"])
    print("\nphases, seconds median [min-max]\n| setting | " + " | ".join(phases) + " |")
    print("|---|" + "---|" * len(phases))
    for k, rs in runs.items():
        print(f"| {k} | " + " | ".join(
            f"{statistics.median(v):.1f} [{min(v):.1f}-{max(v):.1f}]"
            for v in ([r["phases"][ph] for r in rs] for ph in phases)) + " |")
    base = [r["outside_epoch_s"] for r in runs[next(iter(settings))]]
    for k in list(settings)[1:]:
        print(f"- fixed cost, {next(iter(settings))} / {k}: "
              f"{fmt_ratio(paired_ratio(base, [r['outside_epoch_s'] for r in runs[k]]))}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--compare", action="store_true")
    ap.add_argument("--what", choices=sorted(COMPARISONS), default="extras",
                    help="--compare: which scaling settings alternate")
    ap.add_argument("--child", metavar="SCALING_JSON")
    ap.add_argument("--schedule", help="--child: run this config file's whole schedule")
    args = ap.parse_args(argv)
    if args.child:
        import json

        print("RESULT " + json.dumps(_child(json.loads(args.child), args.schedule)), flush=True)
        return
    if args.compare:
        compare(args.repeats, args.what)
        return
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.config import ScheduleConfig, load_config
    from pipelines.pyramid import build_pyramid, load_level, read_manifest
    from pipelines.schedule import run_schedule

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    tmp = Path(tempfile.mkdtemp(prefix="mscnn-fixed-"))
    cfg = load_config(ROOT / "configs" / "demo_single.yaml", ScheduleConfig, {
        "name": "fixed", "storage_path": str(tmp / "runs"), "experiment": "mscnn-benchmarks",
        "levels": [{"n": 28, "steps": 2, "epochs": 1, "optim": {"lr": 0.01}}],
        "scaling": {"num_workers": 1, "cpus_per_worker": 2}})
    pyramid, _ = build_pyramid(cfg.pyramid, Path(cfg.pyramid_root).resolve())
    count = read_manifest(pyramid)["counts"]["train"]["total"]
    scaling = ScalingConfig(num_workers=1, resources_per_worker={"CPU": 2})
    for rep in range(args.repeats):
        t = time.perf_counter()
        ds = {s: load_level(pyramid, 0, s).materialize() for s in ("train", "val")}
        t_mat = time.perf_counter() - t
        t = time.perf_counter()
        TorchTrainer(lambda c: None, scaling_config=scaling,
                     run_config=RunConfig(name=f"empty{rep}", storage_path=str(tmp / "e"))).fit()
        t_empty = time.perf_counter() - t
        t = time.perf_counter()
        TorchTrainer(lambda c: None, scaling_config=scaling, datasets=ds,
                     run_config=RunConfig(name=f"emptyds{rep}", storage_path=str(tmp / "e"))).fit()
        t_empty_ds = time.perf_counter() - t
        t = time.perf_counter()
        res = run_schedule(cfg.model_copy(update={"name": f"fixed{rep}"}), log=lambda s: None)
        t_stage = time.perf_counter() - t
        h = res["stages"][0]["history"][0]
        print(f"repeat {rep}: materialize {t_mat:.1f} s; empty TorchTrainer.fit {t_empty:.1f} s, with "
              f"the datasets {t_empty_ds:.1f} s; 1-epoch stage {t_stage:.1f} s, of which the epoch "
              f"(training + validation) {h['stage_seconds']:.1f} s and its training loop "
              f"{count / h['images_per_s']:.1f} s",
              flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
