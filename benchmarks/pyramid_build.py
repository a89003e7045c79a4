"""Building an image pyramid: Ray Data vs a single-process loop, on MNIST (70,000 IDX images,
3 levels 28/14/7) or Imagenette (2,500 JPEG files, 3 levels 224/112/56).

    python benchmarks/pyramid_build.py [--source mnist|imagenet10] [--data-dir DIR] [--repeats 3]

Paths: ``loop`` (one process, ``write_levels`` block after block, JPEG files decoded in it),
``ray`` (``build_pyramid``: one ``map_batches`` pass of ``write_levels`` per block, numpy-only
workers that decode their own block's files) and, for the before/after ratio, MNIST's
``ray-chained`` (one ``write_parquet`` per level, each level recomputing the ones below it) or
Imagenette's ``ray-driver-decode`` (the build before: every JPEG decoded in the driver, the uint8
images shipped to the tasks). All apply the same ``next_level`` and write the same Parquet layout
(the outputs' images are compared); each runs in its own subprocess, so peak memory (PSS of the
process tree, Ray's workers and object store included; the output check runs afterwards in the
parent) is measured separately. The paths alternate
(``--repeats`` rounds, each starting one path later); ratios are per round, median [min-max],
``ray.init`` excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))


def _loop(cfg, out: Path) -> dict:
    """The same per-block work as the Ray build (``write_levels``, the source's files decoded in
    it), one block after another; returns the normalisation as the build computes it."""
    from mscnn.transfer import level_operator
    from pipelines.pyramid import _load_source, normalisation, source_shape, write_levels

    _, _, splits = _load_source(cfg)
    n0 = source_shape(cfg, splits)[1]
    ops = [level_operator(n0 >> k, cfg.sigma, cfg.pair).numpy() for k in range(cfg.levels - 1)]
    part, written, train = 0, [], set()
    for split, (x, y) in splits.items():
        for i in range(0, len(y), cfg.shard_rows):
            col = "path" if x.ndim == 1 else "image"
            row = write_levels({col: x[i : i + cfg.shard_rows], "label": y[i : i + cfg.shard_rows],
                                "index": np.arange(i, min(i + cfg.shard_rows, len(y))),
                                "split": np.array([split]), "part": np.array([part])},
                               str(out), ops, size=n0)
            written.append({k: v[0] for k, v in row.items()})
            train |= {part} if split == "train" else set()
            part += 1
    return normalisation(written, train)


def _driver_decode(cfg, out: Path) -> dict:
    """The Imagenette build before: every file decoded in the driver, uint8 blocks shipped."""
    import ray

    from mscnn.images import read_image
    from mscnn.transfer import level_operator
    from pipelines.pyramid import _arrow_blocks, _load_source, normalisation, write_levels

    _, _, splits = _load_source(cfg)
    n0 = cfg.source.size
    decoded = {split: (np.stack([read_image(p, n0) for p in paths]), y)
               for split, (paths, y) in splits.items()}
    blocks, train = _arrow_blocks(decoded, cfg.shard_rows)
    ops = [level_operator(n0 >> k, cfg.sigma, cfg.pair).numpy() for k in range(cfg.levels - 1)]
    written = ray.data.from_arrow(blocks).map_batches(
        write_levels, batch_size=None, batch_format="numpy", fn_kwargs={"out": str(out), "ops": ops},
    ).take_all()
    return normalisation(written, train)


def _chained(cfg, out: Path) -> dict:
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
    from mscnn.images import channel_stats

    ds = ray.data.from_arrow(blocks)
    for k in range(cfg.levels):
        if k:
            ds = ds.map_batches(next_level, fn_kwargs={"sigma": cfg.sigma, "pair": cfg.pair},
                                batch_format="numpy", batch_size=1024)
        ds.write_parquet(str(out / f"level={k}"), partition_cols=["split"], filename_provider=_Parts(),
                         mode=ray.data.SaveMode.OVERWRITE)
    return channel_stats(splits["train"][0])


def _images(root: Path, levels: int) -> str:
    """A digest of every level's images and labels in index order (the outputs must agree)."""
    import hashlib

    import pyarrow.parquet as pq

    h = hashlib.sha256()
    for k in range(levels):
        for split in ("train", "val", "test"):
            files = sorted(str(p) for p in (root / f"level={k}" / f"split={split}").glob("*.parquet"))
            if not files:  # a source without this split
                continue
            t = pq.read_table(files, columns=["image", "label", "index"]).sort_by("index")
            img = t.column("image").combine_chunks()
            h.update(np.asarray((img.storage if hasattr(img, "storage") else img).flatten(),
                                dtype=np.float32).tobytes())
            h.update(t.column("label").to_numpy().tobytes())
    return h.hexdigest()[:16]


