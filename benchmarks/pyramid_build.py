"""Building the MNIST pyramid (all 70,000 images, 3 levels): Ray Data vs a single-process loop.

    python benchmarks/pyramid_build.py [--data-dir DIR] [--levels 3]

Both paths load the same source, apply the same ``next_level`` function per batch and write the
same Parquet layout; each runs in its own subprocess, so peak memory (PSS of the process tree,
Ray's workers and object store included) is measured separately. Prints images/s and the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def _loop(cfg, out: Path) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.data.extensions import ArrowTensorArray

    from mscnn.data import unit_images
    from pipelines.pyramid import _load_source, next_level

    _, _, splits = _load_source(cfg)
    for split, (x, y) in splits.items():
        for part, i in enumerate(range(0, len(y), cfg.shard_rows)):
            cols = {"image": unit_images(x[i : i + cfg.shard_rows])}
            for k in range(cfg.levels):
                if k:
                    cols = next_level(cols, cfg.sigma, cfg.pair)
                d = out / f"level={k}" / f"split={split}"
                d.mkdir(parents=True, exist_ok=True)
                n = len(cols["image"])
                pq.write_table(pa.table({
                    "image": ArrowTensorArray.from_numpy(cols["image"]),
                    "label": pa.array(y[i : i + n]),
                    "index": pa.array(np.arange(i, i + n, dtype=np.int64)),
                }), d / f"part-{part:05d}.parquet")


def child(mode: str, data_dir: str | None, levels: int) -> dict:
    from pipelines.pyramid import PyramidConfig, SourceConfig, build_pyramid

    cfg = PyramidConfig(name="mnist", source=SourceConfig(kind="mnist", path=data_dir), levels=levels)
    out = Path(tempfile.mkdtemp(prefix=f"pyr-{mode}-"))
    init = 0.0
    if mode == "ray":
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        init = time.perf_counter() - t0
        t0 = time.perf_counter()
        build_pyramid(cfg, out)
    else:
        t0 = time.perf_counter()
        _loop(cfg, out)
    return {"mode": mode, "seconds": time.perf_counter() - t0, "init_seconds": init}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir")
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--child", choices=["ray", "loop"])
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.data_dir, args.levels)))
        return
    from memory import PeakMemory

    rows = []
    for mode in ("loop", "ray"):
        cmd = [sys.executable, __file__, "--child", mode, "--levels", str(args.levels)]
        cmd += ["--data-dir", args.data_dir] if args.data_dir else []
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        with PeakMemory(proc.pid) as mem:
            out, _ = proc.communicate()
        if proc.returncode:
            raise SystemExit(f"{mode} run failed ({proc.returncode})")
        res = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
        res["peak_mib"] = mem.peak / 2**20
        rows.append(res)
    n = 70_000
    print(f"\nMNIST pyramid, {n} images, {args.levels} levels, 2 CPUs")
    print("| path | build s | images/s | Ray init s | peak memory MiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['seconds']:.1f} | {n / r['seconds']:.0f} | {r['init_seconds']:.1f} "
              f"| {r['peak_mib']:.0f} |")
    loop, ray_ = rows
    print(f"\nRay / loop throughput ratio: {loop['seconds'] / ray_['seconds']:.2f} "
          f"(build only; with Ray init: {loop['seconds'] / (ray_['seconds'] + ray_['init_seconds']):.2f})")


if __name__ == "__main__":
    main()
