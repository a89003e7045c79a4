"""Ray Tune sweeps whose trial is a whole schedule (every level a Ray Train stage).

A sweep config names a base schedule and a search space over its fields (dotted keys, as
``mscnn train --set``)::

    name: sweep-mnist
    base: mnist_multiscale.yaml
    space:
      levels.0.optim.lr: {loguniform: [0.001, 0.03]}
      model.pair: {choice: [full-weighting, average]}
      levels: {grid: [[{n: 14, epochs: 2}, {n: 28, epochs: 1}], [{n: 28, epochs: 3}]]}

Following Ray 2.60 (Train V2), the trial is a function that runs the schedule; each stage's
``TorchTrainer`` gets ``TuneReportCallback`` so per-epoch metrics reach Tune (ASHA can stop weak
trials on ``val_accuracy`` against cumulative ``fine_equiv_epochs``). Every trial is an MLflow
parent run tagged with the sweep id; the sweep itself is a run holding the summary. Run again, an
interrupted sweep continues: the samples are seeded (``seed``) and each trial's schedule is named by
its place in that order, so finished trials and levels are found and not rerun (``Tuner.restore`` is
not used: it ignores ``max_concurrent_trials``, ray#40652).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pipelines.config import ScheduleConfig, apply_overrides, load_config
from pipelines.runtime import exclusive, require_ray
from pipelines.tracking import Tracker, tracking_uri

__all__ = ["InvalidSampleError", "SweepConfig", "load_sweep", "run_sweep"]

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")


# what a trial reports; *_to_target: training wall-clock / fine-equivalent epochs until the final
# level's val accuracy first reaches ``target`` (NOT_REACHED when it never does)
METRICS = ("final_val_accuracy", "fine_equiv_epochs", "train_seconds", "seconds_to_target",
           "compute_to_target")
NOT_REACHED = 1e9


class InvalidSampleError(ValueError):
    """A sample of a sweep's space that gives no valid schedule; ``reason`` is why, in one line
    (what a skipped trial reports), without the sample itself."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    base: dict  # the schedule (a path in YAML, read relative to the sweep file)
    space: dict[str, dict[str, Any]] = Field(min_length=1)
    metric: Literal[METRICS] = "final_val_accuracy"
    mode: Literal["max", "min"] = "max"
    target: float | None = Field(None, gt=0, le=1)  # for the *_to_target metrics
    num_samples: int = Field(1, ge=1)
    max_concurrent_trials: int = Field(1, ge=1)  # 1 fits a 2-core machine
    trial_cpus: float = Field(0.5, ge=0)  # the trial's own driver; its Train workers ask for more
    scheduler: Literal["none", "asha"] = "none"
    grace_period: float = Field(1.0, gt=0)  # ASHA, in fine-grid-equivalent epochs
    storage_path: str = "outputs/sweeps"
    experiment: str = "mscnn-sweeps"
    seed: int = 0
    # a sample whose combination of values makes no valid schedule (e.g. a dilating handover with
    # model.stencil gaussian) is skipped and listed as such, instead of refusing the sweep
    skip_invalid: bool = False

    @field_validator("base", mode="before")
    @classmethod
    def _read_base(cls, v, info: ValidationInfo):
        if isinstance(v, str):
            p = Path(v)
            base = (info.context or {}).get("base")
            if not p.is_absolute() and base and not p.exists():
                p = Path(base) / p
            try:
                v = yaml.safe_load(p.read_text())
            except FileNotFoundError:
                raise ValueError(f"base schedule not found: {p}") from None
            pyr = v.get("pyramid")
            if isinstance(pyr, str) and not Path(pyr).is_absolute():
                v["pyramid"] = str((p.parent / pyr).resolve()) if (p.parent / pyr).exists() else pyr
        return v

    @model_validator(mode="after")
    def _check_target(self) -> SweepConfig:
        if self.metric.endswith("_to_target") and (self.target is None or self.mode != "min"):
            raise ValueError(f"metric {self.metric}: needs target (a val accuracy, e.g. 0.97) and "
                             "mode: min")
        return self

    @model_validator(mode="after")
    def _check_space(self) -> SweepConfig:
        for key, spec in self.space.items():
            if len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                raise ValueError(f"space.{key}: expected exactly one of {list(DISTRIBUTIONS)}, "
                                 f"got {sorted(spec)}")
            (dist, args), = spec.items()
            if dist in ("grid", "choice") and not (isinstance(args, list) and args):
                raise ValueError(f"space.{key}.{dist}: expected a non-empty list of values")
            if dist in ("uniform", "loguniform", "randint") and not (
                    isinstance(args, list) and len(args) == 2 and args[0] < args[1]):
                raise ValueError(f"space.{key}.{dist}: expected [low, high] with low < high")
            if dist == "loguniform" and args[0] <= 0:
                raise ValueError(f"space.{key}.loguniform: bounds must be > 0")
        try:  # every key applies
            apply_overrides(json.loads(json.dumps(self.base)),
                            {k: _example(s) for k, s in self.space.items()})
        except KeyError as e:
            raise ValueError(f"space: {e.args[0]} (not a field of the base schedule)") from None
        combos = _finite_samples(self.space)
        bad = [(c, r) for c in combos if (r := self.invalid(c))]
        if bad and (not self.skip_invalid or len(bad) == len(combos)):
            (c, reason), = bad[:1]
            raise ValueError(f"space: {len(bad)} of {len(combos)} combinations give no valid schedule, "
                             f"e.g. {c}: {reason}"
                             + ("" if self.skip_invalid else " (skip_invalid: true skips them)"))
        return self

    def invalid(self, sample: dict[str, Any]) -> str | None:
        """Why ``sample`` gives no valid schedule, in one line (None when it does)."""
        try:
            self.schedule(sample)
        except InvalidSampleError as e:
            return e.reason
        return None

    def schedule(self, sample: dict[str, Any], name: str | None = None) -> ScheduleConfig:
        """The base schedule with ``sample`` (dotted keys) applied, validated."""
        raw = json.loads(json.dumps(self.base))
        try:
            apply_overrides(raw, sample)
        except KeyError as e:
            reason = f"{e.args[0]} (not a field of the base schedule)"
            raise InvalidSampleError(f"space: {reason}", reason) from None
        if name:
            raw["name"] = name
        try:
            return ScheduleConfig.model_validate(raw)
        except ValidationError as e:
            reason = _reason(e)
            raise InvalidSampleError(f"space: a sample {sample} gives an invalid schedule: {reason}",
                                reason) from None


