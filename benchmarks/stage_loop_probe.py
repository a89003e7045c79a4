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

With ``--loop`` the paths are instead the two epoch loops on 8,000 random 28x28 images in memory
(``--epochs`` epochs, Adam with cosine annealing, batch 128, images/s of the median epoch after the
first): the plain loop's (``mscnn.train.fit``'s batches, ``split_batches`` over a scaled
``Split``) and the stage's (``pipelines.stage.ShardCache`` batches, the stage's per-batch hook),
each in this process's main thread and inside a one-worker ``TorchTrainer``: a 2x2 that says
whether what the stage loses is its loop's code or where it runs.

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
    return {"rate": steps / (time.perf_counter() - t0), "torch_threads": torch.get_num_threads()}


def _loop(kind: str, epochs: int, threads: int | None, prepare=None, pyramid: str | None = None) -> dict:
    """``epochs`` epochs of the plain loop's batches (``kind="fit"``) or the stage's
    (``"stage"``) over 8,000 random images (or the training split of ``pyramid``'s level 0, read
    as the stage's worker reads it): images/s of the median epoch after the first."""
    import types

    from mscnn.data import Split
    from mscnn.ode import ODENet
    from mscnn.train import make_step, split_batches, train_epoch
    from pipelines.stage import ShardCache, _maybe_fail

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = ODENet(channels=16, steps=2, n=28, classes=10)
    model = prepare(net) if prepare else net
    x, y, scale = torch.randn(8000, 1, 28, 28), torch.randint(0, 10, (8000,)), torch.tensor(2.0)
    if pyramid:
        from pipelines.pyramid import level_tensors

        split = level_tensors(pyramid, 0, "train")
        x, y = split.x, split.y
    step = make_step(net, "adam", 0.01, True, epochs * -(-len(y) // 128), forward=model)
    if kind == "stage":
        cache = ShardCache.of_tensors(x, y, 0, 1, "cpu", equal=True, scale=scale)
        spec = types.SimpleNamespace(extra={})
        recs = [train_epoch(step, cache.batches(128, "cpu", e), net,
                            on_batch=lambda i: _maybe_fail(spec, 0, i)) for e in range(epochs)]
    else:
        data, g = Split(x * scale, y), torch.Generator().manual_seed(0)
        recs = [train_epoch(step, split_batches(data, 128, g), net) for _ in range(epochs)]
    return {"rate": statistics.median(r["images_per_s"] for r in recs[1:] or recs),
            "torch_threads": torch.get_num_threads()}


def _in_thread(steps: int, threads: int | None) -> dict:
    out = {}
    t = threading.Thread(target=lambda: out.update(_steps(steps, threads)))
    t.start()
    t.join()
    return out


def _train_func(config: dict) -> None:
    import ray.train
    import ray.train.torch

    if config.get("loop"):
        res = _loop(config["loop"], config["epochs"], None, ray.train.torch.prepare_model,
                    config["pyramid"])
    else:
        res = _steps(config["steps"], None, ray.train.torch.prepare_model)
    # (Train V2 keeps a report's metrics in the Result only with a checkpoint: a file instead)
    Path(config["out"]).write_text(json.dumps(res))
    ray.train.report(res)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--loop", action="store_true", help="the plain and the stage's epoch loops instead")
    ap.add_argument("--epochs", type=int, default=4, help="with --loop")
    ap.add_argument("--pyramid", help="with --loop: train on this pyramid's level 0 (else random images)")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if args.pyramid:
        args.pyramid = str(Path(args.pyramid).resolve())  # the Train worker runs elsewhere

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

    def train(loop: str | None = None) -> dict:
        rounds[0] += 1
        out = Path(tmp) / f"probe{rounds[0]}.json"
        cfg = {"steps": args.steps, "out": str(out), "loop": loop, "epochs": args.epochs,
               "pyramid": args.pyramid}
        trainer = TorchTrainer(_train_func, train_loop_config=cfg,
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
    unit, first = "steps/s", "plain (main thread)"
    if args.loop:
        unit, first = "images/s", "plain loop, main thread"
        paths = {first: lambda: _loop("fit", args.epochs, args.threads, pyramid=args.pyramid),
                 "stage loop, main thread": lambda: _loop("stage", args.epochs, args.threads,
                                                          pyramid=args.pyramid),
                 "plain loop, Train worker": lambda: train("fit"),
                 "stage loop, Train worker": lambda: train("stage")}
    runs = alternate(paths, args.repeats)
    ray.shutdown()
    base = [r["rate"] for r in runs[first]]
    what = (f"{args.epochs} epochs over {args.pyramid or '8,000 random images'} in memory (median "
            "epoch after the first)"
            if args.loop else f"{args.steps} Adam steps on one fixed batch")
    md = [f"{what}, the demo ODENet (16 channels, 2 steps, 28x28, batch 128), "
          f"{args.threads} CPUs per path; {machine()}; {args.repeats} rotated rounds.", "",
          f"| where | {unit} median [min-max] | torch threads | / {first} |", "|---|---|---|---|"]
    ratios, ok = {}, True
    for name, rs in runs.items():
        v = [r["rate"] for r in rs]
        cell = f"{statistics.median(v):.1f} [{min(v):.1f}-{max(v):.1f}]"
        rel = ""
        if name != first:
            ratios[name] = paired_ratio(v, base)
            rel = fmt_ratio(ratios[name])
            ok = ok and ratios[name]["conclusive"]
        md.append(f"| {name} | {cell} | {sorted({r['torch_threads'] for r in rs})} | {rel} |")
    metrics = {f"{k.split(' (')[0].replace(' ', '_').replace(',', '')}_ratio": v["median"]
               for k, v in ratios.items()}
    publish(args.out, "stage_loop_probe" + "_loop" * args.loop, "\n".join(md),
            {"args": vars(args), "runs": runs, "ratios": ratios}, vars(args), metrics)
    return 0 if ok else 3


if __name__ == "__main__":
    sys.exit(main())
