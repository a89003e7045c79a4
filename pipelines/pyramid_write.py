"""The pyramid build's Ray Data task: numpy, Pillow and pyarrow only, so its workers never import
torch (a cold worker importing torch cost the build seconds; the step's matrices come from the
driver). Image files are decoded here, in the tasks, not in the driver.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from mscnn.images import channel_sums, read_image, unit_images

__all__ = ["CHUNK_BYTES", "apply_level", "chunk_rows", "source_images", "write_levels"]


def apply_level(x: np.ndarray, op: np.ndarray) -> np.ndarray:
    """One pyramid step on images ``x (..., n, n)``: ``op @ x @ op.T`` with ``op`` the step's
    ``(n/2, n)`` matrix (``mscnn.transfer.level_operator``), in float64, rounded once to float32."""
    return np.matmul(np.matmul(op, np.asarray(x, dtype=np.float64)), op.T).astype(np.float32)


def source_images(batch: dict[str, np.ndarray], size: int | None = None) -> np.ndarray:
    """A block's source images: its ``image`` column as read, or its ``path`` column's files
    decoded (``mscnn.images.read_image``: uint8 RGB resized to ``size``)."""
    if "image" in batch:
        return np.asarray(batch["image"])
    if size is None:
        raise ValueError("source_images: a block of image paths needs the size to decode them to")
    return np.stack([read_image(str(p), size) for p in batch["path"]])


CHUNK_BYTES = 64 << 20  # float64 bytes of one chunk of a block: at most this much is in flight


def chunk_rows(channels: int, n: int) -> int:
    """Images per chunk so that one chunk in float64 stays within ``CHUNK_BYTES`` (64 MiB): 10,000
    MNIST images (a whole block) at 28x28, 55 RGB images at 224x224. A block goes through the
    levels chunk by chunk: the memory a task touches is bounded whatever the block's size, and a
    fresh worker's first block no longer pays for faulting in gigabytes (measured: the first
    500-image Imagenette block took 3.1 s in a fresh process, the next ones 1.4 s; a prototype in
    50-image chunks took 1.5 s from the first)."""
    return max(1, CHUNK_BYTES // (8 * channels * n * n))


def write_levels(batch: dict[str, np.ndarray], out: str, ops: list[np.ndarray],
                 size: int | None = None) -> dict[str, np.ndarray]:
    """One block of source images (``source_images``) through every level: level 0 = the images
    in [0, 1] (uint8 / 255 in float32, as ``mscnn.images.unit_images``), level k =
    ``apply_level(level k-1, ops[k-1])``, each written to
    ``out/level=k/split=<split>/part-<part>.parquet`` (columns image, label, index), one row group
    per ``chunk_rows`` images. One pass per block: every image is read and transformed once (Ray's
    ``write_parquet`` writes one dataset to one place; chained per level it recomputed the levels
    below each one). Returns the block's ``part``, row count, and level 0's ``channel_sums``
    (``sum``, ``sumsq``, ``pixels``; exact integers for uint8 sources) from which the driver
    computes the normalisation."""
    from ray.data.extensions import ArrowTensorArray

    split, part = str(batch["split"][0]), int(batch["part"][0])
    rows = len(batch["label"])
    files = [Path(out) / f"level={k}" / f"split={split}" / f"part-{part:05d}.parquet"
             for k in range(len(ops) + 1)]
    writers: list[pq.ParquetWriter | None] = [None] * len(files)
    shape = np.shape(batch["image"])[1:] if "image" in batch else (3, size, size)
    step, total = chunk_rows(shape[0], shape[-1]), None
    try:
        for i in range(0, rows, step):
            x = source_images({c: batch[c][i : i + step] for c in ("image", "path") if c in batch}, size)
            sums = channel_sums(x)
            total = sums if total is None else (total[0] + sums[0], total[1] + sums[1], total[2] + sums[2])
            x = unit_images(x)
            label = pa.array(batch["label"][i : i + len(x)], pa.int64())
            index = pa.array(batch["index"][i : i + len(x)], pa.int64())
            for k, f in enumerate(files):
                if k:
                    x = apply_level(x, ops[k - 1])
                t = pa.table({"image": ArrowTensorArray.from_numpy(np.ascontiguousarray(x)),
                              "label": label, "index": index})
                if writers[k] is None:
                    f.parent.mkdir(parents=True, exist_ok=True)
                    writers[k] = pq.ParquetWriter(f, t.schema)
                writers[k].write_table(t)
    finally:
        for w in writers:
            if w is not None:
                w.close()
    s, s2, pixels = total
    return {"part": np.array([part]), "rows": np.array([rows]), "sum": s[None], "sumsq": s2[None],
            "pixels": np.array([pixels])}
