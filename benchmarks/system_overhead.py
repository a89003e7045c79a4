"""What Ray costs: one Ray Train stage vs a plain PyTorch loop with the same model, data, threads.

    python benchmarks/system_overhead.py [--epochs 3] [--threads 2]

The data are level 0 (28x28) of the demo pyramid (``configs/pyramid_mnist_demo.yaml``, 8,000
training images; built if missing). The Ray side is ``pipelines.schedule.run_schedule`` of
``configs/demo_single.yaml`` with one worker holding ``--threads`` CPUs (Ray sets the worker's
torch threads from it); the plain side is ``mscnn.train.fit`` on the same Parquet shards read into
memory, with ``torch.set_num_threads(--threads)``. Printed: images/s inside the epoch loop (what
the stage reports), images/s end to end (the stage from submission to result: worker start, data
materialisation, checkpoints, MLflow), and their ratios. The pyramid build vs a plain loop is
``benchmarks/pyramid_build.py``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, machine, publish

from mscnn.data import Split
from mscnn.ode import ODENet
from mscnn.train import fit


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)

    import ray

    from pipelines.config import ScheduleConfig, load_config
    from pipelines.pyramid import build_pyramid, input_scale, level_tensors, read_manifest
    from pipelines.schedule import run_schedule

    with tempfile.TemporaryDirectory(prefix="mscnn-overhead-") as tmp:
        cfg = load_config(ROOT / "configs" / "demo_single.yaml", ScheduleConfig, {
            "name": "overhead", "storage_path": str(Path(tmp) / "runs"),
            "experiment": "mscnn-benchmarks", "levels": [{"n": 28, "steps": 2, "epochs": args.epochs,
                                                          "optim": {"lr": 0.01}}],
            "scaling": {"num_workers": 1, "cpus_per_worker": args.threads}})
        t0 = time.perf_counter()
        ray.init(num_cpus=max(args.threads, 2), include_dashboard=False, log_to_driver=False)
        t_init = time.perf_counter() - t0
        pyramid, _ = build_pyramid(cfg.pyramid, Path(cfg.pyramid_root).resolve())
        t0 = time.perf_counter()
        res = run_schedule(cfg, log=lambda s: None)
        t_ray = time.perf_counter() - t0
        ray.shutdown()
        hist = res["stages"][0]["history"]
        count = read_manifest(pyramid)["counts"]["train"]["total"]

        torch.set_num_threads(args.threads)
        m = read_manifest(pyramid)
        scale = torch.tensor(input_scale(m)).view(1, -1, 1, 1)
        t0 = time.perf_counter()
        tr = level_tensors(pyramid, 0, "train")
        tr = Split(tr.x * scale, tr.y)
        t_read = time.perf_counter() - t0
        torch.manual_seed(cfg.seed)
        net = ODENet(cfg.model_config_for(0))
        t0 = time.perf_counter()
        ph = fit(net, tr, args.epochs, 0.01, cfg.levels[0].optim.batch_size, cfg.seed)
        t_plain = time.perf_counter() - t0

    plain_loop = count / (sum(h["seconds"] for h in ph) / len(ph))
    ray_loop = sum(h["images_per_s"] for h in hist) / len(hist)
    ray_e2e = count * args.epochs / t_ray
    plain_e2e = count * args.epochs / (t_plain + t_read)
    rows = [("plain PyTorch loop", plain_loop, plain_e2e, t_plain + t_read),
            ("Ray Train stage (1 worker)", ray_loop, ray_e2e, t_ray)]
    head = (f"MNIST 28x28 demo level ({count} training images), ODENet 16 channels 2 steps, batch "
            f"{cfg.levels[0].optim.batch_size}, {args.epochs} epochs, {args.threads} threads; "
            f"{machine()}; ray.init {t_init:.1f} s (not counted).")
    md = [head, "", "| | images/s in the epoch loop | images/s end to end | seconds end to end |",
          "|---|---|---|---|"]
    md += [f"| {a} | {b:,.0f} | {c:,.0f} | {d:.1f} |" for a, b, c, d in rows]
    md += ["", f"Ray / plain: {ray_loop / plain_loop:.2f} in the loop, {ray_e2e / plain_e2e:.2f} end "
           f"to end (each epoch of the stage also validates, checkpoints and logs to MLflow)."]
    data = {"args": vars(args), "plain_loop_img_s": plain_loop, "ray_loop_img_s": ray_loop,
            "plain_e2e_img_s": plain_e2e, "ray_e2e_img_s": ray_e2e, "ray_init_s": t_init,
            "ray_history": hist, "plain_history": ph}
    publish(args.out, "system_overhead", "\n".join(md), data, vars(args),
            {k: v for k, v in data.items() if isinstance(v, float)})


if __name__ == "__main__":
    main()