def _with_absolute_paths(sweep: SweepConfig) -> SweepConfig:
    """The sweep with the base schedule's relative paths (its pyramid file and ``pyramid_root``)
    resolved against this process's directory: a Tune trial runs in its own trial directory, where
    a relative path would point elsewhere (a missing pyramid file, or a pyramid rebuilt per trial)."""
    base = json.loads(json.dumps(sweep.base))
    base.setdefault("pyramid_root", ScheduleConfig.model_fields["pyramid_root"].default)
    for key in ("pyramid", "pyramid_root"):
        if isinstance(base[key], str) and not Path(base[key]).is_absolute():
            base[key] = str(Path(base[key]).resolve())
    return sweep.model_copy(update={"base": base})


def _reason(e: ValidationError) -> str:
    """A schedule's validation errors in one line: ``field: message; ...``."""
    return "; ".join((".".join(map(str, err["loc"])) + ": " if err["loc"] else "")
                     + err["msg"].removeprefix("Value error, ") for err in e.errors())


def _example(spec: dict) -> Any:
    (dist, args), = spec.items()
    return args[0]


def _finite_samples(space: dict[str, dict], limit: int = 512) -> list[dict[str, Any]]:
    """Every combination of the grid and choice values (the other keys at their first bound), up to
    ``limit`` of them: what the sweep checks before it starts."""
    import itertools

    keys = list(space)
    values = [args if dist in ("grid", "choice") else [args[0]]
              for key in keys for dist, args in space[key].items()]
    return [dict(zip(keys, c, strict=True)) for c in itertools.islice(itertools.product(*values), limit)]


def _tune_space(space: dict[str, dict]) -> dict:
    from ray import tune

    fns = {"grid": tune.grid_search, "choice": tune.choice,
           "uniform": lambda a: tune.uniform(*a), "loguniform": lambda a: tune.loguniform(*a),
           "randint": lambda a: tune.randint(*a)}
    # Tune nests dotted keys; keep them flat under one level with a safe separator
    return {key.replace(".", "__"): fns[d](a) for key, spec in space.items() for d, a in spec.items()}