def _config(source: str, data_dir: str | None, levels: int, shard_rows: int | None):
    from mscnn.data import find_data_dir
    from pipelines.pyramid import PyramidConfig, SourceConfig

    if source == "mnist":
        src = SourceConfig(kind="mnist", path=data_dir)
    else:
        root, tried = find_data_dir("imagenet10", data_dir, ok=lambda p: (p / "train").is_dir())
        if root is None:
            raise SystemExit(f"imagenet10: no train/ folder in {', '.join(map(str, tried))}")
        src = SourceConfig(kind="folder", path=str(root), size=224)
    extra = {"shard_rows": shard_rows} if shard_rows else ({"shard_rows": 500} if source != "mnist" else {})
    return PyramidConfig(name=source, source=src, levels=levels, **extra)


def child(mode: str, source: str, data_dir: str | None, levels: int, shard_rows: int | None,
          out: Path) -> dict:
    """One build into ``out`` (the parent checks the images and removes them: the memory the
    check needs is not the build's)."""
    from pipelines.pyramid import build_pyramid, read_manifest

    cfg = _config(source, data_dir, levels, shard_rows)
    init = 0.0
    if mode.startswith("ray"):
        import ray

        t0 = time.perf_counter()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        init = time.perf_counter() - t0
        t0 = time.perf_counter()
        if mode == "ray":
            root = build_pyramid(cfg, out)[0]
            norm = read_manifest(root)["normalisation"]
        else:
            norm = (_chained if mode == "ray-chained" else _driver_decode)(cfg, out)
            root = out
    else:
        t0 = time.perf_counter()
        norm = _loop(cfg, out)
        root = out
    seconds = time.perf_counter() - t0
    return {"mode": mode, "seconds": seconds, "init_seconds": init, "root": str(root), "normalisation": norm}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", choices=["mnist", "imagenet10"], default="mnist")
    ap.add_argument("--data-dir")
    ap.add_argument("--levels", type=int, default=3)
    ap.add_argument("--shard-rows", type=int,
                    help="rows per shard (default: the config's, 500 for imagenet10)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--child", choices=["ray", "loop", "ray-chained", "ray-driver-decode"])
    ap.add_argument("--build-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.source, args.data_dir, args.levels,
                                           args.shard_rows, Path(args.build_dir))))
        return
    from common import alternate, fmt_ratio, machine, paired_ratio, publish
    from memory import PeakMemory

    def run(mode: str):
        def go() -> dict:
            build = Path(tempfile.mkdtemp(prefix=f"pyr-{mode}-"))
            cmd = [sys.executable, __file__, "--child", mode, "--levels", str(args.levels),
                   "--source", args.source, "--build-dir", str(build)]
            cmd += ["--data-dir", args.data_dir] if args.data_dir else []
            cmd += ["--shard-rows", str(args.shard_rows)] if args.shard_rows else []
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
            with PeakMemory(proc.pid) as mem:
                out, _ = proc.communicate()
            try:
                if proc.returncode:
                    raise SystemExit(f"{mode} run failed ({proc.returncode})")
                res = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
                return res | {"peak_mib": mem.peak / 2**20, "images": _images(Path(res["root"]), args.levels)}
            finally:
                shutil.rmtree(build, ignore_errors=True)
        return go

    before = "ray-chained" if args.source == "mnist" else "ray-driver-decode"
    modes = ("loop", "ray", before)
    runs = alternate({m: run(m) for m in modes}, args.repeats)
    digests = {r["images"] for m in modes for r in runs[m]}
    if len(digests) != 1:
        raise SystemExit(f"the paths wrote different images: {digests}")
    norms = {json.dumps(r["normalisation"]) for m in modes for r in runs[m]}
    if len(norms) != 1:
        raise SystemExit(f"the paths computed different normalisations: {norms}")
    cfg = _config(args.source, args.data_dir, args.levels, args.shard_rows)
    n = 70_000 if args.source == "mnist" else 2_500
    secs = {m: [r["seconds"] for r in runs[m]] for m in modes}
    ratios = {"ray / loop": paired_ratio(secs["loop"], secs["ray"]),
              f"{before} / loop": paired_ratio(secs["loop"], secs[before]),
              f"ray / {before}": paired_ratio(secs[before], secs["ray"])}
    lines = [f"{args.source} pyramid, {n} images, {args.levels} levels, {cfg.shard_rows} rows per shard; "
             f"{machine()}; {args.repeats} rounds alternating {' '.join(modes)}; load average at the end "
             f"{os.getloadavg()[0]:.1f}", "",
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
    lines.append(f"- every path wrote the same images (digest {digests.pop()}) and normalisation")
    stem = "pyramid_build" if args.source == "mnist" else f"pyramid_build_{args.source}"
    publish(args.out, stem, "\n".join(lines) + "\n",
            {"seconds": secs, "ratios": ratios, "runs": runs},
            {"source": args.source, "levels": args.levels, "repeats": args.repeats,
             "shard_rows": cfg.shard_rows},
            {k.replace(" / ", "_over_").replace("-", "_"): v["median"] for k, v in ratios.items()})


if __name__ == "__main__":
    main()
