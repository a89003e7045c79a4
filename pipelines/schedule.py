"""A schedule: levels trained one after another in Ray Train (``pipelines.stage``).

Between levels the best network of a level is moved with ``mscnn.hierarchy`` (``to_resolution``
when n changes, ``to_depth`` when the steps change; ``resnet_to_resolution`` for ``model.arch:
resnet34``), written as the next level's initial checkpoint (with lineage), and the next level
starts from it. With ``scaling.worker_group: schedule`` (the default) the unfinished levels run in
one Ray Train run, one worker group, and the move is done in the workers; with ``level`` each level
is a Ray Train run of its own and the driver moves the network between them. A one-level schedule
is the single-scale baseline: the same code path.

Storage: ``<storage_path>/<name>-<config hash>/`` holds the Ray Train run(s) (named
``<name>-<hash>-L<i>-n<n>-N<steps>`` for one level, ``...-L<i>-...-N<steps>..L<j>-...`` for levels
i..j in one worker group, so rerunning resumes it), ``L<i>.init`` (the incoming checkpoint),
``L<i>.best`` and ``L<i>.done.json`` (the level's outcome). Rerunning a schedule skips every level
with a ``done.json`` and resumes at the first unfinished one.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from torch import nn

from mscnn.checkpoint import load_checkpoint, save_checkpoint
from mscnn.mge import mge_pixels
from mscnn.models import cost, handover
from pipelines.config import ScheduleConfig
from pipelines.pyramid import build_pyramid, input_scale, level_for, read_manifest
from pipelines.runtime import exclusive, require_ray
from pipelines.stage import StageSpec, after_level, level_states, run_stage, stage_phases
from pipelines.tracking import Tracker, git_tags

__all__ = ["LevelOutcome", "run_levels", "run_schedule", "stage_name", "to_target"]


def stage_name(cfg: ScheduleConfig, i: int) -> str:
    lv = cfg.levels[i]
    steps = lv.steps if isinstance(lv.steps, int) else "-".join(map(str, lv.steps))
    return f"L{i}-n{lv.n}-N{steps}"


def to_target(results: dict, target: float) -> dict | None:
    """The first epoch of a finished schedule (``run_schedule``'s results) whose validation
    accuracy reaches ``target`` on the final level's resolution (a coarse level's accuracy is on
    other images and does not count): ``{"seconds", "fine_equiv_epochs", "global_epoch"}`` with
    the training wall-clock and compute spent up to it, or ``None`` if no epoch reached it."""
    n = results["stages"][-1]["n"]
    for stage in results["stages"]:
        for rec in stage["history"]:
            if rec.get("n", stage["n"]) == n and rec.get("val_accuracy", -1.0) >= target:
                return {"seconds": rec["wallclock"], "fine_equiv_epochs": rec["fine_equiv_epochs"],
                        "global_epoch": rec["global_epoch"]}
    return None


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(path)


def _transfer(prev: nn.Module, cfg: ScheduleConfig, i: int) -> tuple[nn.Module, list[str]]:
    lv = cfg.levels[i]
    try:
        return handover(prev, cfg.model_config_for(i), naive=lv.naive, lam=lv.lam, galerkin=lv.galerkin,
                        prefilter=cfg.prefilter_px(lv), dilate=lv.dilate)
    except ValueError as e:
        raise ValueError(f"levels.{i}.{e}") from None


def _mge_share(lv) -> float:
    """The pixel cost of a multilevel-estimated batch as a share of the same batch at ``n``."""
    if lv.estimator is None:
        return 1.0
    return mge_pixels(lv.mge_sizes(), lv.estimator.batch_sizes) / (sum(lv.estimator.batch_sizes) * lv.n**2)


@dataclass
class LevelOutcome:
    """What one finished level leaves behind (``L<i>.done.json``), read by the next level."""

    stage: str
    level: int
    n: int
    steps: list[int] | None
    epochs_run: int
    best_val_accuracy: float
    seconds: float
    checkpoint: str  # the best checkpoint, the next level's starting point
    history: list[dict]
    init: dict
    nodes: list[str]
    wallclock_end: float
    compute_end: float
    global_epoch_end: int
    devices: list[str] = field(default_factory=list)  # each worker's torch device, rank order
    phases: dict = field(default_factory=dict)  # where the stage's seconds went (stage_phases)

    @classmethod
    def read(cls, path: Path) -> LevelOutcome:
        return cls(**json.loads(path.read_text()))


@dataclass
class _Run:
    """The driver's state while it walks the levels of one schedule."""

    cfg: ScheduleConfig
    run_dir: Path
    pyramid: Path
    pyramid_levels: list[int]
    tracker: Tracker
    ids: dict
    ref_cost: float
    extra: dict
    train_callbacks: Callable[[], list] | None
    progress: Callable[[str, dict], None] | None = None  # (stage, metrics) after each epoch
    data: dict = field(default_factory=dict)  # how the inputs were made: into every checkpoint

    def save_ids(self) -> None:
        _write_json(self.run_dir / "mlflow.json", self.ids)


