"""Image pyramids on Ray Data: source -> (Gaussian blur + restriction) per level -> Parquet shards.

Layout of a pyramid ``<out>/<name>/``::

    manifest.json                          source + checksums, seed, levels (n, h), counts per split
                                           and class, normalisation, sigma, pair, config hash, versions
    level=<k>/split=<split>/part-*.parquet image (Arrow fixed-shape tensor, float32 C x n x n),
                                           label (int64), index (int64)

Level 0 holds the source images scaled to [0, 1]; level k is
``restrict_image(gaussian_blur(level k-1, sigma), pair)``, computed as ``M x M^T`` with the step's
1D matrix (``mscnn.transfer.level_operator``; ``next_level`` on a batch). One Ray Data
``map_batches`` pass (``pipelines.pyramid_write.write_levels``, numpy only: no torch in the workers)
takes each block of source images through every level and writes its shards; image files
(``folder`` sources) are decoded in those tasks, in parallel, and the normalisation is computed
from the tasks' exact per-channel sums. A pyramid is built
in a temporary folder beside its target and renamed when whole; the same config again does no
work, and a different pyramid is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mscnn import data as mdata
from mscnn.fields import omit_later
from mscnn.images import check_image, stats_from_sums
from mscnn.transfer import get_pair, level_operator
from pipelines.pyramid_write import apply_level, write_levels
from pipelines.runtime import exclusive, require_ray

log = logging.getLogger(__name__)

__all__ = [
    "PyramidConfig",
    "SourceConfig",
    "build_pyramid",
    "check_shards",
    "input_scale",
    "level_for",
    "level_tensors",
    "load_level",
    "next_level",
    "normalisation",
    "read_manifest",
    "source_shape",
]

SPLITS = ("train", "val", "test")


class IdxFiles(BaseModel):
    """An IDX data set's files (names inside ``source.path``; gzipped or not): a train pair and,
    optionally, a test pair of ``[images, labels]``."""

    model_config = ConfigDict(extra="forbid")
    train: tuple[str, str]
    test: tuple[str, str] | None = None


class SourceConfig(BaseModel):
    """Where the images come from: ``idx`` (any IDX images/labels pair: Fashion-MNIST, KMNIST,
    EMNIST...), ``mnist`` (the ``idx`` preset with MNIST's file names, found through
    ``MSCNN_DATA_DIR`` when no path is given), ``folder`` (one sub-folder per class) or
    ``synthetic``."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["mnist", "idx", "folder", "synthetic"]
    path: str | None = None  # mnist/idx: folder of the IDX files; folder: root with train/ (and val/)
    size: int = 28  # folder: square size to resize to; synthetic: n
    count: int = 1000  # synthetic: images in all (split by val_fraction/test_fraction)
    classes: int = 4  # synthetic
    limit: int | None = None  # take only the first `limit` images of each file/split (subsets)
    idx: IdxFiles | None = None  # idx: the files (required); mnist: MNIST's names
    class_names: list[str] | None = None  # idx: names of classes 0..k-1 (default: "0".."max label")
    # mnist/idx: zero pixels added on every side (MNIST at 32x32 with pad 2, as LeNet-5 read it:
    # networks with three units, n % 4 == 0, then fit the 16x16 level too)
    pad: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check(self) -> SourceConfig:
        if self.kind == "idx" and (self.idx is None or not self.path):
            raise ValueError("kind 'idx' needs path (the folder) and idx: {train: [images, labels], "
                             "test: [images, labels]} (file names inside it)")
        if self.kind not in ("idx", "mnist") and (self.idx or self.class_names or self.pad):
            raise ValueError(f"idx, class_names and pad are for kinds 'idx' and 'mnist', not {self.kind!r}")
        return self

    @property
    def image_size(self) -> int:
        """The side of the pyramid's finest level: ``size`` plus the padding on both sides."""
        return self.size + 2 * self.pad

    def idx_files(self) -> dict[str, tuple[str, str]]:
        """``{split: (images, labels)}`` of an IDX source (MNIST's names for ``mnist``)."""
        if self.kind == "mnist" and self.idx is None:
            return dict(mdata.MNIST_FILES)
        return {s: tuple(f) for s, f in (("train", self.idx.train), ("test", self.idx.test)) if f}


