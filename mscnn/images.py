"""Image files and pixel statistics in numpy and Pillow only: no torch, so that the pyramid
build's Ray workers (which decode and restrict images) start without importing it.

``channel_sums`` of uint8 images are exact integers, so the statistics of a data set gathered
block by block, in any order or on any worker, are the same to the last bit.
"""

from __future__ import annotations

import os

import numpy as np

__all__ = ["IMAGE_SUFFIXES", "channel_stats", "channel_sums", "check_image", "read_image",
           "stats_from_sums", "unit_images"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPEG", ".JPG", ".PNG")


def check_image(path: str | os.PathLike) -> None:
    """Open ``path``'s header without decoding its pixels (cheap); a file that is not an image
    raises ``ValueError`` naming it. A file truncated inside its pixel data passes here and fails
    in ``read_image``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.size  # noqa: B018 (the header is parsed on open; size proves it)
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot decode image ({e})") from None


def read_image(path: str | os.PathLike, size: int) -> np.ndarray:
    """One image as ``(3, size, size)`` uint8 RGB (grayscale converted), resized bilinearly.
    A corrupt or truncated file raises ``ValueError`` naming it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if im.size != (size, size):
                im = im.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot decode image ({e})") from None


def unit_images(x: np.ndarray) -> np.ndarray:
    """Images as float32 in ``[0, 1]`` (uint8 divided by 255; float passed through)."""
    return (x.astype(np.float32) / 255.0) if x.dtype == np.uint8 else x.astype(np.float32)


def channel_sums(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """``(sum, sum of squares, pixels per channel)`` of images ``(N, C, n, n)``: uint8 as exact
    int64 sums of the raw values (0..255), float images as float64 sums of their values."""
    if x.dtype == np.uint8:  # a histogram per channel: exact and without an int64 copy
        v = np.arange(256, dtype=np.int64)
        hist = np.stack([np.bincount(x[:, c].ravel(), minlength=256) for c in range(x.shape[1])])
        return hist @ v, hist @ (v * v), int(len(x) * x.shape[2] * x.shape[3])
    s, s2 = np.zeros(x.shape[1]), np.zeros(x.shape[1])
    for i in range(0, len(x), 4096):
        xi = x[i : i + 4096].astype(np.float64)
        s += xi.sum(axis=(0, 2, 3))
        s2 += (xi**2).sum(axis=(0, 2, 3))
    return s, s2, int(len(x) * x.shape[2] * x.shape[3])


def stats_from_sums(s: np.ndarray, s2: np.ndarray, count: int, scale: float = 1.0) -> dict[str, list[float]]:
    """Per-channel ``mean`` and ``std`` from ``channel_sums`` (added over blocks), the values
    divided by ``scale`` (255 for uint8 sums: statistics of the images in ``[0, 1]``)."""
    mean = np.asarray(s, np.float64) / (count * scale)
    var = np.asarray(s2, np.float64) / (count * scale * scale) - mean**2
    return {"mean": mean.tolist(), "std": np.sqrt(np.maximum(var, 0)).tolist()}


def channel_stats(x: np.ndarray) -> dict[str, list[float]]:
    """Per-channel ``mean`` and ``std`` of images ``(N, C, n, n)`` in ``[0, 1]`` (uint8 scaled).
    One normalisation serves every level of a pyramid.

    >>> channel_stats(np.array([[[[0, 255]]]], dtype=np.uint8))
    {'mean': [0.5], 'std': [0.5]}
    """
    return stats_from_sums(*channel_sums(x), scale=255.0 if x.dtype == np.uint8 else 1.0)
