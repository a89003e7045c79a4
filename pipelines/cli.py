"""``mscnn`` command line: ``mscnn demo``, ``mscnn pyramid``."""

from __future__ import annotations

import argparse
import sys
import time

from rich.console import Console
from rich.table import Table


def _demo(args: argparse.Namespace) -> int:
    """Cross-resolution demo on real MNIST: train at 14x14 and 28x28, move each network to the
    other resolution with Galerkin stencils (and naively), and print the accuracies."""
    from mscnn.crossres import CrossResConfig, cross_resolution
    from mscnn.data import Split, mnist_splits

    console = Console()
    t0 = time.perf_counter()
    data = mnist_splits(args.data_dir)
    train = Split(data["train"].x[: args.train_count], data["train"].y[: args.train_count])
    cfg = CrossResConfig(epochs=args.epochs, pairs=tuple(args.pairs))
    console.print(
        f"[bold]mscnn demo[/]: MNIST {cfg.n}x{cfg.n} <-> {cfg.n // 2}x{cfg.n // 2}, "
        f"{len(train)} training images, {cfg.epochs} epoch(s), validation on the last 10,000"
    )
    rows = cross_resolution(train, data["val"], cfg, log=console.print)
    table = Table(title="Classification across resolutions, no retraining")
    for col in ("pair", "images", "network", "method", "val accuracy"):
        table.add_column(col)
    label = {"fine": ("28x28", "trained at 28"), "coarse": ("14x14", "trained at 14"),
             "coarse->fine": ("28x28", "14 -> 28"), "fine->coarse": ("14x14", "28 -> 14")}
    for r in rows:
        if r["pair"] != cfg.pairs[0] and r["direction"] == "fine":
            continue
        images, net = label[r["direction"]]
        table.add_row(r["pair"], images, net, r["method"], f"{100 * r['accuracy']:.2f}%")
    console.print(table)
    console.print(f"done in {time.perf_counter() - t0:.0f} s. Full table over seeds: "
                  "python benchmarks/cross_resolution.py")
    return 0


def _pyramid(args: argparse.Namespace) -> int:
    """Build an image pyramid with Ray Data (idempotent; see pipelines/pyramid.py)."""
    import logging
    import os

    import ray

    from pipelines.config import load_config, parse_overrides
    from pipelines.pyramid import PyramidConfig, build_pyramid

    overrides = parse_overrides(args.set or [])
    if args.data_dir:
        overrides["source.path"] = args.data_dir
    cfg = load_config(args.config, PyramidConfig, overrides)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not ray.is_initialized():
        ray.init(address=args.address or os.environ.get("RAY_ADDRESS"))
    path, built = build_pyramid(cfg, args.out)
    Console().print(f"pyramid {'built' if built else 'already up to date, nothing done'}: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mscnn", description="Multiscale training of CNNs")
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="cross-resolution demo on MNIST (about a minute on 2 CPUs)")
    demo.add_argument("--data-dir", help="folder with the MNIST IDX files (or MSCNN_DATA_DIR)")
    demo.add_argument("--train-count", type=int, default=10_000)
    demo.add_argument("--epochs", type=int, default=2)
    demo.add_argument("--pairs", nargs="+", default=["full-weighting", "average"])
    demo.set_defaults(func=_demo)
    pyr = sub.add_parser("pyramid", help="build an image pyramid (Parquet shards) with Ray Data")
    pyr.add_argument("--config", required=True, help="YAML file, e.g. configs/pyramid_mnist.yaml")
    pyr.add_argument("--out", default="outputs/pyramids", help="folder (or shared path) of pyramids")
    pyr.add_argument("--data-dir", help="source folder (overrides source.path)")
    pyr.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    pyr.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override config fields")
    pyr.set_defaults(func=_pyramid)
    args = ap.parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        Console(stderr=True).print(f"[red]error:[/] {e}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
