"""A tiny Tune sweep on a real local Ray, then `mscnn report` from its MLflow runs."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient

from pipelines.config import ScheduleConfig, load_config
from pipelines.report import RunCurve, fig1_kernels, make_report, summary_rows
from pipelines.sweep import InvalidSampleError, SweepConfig, load_sweep, run_sweep

BASE = {"name": "b", "kind": "single",
        "pyramid": {"name": "syn", "source": {"kind": "synthetic", "size": 16, "count": 200}, "levels": 2},
        "model": {"channels": 4, "classes": 4}, "levels": [{"n": 8, "steps": 1, "epochs": 1}]}


def _sweep(tmp_path, space, **fields):
    return SweepConfig.model_validate({
        "name": "tiny", "storage_path": str(tmp_path / "sweeps"), "experiment": "sw",
        "base": BASE | {"pyramid_root": str(tmp_path / "pyr")}, "space": space, **fields,
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
        "space": space, "metric": "seconds_to_target", "mode": "min", "target": 0.01}))
    return load_sweep(Path("configs") / "sweep.yaml")


@pytest.fixture(scope="module")
def tiny(local_ray, tmp_path_factory):
    """A two-trial sweep from YAML files with relative paths, run once for the tests below; the
    working directory and the tracking URI stay set while each test runs (``env``)."""
    tmp = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{tmp}/mlflow.db"

    def env():
        mp = pytest.MonkeyPatch()
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.chdir(tmp)  # relative paths in the files, as in configs/sweep_*.yaml
        return mp

    mp = env()
    try:
        sweep = _sweep_from_files(tmp, {"levels.0.optim.lr": {"grid": [0.01, 0.003]},
                                        "model.pair": {"choice": ["average"]}})
        res = run_sweep(sweep, log=lambda s: None)
    finally:
        mp.undo()
    client = MlflowClient(uri)
    yield SimpleNamespace(tmp=tmp, uri=uri, sweep=sweep, res=res, env=env, client=client,
                          exp=client.get_experiment_by_name("sw"))


@pytest.mark.ray
@pytest.mark.slow
def test_trials_run_in_their_own_folders_yet_share_one_pyramid(tiny):
    assert sorted(p.name for p in (tiny.tmp / "pyr").iterdir()) == [".syn.lock", "syn"]
    assert len(tiny.res["trials"]) == 2 and all(t["error"] is None for t in tiny.res["trials"])
    assert sorted(t["space.levels.0.optim.lr"] for t in tiny.res["trials"]) == [0.003, 0.01]


@pytest.mark.ray
@pytest.mark.slow
def test_the_best_configuration_is_a_ready_to_run_schedule(tiny):
    mp = tiny.env()
    try:
        best = load_config(tiny.res["best_config"], ScheduleConfig)
    finally:
        mp.undo()
    assert best.levels[0].optim.lr == tiny.res["best"]["space.levels.0.optim.lr"]
    assert best.model.pair == "average"


@pytest.mark.ray
@pytest.mark.slow
def test_each_trial_is_an_mlflow_parent_run_tagged_with_the_sweep(tiny):
    client, exp, res = tiny.client, tiny.exp, tiny.res
    parents = client.search_runs([exp.experiment_id], "tags.sweep_id = 'tiny' and tags.kind = 'single'")
    assert len(parents) == 2
    assert {p.info.run_id for p in parents} == {t["mlflow_run_id"] for t in res["trials"]}
    for p in parents:
        kids = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{p.info.run_id}'")
        assert len(kids) == 1 and "val_accuracy" in kids[0].data.metrics
    sweep_run = client.get_run(res["mlflow_run_id"])
    assert sweep_run.data.tags["kind"] == "sweep" and sweep_run.data.metrics["finished"] == 2


@pytest.mark.ray
@pytest.mark.slow
def test_trials_are_scored_by_the_wallclock_to_the_target(tiny):
    """metric seconds_to_target: the training wall-clock at the first epoch that reached the
    target (here the first: every network passes 1%), as the stage logged it; best = the least."""
    client, res = tiny.client, tiny.res
    for t in res["trials"]:
        kid, = client.search_runs([tiny.exp.experiment_id],
                                  f"tags.mlflow.parentRunId = '{t['mlflow_run_id']}'")
        first = min(client.get_metric_history(kid.info.run_id, "wallclock"), key=lambda m: m.step)
        assert t["seconds_to_target"] == pytest.approx(first.value)
        assert t["compute_to_target"] == pytest.approx(1.0)  # one epoch at the only level
    assert res["best"]["seconds_to_target"] == min(t["seconds_to_target"] for t in res["trials"])


@pytest.mark.ray
@pytest.mark.slow
def test_the_report_reads_the_trials_back_from_mlflow(tiny):
    mp = tiny.env()
    try:
        rep = make_report("sw", str(tiny.tmp / "report"), target=0.0,
                          filter_string="tags.sweep_id = 'tiny'")
    finally:
        mp.undo()
    parents = tiny.client.search_runs([tiny.exp.experiment_id],
                                      "tags.sweep_id = 'tiny' and tags.kind = 'single'")
    assert len(rep["rows"]) == 2
    assert {r["run"] for r in rep["rows"]} == {p.info.run_name for p in parents}
    assert all(r["compute_to_target"] == pytest.approx(1.0) for r in rep["rows"])
    for p in rep["plots"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not tiny.client.search_runs([tiny.exp.experiment_id], "tags.kind = 'report'")
    reports = tiny.client.search_runs(
        [tiny.client.get_experiment_by_name("sw-reports").experiment_id], "tags.kind = 'report'")
    arts = {a.path for a in tiny.client.list_artifacts(reports[0].info.run_id)}
    assert {"comparison.md", "val_acc_vs_compute.png", "fig1_kernels.png"} <= arts


@pytest.mark.ray
@pytest.mark.slow
def test_the_same_sweep_again_continues_without_rerunning_trials(tiny):
    mp = tiny.env()
    try:
        logs = []
        again = run_sweep(tiny.sweep, log=logs.append)
    finally:
        mp.undo()
    assert any("continuing sweep" in s for s in logs)
    assert sorted(t["mlflow_run_id"] for t in again["trials"]) == sorted(
        t["mlflow_run_id"] for t in tiny.res["trials"])


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_whose_first_run_failed_reruns_its_trials_one_at_a_time(local_ray, tmp_path, monkeypatch):
    """The first run fails in every trial (the IDX files are not there yet); run again once they
    are, the trials run one after the other as ``max_concurrent_trials: 1`` asks. ``Tuner.restore``
    resumed all errored trials at once (ray#40652): their runs overlapped, or on 2 CPUs hung."""
    import gzip

    from mscnn.data import synthetic

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    data = tmp_path / "idx"
    data.mkdir()
    sweep = SweepConfig.model_validate({
        "name": "again", "storage_path": str(tmp_path / "sweeps"), "experiment": "again",
        "space": {"levels.0.optim.lr": {"grid": [0.01, 0.003]}},
        "base": BASE | {"levels": [{"n": 14, "steps": 1, "epochs": 1}],
                        "pyramid_root": str(tmp_path / "pyr"), "pyramid": {
            "name": "idx", "levels": 2, "n_val": 40,
            "source": {"kind": "idx", "path": str(data), "idx": {"train": ["x.gz", "y.gz"]}}}}})
    with pytest.raises(RuntimeError, match=r"sweep again: no trial finished; errors: \['\w*Error: .*x\.gz"):
        run_sweep(sweep, log=lambda s: None)
    x, y = synthetic(200, 28)
    for name, a in (("x.gz", np.clip(x[:, 0] * 255, 0, 255)), ("y.gz", y)):
        head = bytes([0, 0, 0x08, a.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in a.shape)
        (data / name).write_bytes(gzip.compress(head + a.astype(np.uint8).tobytes()))
    logs = []
    res = run_sweep(sweep, log=logs.append)
    assert any("continuing sweep" in s for s in logs)
    assert [t["error"] for t in res["trials"]] == [None, None]
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("again").experiment_id],
                              "tags.sweep_id = 'again' and tags.kind = 'single'")
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    assert len(spans) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert spans[0][1] <= spans[1][0], f"the two trials ran at the same time: {spans}"


