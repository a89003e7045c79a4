"""Building the MNIST pyramid (all 70,000 images, 3 levels): Ray Data vs a single-process loop.

    python benchmarks/pyramid_build.py [--data-dir DIR] [--levels 3] [--repeats 3]

Paths: ``loop`` (one process, ``write_levels`` block after block), ``ray`` (``build_pyramid``: one
``map_batches`` pass of ``write_levels`` per block, numpy-only workers) and ``ray-chained`` (the
build before: one ``write_parquet`` per level, each level recomputing the ones below it, float
images shipped from the driver; with today's ``next_level`` numerics). All load the same source,
apply the same ``next_level`` and write the same Parquet layout (the outputs' images are compared);
each runs in its own subprocess, so peak memory (PSS of the process tree, Ray's workers and object
store included) is measured separately. The paths alternate (loop ray ray-chained, ``--repeats``
rounds); ratios are per round, median [min-max], ``ray.init`` excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def _loop(cfg, out: Path) -> None:
    """The same per-block work as the Ray build (``write_levels``), one block after another."""
    from mscnn.transfer import level_operator
    from pipelines.pyramid import _load_source, write_levels

    _, _, splits = _load_source(cfg)
    n0 = next(iter(splits.values()))[0].shape[-1]
    ops = [level_operator(n0 >> k, cfg.sigma, cfg.pair).numpy() for k in range(cfg.levels - 1)]
    part = 0
    for split, (x, y) in splits.items():
        for i in range(0, len(y), cfg.shard_rows):
            write_levels({"image": x[i : i + cfg.shard_rows], "label": y[i : i + cfg.shard_rows],
                          "index": np.arange(i, min(i + cfg.shard_rows, len(y))),
                          "split": np.array([split]), "part": np.array([part])},
                         str(out), ops)
            part += 1


def _chained(cfg, out: Path) -> None:
    """The Ray Data build before this change (kept here for the before/after ratio)."""
    import pyarrow as pa
    import ray
    from ray.data.datasource import FilenameProvider
    from ray.data.extensions import ArrowTensorArray

    from mscnn.data import unit_images
    from pipelines.pyramid import _load_source, next_level

    class _Parts(FilenameProvider):
        def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
            return f"part-{task_index:05d}.parquet"

    _, _, splits = _load_source(cfg)
    blocks = []
    for split, (x, y) in splits.items():
        for i in range(0, len(y), cfg.shard_rows):
            xi = unit_images(x[i : i + cfg.shard_rows])
            blocks.append(pa.table({
                "image": ArrowTensorArray.from_numpy(np.ascontiguousarray(xi)),
                "label": pa.array(y[i : i + cfg.shard_rows], pa.int64()),
                "index": pa.array(np.arange(i, i + len(xi), dtype=np.int64)),
                "split": pa.array([split] * len(xi), pa.string())}))
    ds = ray.data.from_arrow(blocks)
    for k in range(cfg.levels):
        if k:
            ds = ds.map_batches(next_level, fn_kwargs={"sigma": cfg.sigma, "pair": cfg.pair},
                                batch_format="numpy", batch_size=1024)
        ds.write_parquet(str(out / f"level={k}"), partition_cols=["split"], filename_provider=_Parts(),
                         mode=ray.data.SaveMode.OVERWRITE)


def _images(root: Path, levels: int) -> str:
    """A digest of every level's images and labels in index order (the outputs must agree)."""
    import hashlib

    import pyarrow.parquet as pq

    h = hashlib.sha256()
    for k in range(levels):
        for split in ("train", "val", "test"):
            files = sorted(str(p) for p in (root / f"level={k}" / f"split={split}").glob("*.parquet"))
            t = pq.read_table(files, columns=["image", "label", "index"]).sort_by("index")
            img = t.column("image").combine_chunks()
            h.update(np.asarray((img.storage if hasattr(img, "storage") else img).flatten(),
                                dtype=np.float32).tobytes())
            h.update(t.column("label").to_numpy().tobytes())
    return h.hexdigest()[:16]


def child(mode: str, data_dir: str | None, levels: int) -> dict:
    import shutil

    from pipelines.pyramid import PyramidConfig, SourceConfig, build_pyramid

    cfg = PyramidConfig(name="mnist", source=SourceConfig(kind="mnist", path=data_dir), levels=levels)
    out = Path(tempfile.mkdtemp(prefix=f"pyr-{mode}-"))
    init = 0.0
    try:
        if mode.startswith("ray"):
            import ray

            t0 = time.perf_counter()
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            init = time.perf_counter() - t0
            t0 = time.perf_counter()
            if mode == "ray":
                root = build_pyramid(cfg, out)[0]
            else:
                _chained(cfg, out)
                root = out
        else:
            t0 = time.perf_counter()
            _loop(cfg, out)
            root = out
        seconds = time.perf_counter() - t0
        return {"mode": mode, "seconds": seconds, "init_seconds": init, "images": _images(root, levels)}
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir")
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--child", choices=["ray", "loop", "ray-chained"])
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.data_dir, args.levels)))
        return
    from common import alternate, fmt_ratio, machine, paired_ratio, publish
    from memory import PeakMemory

    def run(mode: str):
        def go() -> dict:
            cmd = [sys.executable, __file__, "--child", mode, "--levels", str(args.levels)]
            cmd += ["--data-dir", args.data_dir] if args.data_dir else []
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            with PeakMemory(proc.pid) as mem:
                out, _ = proc.communicate()
            if proc.returncode:
                raise SystemExit(f"{mode} run failed ({proc.returncode})")
            res = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
            return res | {"peak_mib": mem.peak / 2**20}
        return go

    modes = ("loop", "ray", "ray-chained")
    runs = alternate({m: run(m) for m in modes}, args.repeats)
    digests = {r["images"] for m in modes for r in runs[m]}
    if len(digests) != 1:
        raise SystemExit(f"the paths wrote different images: {digests}")
    n = 70_000
    secs = {m: [r["seconds"] for r in runs[m]] for m in modes}
    ratios = {"ray / loop": paired_ratio(secs["loop"], secs["ray"]),
              "ray-chained / loop": paired_ratio(secs["loop"], secs["ray-chained"]),
              "ray / ray-chained": paired_ratio(secs["ray-chained"], secs["ray"])}
    lines = [f"MNIST pyramid, {n} images, {args.levels} levels; {machine()}; {args.repeats} rounds "
             f"alternating {' '.join(modes)}; load average at the end {os.getloadavg()[0]:.1f}", "",
             "| path | build s (median [min-max]) | images/s | Ray init s | peak memory MiB |",
             "|---|---|---|---|---|"]
    for m in modes:
        s_ = secs[m]
        lines.append(f"| {m} | {statistics.median(s_):.1f} [{min(s_):.1f}-{max(s_):.1f}] | "
                     f"{n / statistics.median(s_):.0f} | "
                     f"{statistics.median(r['init_seconds'] for r in runs[m]):.1f} | "
                     f"{max(r['peak_mib'] for r in runs[m]):.0f} |")
    lines += ["", "Throughput ratios (per round, ray.init excluded), median [min-max]:"]
    lines += [f"- {k}: {fmt_ratio(v)}" for k, v in ratios.items()]
    lines.append(f"- every path wrote the same images (digest {digests.pop()})")
    publish(args.out, "pyramid_build", "\n".join(lines) + "\n",
            {"seconds": secs, "ratios": ratios, "runs": runs},
            {"levels": args.levels, "repeats": args.repeats},
            {k.replace(" / ", "_over_").replace("-", "_"): v["median"] for k, v in ratios.items()})


if __name__ == "__main__":
    main()
