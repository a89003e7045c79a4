"""``mscnn predict`` and ``mscnn export``: a trained checkpoint used on images of any resolution,
and written as TorchScript and ONNX.

A checkpoint written by a schedule records how its inputs were made (``lineage["data"]``: the
pyramid's per-channel scale, blur sigma, transfer pair and class names), so predicting needs
nothing but the checkpoint and the images. How a network meets images of another resolution
(``method="auto"``), from what was measured here (benchmarks/RESULTS.md):

- images finer by ``2**k``: the images are coarsened as the pyramid coarsens them (blur +
  restriction), so the network sees exactly the kind of image it was trained on;
- images coarser by ``2**k``: the network moves to them (``to_resolution``: scale-consistent
  stencils are re-discretised, free 3x3 stencils are kept as they are, which measured at least as
  well as their Galerkin restriction moving down; ResNets through ``resnet_to_resolution``);
- any other size: the images are resized (antialiased) to the network's own resolution.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mscnn.checkpoint import load_checkpoint
from mscnn.hierarchy import handover_sigma, to_resolution
from mscnn.ode import ODENet
from mscnn.transfer import pyramid_step

__all__ = ["METHODS", "export", "predict", "read_images", "to_images"]

METHODS = ("auto", "native", "coarsen-images", "move-network", "resize-images")


def _data(lineage: dict, path) -> dict:
    d = lineage.get("data")
    if not d:
        raise ValueError(f"checkpoint {path} does not record its input scale (written before "
                         "checkpoints carried lineage['data']); retrain or add it to lineage.json")
    return d


def read_images(paths: list[str | os.PathLike], channels: int, n: int | None = None) -> torch.Tensor:
    """Images as ``(B, channels, m, m)`` floats in ``[0, 1]``: grayscale for one channel, RGB for
    three; a non-square image is centre-cropped; ``n`` resizes to ``n x n`` (else all images must
    share one size). Errors name the file."""
    from PIL import Image, UnidentifiedImageError

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                w, h = im.size
                s = min(w, h)
                im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
                if n and s != n:
                    im = im.resize((n, n), Image.Resampling.BILINEAR, reducing_gap=None)
                a = np.asarray(im, dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise ValueError(f"{p}: cannot decode image ({e})") from None
        out.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    sizes = {a.shape[-1] for a in out}
    if len(sizes) > 1:
        raise ValueError(f"images of several sizes {sorted(sizes)}: pass --n to read them all at one")
    return torch.from_numpy(np.stack(out))


def _ratio(n_img: int, n_net: int) -> int | None:
    """``k`` with ``n_img = n_net * 2**k`` (negative: coarser), or None."""
    for k in range(-6, 7):
        if (n_net * 2**k if k >= 0 else n_net / 2**-k) == n_img:
            return k
    return None


def to_images(model: torch.nn.Module, x: torch.Tensor, data: dict, method: str = "auto"):
    """``(model, x, how)``: the network and the (scaled) images it should classify, for images
    ``x`` of any square size, by ``method`` (see the module docstring)."""
    if method not in METHODS:
        raise ValueError(f"method: {method!r} is not one of {METHODS}")
    n_net, n_img = model.config.n, x.shape[-1]
    k = _ratio(n_img, n_net)
    if method == "auto":
        method = ("native" if k == 0 else "coarsen-images" if k and k > 0 else
                  "move-network" if k is not None else "resize-images")
    scale = torch.tensor(data["input_scale"], dtype=x.dtype).view(1, -1, 1, 1)
    if method == "native":
        if k != 0:
            raise ValueError(f"method native: the images are {n_img}x{n_img}, the network {n_net}x{n_net}")
        return model, x * scale, f"native {n_net}x{n_net}"
    if method == "resize-images":
        x = F.interpolate(x, size=(n_net, n_net), mode="bilinear", antialias=True, align_corners=False)
        return model, x * scale, f"images resized {n_img} -> {n_net}"
    if k is None:
        raise ValueError(f"method {method}: {n_img} is not {n_net} times a power of 2; use resize-images")
    if method == "coarsen-images":
        if k < 0:
            raise ValueError(f"method coarsen-images: the images ({n_img}) are coarser than "
                             f"the network ({n_net})")
        for _ in range(k):
            x = pyramid_step(x, data.get("sigma", 1.0), data.get("pair", "full-weighting"))
        return model, x * scale, f"images coarsened {n_img} -> {n_net} (blur + restriction, as the pyramid)"
    moved, how = _moved(model, n_img, k, data.get("sigma", 1.0), data.get("pair", "full-weighting"))
    return moved, x * scale, f"network moved {n_net} -> {n_img} ({how})"


def _moved(model: torch.nn.Module, n: int, k: int, sigma: float = 1.0, pair: str = "full-weighting"):
    """``(network for n x n images, how)``, ``n = model.config.n * 2**k``: scale-consistent
    stencils re-discretised; free ones dilated on the way to a finer grid (and a dilated network's
    undilated on the way back), else kept (measured at least as good as Galerkin moving down);
    prefiltered by ``handover_sigma(sigma, pair)`` of the pyramid (a finer grid sees the bandwidth
    the network was trained at; measured best in benchmarks/RESULTS.md), a ResNet through
    ``resnet_to_resolution``."""
    if isinstance(model, ODENet):
        free = model.config.stencil == "free"
        dilate = free and model.config.dilation * 2.0**k >= 1
        px = handover_sigma(sigma, pair)
        moved = to_resolution(model, n, naive=free, prefilter=px, dilate=dilate).eval()
        how = "stencils dilated" if dilate else "stencils kept" if free else "re-discretised"
        return moved, how + f", prefilter {px:.3g} px"
    from mscnn.resnet import resnet_to_resolution

    return resnet_to_resolution(model, k).eval(), "Galerkin"


@torch.no_grad()
def predict(checkpoint: str | os.PathLike, images: list[str | os.PathLike], n: int | None = None,
            method: str = "auto", top: int = 1) -> list[dict]:
    """Classify image files with a checkpoint at the images' resolution. Rows ``{image, label,
    class, probability, top, how}``."""
    model, lineage = load_checkpoint(checkpoint)
    data = _data(lineage, checkpoint)
    x = read_images(images, model.config.in_channels, n)
    net, xs, how = to_images(model.eval(), x, data, method)
    prob = torch.softmax(net(xs), dim=1)
    names = data.get("classes") or [str(i) for i in range(prob.shape[1])]
    p, i = prob.topk(min(top, prob.shape[1]), dim=1)
    return [{"image": str(f), "label": int(i[r, 0]), "class": names[int(i[r, 0])],
             "probability": float(p[r, 0]), "how": how,
             "top": [[names[int(c)], float(q)] for c, q in zip(i[r], p[r], strict=True)]}
            for r, f in enumerate(images)]


@torch.no_grad()
def export(checkpoint: str | os.PathLike, out: str | os.PathLike, n: int | None = None,
           batch: int = 4, atol: float = 1e-4) -> dict:
    """Write ``model.ts`` (TorchScript) and ``model.onnx`` for ``n x n`` inputs (default: the
    network's own; another ``n`` moves the network first, as ``predict`` does) with a dynamic batch
    axis, plus ``export.json``; each is run on the same random batch and must give the eager
    network's logits within ``atol`` (the largest differences are recorded)."""
    model, lineage = load_checkpoint(checkpoint)
    model.eval()
    if n and n != model.config.n:
        k = _ratio(n, model.config.n)
        if k is None:
            raise ValueError(f"--n {n}: not {model.config.n} times a power of 2")
        data = _data(lineage, checkpoint)
        model, _ = _moved(model, n, k, data.get("sigma", 1.0), data.get("pair", "full-weighting"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    size = model.config.n
    x = torch.randn(batch, model.config.in_channels, size, size, generator=torch.Generator().manual_seed(0))
    want = model(x)
    with warnings.catch_warnings():  # jit's deprecation and shape-as-constant notes: checked below
        warnings.simplefilter("ignore")
        ts = torch.jit.trace(model, x[:1], check_trace=False)
        ts.save(str(out / "model.ts"))
        ts_diff = float((torch.jit.load(str(out / "model.ts"))(x) - want).abs().max())
    try:
        import onnxruntime as ort
    except ImportError:
        raise RuntimeError("ONNX export needs onnx, onnxscript and onnxruntime: "
                           "pip install 'mscnn[export]'") from None
    with contextlib.redirect_stdout(io.StringIO()):  # the exporter's step-by-step notes
        torch.onnx.export(model, (x[:2],), str(out / "model.onnx"), input_names=["images"],
                          output_names=["logits"], dynamic_shapes=({0: torch.export.Dim("batch")},),
                          dynamo=True, external_data=False)
    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    onnx_diff = float(np.abs(got - want.numpy()).max())
    info = {"checkpoint": str(checkpoint), "n": size, "in_channels": model.config.in_channels,
            "classes": lineage.get("data", {}).get("classes"),
            "input_scale": lineage.get("data", {}).get("input_scale"),
            "max_abs_diff": {"torchscript": ts_diff, "onnx": onnx_diff}, "atol": atol}
    (out / "export.json").write_text(json.dumps(info, indent=1))
    bad = {k: v for k, v in info["max_abs_diff"].items() if not v <= atol}
    if bad:
        raise RuntimeError(f"export to {out}: logits differ from the eager network by {bad} (> {atol})")
    return info
