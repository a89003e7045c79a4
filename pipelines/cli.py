"""``mscnn`` command line: ``demo``, ``pyramid``, ``train``, ``evaluate``, ``sweep``, ``report``,
``predict``, ``export``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipelines.runtime import init_ray


def _load_schedule(path, sets: list[str] | None, data_dir: str | None):
    from pipelines.config import ScheduleConfig, load_config, parse_overrides

    overrides = parse_overrides(sets or [])
    cfg = load_config(path, ScheduleConfig, overrides)
    if data_dir:
        cfg = cfg.model_copy(update={"pyramid": cfg.pyramid.model_copy(
            update={"source": cfg.pyramid.source.model_copy(update={"path": data_dir})})})
    return cfg


def _schedule_table(results: list[dict], target: float | None = None) -> Table:
    """One row per schedule; with ``target``, the training seconds until the final level's val
    accuracy first reached it (``pipelines.schedule.to_target``)."""
    from pipelines.schedule import to_target

    table = Table(title="Schedules")
    cols = ["schedule", "kind", "levels (n x epochs)", "final val acc", "train s", "fine-equiv epochs"]
    for col in cols + ([f"train s to {100 * target:g}%"] if target else []):
        table.add_column(col)
    for r in results:
        levels = " -> ".join(f"{s['n']}x{s['epochs_run']}" + (f" N{sum(s['steps'])}" if r["kind"] ==
                             "depth" else "") for s in r["stages"])
        row = [r["schedule"], r["kind"], levels, f"{100 * r['final_val_accuracy']:.2f}%",
               f"{r['train_seconds']:.0f}", f"{r['fine_equiv_epochs']:.2f}"]
        if target:
            hit = to_target(r, target)
            row.append(f"{hit['seconds']:.0f}" if hit else "not reached")
        table.add_row(*row)
    return table


def _crossres_table(rows: list[dict]) -> Table:
    table = Table(title="Classification across resolutions, no retraining (val)")
    for col in ("pair", "images", "network", "method", "accuracy"):
        table.add_column(col)
    label = {"fine": ("fine", "trained fine"), "coarse": ("coarse", "trained coarse"),
             "coarse->fine": ("fine", "coarse, prolonged"), "fine->coarse": ("coarse", "fine, restricted")}
    for r in rows:
        images, net = label[r["direction"]]
        method = r["method"] + (f" (sigma {r['sigma']:.2f} px)" if "sigma" in r else "")
        table.add_row(r["pair"], images, net, method, f"{100 * r['accuracy']:.2f}%")
    return table


class _StageProgress:
    """A rich progress bar per stage: epochs done of the level's, val accuracy, images/s, ETA."""

    def __init__(self, console: Console) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("epochs  {task.fields[status]}"), TimeElapsedColumn(),
                            TextColumn("eta"), TimeRemainingColumn(), console=console)
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        self.bar.start()
        return self

    def __exit__(self, *exc) -> None:
        self.bar.stop()

    def __call__(self, stage: str, m: dict) -> None:
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=m["epochs"], status="")
        self.bar.update(self.tasks[stage], completed=m["epoch"] + 1,
                        status=f"val acc {100 * m['val_accuracy']:.2f}%  "
                               f"{m['images_per_s']:.0f} img/s  loss {m['train_loss']:.3f}")


def _train(args: argparse.Namespace) -> int:
    """Run (or resume) a schedule: each level a Ray Train stage, tracked in MLflow."""
    from pipelines.schedule import run_schedule

    cfg = _load_schedule(args.config, args.set, args.data_dir)
    console = Console()
    if args.dry_run:  # the resolved, validated schedule; nothing runs
        import yaml

        console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        return 0
    init_ray(args.address, quiet=not args.verbose)
    with _StageProgress(console) as progress:
        result = run_schedule(cfg, log=console.print, progress=progress, fresh=args.fresh)
    console.print(_schedule_table([result]))
    return 0


def _predict(args: argparse.Namespace) -> int:
    """Classify images with a checkpoint, at the images' resolution."""
    import json

    from pipelines.predict import predict

    rows = predict(args.checkpoint, args.images, n=args.n, method=args.method, top=args.top)
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    table = Table(title=f"{args.checkpoint}: {rows[0]['how']}")
    for col in ("image", "class", "probability", *(["top"] if args.top > 1 else [])):
        table.add_column(col)
    for r in rows:
        table.add_row(r["image"], r["class"], f"{r['probability']:.3f}",
                      *([", ".join(f"{c} {q:.2f}" for c, q in r["top"])] if args.top > 1 else []))
    Console().print(table)
    return 0