def _prepare_level(run: _Run, i: int, prev: LevelOutcome | None, log: Callable[[str], None]
                   ) -> tuple[StageSpec, str, dict]:
    """Level ``i``'s stage spec, MLflow run and lineage. Its start: the previous level's best,
    moved here (``prev``: a finished level), moved in the worker (``prev`` None and ``i`` > 0: the
    level before runs in the same worker group), or random weights."""
    cfg, lv, name = run.cfg, run.cfg.levels[i], stage_name(run.cfg, i)
    mcfg, chash = cfg.model_config_for(i), cfg.config_hash()
    init, lineage = None, {"schedule": cfg.name, "config_hash": chash, "stage": name,
                           "level": i, "from": None, "transfers": [], "data": run.data}
    moves = i > 0 and lv.init == "transfer" and not cfg.random_init
    in_group = moves and prev is None
    if moves and prev is not None:
        moved, transfers = _transfer(load_checkpoint(prev.checkpoint)[0], cfg, i)
        lineage |= {"from": prev.checkpoint, "transfers": transfers}
        init = str(save_checkpoint(run.run_dir / f"{name}.init", moved, lineage))
    elif in_group:
        lineage["from"] = str(run.run_dir / f"{stage_name(cfg, i - 1)}.best")
    steps = getattr(mcfg, "unit_steps", None)
    log(f"[{i + 1}/{len(cfg.levels)}] {name}: {lv.epochs} epoch(s) at {lv.n}x{lv.n}"
        + (f", steps {steps}" if steps else f", {cfg.model.arch}")
        + (", from the level before (moved in the worker group)" if in_group
           else f", from {' + '.join(lineage['transfers']) or 'random weights'}"))
    run_id = run.ids.get(name) or run.tracker.start_run(
        f"{cfg.name}/{name}", parent_id=run.ids["parent"],
        tags={"kind": cfg.kind, "config_hash": chash, "stage": name, "level": str(i),
              "schedule": cfg.name, "n": str(lv.n)},
        params={"n": lv.n, "steps": steps, "arch": cfg.model.arch, "epochs": lv.epochs,
                "optim": lv.optim.model_dump(), "patience": lv.patience, "init": lv.init,
                "pyramid_level": run.pyramid_levels[i],
                "estimator": lv.estimator.model_dump() if lv.estimator else None}
        | ({} if in_group else {"transfers": lineage["transfers"]}))  # a group's: known after it
    if name not in run.ids:
        run.tracker.log_dataset(run_id, run.pyramid, f"pyramid/{run.pyramid.name}",
                                run.data["config_hash"], context=f"train: level {run.pyramid_levels[i]} "
                                                                 f"({lv.n}x{lv.n})")
    run.ids[name] = run_id
    run.save_ids()
    spec = StageSpec(
        name=f"{cfg.name}-{chash}-{name}", model=mcfg, level=run.pyramid_levels[i], epochs=lv.epochs,
        optim=lv.optim.model_dump(), patience=lv.patience, seed=cfg.seed + i, init_checkpoint=init,
        lineage=lineage, compute_per_epoch=cost(mcfg) / run.ref_cost * _mge_share(lv), extra=run.extra,
        mge={"sizes": lv.mge_sizes(), "batch_sizes": lv.estimator.batch_sizes, "move": lv.estimator.move,
             "sigma": cfg.pyramid.sigma,  # the coarse samples are made as the pyramid made its levels
             # the input blur a prefiltered handover gave the network comes off on the coarse grids
             "prefilter": cfg.prefilter_px(lv) or cfg.pyramid.sigma}
        if lv.estimator else None,
        handover={"naive": lv.naive, "lam": lv.lam, "galerkin": lv.galerkin,
                  "prefilter": cfg.prefilter_px(lv), "dilate": lv.dilate,
                  "init_path": str(run.run_dir / f"{name}.init")} if in_group else None)
    return (after_level(spec, prev.history[-1]) if prev else spec), run_id, lineage


