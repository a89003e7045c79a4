"""The pyramid build's Ray Data task: numpy and pyarrow only, so its workers never import torch
(a cold worker importing torch cost the build seconds; the step's matrices come from the driver).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

__all__ = ["apply_level", "write_levels"]


def apply_level(x: np.ndarray, op: np.ndarray) -> np.ndarray:
    """One pyramid step on images ``x (..., n, n)``: ``op @ x @ op.T`` with ``op`` the step's
    ``(n/2, n)`` matrix (``mscnn.transfer.level_operator``), in float64, rounded once to float32."""
    return np.matmul(np.matmul(op, np.asarray(x, dtype=np.float64)), op.T).astype(np.float32)


def write_levels(batch: dict[str, np.ndarray], out: str, ops: list[np.ndarray]) -> dict[str, np.ndarray]:
    """One block of source images through every level: level 0 = the images in [0, 1] (uint8 / 255
    in float32, as ``mscnn.data.unit_images``), level k = ``apply_level(level k-1, ops[k-1])``, each
    written to ``out/level=k/split=<split>/part-<part>.parquet`` (columns image, label, index).
    One pass per block: every image is read and transformed once (Ray's ``write_parquet`` writes
    one dataset to one place; chained per level it recomputed the levels below each one). Returns
    the block's ``part`` and row count."""
    from ray.data.extensions import ArrowTensorArray

    split, part = str(batch["split"][0]), int(batch["part"][0])
    x = np.asarray(batch["image"])
    x = x.astype(np.float32) / 255.0 if x.dtype == np.uint8 else x.astype(np.float32)
    label, index = pa.array(batch["label"], pa.int64()), pa.array(batch["index"], pa.int64())
    for k in range(len(ops) + 1):
        if k:
            x = apply_level(x, ops[k - 1])
        d = Path(out) / f"level={k}" / f"split={split}"
        d.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"image": ArrowTensorArray.from_numpy(np.ascontiguousarray(x)),
                                 "label": label, "index": index}), d / f"part-{part:05d}.parquet")
    return {"part": np.array([part]), "rows": np.array([len(index)])}
