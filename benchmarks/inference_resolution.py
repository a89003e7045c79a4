"""Inference across resolution: classify 14x14 images with the restricted network, or upsample them
to 28x28 for the fine network.

    python benchmarks/inference_resolution.py [--threads 2] [--batch 1000]

A 28x28 network (16 channels, 2 steps; trained ``--epochs`` on MNIST so the accuracies mean
something) and its Galerkin restriction to 14x14; the 10,000 validation images restricted to 14x14
(full weighting). Path A: the restricted network on the 14x14 images. Path B: ``prolong_image`` of
the 14x14 images to 28x28, then the fine network (the upsampling is timed too). Images/s is the
median of ``--repeats`` passes after a warm-up; the ideal ratio is 4 (a quarter of the pixels).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import ROOT, machine, publish

from mscnn.data import coarsen, mnist_splits
from mscnn.hierarchy import to_resolution
from mscnn.ode import ODENet
from mscnn.train import accuracy, fit
from mscnn.transfer import prolong_image


@torch.inference_mode()
def throughput(fn, x: torch.Tensor, batch: int, repeats: int) -> float:
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    for i in range(0, min(len(x), 2 * batch), batch):  # warm-up
        fn(x[i : i + batch])
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for i in range(0, len(x), batch):
            fn(x[i : i + batch])
        sync()
        times.append(time.perf_counter() - t0)
    return len(x) / statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    d = mnist_splits(args.data_dir)
    torch.manual_seed(0)
    fine = ODENet(n=28, channels=16, steps=2)
    fit(fine, d["train"], args.epochs, 1e-2, 128, 0)
    dev = torch.device(args.device)
    fine.eval().to(dev)
    coarse = to_resolution(fine, 14).eval()
    v = coarsen(d["val"], 1, 0.0, "full-weighting")
    val14 = type(v)(v.x.to(dev), v.y.to(dev))
    a = throughput(coarse, val14.x, args.batch, args.repeats)
    b = throughput(lambda x: fine(prolong_image(x)), val14.x, args.batch, args.repeats)
    b_net = throughput(fine, prolong_image(val14.x), args.batch, args.repeats)
    up = type(val14)(prolong_image(val14.x), val14.y)
    acc_a, acc_b = accuracy(coarse, val14), accuracy(fine, up)
    head = (f"10,000 MNIST validation images at 14x14; ODENet 16 channels, 2 steps, trained "
            f"{args.epochs} epoch(s) at 28x28; batch {args.batch}; median of {args.repeats}; "
            f"{machine()}; device {dev}.")
    md = [head, "", "| path | images/s | accuracy % |", "|---|---|---|",
          f"| A: restricted network on 14x14 | {a:,.0f} | {100 * acc_a:.2f} |",
          f"| B: upsample to 28x28 + fine network | {b:,.0f} | {100 * acc_b:.2f} |",
          f"| (B without the upsampling) | {b_net:,.0f} | |",
          "", f"A / B = {a / b:.2f} (the limit is 4: a quarter of the pixels)."]
    data = {"args": vars(args), "restricted_img_s": a, "upsampled_img_s": b, "fine_only_img_s": b_net,
            "ratio": a / b, "restricted_acc": acc_a, "upsampled_acc": acc_b}
    publish(args.out, f"inference_resolution_{dev.type}", "\n".join(md), data, vars(args),
            {k: v for k, v in data.items() if isinstance(v, float)})


if __name__ == "__main__":
    main()
