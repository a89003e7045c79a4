"""Where a Ray Train stage's fixed time goes (issue 18): the pieces of a 1-epoch demo stage.

    python benchmarks/stage_fixed_cost.py [--repeats 2]

Level 0 (28x28) of the demo pyramid, one worker with 2 CPUs. Per repeat: Ray Data's
``materialize`` of the level's train and val splits, an empty ``TorchTrainer.fit`` (worker group
start and teardown, no data), the same with the materialised datasets, and a whole 1-epoch stage
through ``run_schedule`` (with the epoch's own time, training and validation, as the stage
reports it). Printed only (a profile, not a result to compare).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import ROOT


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
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