def test_time_to_target_reads_the_final_level_only_and_needs_a_target():
    from pipelines.schedule import to_target
    from pipelines.sweep import NOT_REACHED, _markdown

    def rec(n, acc, wall, comp, ge):
        return {"n": n, "val_accuracy": acc, "wallclock": wall, "fine_equiv_epochs": comp, "global_epoch": ge}

    res = {"stages": [{"n": 14, "history": [rec(14, 0.99, 5.0, 0.25, 0)]},
                      {"n": 28, "history": [rec(28, 0.90, 20.0, 1.25, 1), rec(28, 0.97, 35.0, 2.25, 2),
                                            rec(28, 0.98, 50.0, 3.25, 3)]}]}
    assert to_target(res, 0.95) == {"seconds": 35.0, "fine_equiv_epochs": 2.25, "global_epoch": 2}
    assert to_target(res, 0.99) is None  # the coarse level's 99% is on other images
    base = {"name": "s", "base": BASE, "space": {"seed": {"grid": [0, 1]}}}
    with pytest.raises(ValueError, match="seconds_to_target: needs target"):
        SweepConfig.model_validate(base | {"metric": "seconds_to_target", "mode": "min"})
    with pytest.raises(ValueError, match="needs target"):
        SweepConfig.model_validate(base | {"metric": "seconds_to_target", "target": 0.9})  # mode max
    with pytest.raises(ValueError, match="metric"):
        SweepConfig.model_validate(base | {"metric": "val_acc"})
    scores = [("a", NOT_REACHED), ("b", 30.0), ("c", 20.0)]
    trials = [{"trial_id": a, "space.seed": i, "seconds_to_target": v, "fine_equiv_epochs": 1.0,
               "train_seconds": 9.0, "error": None} for i, (a, v) in enumerate(scores)]
    lines = _markdown(trials, "seconds_to_target", "min").splitlines()[2:]
    assert [ln.split(" | ")[0] for ln in lines] == ["| c", "| b", "| a"] and "not reached" in lines[2]


