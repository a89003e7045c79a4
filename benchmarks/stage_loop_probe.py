"""Where the Ray Train stage's epoch-loop deficit comes from (issue 18): the same fixed training
steps timed in five places.

    python benchmarks/stage_loop_probe.py [--steps 150] [--repeats 3] [--threads 2]

Each path runs ``--steps`` optimiser steps of the demo's ODENet (16 channels, 2 steps, 28x28, Adam,
batch 128) on one fixed random batch held in memory -- no data loading, no validation, no
checkpoint, no report -- and times them after 10 warm-up steps:

* ``plain``: in this process's main thread;
* ``thread``: in a new thread of this process (a Ray Train worker runs the training function in a
  thread of its actor, not in its main thread);
* ``task``: in a Ray task holding ``--threads`` CPUs;
* ``actor thread``: in a thread of a Ray actor holding ``--threads`` CPUs (what Train does, without
  Train);
* ``Train``: inside a one-worker ``TorchTrainer`` (``ray.train.torch``, gloo, no datasets), the
  steps on the model ``prepare_model`` returns, as the stage runs them.

Each path also reports the torch threads it ran with. The paths alternate (rotated each round, one
``ray.init`` for all); ratios to ``plain`` are the median of the per-round ratios with their
min-max spread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from common import alternate, fmt_ratio, machine, paired_ratio, publish


def _steps(steps: int, threads: int | None, prepare=None) -> dict:
    """``steps`` Adam steps of the demo network on one fixed batch: steps/s and torch threads."""
    from mscnn.ode import ODENet

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = ODENet(channels=16, steps=2, n=28, classes=10)
    model = prepare(net) if prepare else net
    opt = torch.optim.Adam(net.parameters(), 1e-3)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))

    def one():
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    for _ in range(10):
        one()
    t0 = time.perf_counter()
    for _ in range(steps):
        one()
    return {"steps_per_s": steps / (time.perf_counter() - t0), "torch_threads": torch.get_num_threads()}


def _in_thread(steps: int, threads: int | None) -> dict:
    out = {}
    t = threading.Thread(target=lambda: out.update(_steps(steps, threads)))
    t.start()
    t.join()
    return out


def _train_func(config: dict) -> None:
    import ray.train
    import ray.train.torch

    res = _steps(config["steps"], None, ray.train.torch.prepare_model)
    # (Train V2 keeps a report's metrics in the Result only with a checkpoint: a file instead)
    Path(config["out"]).write_text(json.dumps(res))
    ray.train.report(res)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)

    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    ray.init(num_cpus=max(args.threads, 2), include_dashboard=False, log_to_driver=False)
    task = ray.remote(num_cpus=args.threads)(_steps)

    @ray.remote(num_cpus=args.threads)
    class Runner:
        def run(self, steps, threads):
            return _in_thread(steps, threads)

    tmp = tempfile.mkdtemp(prefix="mscnn-probe-")
    rounds = [0]

    def train() -> dict:
        rounds[0] += 1
        out = Path(tmp) / f"probe{rounds[0]}.json"
        trainer = TorchTrainer(_train_func, train_loop_config={"steps": args.steps, "out": str(out)},
                               scaling_config=ScalingConfig(num_workers=1, use_gpu=False,
                                                            resources_per_worker={"CPU": args.threads}),
                               run_config=RunConfig(name=f"probe{rounds[0]}", storage_path=tmp))
        trainer.fit()
        return json.loads(out.read_text())

    def actor() -> dict:
        r = Runner.remote()
        try:
            return ray.get(r.run.remote(args.steps, args.threads))
        finally:
            ray.kill(r)

    paths = {"plain (main thread)": lambda: _steps(args.steps, args.threads),
             "plain, in a new thread": lambda: _in_thread(args.steps, args.threads),
             "Ray task": lambda: ray.get(task.remote(args.steps, args.threads)),
             "Ray actor, in a thread": actor,
             "Ray Train worker (TorchTrainer)": train}
    runs = alternate(paths, args.repeats)
    ray.shutdown()
    base = [r["steps_per_s"] for r in runs["plain (main thread)"]]
    md = [f"{args.steps} Adam steps of the demo ODENet (16 channels, 2 steps, 28x28, batch 128) on one "
          f"fixed batch, {args.threads} CPUs per path; {machine()}; {args.repeats} rotated rounds.", "",
          "| where | steps/s median [min-max] | torch threads | / plain |", "|---|---|---|---|"]
    ratios, ok = {}, True
    for name, rs in runs.items():
        v = [r["steps_per_s"] for r in rs]
        cell = f"{statistics.median(v):.1f} [{min(v):.1f}-{max(v):.1f}]"
        rel = ""
        if name != "plain (main thread)":
            ratios[name] = paired_ratio(v, base)
            rel = fmt_ratio(ratios[name])
            ok = ok and ratios[name]["conclusive"]
        md.append(f"| {name} | {cell} | {sorted({r['torch_threads'] for r in rs})} | {rel} |")
    metrics = {f"{k.split(' (')[0].replace(' ', '_').replace(',', '')}_ratio": v["median"]
               for k, v in ratios.items()}
    publish(args.out, "stage_loop_probe", "\n".join(md), {"args": vars(args), "runs": runs,
                                                          "ratios": ratios}, vars(args), metrics)
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