def _export(args: argparse.Namespace) -> int:
    """TorchScript + ONNX of a checkpoint, each checked against the eager network's logits."""
    from pipelines.predict import export

    info = export(args.checkpoint, args.out, n=args.n)
    Console().print(f"wrote {args.out}/model.ts and {args.out}/model.onnx for {info['n']}x{info['n']} "
                    f"inputs; largest logit difference from the eager network: "
                    f"TorchScript {info['max_abs_diff']['torchscript']:.2e}, "
                    f"ONNX {info['max_abs_diff']['onnx']:.2e}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    """Cross-resolution evaluation of a fine and a coarse checkpoint (paper Sec. 4.1)."""
    from pipelines.evaluate import evaluate_checkpoints

    rows = evaluate_checkpoints(args.fine, args.coarse, args.pyramid, args.split, args.pairs)
    Console().print(_crossres_table(rows))
    return 0


def _sweep(args: argparse.Namespace) -> int:
    """A Ray Tune sweep over schedules (see pipelines/sweep.py)."""
    from pipelines.config import parse_overrides
    from pipelines.sweep import load_sweep, run_sweep

    sweep = load_sweep(args.config, parse_overrides(args.set or []))
    if args.data_dir:  # the trials' schedules find their source through it (absolute: own folders)
        os.environ["MSCNN_DATA_DIR"] = os.path.abspath(args.data_dir)
    # a trial (its driver), its Train worker and Ray Data's read tasks need more logical CPUs than
    # there are cores on a small machine, or lazy reads wait forever
    init_ray(args.address, num_cpus=max(4, 2 * (os.cpu_count() or 1)), quiet=not args.verbose)
    run_sweep(sweep, log=Console().print)
    return 0


def _report(args: argparse.Namespace) -> int:
    """Single vs multiscale vs depth, read back from MLflow: a table and PNG plots."""
    from pipelines.report import make_report

    flt = args.filter or (f"tags.sweep_id = '{args.sweep}'" if args.sweep else "")
    rep = make_report(args.experiment, args.out, args.target, flt, unfinished=args.unfinished)
    console = Console()
    console.print(rep["table"])
    console.print("plots: " + ", ".join(rep["plots"]))
    return 0


def _demo(args: argparse.Namespace) -> int:
    """The main job: MNIST pyramid, single-scale and multiscale schedules on Ray Train, the
    cross-resolution evaluation, one comparison table, and where to look in MLflow."""
    from pipelines.config import packaged_configs
    from pipelines.evaluate import evaluate_checkpoints
    from pipelines.schedule import run_schedule
    from pipelines.tracking import tracking_uri

    console = Console()
    t0 = time.perf_counter()
    if args.target is None:
        args.target = 0.97 if args.full else 0.85
    names = (("mnist_single", "mnist_multiscale") if args.full else
             ("demo_single", "demo_multiscale", "demo_multiscale_galerkin"))
    cfgs = [_load_schedule(packaged_configs() / f"{n}.yaml", args.set, args.data_dir) for n in names]
    console.print(f"[bold]mscnn demo[/] ({'full protocol' if args.full else 'demo subset'}): "
                  f"{', '.join(c.name for c in cfgs)} on Ray Train; tracking in {tracking_uri()}")
    init_ray(args.address, quiet=not args.verbose)
    results = []
    for cfg in cfgs:
        console.rule(f"{cfg.name} ({cfg.kind})")
        with _StageProgress(console) as progress:
            results.append(run_schedule(cfg, log=console.print, progress=progress))
    single, multi = results[:2]
    pyramid = Path(cfgs[0].pyramid_root).resolve() / cfgs[0].pyramid.name
    console.rule("cross-resolution evaluation")
    rows = evaluate_checkpoints(single["checkpoint"], multi["stages"][0]["checkpoint"], pyramid,
                                tags={"demo": "true"})
    console.print(_schedule_table(results, args.target))
    console.print(_crossres_table(rows))
    uri = tracking_uri()
    console.print(f"done in {time.perf_counter() - t0:.0f} s. Open MLflow with:\n"
                  f"  .venv/bin/mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000")
    return 0


def _pyramid(args: argparse.Namespace) -> int:
    """Build an image pyramid with Ray Data (idempotent; see pipelines/pyramid.py)."""
    import logging

    from pipelines.config import load_config, parse_overrides
    from pipelines.pyramid import PyramidConfig, build_pyramid

    overrides = parse_overrides(args.set or [])
    if args.data_dir:
        overrides["source.path"] = args.data_dir
    cfg = load_config(args.config, PyramidConfig, overrides)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    init_ray(args.address, quiet=not args.verbose)
    path, built = build_pyramid(cfg, args.out, verify=args.verify)
    Console().print(f"pyramid {'built' if built else 'already up to date, nothing done'}: {path}")
    return 0


def _absolute_data_dir() -> None:
    """A relative ``MSCNN_DATA_DIR`` made absolute before Ray starts: sweep trials and Train
    workers inherit the variable but run in folders of their own."""
    d = os.environ.get("MSCNN_DATA_DIR")
    if d and not os.path.isabs(d):
        os.environ["MSCNN_DATA_DIR"] = os.path.abspath(d)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="mscnn", description="Multiscale training of CNNs")
    sub = ap.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the main job: pyramid, single vs multiscale on Ray Train, "
                          "cross-resolution evaluation, MLflow (under 10 minutes on 2 CPUs)")
    demo.add_argument("--full", action="store_true", help="the paper's protocol (all of MNIST)")
    demo.add_argument("--target", type=float, default=None,
                      help="val accuracy for the time-to-target column (default 0.85, --full 0.97)")
    demo.add_argument("--data-dir", help="folder with the MNIST IDX files (or MSCNN_DATA_DIR)")
    demo.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    demo.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override schedule fields")
    demo.add_argument("--verbose", action="store_true", help="show Ray's worker and data logs")
    demo.set_defaults(func=_demo)
    train = sub.add_parser("train", help="run or resume a schedule (configs/*.yaml) on Ray Train")
    train.add_argument("--config", required=True)
    train.add_argument("--data-dir", help="pyramid source folder (overrides pyramid.source.path)")
    train.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    train.add_argument("--set", nargs="*", metavar="KEY=VALUE",
                       help="override fields, e.g. levels.0.epochs=1 scaling.num_workers=2")
    train.add_argument("--dry-run", action="store_true",
                       help="print the resolved schedule (config file + --set + --data-dir) and exit")
    train.add_argument("--fresh", action="store_true",
                       help="discard this schedule's earlier outputs and start over (default: resume)")
    train.add_argument("--verbose", action="store_true", help="show Ray's worker and data logs")
    train.set_defaults(func=_train)
    pr = sub.add_parser("predict", help="classify image files with a checkpoint, at their resolution")
    pr.add_argument("--checkpoint", required=True, help="a checkpoint folder (e.g. .../L1-n28-N2.best)")
    pr.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    pr.add_argument("--n", type=int, help="read the images at n x n (default: their own size)")
    from pipelines.predict import METHODS

    pr.add_argument("--method", default="auto", choices=METHODS,
                    help="how the network meets the images' resolution (default: the measured best)")
    pr.add_argument("--top", type=int, default=1, help="show the top-k classes")
    pr.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    pr.set_defaults(func=_predict)
    ex = sub.add_parser("export", help="TorchScript and ONNX files of a checkpoint, checked")
    ex.add_argument("--checkpoint", required=True)
    ex.add_argument("--out", required=True, help="folder for model.ts, model.onnx, export.json")
    ex.add_argument("--n", type=int, help="input resolution (default: the network's own)")
    ex.set_defaults(func=_export)
    ev = sub.add_parser("evaluate", help="cross-resolution table of a fine and a coarse checkpoint")
    ev.add_argument("--fine", required=True, help="checkpoint folder of the fine-trained network")
    ev.add_argument("--coarse", required=True, help="checkpoint folder of the coarse-trained network")
    ev.add_argument("--pyramid", required=True, help="pyramid folder holding both resolutions")
    ev.add_argument("--split", default="val")
    ev.add_argument("--pairs", nargs="+", help="transfer pairs (default: the pyramid's)")
    ev.set_defaults(func=_evaluate)
    sw = sub.add_parser("sweep", help="Ray Tune sweep over schedules; resumable")
    sw.add_argument("--config", required=True, help="e.g. configs/sweep_mnist.yaml")
    sw.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    sw.add_argument("--data-dir", help="folder of the base schedule's source data, for every trial "
                    "(sets MSCNN_DATA_DIR)")
    sw.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override sweep fields")
    sw.add_argument("--verbose", action="store_true", help="show Ray's worker and data logs")
    sw.set_defaults(func=_sweep)
    rp = sub.add_parser("report", help="compare schedules from MLflow runs: table + PNG plots")
    rp.add_argument("--experiment", default="mscnn", help="MLflow experiment (sweeps: mscnn-sweeps)")
    rp.add_argument("--sweep", help="only the trials of this sweep (its name)")
    rp.add_argument("--filter", help="any MLflow filter string, e.g. \"tags.kind = 'depth'\"")
    rp.add_argument("--target", type=float, default=0.9, help="accuracy for compute-to-target")
    rp.add_argument("--out", default="outputs/report")
    rp.add_argument("--unfinished", action="store_true", help="include FAILED/KILLED/RUNNING schedules")
    rp.set_defaults(func=_report)
    pyr = sub.add_parser("pyramid", help="build an image pyramid (Parquet shards) with Ray Data")
    pyr.add_argument("--config", required=True, help="YAML file, e.g. configs/pyramid_mnist.yaml")
    pyr.add_argument("--out", default="outputs/pyramids", help="folder (or shared path) of pyramids")
    pyr.add_argument("--data-dir", help="source folder (overrides source.path)")
    pyr.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    pyr.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="override config fields")
    pyr.add_argument("--verbose", action="store_true", help="show Ray's worker and data logs")
    pyr.add_argument("--verify", action="store_true",
                     help="when the pyramid is already there, check every shard's SHA-256 too")
    pyr.set_defaults(func=_pyramid)
    ap.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    args = ap.parse_args(argv)
    _absolute_data_dir()
    try:
        return args.func(args)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
        if args.traceback:
            raise
        Console(stderr=True).print(f"[red]error:[/] {e}")
        return 2
    except KeyboardInterrupt:
        Console(stderr=True).print("[red]interrupted[/] (runs in progress are marked KILLED in MLflow)")
        return 130
    except Exception as e:  # one clear line; the traceback with --traceback
        if args.traceback:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        Console(stderr=True).print(f"[red]error:[/] {type(e).__name__}: {first} "
                                   "(mscnn --traceback ... shows the traceback)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
