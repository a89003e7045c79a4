"""A tiny Tune sweep on a real local Ray, then `mscnn report` from its MLflow runs."""

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines.config import ScheduleConfig, load_config
from pipelines.report import RunCurve, fig1_kernels, make_report, summary_rows
from pipelines.sweep import SweepConfig, load_sweep, run_sweep

BASE = {"name": "b", "kind": "single",
        "pyramid": {"name": "syn", "source": {"kind": "synthetic", "size": 16, "count": 200}, "levels": 2},
        "model": {"channels": 4, "classes": 4}, "levels": [{"n": 8, "steps": 1, "epochs": 1}]}


def _sweep(tmp_path, space):
    return SweepConfig.model_validate({
        "name": "tiny", "storage_path": str(tmp_path / "sweeps"), "experiment": "sw",
        "base": BASE | {"pyramid_root": str(tmp_path / "pyr")}, "space": space,
    })


def _sweep_from_files(tmp_path, space):
    """The same sweep as the user writes it: YAML files with paths relative to the working
    directory (``tmp_path``) and to the schedule's own file."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "syn.yaml").write_text(yaml.safe_dump(BASE["pyramid"]))
    (tmp_path / "configs" / "base.yaml").write_text(
        yaml.safe_dump(BASE | {"pyramid": "syn.yaml", "pyramid_root": "pyr"}))
    (tmp_path / "configs" / "sweep.yaml").write_text(yaml.safe_dump({
        "name": "tiny", "storage_path": "sweeps", "experiment": "sw", "base": "base.yaml",
        "space": space}))
    return load_sweep(Path("configs") / "sweep.yaml")


@pytest.mark.ray
@pytest.mark.slow
def test_tiny_sweep_then_report_from_mlflow(local_ray, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)  # relative paths in the files, as in configs/sweep_*.yaml
    sweep = _sweep_from_files(tmp_path, {"levels.0.optim.lr": {"grid": [0.01, 0.003]},
                                         "model.pair": {"choice": ["average"]}})
    res = run_sweep(sweep, log=lambda s: None)
    # trials run in their own directories, yet share the one pyramid under ./pyr
    assert [p.name for p in (tmp_path / "pyr").iterdir()] == ["syn"]
    # the same sweep again continues with Tuner.restore: finished trials are not rerun
    logs = []
    again = run_sweep(sweep, log=logs.append)
    assert any("continuing sweep" in s for s in logs)
    assert sorted(t["mlflow_run_id"] for t in again["trials"]) == sorted(
        t["mlflow_run_id"] for t in res["trials"])
    assert len(res["trials"]) == 2 and all(t["error"] is None for t in res["trials"])
    assert sorted(t["space.levels.0.optim.lr"] for t in res["trials"]) == [0.003, 0.01]
    # the best configuration is a ready-to-run schedule
    best = load_config(res["best_config"], ScheduleConfig)
    assert best.levels[0].optim.lr == res["best"]["space.levels.0.optim.lr"]
    assert best.model.pair == "average"
    # one MLflow parent run per trial, tagged with the sweep id, with its stage as a child
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("sw")
    parents = client.search_runs([exp.experiment_id], "tags.sweep_id = 'tiny' and tags.kind = 'single'")
    assert len(parents) == 2
    assert {p.info.run_id for p in parents} == {t["mlflow_run_id"] for t in res["trials"]}
    for p in parents:
        kids = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{p.info.run_id}'")
        assert len(kids) == 1 and "val_accuracy" in kids[0].data.metrics
    sweep_run = client.get_run(res["mlflow_run_id"])
    assert sweep_run.data.tags["kind"] == "sweep" and sweep_run.data.metrics["finished"] == 2

    # the report reads those runs back from MLflow
    rep = make_report("sw", str(tmp_path / "report"), target=0.0, filter_string="tags.sweep_id = 'tiny'")
    assert len(rep["rows"]) == 2
    assert {r["run"] for r in rep["rows"]} == {p.info.run_name for p in parents}
    assert all(r["compute_to_target"] == pytest.approx(1.0) for r in rep["rows"])
    for p in rep["plots"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    reports = client.search_runs([exp.experiment_id], "tags.kind = 'report'")
    arts = {a.path for a in client.list_artifacts(reports[0].info.run_id)}
    assert {"comparison.md", "val_acc_vs_compute.png", "fig1_kernels.png"} <= arts


def test_invalid_search_space_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"space\.levels\.0\.optim\.lr: expected exactly one of"):
        _sweep(tmp_path, {"levels.0.optim.lr": {"normal": [0, 1]}})
    with pytest.raises(ValueError, match=r"space\.model\.T\.uniform: expected \[low, high\]"):
        _sweep(tmp_path, {"model.T": {"uniform": [3, 1]}})
    with pytest.raises(ValueError, match=r"space:[\s\S]*levels\.0\.optim\.lrr"):
        _sweep(tmp_path, {"levels.0.optim.lrr": {"grid": [0.1]}})
    with pytest.raises(ValueError, match=r"levels\.7\.epochs"):
        _sweep(tmp_path, {"levels.7.epochs": {"grid": [1]}})


def test_speedup_against_the_single_scale_baseline():
    single = RunCurve("a", "single", "single", {}, 0.9, [
        {"step": 0, "val_accuracy": 0.5, "fine_equiv_epochs": 1.0, "wallclock": 10},
        {"step": 1, "val_accuracy": 0.9, "fine_equiv_epochs": 2.0, "wallclock": 20}])
    multi = RunCurve("b", "multi", "multiscale", {}, 0.91, [
        {"step": 0, "val_accuracy": 0.8, "fine_equiv_epochs": 0.25, "wallclock": 4},
        {"step": 1, "val_accuracy": 0.9, "fine_equiv_epochs": 0.5, "wallclock": 7}])
    rows = summary_rows([single, multi], target=0.9)
    assert [r["speedup"] for r in rows] == [1.0, 4.0]
    assert rows[1]["wallclock_to_target"] == 7
    assert summary_rows([single, multi], target=0.95)[1]["speedup"] is None


def test_fig1_kernel_illustration(tmp_path):
    import torch

    p = fig1_kernels(tmp_path / "f.png", image=torch.rand(1, 28, 28))
    assert p.read_bytes()[:4] == b"\x89PNG"
