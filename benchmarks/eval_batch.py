"""Two pieces of a stage's time outside its training steps (issue 18): the validation batch size and
the imports a stage's worker process pays before its first step.

    python benchmarks/eval_batch.py [--repeats 5] [--threads 2] [--batches 1000 256 128 64]

* **Validation batch**: ``mscnn.train.evaluate`` of the demo network (``configs/demo_single.yaml``'s
  level at 28x28) over the demo pyramid's validation split (8,000 images), once per batch size per
  round, alternating (rotated each round), and at what ``mscnn.train.eval_batch_size`` picks.
  Ratios are seconds at each batch size over seconds at 1,000 (the stage's validation batch before
  session 13), per round: median [min-max].
* **Worker imports**: a fresh Python process importing what a stage's worker imports
  (``torch, ray.train.torch, pipelines.stage, mscnn.models``), with and without ``torchvision``
  imported first (``mscnn.resnet`` imported torchvision at module level before session 13; it is
  now imported where a ResNet is built), alternating. Seconds per process start, median [min-max].
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import torch
from common import ROOT, alternate, fmt_ratio, machine, paired_ratio, publish

WORKER_IMPORTS = "import torch, ray.train.torch, pipelines.stage, mscnn.models"


def _imports(first: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"{first}{WORKER_IMPORTS}"], check=True, cwd=ROOT)
    return time.perf_counter() - t0


def _cell(v: list[float]) -> str:
    return f"{statistics.median(v):.2f} [{min(v):.2f}-{max(v):.2f}]"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1000, 256, 128, 64])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    if args.batches[0] != 1000:
        ap.error("--batches: the first is the reference (1000)")

    from mscnn.data import Split
    from mscnn.models import build_model
    from mscnn.train import eval_batch_size, evaluate, split_batches
    from pipelines.config import ScheduleConfig, load_config
    from pipelines.pyramid import build_pyramid, input_scale, level_for, level_tensors, read_manifest

    torch.set_num_threads(args.threads)
    cfg = load_config(ROOT / "configs" / "demo_single.yaml", ScheduleConfig)
    root, _ = build_pyramid(cfg.pyramid, (ROOT / cfg.pyramid_root).resolve())
    m = read_manifest(root)
    lv = cfg.levels[-1]
    v = level_tensors(root, level_for(m, lv.n, "n"), "val")
    val = Split(v.x * torch.tensor(input_scale(m)).view(1, -1, 1, 1), v.y)
    torch.manual_seed(0)
    net = build_model(cfg.model_config_for(0))
    auto = eval_batch_size(net, val.x[:1])  # what the stage and mscnn.train.accuracy now pick
    batches = list(dict.fromkeys([*args.batches, auto]))

    def timed(bs: int):
        def run() -> float:
            t0 = time.perf_counter()
            evaluate(net, split_batches(val, bs))
            return time.perf_counter() - t0
        return run

    evals = alternate({bs: timed(bs) for bs in batches}, args.repeats)
    imports = alternate({"torchvision first (before)": lambda: _imports("import torchvision; "),
                         "as committed": lambda: _imports("")}, args.repeats)
    md = [f"Validation of the demo network ({lv.n}x{lv.n}, {len(val)} images), {args.threads} torch "
          f"threads; {machine()}; {args.repeats} alternating rounds.", "",
          "| batch | seconds per pass | images/s | seconds / seconds at 1,000 |", "|---|---|---|---|"]
    ratios = {}
    for bs, ts in evals.items():
        r = paired_ratio(ts, evals[1000])
        ratios[bs] = r
        name = f"{bs} (eval_batch_size)" if bs == auto else bs
        md.append(f"| {name} | {_cell(ts)} | {len(val) / statistics.median(ts):,.0f} | "
                  f"{'' if bs == 1000 else fmt_ratio(r)} |")
    before, now = imports.values()
    imp = paired_ratio(now, before)
    md += ["", f"A stage worker's imports (`{WORKER_IMPORTS}`, a fresh process each):", "",
           "| | seconds |", "|---|---|",
           *(f"| {k} | {_cell(ts)} |" for k, ts in imports.items()),
           "", f"As committed / torchvision first: {fmt_ratio(imp)}."]
    data = {"args": vars(args), "eval_batch_size": auto, "eval_seconds": evals, "eval_ratios": ratios,
            "imports": imports, "imports_ratio": imp}
    metrics = {f"eval_{bs}_over_1000": r["median"] for bs, r in ratios.items() if bs != 1000}
    metrics |= {"imports_ratio": imp["median"], "imports_s": statistics.median(now)}
    publish(args.out, "eval_batch", "\n".join(md), data, vars(args), metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
