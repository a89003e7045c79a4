"""Readers for the data sets the experiments use (plain numpy/torch, no Ray).

Where data is looked up (``find_data_dir``), and nothing else: the folder given (only there, when
one is given), else ``$MSCNN_DATA_DIR``, else ``DEFAULT_DATA_DIR`` (``shared/data`` beside the
repository, where the project keeps its real data); in each, the folder itself or its sub-folder of
the data set's name (``mnist``, ``imagenet10``). MNIST comes as its four IDX ``.gz`` files;
``download=True`` fetches them with torchvision where a network exists.

One split and one normalisation for every path: ``split_indices`` (a seeded random validation
set, as the pyramid draws it) and ``channel_stats`` (per-channel mean/std of the training images in
``[0, 1]``; images are divided by the std, never shifted). ``mnist_splits`` gives exactly the
images and scale that ``mscnn train`` reads from a pyramid built with the same seed.
"""

from __future__ import annotations

import gzip
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mscnn.images import IMAGE_SUFFIXES, channel_stats, read_image, unit_images

__all__ = [
    "DEFAULT_DATA_DIR",
    "MNIST_FILES",
    "MNIST_SCALE",
    "Split",
    "IMAGE_SUFFIXES",
    "channel_stats",
    "coarsen",
    "find_data_dir",
    "find_mnist_dir",
    "load_image_folder",
    "load_mnist",
    "mnist_splits",
    "read_idx",
    "read_image",
    "unit_images",
    "split_indices",
    "write_idx",
    "stratified_limit",
    "check_labels",
]

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"

MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Pixels are scaled to x / 255 / MNIST_SCALE (the training set's standard deviation), without
# shifting the mean: the background stays 0, which matches the zero boundary of the grid transfer.
MNIST_SCALE = 0.3081

_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array; a corrupt, truncated or
    mis-typed file raises ``ValueError`` naming the file."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise FileNotFoundError(f"IDX file not found: {path}") from None
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: not a readable gzip file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: bad IDX magic number {raw[:4].hex()!r}")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise ValueError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    want = int(np.prod(shape)) * dtype.itemsize
    if len(raw) - head != want:
        raise ValueError(
            f"{path}: IDX payload has {len(raw) - head} bytes, header shape {shape} needs {want}"
        )
    return np.frombuffer(raw, dtype=dtype, offset=head).reshape(shape)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> Path:
    """Write ``array`` (uint8, 1 to 255 dimensions) as an IDX file, gzipped when ``path`` ends in
    ``.gz`` (what ``read_idx`` and MNIST-format readers take). The file appears whole or not at
    all (written beside it, then renamed). Another dtype raises ``ValueError`` naming the file."""
    path, array = Path(path), np.asarray(array)
    if array.dtype != np.uint8 or not 1 <= array.ndim <= 255:
        raise ValueError(f"{path}: write_idx takes uint8 arrays of 1..255 dimensions, "
                         f"got {array.dtype} of shape {array.shape}")
    raw = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    raw += np.ascontiguousarray(array).tobytes()
    if path.suffix == ".gz":
        raw = gzip.compress(raw, mtime=0)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(raw)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def find_data_dir(name: str, data_dir: str | os.PathLike | None = None,
                  ok: callable = Path.is_dir) -> tuple[Path | None, list[Path]]:
    """``(folder, tried)``: the first of ``data_dir`` (when given, only it), ``$MSCNN_DATA_DIR`` or
    ``DEFAULT_DATA_DIR`` -- each itself or its ``name`` sub-folder -- for which ``ok(folder)``
    holds; ``folder`` is ``None`` when none does."""
    bases = [Path(data_dir)] if data_dir else (
        [Path(os.environ["MSCNN_DATA_DIR"])] if os.environ.get("MSCNN_DATA_DIR") else [DEFAULT_DATA_DIR])
    tried = [p for b in bases for p in (b, b / name)]
    return next((p for p in tried if ok(p)), None), tried


def find_mnist_dir(data_dir: str | os.PathLike | None = None, download: bool = False) -> Path:
    """The folder that holds the four MNIST files (see the module docstring for the search order)."""
    names = [f for pair in MNIST_FILES.values() for f in pair]
    found, tried = find_data_dir("mnist", data_dir, lambda d: all((d / f).is_file() for f in names))
    if found:
        return found
    if download:
        from torchvision.datasets import MNIST

        root = Path(data_dir or os.environ.get("MSCNN_DATA_DIR") or "data")
        MNIST(str(root), download=True)
        return root / "MNIST" / "raw"
    raise FileNotFoundError(
        "MNIST files not found (need " + ", ".join(names) + "). Looked in: "
        + ", ".join(str(d) for d in tried)
        + ". Pass --data-dir, set MSCNN_DATA_DIR, or allow a download."
    )


def load_mnist(
    split: str = "train", data_dir: str | os.PathLike | None = None, download: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST ``split`` ("train": 60,000, "test": 10,000) as ``x: (N, 1, 28, 28)`` float32 scaled
    by ``1 / (255 * MNIST_SCALE)`` and ``y: (N,)`` int64."""
    if split not in MNIST_FILES:
        raise ValueError(f"load_mnist: unknown split {split!r}; valid: {sorted(MNIST_FILES)}")
    d = find_mnist_dir(data_dir, download)
    img_f, lab_f = (d / f for f in MNIST_FILES[split])
    images, labels = read_idx(img_f), read_idx(lab_f)
    if images.ndim != 3 or labels.ndim != 1:
        raise ValueError(f"{img_f}: expected images (N, rows, cols) and labels (N,), got "
                         f"{images.shape} and {labels.shape}")
    if len(images) != len(labels):
        raise ValueError(f"{img_f} has {len(images)} images but {lab_f} has {len(labels)} labels")
    x = torch.from_numpy(images.astype(np.float32) / (255.0 * MNIST_SCALE)).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


@dataclass(frozen=True)
class Split:
    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


def coarsen(data: Split, levels: int, sigma: float, pair: str = "full-weighting") -> Split:
    """``levels`` times ``restrict_image(gaussian_blur(x, sigma), pair)`` (a pyramid's step,
    ``mscnn.transfer.pyramid_step``), in chunks; labels kept."""
    from mscnn.transfer import pyramid_step

    xs = []
    for x in data.x.split(4096):
        for _ in range(levels):
            x = pyramid_step(x, sigma, pair)
        xs.append(x)
    return Split(torch.cat(xs), data.y)


def stratified_limit(labels: np.ndarray, limit: int) -> np.ndarray:
    """Indices of at most ``limit`` items taken round-robin over the classes (in each class's own
    order), sorted: a subset keeps the class balance instead of cutting in class order.

    >>> stratified_limit(np.array([0, 0, 0, 1, 1, 2]), 4).tolist()
    [0, 1, 3, 5]
    """
    labels = np.asarray(labels)
    per = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    order = [p[k] for k in range(max((len(p) for p in per), default=0)) for p in per if k < len(p)]
    return np.sort(np.asarray(order[:limit], dtype=np.int64))


def check_labels(labels: np.ndarray, classes: int, where: str) -> None:
    """``ValueError`` naming ``where`` unless every label is in ``0 .. classes - 1``."""
    labels = np.asarray(labels)
    if len(labels) and (labels.min() < 0 or labels.max() >= classes):
        bad = labels[(labels < 0) | (labels >= classes)]
        raise ValueError(f"{where}: labels must be in 0..{classes - 1} ({classes} classes); "
                         f"found {sorted(set(bad.tolist()))[:5]}")


def split_indices(count: int, n_val: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(train, val)`` indices, each sorted: a seeded random ``n_val`` of ``count`` for validation.
    The pyramid (``pipelines.pyramid``) and ``mnist_splits`` both split with this.

    >>> tr, va = split_indices(10, 3, seed=0)
    >>> len(tr), len(va), sorted(set(tr) | set(va)) == list(range(10))
    (7, 3, True)
    """
    if not 0 <= n_val <= count:
        raise ValueError(f"split_indices: n_val={n_val} is not within 0..{count}")
    perm = np.random.default_rng(seed).permutation(count)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def mnist_splits(data_dir: str | os.PathLike | None = None, n_val: int = 10_000,
                 seed: int = 0) -> dict[str, Split]:
    """The split ``mscnn train`` uses (a pyramid with ``n_val`` and ``seed``): a seeded random
    ``n_val`` of the training file for validation, the rest for training, the test file as test;
    every image divided by the training split's standard deviation (``channel_stats``)."""
    d = find_mnist_dir(data_dir)
    raw = {}
    for split, (img_f, lab_f) in MNIST_FILES.items():
        x, y = read_idx(d / img_f), read_idx(d / lab_f)
        if len(x) != len(y):
            raise ValueError(f"{d / img_f} has {len(x)} images but {d / lab_f} has {len(y)} labels")
        raw[split] = (x[:, None], y.astype(np.int64))
    x, y = raw["train"]
    tr, va = split_indices(len(y), n_val, seed)
    parts = {"train": (x[tr], y[tr]), "val": (x[va], y[va]), "test": raw["test"]}
    std = np.asarray(channel_stats(parts["train"][0])["std"], dtype=np.float32).reshape(1, -1, 1, 1)
    return {k: Split(torch.from_numpy(unit_images(xi) / std), torch.from_numpy(yi))
            for k, (xi, yi) in parts.items()}


def list_image_folder(root: str | os.PathLike) -> tuple[list[str], list[tuple[Path, int]]]:
    """Class-per-folder images (as torchvision's ``ImageFolder``): ``(classes, [(file, label)])``,
    classes in sorted order; hidden entries (``.ipynb_checkpoints/``, ``.DS_Store``) are skipped.
    An empty class folder or a root without classes raises."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{root}: no class sub-folders")
    items = []
    for label, c in enumerate(classes):
        files = sorted(f for f in (root / c).iterdir()
                       if f.suffix in IMAGE_SUFFIXES and not f.name.startswith("."))
        if not files:
            raise ValueError(f"{root / c}: empty class folder (no {'/'.join(IMAGE_SUFFIXES[:3])} files)")
        items += [(f, label) for f in files]
    return classes, items


def synthetic(count: int, n: int, seed: int = 0, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """Seeded synthetic images ``(count, 1, n, n)`` float32 in [0, 1] and labels ``(count,)``:
    class 0 a horizontal bar, 1 a vertical bar, 2 a filled square, 3 a hollow square (cycled for
    more classes, with the bar width growing), at random positions and sizes."""
    if n < 8:
        raise ValueError(f"synthetic: n must be >= 8, got {n}")
    rng = np.random.default_rng(seed)
    x = np.zeros((count, 1, n, n), np.float32)
    y = rng.integers(0, classes, count)
    for i, c in enumerate(y):
        w = max(1, n // 8) * (1 + c // 4)
        L = int(rng.integers(n // 2, n - 2))
        r, q = (int(v) for v in rng.integers(1, n - L, 2))
        kind = c % 4
        if kind == 0:
            x[i, 0, r : r + w, q : q + L] = 1
        elif kind == 1:
            x[i, 0, r : r + L, q : q + w] = 1
        else:
            x[i, 0, r : r + L, q : q + L] = 1
            if kind == 3:
                x[i, 0, r + w : r + L - w, q + w : q + L - w] = 0
    x += 0.05 * rng.standard_normal(x.shape).astype(np.float32)
    return x, y.astype(np.int64)


def load_image_folder(root: str | os.PathLike, size: int) -> tuple[list[str], Split]:
    """Every image under ``root`` (class-per-folder) as ``(classes, Split)``: ``x`` float32 in
    ``[0, 1]`` of shape ``(count, 3, size, size)``, ``y`` int64 labels."""
    classes, items = list_image_folder(root)
    x = np.stack([read_image(f, size) for f, _ in items]).astype(np.float32) / 255.0
    y = np.array([label for _, label in items], dtype=np.int64)
    return classes, Split(torch.from_numpy(x), torch.from_numpy(y))