def _trial(config: dict) -> None:
    """One trial: the sampled schedule, every level a Ray Train stage reporting to Tune."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.schedule import run_schedule, to_target

    os.environ["MLFLOW_TRACKING_URI"] = config["_mlflow_uri"]
    sweep = SweepConfig.model_validate(config["_sweep"])
    trial_id = tune.get_context().get_trial_id()
    sample = {k.replace("__", "."): v for k, v in config.items() if not k.startswith("_")}
    if sweep.skip_invalid and (reason := sweep.invalid(sample)):
        print(f"skipped: {reason}")
        tune.report({"skipped": reason, "done_schedule": True})
        return
    # named by the trial's place in the (seeded) sample order, not by Tune's per-run id: a rerun
    # of the sweep finds each trial's schedule, finished levels and MLflow runs again
    cfg = sweep.schedule(sample, name=f"{sweep.name}-{trial_id.rsplit('_', 1)[-1]}")
    cfg = cfg.model_copy(update={"experiment": sweep.experiment,
                                 "storage_path": config["_storage"]})
    res = run_schedule(cfg, log=print, tags={"sweep_id": config["_sweep_id"], "trial_id": trial_id},
                       train_callbacks=lambda: [TuneReportCallback()])
    hit = to_target(res, sweep.target) if sweep.target is not None else None
    tune.report({"final_val_accuracy": res["final_val_accuracy"],
                 "val_accuracy": res["final_val_accuracy"],
                 "seconds_to_target": hit["seconds"] if hit else NOT_REACHED,
                 "compute_to_target": hit["fine_equiv_epochs"] if hit else NOT_REACHED,
                 "fine_equiv_epochs": res["fine_equiv_epochs"], "train_seconds": res["train_seconds"],
                 "mlflow_run_id": res["mlflow_parent_run_id"], "done_schedule": True})


def _last_line(error: BaseException) -> str:
    """A trial's error as its last line (``ValueError: ...``), without Ray's traceback and colours."""
    lines = [ln.strip() for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if ln.strip()]
    return lines[-1] if lines else type(error).__name__


def load_sweep(path: str | os.PathLike, overrides: dict | None = None) -> SweepConfig:
    return load_config(path, SweepConfig, overrides)


def run_sweep(sweep: SweepConfig, log=print) -> dict:
    """Run (or continue) the sweep; returns ``{"best": ..., "trials": [...], "best_config": path}``.
    One run of a sweep at a time: a second refuses, naming the holder."""
    require_ray("run_sweep")
    storage = Path(sweep.storage_path).resolve()
    with exclusive(storage / f".{sweep.name}.lock", f"sweep {sweep.name} ({storage})"):
        return _run_sweep(sweep, storage, log)


def _run_sweep(sweep: SweepConfig, storage: Path, log) -> dict:
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    path = storage / sweep.name
    uri = tracking_uri()
    tracker = Tracker(sweep.experiment, uri)
    ids_file = storage / f"{sweep.name}.mlflow.json"
    ids = json.loads(ids_file.read_text()) if ids_file.exists() else {}
    if "sweep" not in ids:
        storage.mkdir(parents=True, exist_ok=True)
        ids["sweep"] = tracker.start_run(sweep.name, tags={"kind": "sweep", "sweep_id": sweep.name},
                                         params={"space": sweep.space, "metric": sweep.metric,
                                                 "num_samples": sweep.num_samples})
        ids_file.write_text(json.dumps(ids))
    trainable = tune.with_resources(_trial, {"cpu": sweep.trial_cpus})
    if path.exists():
        # Not Tuner.restore: a restored experiment resumes every unfinished trial at once,
        # ignoring max_concurrent_trials (ray#40652; on 2 CPUs nothing then progresses). The same
        # seeded samples in a fresh run find their schedules' finished levels instead.
        log(f"continuing sweep {path} (finished trials and levels are not rerun)")
        shutil.rmtree(path)  # Tune's bookkeeping only; the schedules live in <name>-runs
    scheduler = None
    if sweep.scheduler == "asha":
        scheduler = tune.schedulers.ASHAScheduler(
            time_attr="fine_equiv_epochs", metric="val_accuracy", mode="max",
            grace_period=sweep.grace_period, max_t=10_000)
    param_space = _tune_space(sweep.space) | {
        "_sweep": _with_absolute_paths(sweep).model_dump(), "_sweep_id": sweep.name, "_mlflow_uri": uri,
        "_storage": str(storage / f"{sweep.name}-runs")}
    tuner = tune.Tuner(
        trainable, param_space=param_space,
        tune_config=tune.TuneConfig(num_samples=sweep.num_samples, scheduler=scheduler,
                                    # the limit goes to the generator: given a search_alg,
                                    # Tune ignores max_concurrent_trials (tune.py, 2.60)
                                    search_alg=BasicVariantGenerator(
                                        random_state=sweep.seed,
                                        max_concurrent=sweep.max_concurrent_trials)),
        run_config=tune.RunConfig(name=sweep.name, storage_path=str(storage),
                                  failure_config=tune.FailureConfig(max_failures=1)),
    )
    grid = tuner.fit()
    trials = []
    for r in grid:
        sample = {k.replace("__", "."): v for k, v in r.config.items() if not k.startswith("_")}
        m = r.metrics or {}
        trials.append({"trial_id": m.get("trial_id"), **{f"space.{k}": v for k, v in sample.items()},
                       "final_val_accuracy": m.get("final_val_accuracy"),
                       **({k: m.get(k) for k in ("seconds_to_target", "compute_to_target")}
                          if sweep.target is not None else {}),
                       "fine_equiv_epochs": m.get("fine_equiv_epochs"),
                       "train_seconds": m.get("train_seconds"),
                       "error": _last_line(r.error) if r.error else (
                           f"skipped: {m['skipped']}" if m.get("skipped") else None),
                       "mlflow_run_id": m.get("mlflow_run_id")})
    done = [t for t in trials if t["final_val_accuracy"] is not None and t[sweep.metric] is not None]
    if not done:
        raise RuntimeError(f"sweep {sweep.name}: no trial finished; errors: "
                           f"{[t['error'] for t in trials]}")
    best = (max if sweep.mode == "max" else min)(done, key=lambda t: t[sweep.metric])
    best_sample = {k[len("space."):]: v for k, v in best.items() if k.startswith("space.")}
    best_cfg = sweep.schedule(best_sample, name=f"{sweep.name}-best")
    best_file = storage / f"{sweep.name}.best.yaml"
    raw = best_cfg.model_dump()
    best_file.write_text(f"# best of sweep {sweep.name}: {sweep.metric} = {best[sweep.metric]:.4f}\n"
                         + yaml.safe_dump(raw, sort_keys=False))
    table = _markdown(trials, sweep.metric, sweep.mode)
    (storage / f"{sweep.name}.trials.md").write_text(table + "\n")
    tracker.log_metrics(ids["sweep"], {f"best_{sweep.metric}": best[sweep.metric],
                                       "trials": len(trials), "finished": len(done)}, step=0)
    tracker.log_artifacts(ids["sweep"], best_file)
    tracker.log_artifacts(ids["sweep"], storage / f"{sweep.name}.trials.md")
    tracker.log_dict(ids["sweep"], {"trials": trials}, "trials.json")
    tracker.end_run(ids["sweep"])
    log(table)
    log(f"best config: {best_file}")
    return {"best": best, "trials": trials, "best_config": str(best_file),
            "mlflow_run_id": ids["sweep"]}


def _markdown(trials: list[dict], metric: str, mode: str = "max") -> str:
    """The trials, best first (by ``metric`` in ``mode``; unfinished ones last)."""
    keys = [k for k in trials[0] if k.startswith("space.")]
    head = ["trial", *keys, metric, "fine-equiv epochs", "train s", "error"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    sign = -1 if mode == "max" else 1
    for t in sorted(trials, key=lambda t: (t[metric] is None, sign * (t[metric] or 0))):
        v = t[metric]
        cells = [t["trial_id"] or "", *[json.dumps(t[k]) for k in keys],
                 "" if v is None else "not reached" if v >= NOT_REACHED else f"{v:.4f}",
                 f"{t['fine_equiv_epochs']:.2f}" if t["fine_equiv_epochs"] is not None else "",
                 f"{t['train_seconds']:.0f}" if t["train_seconds"] is not None else "",
                 (t["error"] or "")[:60]]
        rows.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(rows)