class PyramidConfig(BaseModel):
    """A pyramid: its name, source, levels and transfer. Validated; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    source: SourceConfig
    levels: int = Field(3, ge=1, le=8)
    sigma: float = Field(1.0, ge=0)
    pair: str = "full-weighting"
    seed: int = 0
    n_val: int | None = 10_000  # mnist: validation images taken from the training file
    val_fraction: float = Field(0.2, gt=0, lt=1)  # synthetic / folder without val/
    shard_rows: int = Field(10_000, ge=1)

    @model_validator(mode="after")
    def _check(self) -> PyramidConfig:
        get_pair(self.pair)
        return self

    def identity(self) -> dict:
        """The settings that decide the pyramid's content: everything but its name and where the
        source was read from (the source's content enters through its checksums)."""
        d = self.model_dump(exclude={"name"})
        d["source"]["path"] = None  # as if found through MSCNN_DATA_DIR: those hashes stay as they were
        omit_later(d["source"], {"idx": None, "class_names": None, "pad": 0})
        return d

    def config_hash(self, checksums: dict[str, str]) -> str:
        """Content identity: the same files reached through ``--data-dir``, ``MSCNN_DATA_DIR``, a
        symlink or a trailing slash give the same hash."""
        blob = json.dumps({"config": self.identity(), "checksums": checksums}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def same_content(self, manifest: dict, checksums: dict[str, str]) -> bool:
        """Whether ``manifest`` (also one written before the hash left the path out) describes the
        pyramid this config builds from sources with these ``checksums``."""
        if manifest.get("config_hash") == self.config_hash(checksums):
            return True
        try:
            old = PyramidConfig.model_validate(manifest["config"])
        except (KeyError, ValueError):
            return False
        return old.identity() == self.identity() and manifest.get("checksums") == checksums


def next_level(batch: dict[str, np.ndarray], sigma: float, pair: str) -> dict[str, np.ndarray]:
    """One pyramid step on a numpy batch: ``image (B, C, n, n) -> (B, C, n/2, n/2)``,
    ``restrict_image(gaussian_blur(image, sigma), pair)`` computed as ``M x M^T``
    (``level_operator``, float64, rounded once); other columns pass through."""
    x = np.asarray(batch["image"])
    out = dict(batch)
    out["image"] = apply_level(x, level_operator(x.shape[-1], sigma, pair).numpy())
    return out


# ---------------------------------------------------------------- sources -> in-memory splits


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_source(cfg: PyramidConfig) -> tuple[dict, dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """``(source_info, checksums, {split: (images, labels)})``: images uint8/float32
    ``(N, C, n, n)``, or for ``folder`` sources the image files' paths ``(N,)`` (decoded in the
    build's tasks, in parallel). Everything that can be wrong with the input is found here, before
    any Ray work, but pixel data truncated inside an image file (found when the build decodes it)."""
    src = cfg.source
    if src.kind in ("mnist", "idx"):
        pairs = src.idx_files()
        d = mdata.find_mnist_dir(src.path) if src.kind == "mnist" else Path(src.path)
        files = [d / f for pair in pairs.values() for f in pair]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"source.idx: {', '.join(missing)} not found")
        checksums = {f.name: _sha256(f) for f in files}
        arrays = {}
        for split, (img_f, lab_f) in pairs.items():
            x, y = mdata.read_idx(d / img_f), mdata.read_idx(d / lab_f)
            if x.ndim != 3 or y.ndim != 1:
                raise ValueError(f"{d / img_f}: expected images (N, n, n) and labels (N,), got "
                                 f"{x.shape} and {y.shape} ({d / lab_f})")
            if len(x) != len(y):
                raise ValueError(f"{d / img_f} has {len(x)} images but {d / lab_f} has {len(y)} labels")
            if src.pad:
                x = np.pad(x, ((0, 0), (src.pad, src.pad), (src.pad, src.pad)))
            arrays[split] = (x[:, None], y.astype(np.int64))
        names = src.class_names or [str(i) for i in range(
            10 if src.kind == "mnist" else int(arrays["train"][1].max()) + 1)]
        for split, (_, lab_f) in pairs.items():
            mdata.check_labels(arrays[split][1], len(names), str(d / lab_f))
        x, y = arrays["train"]
        n_val = cfg.n_val if cfg.n_val is not None else int(len(y) * cfg.val_fraction)
        tr, va = mdata.split_indices(len(y), n_val, cfg.seed)
        splits = {"train": (x[tr], y[tr]), "val": (x[va], y[va])}
        if "test" in arrays:
            splits["test"] = arrays["test"]
        info = {"kind": src.kind, "path": str(d), "classes": names}
    elif src.kind == "folder":
        if not src.path:
            raise ValueError("source.path: required for kind 'folder'")
        root = Path(src.path)
        parts = {s: root / s for s in SPLITS if (root / s).is_dir()}
        if "train" not in parts:
            raise ValueError(f"source.path: {root} has no train/ sub-folder")
        splits, checksums, classes = {}, {}, None
        for split, folder in parts.items():
            cls, items = mdata.list_image_folder(folder)
            if classes is not None and cls != classes:
                raise ValueError(f"{folder}: classes {cls} differ from train/'s {classes}")
            classes = cls
            if src.limit:
                keep = mdata.stratified_limit(np.array([lab for _, lab in items]), src.limit)
                items = [items[i] for i in keep]
            for f, _ in items:  # not an image at all: found here; truncated pixels: in the build
                check_image(f)
            checksums.update({str(f.relative_to(root)): _sha256(f) for f, _ in items})
            splits[split] = (np.array([str(f) for f, _ in items]),
                             np.array([lab for _, lab in items], np.int64))
        if "val" not in splits:  # a validation split drawn from train/; test/ stays as it is
            x, y = splits["train"]
            tr, va = mdata.split_indices(len(y), int(len(y) * cfg.val_fraction), cfg.seed)
            splits |= {"train": (x[tr], y[tr]), "val": (x[va], y[va])}
        info = {"kind": "folder", "path": str(root), "classes": classes, "size": src.size}
    else:
        x, y = mdata.synthetic(src.count, src.size, cfg.seed, src.classes)
        checksums = {"synthetic": hashlib.sha256(x.tobytes()).hexdigest()}
        tr, va = mdata.split_indices(len(y), int(len(y) * cfg.val_fraction), cfg.seed)
        splits = {"train": (x[tr], y[tr]), "val": (x[va], y[va])}
        info = {"kind": "synthetic", "classes": [str(i) for i in range(src.classes)]}
    if src.limit and src.kind != "folder":
        splits = {k: (x[i], y[i]) for k, (x, y) in splits.items()
                  for i in [mdata.stratified_limit(y, src.limit)]}
    n = source_shape(cfg, splits)[1]
    if n % 2 ** (cfg.levels - 1):
        raise ValueError(
            f"levels: image size {n} is not divisible by 2**{cfg.levels - 1} "
            f"({cfg.levels} levels need {cfg.levels - 1} restrictions)"
        )
    return info, checksums, splits


def source_shape(cfg: PyramidConfig, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> tuple[int, int]:
    """``(channels, n)`` of the source's images (``folder``: RGB at ``source.size``)."""
    x = next(iter(splits.values()))[0]
    return (3, cfg.source.size) if x.ndim == 1 else (int(x.shape[1]), int(x.shape[-1]))


def _arrow_blocks(splits: dict, rows: int) -> tuple[list[pa.Table], set[int]]:
    """Every source split as Arrow tables of ``rows`` images each, as read (uint8 stays uint8: the
    conversion to [0, 1] runs in the build's tasks; paths stay paths: the tasks decode them),
    numbered ``part`` from 0 in split order; and the parts that hold the training split."""
    from ray.data.extensions import ArrowTensorArray

    out, train = [], set()
    for split, (x, y) in splits.items():
        for i in range(0, len(y), rows):
            xi = np.ascontiguousarray(x[i : i + rows])
            source = ({"path": pa.array(xi.tolist(), pa.string())} if x.ndim == 1
                      else {"image": ArrowTensorArray.from_numpy(xi)})
            train |= {len(out)} if split == "train" else set()
            out.append(pa.table({
                **source,
                "label": pa.array(y[i : i + rows], pa.int64()),
                "index": pa.array(np.arange(i, i + len(xi), dtype=np.int64)),
                "split": pa.array([split] * len(xi), pa.string()),
                "part": pa.array([len(out)] * len(xi), pa.int64()),
            }))
    return out, train


# ---------------------------------------------------------------- build


def normalisation(written: list[dict], parts: set[int]) -> dict[str, list[float]]:
    """The training images' per-channel mean and std in ``[0, 1]`` from the ``channel_sums`` that
    ``write_levels`` returned for the blocks ``parts``, added in part order (exact for uint8
    sources, so the same whichever worker wrote which block)."""
    rows = sorted((r for r in written if int(r["part"]) in parts), key=lambda r: int(r["part"]))
    s = sum(np.asarray(r["sum"]) for r in rows)
    s2 = sum(np.asarray(r["sumsq"]) for r in rows)
    exact = np.asarray(rows[0]["sum"]).dtype.kind in "iu"
    return stats_from_sums(s, s2, sum(int(r["pixels"]) for r in rows), scale=255.0 if exact else 1.0)


def read_manifest(root: str | os.PathLike) -> dict:
    p = Path(root) / "manifest.json"
    if not p.is_file():
        raise FileNotFoundError(f"not a pyramid (no manifest.json): {root}")
    return json.loads(p.read_text())


def _versions() -> dict:
    import ray

    from mscnn import __version__

    return {"mscnn": __version__, "torch": torch.__version__, "ray": ray.__version__,
            "pyarrow": pa.__version__, "numpy": np.__version__}


def build_pyramid(cfg: PyramidConfig, out: str | os.PathLike, verify: bool = False) -> tuple[Path, bool]:
    """Build the pyramid ``cfg`` under ``out/<name>`` with Ray Data. Returns ``(path, built)``;
    ``built`` is False when the same pyramid was already there (nothing is done then; its shards'
    sizes are checked, and with ``verify`` their SHA-256). One build per pyramid at a time (a lock
    beside it: a second build of it, e.g. by a concurrent sweep trial, waits and then finds it
    built); temporary folders of a killed build are removed."""
    target = Path(out) / cfg.name
    cfg = _with_recorded_source(cfg, target)
    info, checksums, splits = _load_source(cfg)
    with exclusive(Path(out) / f".{cfg.name}.lock", f"building pyramid {cfg.name} in {out}", wait=True):
        for stale in Path(out).glob(f".{cfg.name}.tmp-*"):  # left by a killed build (we hold the lock)
            shutil.rmtree(stale, ignore_errors=True)
        return _build(cfg, target, info, checksums, splits, verify)


def _with_recorded_source(cfg: PyramidConfig, target: Path) -> PyramidConfig:
    """A config without ``source.path`` (and no ``MSCNN_DATA_DIR``) reads the source from where the
    pyramid already at ``target`` recorded it, so ``--data-dir`` is given once, at the first build."""
    if cfg.source.path or cfg.source.kind == "synthetic" or os.environ.get("MSCNN_DATA_DIR"):
        return cfg
    try:
        recorded = read_manifest(target)["source"].get("path")
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return cfg
    if not recorded or not Path(recorded).is_dir():
        return cfg
    log.info("pyramid %s: reading its source from %s (recorded at its build)", target, recorded)
    return cfg.model_copy(update={"source": cfg.source.model_copy(update={"path": recorded})})


def _build(cfg: PyramidConfig, target: Path, info: dict, checksums: dict, splits: dict,
           verify: bool) -> tuple[Path, bool]:
    import ray

    chash = cfg.config_hash(checksums)
    if target.exists():
        try:
            manifest = read_manifest(target)
        except (FileNotFoundError, json.JSONDecodeError):
            manifest = {}
        old = manifest.get("config_hash")
        if cfg.same_content(manifest, checksums):
            check_shards(target, manifest, verify=verify)
            log.info("pyramid %s is up to date (config hash %s%s): nothing to do", target, old,
                     ", every shard's checksum verified" if verify else "")
            return target, False
        raise FileExistsError(
            f"{target} holds a different pyramid (config hash {old} != {chash}); "
            "choose another name or remove it"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cfg.name}.tmp-", dir=target.parent))
    t0 = time.perf_counter()
    try:
        require_ray("build_pyramid")
        channels, n0 = source_shape(cfg, splits)
        levels = [{"level": k, "n": n0 >> k, "h": 1.0 / (n0 >> k)} for k in range(cfg.levels)]
        blocks, train_parts = _arrow_blocks(splits, cfg.shard_rows)
        ops = [level_operator(n0 >> k, cfg.sigma, cfg.pair).numpy() for k in range(cfg.levels - 1)]
        try:
            written = ray.data.from_arrow(blocks).map_batches(
                write_levels, batch_size=None, batch_format="numpy",
                fn_kwargs={"out": str(tmp), "ops": ops, "size": n0},
            ).take_all()
        except Exception as e:  # an image file that fails to decode in a task: its own message
            bad = re.findall(r"ValueError: (.+: cannot decode image .+)", str(e))
            if bad:
                raise ValueError(bad[-1]) from None
            raise
        if sorted(int(r["part"]) for r in written) != list(range(len(blocks))):
            raise RuntimeError(f"pyramid {cfg.name}: parts written {sorted(r['part'] for r in written)}, "
                               f"expected 0..{len(blocks) - 1}")
        counts = {s: {"total": int(len(y)), "per_class": np.bincount(y, minlength=len(info["classes"]))
                      .tolist()} for s, (_, y) in splits.items()}
        manifest = {
            "name": cfg.name, "config": cfg.model_dump(), "config_hash": chash, "source": info,
            "checksums": checksums, "seed": cfg.seed, "levels": levels, "channels": channels,
            "counts": counts, "normalisation": normalisation(written, train_parts), "sigma": cfg.sigma,
            "pair": cfg.pair,
            "versions": _versions(), "build_seconds": time.perf_counter() - t0,
        }
        manifest["shards"] = _shards(tmp)
        manifest["shard_sha256"] = {rel: _sha256(tmp / rel) for rel in manifest["shards"]}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target, True


# ---------------------------------------------------------------- read


def _shards(root: Path) -> dict[str, int]:
    """``{relative path: size in bytes}`` of every shard of a pyramid folder."""
    files = sorted(root.glob("level=*/split=*/*.parquet"))
    return {str(f.relative_to(root)): f.stat().st_size for f in files}


def check_shards(root: str | os.PathLike, manifest: dict | None = None, verify: bool = False) -> None:
    """``ValueError`` naming the first shard that the manifest lists and that is missing or has
    another size (a deleted or truncated file), or that is there without being listed; with
    ``verify``, also one whose SHA-256 differs from the manifest's (a file changed in place)."""
    root = Path(root)
    m = manifest or read_manifest(root)
    want = m.get("shards")
    if want is None:  # a pyramid from before shard lists: row counts are still checked on read
        return
    have = _shards(root)
    for rel, size in want.items():
        if rel not in have:
            raise ValueError(f"pyramid {root} is damaged: shard {root / rel} is missing "
                             "(remove the folder to rebuild it)")
        if have[rel] != size:
            raise ValueError(f"pyramid {root} is damaged: shard {root / rel} has {have[rel]} bytes, "
                             f"the manifest says {size} (remove the folder to rebuild it)")
    extra = sorted(set(have) - set(want))
    if extra:
        raise ValueError(f"pyramid {root}: shard {root / extra[0]} is not in its manifest")
    if verify:
        sums = m.get("shard_sha256")
        if sums is None:
            raise ValueError(f"pyramid {root}: its manifest has no shard checksums (built before "
                             "they were recorded); remove the folder to rebuild it")
        for rel, digest in sums.items():
            if _sha256(root / rel) != digest:
                raise ValueError(f"pyramid {root} is damaged: shard {root / rel} does not match "
                                 "its SHA-256 in the manifest (remove the folder to rebuild it)")


def _level_dir(root: str | os.PathLike, level: int, split: str) -> Path:
    """The folder of one level and split, after checking its shards against the manifest: the
    listed files and sizes, and the row count in their Parquet footers."""
    import pyarrow.parquet as pq

    m = read_manifest(root)
    if not 0 <= level < len(m["levels"]):
        raise ValueError(f"{root}: level {level} out of range (pyramid has {len(m['levels'])})")
    d = Path(root) / f"level={level}" / f"split={split}"
    if not d.is_dir():
        raise ValueError(f"{root}: no split {split!r} (has {sorted(m['counts'])})")
    check_shards(root, m)
    rows = 0
    for f in sorted(d.glob("*.parquet")):
        try:
            rows += pq.ParquetFile(f).metadata.num_rows
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"{f}: not a readable Parquet shard ({e})") from None
    want = m["counts"][split]["total"]
    if rows != want:
        raise ValueError(f"{d}: {rows} rows in its shards, the manifest says {want} "
                         "(a shard is missing or damaged; remove the pyramid to rebuild it)")
    return d


def input_scale(manifest: dict) -> list[float]:
    """What every reader multiplies the pyramid's ``[0, 1]`` images by, per channel: ``1 / std`` of
    the level-0 training images (``mscnn.data.channel_stats``), the same at every level."""
    return [1.0 / s for s in manifest["normalisation"]["std"]]


def level_for(manifest: dict, n: int, where: str) -> int:
    """The pyramid level whose images are ``n x n``; ``ValueError`` naming ``where`` otherwise."""
    for lv in manifest["levels"]:
        if lv["n"] == n:
            return lv["level"]
    have = [lv["n"] for lv in manifest["levels"]]
    raise ValueError(f"{where}: n={n} is not a level of pyramid {manifest['name']} (has n in {have})")


def load_level(root: str | os.PathLike, level: int, split: str = "train"):
    """The shards of one level and split as a ``ray.data.Dataset`` (columns image, label, index).
    Feed Ray Train with ``datasets={"train": load_level(...)}`` and, on each worker,
    ``get_dataset_shard("train").iter_torch_batches(batch_size=...)``."""
    import ray

    return ray.data.read_parquet(str(_level_dir(root, level, split)), partitioning=None)


def level_tensors(root: str | os.PathLike, level: int, split: str = "train") -> mdata.Split:
    """One level and split as in-memory torch tensors, read with pyarrow alone (no Ray):
    ``x: (N, C, n, n)`` float32 in the order of ``index``, ``y: (N,)`` int64."""
    import pyarrow.parquet as pq

    d = _level_dir(root, level, split)
    m = read_manifest(root)
    n, c = m["levels"][level]["n"], m["channels"]
    t = pq.read_table(sorted(str(p) for p in d.glob("*.parquet"))).sort_by("index")
    flat = t.column("image").combine_chunks()
    storage = flat.storage if hasattr(flat, "storage") else flat
    x = np.asarray(storage.flatten(), dtype=np.float32).reshape(len(t), c, n, n)
    return mdata.Split(torch.from_numpy(x.copy()), torch.from_numpy(t.column("label").to_numpy().copy()))
