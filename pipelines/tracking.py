"""MLflow: a parent run per schedule, a nested run per stage, logged through ``MlflowClient``.

The tracking URI follows ``MLFLOW_TRACKING_URI`` (a server on a cluster) and defaults to
``sqlite:///<absolute path>/mlflow.db`` in the working directory: absolute, because Ray workers run
in other directories. The driver creates runs; inside a stage only rank 0 logs metrics.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipelines.runtime import exclusive

__all__ = ["Tracker", "flatten", "tracking_uri"]


def tracking_uri(uri: str | None = None) -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}} -> {"a.b": "1"}`` (MLflow params are flat strings, 6000 chars at most)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list | tuple) else str(v)
    return {k: v[:6000] for k, v in out.items()}


class Tracker:
    """Thin wrapper over ``MlflowClient`` with the project's conventions."""

    def __init__(self, experiment: str = "mscnn", uri: str | None = None) -> None:
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(uri)
        if self.uri.startswith("sqlite:"):
            # the first client of a new SQLite store creates its tables (alembic migrations): two
            # processes doing it at once break each other, so one at a time (a lock beside the file)
            db = Path(self.uri[len("sqlite:///"):])
            with exclusive(db.with_name(f".{db.name}.lock"), f"MLflow store {db}", wait=True):
                self.client = MlflowClient(self.uri)
                self.experiment_id = self._experiment(experiment, (db.parent / "mlartifacts").as_uri())
        else:
            self.client = MlflowClient(self.uri)
            self.experiment_id = self._experiment(experiment, None)

    def _experiment(self, name: str, location: str | None) -> str:
        """The id of experiment ``name``, created if missing (by whichever process gets there
        first: a server answers the second with RESOURCE_ALREADY_EXISTS)."""
        from mlflow.exceptions import MlflowException

        exp = self.client.get_experiment_by_name(name)
        if exp is not None:
            return exp.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except MlflowException as e:
            if e.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
            return self.client.get_experiment_by_name(name).experiment_id

    def start_run(self, name: str, tags: dict[str, str] | None = None,
                  params: dict[str, Any] | None = None, parent_id: str | None = None) -> str:
        tags = dict(tags or {})
        if parent_id:
            tags["mlflow.parentRunId"] = parent_id
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        if params:
            self.log_params(run.info.run_id, params)
        return run.info.run_id

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, v) for k, v in flatten(params).items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()
                 if isinstance(v, int | float) and not isinstance(v, bool)]
        self.client.log_batch(run_id, metrics=items)

    def log_artifacts(self, run_id: str, path: str | os.PathLike, dest: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self.client.log_artifacts(run_id, str(p), dest)
        else:
            self.client.log_artifact(run_id, str(p), dest)

    def log_dict(self, run_id: str, data: dict, name: str) -> None:
        self.client.log_dict(run_id, data, name)

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)