def test_invalid_search_space_names_the_key(tmp_path):
    with pytest.raises(ValueError, match=r"space\.levels\.0\.optim\.lr: expected exactly one of"):
        _sweep(tmp_path, {"levels.0.optim.lr": {"normal": [0, 1]}})
    with pytest.raises(ValueError, match=r"space\.model\.T\.uniform: expected \[low, high\]"):
        _sweep(tmp_path, {"model.T": {"uniform": [3, 1]}})
    with pytest.raises(ValueError, match=r"space:[\s\S]*levels\.0\.optim\.lrr"):
        _sweep(tmp_path, {"levels.0.optim.lrr": {"grid": [0.1]}})
    with pytest.raises(ValueError, match=r"levels\.7\.epochs"):
        _sweep(tmp_path, {"levels.7.epochs": {"grid": [1]}})


SINGLE = [{"n": 8, "steps": 1, "epochs": 1}]
DILATING = [{"n": 8, "steps": 1, "epochs": 1}, {"n": 16, "steps": 1, "epochs": 1, "dilate": True}]


def test_a_combination_that_gives_no_schedule_is_refused_unless_skipped(tmp_path):
    """Each value is valid alone; together (a dilating handover with Gaussian stencils) they are
    not. The sweep names the combination and the reason, or with skip_invalid accepts the space
    and says which samples it will skip; a space with nothing valid is refused either way."""
    space = {"model.stencil": {"grid": ["free", "gaussian"]}, "levels": {"grid": [SINGLE, DILATING]}}
    with pytest.raises(ValueError, match=r"space: 1 of 4 combinations give no valid schedule, e\.g\. "
                       r"\{'model\.stencil': 'gaussian', 'levels': .*'dilate': True.*\}: levels\.1\.dilate: "
                       r"moves free stencils; model\.stencil 'gaussian'.*\(skip_invalid: true skips them\)"):
        _sweep(tmp_path, space)
    sweep = _sweep(tmp_path, space, skip_invalid=True)
    assert sweep.invalid({"model.stencil": "free", "levels": DILATING}) is None
    assert sweep.invalid({"model.stencil": "gaussian", "levels": SINGLE}) is None
    assert sweep.invalid({"model.stencil": "gaussian", "levels": DILATING}).startswith(
        "levels.1.dilate: moves free stencils")
    with pytest.raises(InvalidSampleError) as bad:  # the reason travels as data, not parsed text
        sweep.schedule({"model.stencil": "gaussian", "levels": DILATING})
    assert bad.value.reason == sweep.invalid({"model.stencil": "gaussian", "levels": DILATING})
    assert str(bad.value).startswith("space: a sample {'model.stencil': 'gaussian'")
    assert (sweep.invalid({"levels.9.n": 7})
            == "cannot apply override levels.9.n=7 (not a field of the base schedule)")
    with pytest.raises(ValueError, match=r"space: 1 of 1 combinations give no valid schedule"):
        _sweep(tmp_path, {"model.stencil": {"grid": ["gaussian"]}, "levels": {"grid": [DILATING]}},
               skip_invalid=True)


