"""`make bench`: every benchmark, each printing its table of side-by-side measurements.

Results land in ``benchmarks/results/`` (markdown + JSON) and in MLflow (experiment
``mscnn-benchmarks``); ``benchmarks/RESULTS.md`` collects them with the commands. ``--quick`` runs
each with reduced settings (minutes instead of hours), to check that they all work.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
FULL = [
    ["inference_resolution.py"],
    ["system_overhead.py"],
    ["stage_loop_probe.py", "--steps", "300", "--repeats", "5"],
    ["eval_batch.py", "--repeats", "5"],
    ["pyramid_build.py"],
    ["pyramid_build.py", "--source", "imagenet10"],
    ["multiscale_training.py"],
    ["transfer_methods.py", "--seeds", "0", "1", "2", "--jobs", "3", "--threads", "1"],
    ["cross_resolution.py", "--seeds", "0", "1", "2", "--epochs", "3", "--sigma", "0"],
    ["resnet_imagenette.py"],
    ["consistent_stencils.py", "--seeds", "0", "1", "2"],
    ["stencil_length.py", "--seeds", "0"],
    ["consistent_stencils.py", "--seeds", "0", "1", "2", "--kinds", "moment-blur", "gaussian",
     "--length", "0.14", "--speed-repeats", "0", "--stem", "consistent_stencils_length0.14"],
    ["optimizers.py", "--budget", "480", "--depth-levels", "2", "4", "8", "16"],
]
QUICK = [
    ["inference_resolution.py", "--repeats", "2"],
    ["system_overhead.py", "--epochs", "1"],
    ["stage_loop_probe.py", "--steps", "20", "--repeats", "1"],
    ["eval_batch.py", "--repeats", "1"],
    ["multiscale_training.py", "--epochs", "1", "1", "1"],
    ["transfer_methods.py", "--seeds", "0", "--epochs", "1", "--mr-epochs", "1", "--coarse", "14"],
    ["resnet_imagenette.py", "--fine", "16", "--coarse", "8", "--max-epochs", "1"],
    ["consistent_stencils.py", "--train-count", "2000", "--epochs", "1", "--pairs", "14:28",
     "--kinds", "free", "moment-blur"],
    ["stencil_length.py", "--epochs", "1", "--lengths", "0", "0.14", "--kinds", "moment-blur"],
    ["optimizers.py", "--budget", "10", "--depth-levels", "2", "4", "--depth-iters", "1"],
]

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results)")
    args = ap.parse_args()
    failed = []
    for bench in QUICK if args.quick else FULL:
        if args.out and bench[0] != "optimizers.py":
            bench = [*bench, "--out", args.out]
        print(f"\n=== {' '.join(bench)}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.run([sys.executable, str(HERE / bench[0]), *bench[1:]]).returncode
        print(f"=== {bench[0]}: {time.perf_counter() - t0:.0f} s, exit {rc}", flush=True)
        if rc:  # 3: a ratio too noisy to claim anything (system_overhead); the others still run
            failed.append(f"{bench[0]} (exit {rc})")
    if failed:
        sys.exit("benchmarks that failed or were inconclusive: " + ", ".join(failed))