def _best_of(result, k: int):
    """The checkpoint of the best validation accuracy (the earliest of equals, as the worker
    keeps it) among the reports of the run's ``k``-th level."""
    reports = [(c, m) for c, m in result.best_checkpoints or [] if int(m.get("group_index", 0)) == k]
    return max(reports, key=lambda cm: (cm[1]["val_accuracy"], -cm[1]["global_epoch"]))[0]


def run_levels(run: _Run, first: int, last: int, prev: LevelOutcome | None,
               log: Callable[[str], None]) -> list[LevelOutcome]:
    """Levels ``first .. last - 1`` in one Ray Train run (one worker group: ``scaling.worker_group:
    schedule``; one level each otherwise): their starting checkpoint (``prev``'s best, moved; a
    later level's is moved in the worker), MLflow runs, the stage, and each level's outcome
    (written as ``done.json``)."""
    cfg, idx = run.cfg, list(range(first, last))
    prepared = [_prepare_level(run, i, prev if i == first else None, log) for i in idx]
    specs, run_ids = [p[0] for p in prepared], [p[1] for p in prepared]
    names = [stage_name(cfg, i) for i in idx]
    group = len(idx) > 1
    mlflow = {"uri": run.tracker.uri, "experiment": cfg.experiment,
              "run_id": run_ids if group else run_ids[0], "parent_id": run.ids["parent"]}
    stamps: dict = {}
    progress = None
    if run.progress:
        def progress(m):
            return run.progress(names[int(m.get("group_index", 0))], m)
    try:  # Ray Train V2 raises on failure: the levels' runs end FAILED (KILLED on Ctrl-C)
        result = run_stage(specs if group else specs[0], str(run.pyramid), str(run.run_dir),
                           cfg.scaling.model_dump(), cfg.max_failures, mlflow, cfg.materialize_data,
                           run.train_callbacks() if run.train_callbacks else None, progress, stamps,
                           name=specs[0].name + (f"..{names[-1]}" if group else ""))
    except BaseException as e:
        for run_id in run_ids:
            run.tracker.end_run(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    with result.checkpoint.as_directory() as d:  # the latest: the whole history
        states = level_states(json.loads((Path(d) / "train_state.json").read_text()))
    outcomes = []
    for k, i in enumerate(idx):
        lineage = prepared[k][2]
        if specs[k].handover:  # moved in the worker: its transfers are in the moved network's lineage
            lineage = load_checkpoint(specs[k].handover["init_path"])[1]
            run.tracker.log_params(run_ids[k], {"transfers": lineage["transfers"]})
        ends = states[k + 1]["timeline"]["entered"] if k + 1 < len(idx) else stamps["fit_end"]
        level_stamps = stamps if k == 0 else {"start": states[k]["timeline"]["entered"],
                                              "fit_start": states[k]["timeline"]["entered"]}
        outcomes.append(_finish_level(run, i, run_ids[k], lineage, _best_of(result, k),
                                      states[k], stage_phases({**level_stamps, "fit_end": ends}, states[k]),
                                      log))
    return outcomes


def _finish_level(run: _Run, i: int, run_id: str, lineage: dict, best, state: dict, phases: dict,
                  log: Callable[[str], None]) -> LevelOutcome:
    name, lv = stage_name(run.cfg, i), run.cfg.levels[i]
    with best.as_directory() as d:
        model, _ = load_checkpoint(Path(d) / "model")
    history = state["history"]
    best_dir = save_checkpoint(run.run_dir / f"{name}.best", model, {**lineage, "best_of": best.path})
    last = history[-1]
    out = LevelOutcome(
        stage=name, level=i, n=lv.n, steps=getattr(run.cfg.model_config_for(i), "unit_steps", None),
        epochs_run=len(history), best_val_accuracy=max(h["val_accuracy"] for h in history),
        seconds=state["seconds"], checkpoint=str(best_dir), history=history, init=state.get("init", {}),
        nodes=state.get("nodes", []), devices=state.get("devices", []), wallclock_end=last["wallclock"],
        compute_end=last["fine_equiv_epochs"], global_epoch_end=last["global_epoch"] + 1,
        phases=phases)
    run.tracker.log_metrics(run_id, {"best_val_accuracy": out.best_val_accuracy,
                                     "epochs_run": out.epochs_run,
                                     **{f"phase_seconds/{k}": v for k, v in out.phases.items()}},
                            step=out.global_epoch_end)
    devices = ", ".join(sorted(set(out.devices))) or "?"
    run.tracker.set_tags(run_id, {"devices": devices, "workers": str(len(out.devices))})
    run.tracker.log_artifacts(run_id, best_dir, "checkpoint")
    run.tracker.end_run(run_id)
    _write_json(run.run_dir / f"{name}.done.json", asdict(out))
    log(f"    {name}: best val accuracy {out.best_val_accuracy:.4f} after {out.epochs_run} epoch(s), "
        f"{out.seconds:.0f} s, on {devices} "
        f"({len(out.devices)} worker(s))")
    return out


def run_schedule(cfg: ScheduleConfig, log: Callable[[str], None] = print,
                 extra: dict | None = None, tags: dict | None = None,
                 train_callbacks: Callable[[], list] | None = None,
                 progress: Callable[[str, dict], None] | None = None, fresh: bool = False) -> dict:
    """Run (or resume) every level of ``cfg`` (``run_levels``: each level a Ray Train run, or the
    unfinished ones in one with ``scaling.worker_group: schedule``; the finished ones skipped);
    returns the results (also ``results.json``). ``extra`` goes into every stage's spec (test-only
    switches); ``tags`` go on the MLflow parent run; ``train_callbacks()`` makes Ray Train
    callbacks per stage; ``progress(stage, metrics)`` is called after each epoch; ``fresh``
    discards this schedule's earlier outputs (finished levels, checkpoints) first, under its lock.
    Ray must be started (``pipelines.runtime.init_ray``)."""
    require_ray("run_schedule")
    chash = cfg.config_hash()
    run_dir = Path(cfg.storage_path).resolve() / f"{cfg.name}-{chash}"
    with exclusive(run_dir / ".lock", f"schedule {cfg.name} ({run_dir})"):
        if fresh:
            for old in run_dir.iterdir():
                if old.name != ".lock":
                    shutil.rmtree(old) if old.is_dir() else old.unlink()
            log(f"--fresh: removed the earlier outputs in {run_dir}")
        return _run_schedule(cfg, run_dir, chash, log, extra, tags, train_callbacks, progress)


def _run_schedule(cfg: ScheduleConfig, run_dir: Path, chash: str, log, extra, tags,
                  train_callbacks, progress) -> dict:
    pyramid, built = build_pyramid(cfg.pyramid, Path(cfg.pyramid_root).resolve())
    log(f"pyramid {pyramid} ({'built' if built else 'up to date'})")
    manifest = read_manifest(pyramid)
    levels = [level_for(manifest, lv.n, f"levels.{i}.n") for i, lv in enumerate(cfg.levels)]
    tracker = Tracker(cfg.experiment)
    ids_file = run_dir / "mlflow.json"
    ids = json.loads(ids_file.read_text()) if ids_file.exists() else {}
    if ids and not tracker.has_run(ids.get("parent", "")):  # another store, or the old one deleted
        log(f"MLflow runs of the earlier attempt are not in {tracker.uri}: this schedule gets new runs")
        ids = {}
    finished = run_dir / "results.json"
    if ids and finished.exists() and all((run_dir / f"{stage_name(cfg, i)}.done.json").exists()
                                         for i in range(len(cfg.levels))):
        log(f"schedule {cfg.name} finished before ({finished}); nothing to run (--fresh reruns it)")
        return json.loads(finished.read_text())
    data = {"input_scale": input_scale(manifest), "classes": manifest["source"]["classes"],
            "sigma": manifest["sigma"], "pair": manifest["pair"], "pyramid": pyramid.name,
            "config_hash": manifest["config_hash"]}
    run = _Run(cfg, run_dir, pyramid, levels, tracker, ids, cost(cfg.model_config_for(len(cfg.levels) - 1)),
               extra or {}, train_callbacks, progress, data)
    if "parent" not in ids:
        ids["parent"] = tracker.start_run(
            cfg.name, tags={"kind": cfg.kind, "config_hash": chash, "schedule": cfg.name,
                            "init": "random" if cfg.random_init else "transfer",
                            "resolutions": " -> ".join(str(lv.n) for lv in cfg.levels),
                            **git_tags(), **(tags or {})},
            params=cfg.model_dump(exclude={"pyramid"}) | {"pyramid": pyramid.name})
        tracker.log_dict(ids["parent"], cfg.model_dump(), "config.json")
        tracker.log_dataset(ids["parent"], pyramid, f"pyramid/{pyramid.name}", manifest["config_hash"])
        run.save_ids()
    t_start = time.perf_counter()
    outcomes: list[LevelOutcome] = []
    for i in range(len(cfg.levels)):
        if outcomes and outcomes[-1].level >= i:  # ran in the worker group of an earlier level
            continue
        done = run_dir / f"{stage_name(cfg, i)}.done.json"
        if done.exists():
            outcomes.append(LevelOutcome.read(done))
            log(f"[{i + 1}/{len(cfg.levels)}] {outcomes[-1].stage}: finished before, skipped "
                f"(best val accuracy {outcomes[-1].best_val_accuracy:.4f})")
            continue
        last = len(cfg.levels) if cfg.scaling.worker_group == "schedule" else i + 1
        try:
            outcomes += run_levels(run, i, last, outcomes[-1] if outcomes else None, log)
        except BaseException as e:
            tracker.end_run(ids["parent"], "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            raise
    final = outcomes[-1]
    results = {"schedule": cfg.name, "kind": cfg.kind, "config_hash": chash,
               "final_val_accuracy": final.best_val_accuracy,
               "train_seconds": sum(o.seconds for o in outcomes),
               "fine_equiv_epochs": final.compute_end, "stages": [asdict(o) for o in outcomes],
               "driver_seconds": time.perf_counter() - t_start, "checkpoint": final.checkpoint,
               "mlflow_parent_run_id": ids["parent"]}
    model, _ = load_checkpoint(final.checkpoint)
    example = np.zeros((1, model.config.in_channels, final.n, final.n), np.float32)
    results["model_uri"] = tracker.log_model(ids["parent"], model.eval(), example, cfg.register_model)
    _write_json(run_dir / "results.json", results)
    tracker.log_metrics(ids["parent"], {"final_val_accuracy": results["final_val_accuracy"],
                                        "train_seconds": results["train_seconds"],
                                        "fine_equiv_epochs": final.compute_end},
                        step=final.global_epoch_end)
    tracker.log_artifacts(ids["parent"], run_dir / "results.json")
    tracker.log_artifacts(ids["parent"], final.checkpoint, "final_checkpoint")
    tracker.end_run(ids["parent"])
    return results