@pytest.mark.ray
@pytest.mark.slow
def test_a_sweep_skips_the_samples_that_give_no_schedule(local_ray, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    sweep = _sweep(tmp_path, {"model.stencil": {"grid": ["gaussian"]},
                              "levels": {"grid": [SINGLE, DILATING]}}, skip_invalid=True)
    res = run_sweep(sweep, log=lambda s: None)
    by_levels = {len(t["space.levels"]): t for t in res["trials"]}
    assert by_levels[1]["error"] is None and by_levels[1]["final_val_accuracy"] is not None
    assert by_levels[2]["error"].startswith("skipped: levels.1.dilate: moves free stencils")
    assert by_levels[2]["final_val_accuracy"] is None and by_levels[2]["mlflow_run_id"] is None
    assert res["best"] is by_levels[1]
    table = (tmp_path / "sweeps" / "tiny.trials.md").read_text()
    assert "skipped: levels.1.dilate" in table


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
    assert rows[1]["wallclock_speedup"] == pytest.approx(20 / 7)
    assert summary_rows([single, multi], target=0.95)[1]["speedup"] is None


def test_repeated_runs_get_unique_labels_and_levels_plot_as_separate_lines(tmp_path):
    from pipelines.report import _curves_plot, draw_curves, unique_labels

    pts = [{"step": i, "val_accuracy": a, "wallclock": i, "n": n, "stage": f"L{int(n == 16)}"}
           for i, (a, n) in enumerate([(0.9, 8), (0.95, 8), (0.6, 16), (0.97, 16)])]
    runs = [RunCurve(f"id{i}abcdef", "ms", "multiscale", {}, 0.97, pts) for i in range(2)]
    unique_labels(runs)
    assert [r.label for r in runs] == ["ms #id0abc (multiscale)", "ms #id1abc (multiscale)"]
    png = _curves_plot(runs, "wallclock", "wall-clock (s)", tmp_path / "c.png", target=0.95)
    assert png.read_bytes()[:4] == b"\x89PNG"
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    draw_curves(ax, runs, "wallclock", 0.95)
    lines = [(ln.get_label(), list(ln.get_xdata()), ln.get_linestyle()) for ln in ax.get_lines()]
    plt.close(fig)
    # per run: the 8x8 level, the 16x16 level (never one line through both), the dotted handover
    assert lines[:3] == [("ms #id0abc (multiscale) @ 8x8", [0, 1], "-"),
                         ("ms #id0abc (multiscale) @ 16x16", [2, 3], "-"),
                         (lines[2][0], [1, 2], ":")]
    assert lines[-1][0] == "target 95.0%" and len(lines) == 7


def test_fig1_kernel_illustration(tmp_path):
    import torch

    p = fig1_kernels(tmp_path / "f.png", image=torch.rand(1, 28, 28))
    assert p.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.ray
@pytest.mark.slow
def test_a_second_run_of_the_same_sweep_is_refused(tiny):
    from pipelines.runtime import exclusive

    mp = tiny.env()
    try:
        storage = Path(tiny.sweep.storage_path).resolve()
        with exclusive(storage / ".tiny.lock", "a first run"):
            with pytest.raises(RuntimeError, match=r"sweep tiny \(.*\) is already running \(pid \d+ on "):
                run_sweep(tiny.sweep, log=lambda s: None)
    finally:
        mp.undo()
