"""MLflow: a parent run per schedule, a nested run per stage, logged through ``MlflowClient``.

The tracking URI follows ``MLFLOW_TRACKING_URI`` (a server on a cluster) and defaults to
``sqlite:///<absolute path>/mlflow.db`` in the working directory: absolute, because Ray workers run
in other directories. The driver creates runs; inside a stage only rank 0 logs metrics.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

from pipelines.runtime import exclusive

__all__ = ["Tracker", "flatten", "git_tags", "tracking_uri"]


def tracking_uri(uri: str | None = None) -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """MLflow params are flat strings (6000 chars at most): nested dicts and lists of dicts become
    dotted keys, other lists JSON.

    >>> flatten({"a": {"b": 1}, "levels": [{"n": 14}, {"n": 28}], "steps": [1, 2]})
    {'a.b': '1', 'levels.0.n': '14', 'levels.1.n': '28', 'steps': '[1, 2]'}
    """
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, list | tuple) and v and all(isinstance(x, dict) for x in v):
            v = {str(i): x for i, x in enumerate(v)}
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list | tuple) else str(v)
    return {k: v[:6000] for k, v in out.items()}


def git_tags(root: str | os.PathLike | None = None) -> dict[str, str]:
    """MLflow's own source tags for the code that runs: the git commit, ``git_dirty`` (tracked
    files changed) and the repository; empty outside a git checkout (e.g. a pip install)."""
    import subprocess

    root = Path(root or Path(__file__).resolve().parents[1])
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"mlflow.source.git.commit": commit, "git_dirty": str(bool(dirty)).lower(),
            "mlflow.source.name": str(root)}


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
        if exp is None:
            try:
                exp_id = self.client.create_experiment(name, artifact_location=location)
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                exp = self.client.get_experiment_by_name(name)
            else:
                exp = self.client.get_experiment(exp_id)
        if "mlflow.experimentKind" not in exp.tags:  # the UI opens on training runs, not GenAI traces
            self.client.set_experiment_tag(exp.experiment_id, "mlflow.experimentKind",
                                           "custom_model_development")
        return exp.experiment_id

    def has_run(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            return bool(run_id) and self.client.get_run(run_id).info.experiment_id == self.experiment_id
        except MlflowException:
            return False

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

    def log_model(self, run_id: str, model, input_example, registered_name: str | None = None) -> str:
        """``mlflow.pytorch.log_model`` into run ``run_id``, with the signature inferred from
        ``input_example`` (a numpy batch) and pinned requirements (no slow inference of them);
        registered as ``registered_name`` when given. Returns the model's URI.

        Saved as a pickle with the ``mscnn`` package's code inside the model (``code_paths``): the
        default ``pt2`` format traces the network at the example's batch size and then refuses any
        other batch size."""
        import mlflow
        import mlflow.pytorch
        import torch

        import mscnn

        try:  # a Ray job's working_dir copy can be gone by now (seen on a two-node cluster):
            os.getcwd()  # MLflow's model logging calls Path.cwd()
        except FileNotFoundError:
            os.chdir(tempfile.gettempdir())
        mlflow.set_tracking_uri(self.uri)
        quiet = logging.getLogger("mlflow.pytorch")  # its warning about pickle: chosen, see above
        level, quiet.level = quiet.level, logging.ERROR
        try:
            with mlflow.start_run(run_id=run_id):
                info = mlflow.pytorch.log_model(
                    model, name="model", input_example=input_example, serialization_format="pickle",
                    code_paths=[str(Path(mscnn.__file__).parent)],
                    pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
                    registered_model_name=registered_name)
        finally:
            quiet.setLevel(level)
        return info.model_uri

    def log_dataset(self, run_id: str, path: str | os.PathLike, name: str, digest: str,
                    context: str = "train") -> None:
        """Record a pyramid as the run's MLflow dataset input (the Datasets column and the run's
        Inputs): its location, name and content digest (the manifest's config hash)."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local folder
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str(path))
        ds = MetaDataset(source, name=name, digest=digest[:36])
        self.client.log_inputs(run_id, datasets=[DatasetInput(
            ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", context)])])

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status)
