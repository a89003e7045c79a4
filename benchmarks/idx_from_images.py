"""A second 28x28 IDX data set from the Imagenette subset, for the "nothing tuned to MNIST" checks
(issue 14): the four MNIST-named ``.gz`` files, so every MNIST path (``mnist_splits``,
``--data-dir``) reads it unchanged.

    python benchmarks/idx_from_images.py --out outputs/imagenette28 \\
        [--src ../shared/data/imagenet10] [--size 28] [--crops 5]

Each JPEG (``train/`` -> the training file, ``val/`` -> the test file) becomes ``--crops`` grayscale
``size x size`` images: the whole image, then (with 5) its four corner crops of 3/4 the side, each
resized with an antialiasing box filter. Crops of one photo stay in one file, so the test file shares
no photo with the training file; a validation split drawn from the training file (``mnist_splits``)
does share photos with the rest of it (say so where it is used). No MNIST file is read or changed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from common import ROOT

from mscnn.data import MNIST_FILES, find_data_dir, list_image_folder, write_idx

CROPS = 5  # the whole image and its four corners


def crops_of(path: Path, size: int, crops: int) -> np.ndarray:
    """``(crops, size, size)`` uint8: the whole image, then the corner crops of 3/4 its side."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("L")
        w, h = im.size
        s = (3 * min(w, h)) // 4
        boxes = [(0, 0, w, h), (0, 0, s, s), (w - s, 0, w, s), (0, h - s, s, h), (w - s, h - s, w, h)]
        return np.stack([np.asarray(im.resize((size, size), Image.Resampling.BOX, box=b), np.uint8)
                         for b in boxes[:crops]])


def build(src: Path, out: Path, size: int = 28, crops: int = 5) -> dict:
    """Write the four IDX files under ``out``; returns their counts and the class names."""
    if not 1 <= crops <= CROPS:
        raise ValueError(f"crops must be 1..{CROPS}, got {crops}")
    listed = {split: list_image_folder(src / folder)
              for split, folder in (("train", "train"), ("test", "val"))}
    if listed["train"][0] != listed["test"][0]:  # the labels are class indices: the same classes, in order
        raise ValueError(f"{src / 'val'}: classes {listed['test'][0]} differ from {src / 'train'}'s "
                         f"{listed['train'][0]}")
    out.mkdir(parents=True, exist_ok=True)
    summary = {"source": str(src), "size": size, "crops": crops, "classes": listed["train"][0]}
    for split, (_, items) in listed.items():
        x = np.concatenate([crops_of(f, size, crops) for f, _ in items])
        y = np.repeat(np.array([label for _, label in items], np.uint8), crops)
        img_f, lab_f = MNIST_FILES[split]
        write_idx(out / img_f, x)
        write_idx(out / lab_f, y)
        summary[split] = {"images": len(x), "photos": len(items), "per_class": np.bincount(y).tolist()}
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--src", default=None, help="the Imagenette folder (train/, val/); default: found "
                    "as the data sets are ($MSCNN_DATA_DIR or shared/data, sub-folder imagenet10)")
    ap.add_argument("--out", default=str(ROOT / "outputs" / "imagenette28"))
    ap.add_argument("--size", type=int, default=28)
    ap.add_argument("--crops", type=int, default=5)
    args = ap.parse_args()
    src, tried = (Path(args.src), []) if args.src else find_data_dir(
        "imagenet10", None, lambda d: (d / "train").is_dir() and (d / "val").is_dir())
    if src is None:
        raise SystemExit(f"no Imagenette folder (train/, val/) found; tried {[str(t) for t in tried]}")
    print(json.dumps(build(src, Path(args.out), args.size, args.crops), indent=1))


if __name__ == "__main__":
    main()
