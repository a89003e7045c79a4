"""Schedules on a real local Ray: Ray Train stages, handover, resume, fault tolerance, MLflow."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from mlflow.tracking import MlflowClient

from mscnn.checkpoint import load_checkpoint
from mscnn.data import Split
from mscnn.hierarchy import to_depth, to_resolution
from mscnn.resnet import ResNetConfig, resnet_to_resolution
from mscnn.train import accuracy
from mscnn.transfer import prolong_stencil
from pipelines.config import ConfigError, ScheduleConfig, load_config
from pipelines.pyramid import input_scale, level_for, level_tensors, read_manifest
from pipelines.runtime import exclusive
from pipelines.schedule import run_schedule

pytestmark = [pytest.mark.ray, pytest.mark.slow]



@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def _cfg(tmp_path, levels, **kw):
    return ScheduleConfig.model_validate({
        "name": kw.pop("name", "t"), "kind": kw.pop("kind", "multiscale"),
        "pyramid": {"name": "syn", "source": {"kind": "synthetic", "size": 16, "count": 240},
                    "levels": 2, "shard_rows": 64},
        "pyramid_root": str(tmp_path / "pyramids"), "storage_path": str(tmp_path / "runs"),
        "model": {"channels": 4, "classes": 4}, "levels": levels, "experiment": "test", **kw,
    })


def _run_dir(cfg):
    return Path(cfg.storage_path) / f"{cfg.name}-{cfg.config_hash()}"


def _val_accuracy(cfg, model) -> float:
    """``model``'s accuracy on the val split of its level, read without Ray, scaled as stages do."""
    pyramid = Path(cfg.pyramid_root) / cfg.pyramid.name
    man = read_manifest(pyramid)
    val = level_tensors(pyramid, level_for(man, model.config.n, "test"), "val")
    scale = torch.tensor(input_scale(man)).view(1, -1, 1, 1)
    return accuracy(model, Split(val.x * scale, val.y))


@pytest.fixture(scope="module")
def two_level(local_ray, tmp_path_factory):
    """One two-level schedule (8 -> 16, Galerkin on the units, lam 0.5, prefilter), run once for the tests
    below, each of which checks one property of it."""
    tmp = tmp_path_factory.mktemp("two_level")
    uri = f"sqlite:///{tmp}/mlflow.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        cfg = _cfg(tmp, [{"n": 8, "steps": 1, "epochs": 2},
                         {"n": 16, "steps": 1, "epochs": 1, "lam": 0.5, "galerkin": ["units"],
                          "prefilter": True}])
        res = run_schedule(cfg, log=lambda s: None)
        yield SimpleNamespace(cfg=cfg, res=res, d=_run_dir(cfg), uri=uri,
                              client=MlflowClient(uri))


def test_every_epoch_runs_once_on_one_axis_and_compute_counts_pixels(two_level):
    res = two_level.res
    assert [s["epochs_run"] for s in res["stages"]] == [2, 1]
    assert [h["global_epoch"] for s in res["stages"] for h in s["history"]] == [0, 1, 2]
    assert res["fine_equiv_epochs"] == pytest.approx(2 * 0.25 + 1)  # 2 epochs at (8/16)^2, 1 at 16


def test_each_stage_says_where_its_seconds_went(two_level):
    """``phases``: the driver's and the worker's stamps; the epochs are the stage's own epoch
    seconds, every phase is non-negative and they add up to the driver's time around ``fit``."""
    keys = {"datasets", "worker_start", "setup", "init_validation", "epochs", "reports", "teardown",
            "other"}
    for s in two_level.res["stages"]:
        ph = s["phases"]
        assert set(ph) == keys
        assert ph["epochs"] == pytest.approx(s["seconds"], abs=1e-3)
        assert all(v >= 0 for k, v in ph.items() if k != "other")
        assert ph["teardown"] > 0 and abs(ph["other"]) < 0.5
    # one worker group for both levels (scaling.worker_group: schedule, the default): it started
    # once, before the coarse level; the fine level went on in it
    coarse, fine = (s["phases"] for s in two_level.res["stages"])
    assert coarse["worker_start"] > 0.5 and fine["worker_start"] == fine["datasets"] == 0


def test_stage_phases_arithmetic():
    from pipelines.stage import stage_phases

    stamps = {"start": 100.0, "fit_start": 103.0, "fit_end": 130.0}
    state = {"seconds": 12.0, "history": [{}, {}],
             "timeline": {"entered": 110.0, "setup_done": 111.0, "init_validated": 113.0,
                          "report_s": 1.5, "last_report": 127.0}}
    assert stage_phases(stamps, state) == {"datasets": 3.0, "worker_start": 7.0, "setup": 1.0,
                                           "init_validation": 2.0, "epochs": 12.0, "reports": 1.5,
                                           "teardown": 3.0, "other": 0.5}
    assert stage_phases({}, state) == {} and stage_phases(stamps, {"seconds": 1.0}) == {}
    # a resumed attempt: 5 s of epochs came before it (inside worker_start), not counted twice
    state = {**state, "seconds": 17.0, "timeline": {**state["timeline"], "seconds_before": 5.0}}
    assert stage_phases(stamps, state)["epochs"] == 12.0 and stage_phases(stamps, state)["other"] == 0.5


def test_the_fine_level_starts_from_the_prolonged_best_checkpoint(two_level):
    cfg, res, d = two_level.cfg, two_level.res, two_level.d
    coarse, _ = load_checkpoint(d / "L0-n8-N1.best")
    init, lineage = load_checkpoint(d / "L1-n16-N1.init")
    # `prefilter: true`: the pyramid's blur (1 px) and full weighting's smoothing (0.5 px^2)
    assert cfg.pyramid.sigma == 1.0 and cfg.pyramid.pair == "full-weighting"
    want = to_resolution(coarse, 16, lam=0.5, galerkin=["units"], prefilter=1.5**0.5)
    for k, v in want.state_dict().items():
        torch.testing.assert_close(init.state_dict()[k], v, rtol=0, atol=0)
    assert torch.equal(init.opening.weight, coarse.opening.weight)  # not in galerkin: kept
    assert init.config.input_blur == pytest.approx(1.5**0.5 / 16)  # that blur, kept
    assert lineage["transfers"] == ["to_resolution(16, prefilter=1.22474, lam=0.5, galerkin=['units'])"]
    assert lineage["from"].endswith("L0-n8-N1.best")
    fine, _ = load_checkpoint(res["checkpoint"])
    assert fine.n == 16 and fine.config.input_blur == init.config.input_blur
    assert not torch.equal(fine.units[0].K, init.units[0].K)  # and it trained from there
    # the recorded start of the fine stage is the handed-over network's own val accuracy
    assert res["stages"][1]["init"]["init_val_accuracy"] == pytest.approx(_val_accuracy(cfg, init), abs=1e-9)


def test_mlflow_holds_the_parent_the_stage_runs_their_curves_and_artifacts(two_level):
    cfg, res, client = two_level.cfg, two_level.res, two_level.client
    exp = client.get_experiment_by_name("test")
    parent = client.get_run(res["mlflow_parent_run_id"])
    assert parent.data.tags["kind"] == "multiscale" and parent.data.tags["config_hash"] == cfg.config_hash()
    assert parent.data.metrics["final_val_accuracy"] == pytest.approx(res["final_val_accuracy"])
    kids = client.search_runs([exp.experiment_id],
                              f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
                              order_by=["attributes.start_time ASC"])
    assert [r.data.tags["stage"] for r in kids] == ["L0-n8-N1", "L1-n16-N1"]
    hist = client.get_metric_history(kids[0].info.run_id, "val_accuracy")
    assert sorted(m.step for m in hist) == [0, 1]
    assert [m.step for m in client.get_metric_history(kids[1].info.run_id, "train_loss")] == [2]
    # the parent run carries every epoch's curve on the same axis; bookkeeping is not a metric
    assert [m.step for m in client.get_metric_history(parent.info.run_id, "val_accuracy")] == [0, 1, 2]
    assert not {"epoch", "n", "steps", "global_epoch"} & set(kids[0].data.metrics)
    assert kids[0].data.params["n"] == "8" and kids[0].info.run_name == f"{cfg.name}/L0-n8-N1"
    assert parent.data.params["levels.1.n"] == "16" and parent.data.tags["resolutions"] == "8 -> 16"
    assert "init_val_accuracy" in kids[1].data.metrics
    inputs = client.get_run(parent.info.run_id).inputs.dataset_inputs
    assert [d.dataset.name for d in inputs] == ["pyramid/syn"]
    assert client.get_run(kids[1].info.run_id).inputs.dataset_inputs[0].tags[0].value == \
        "train: level 0 (16x16)"
    # the final model as an MLflow model (signature from an input example), loadable as it was
    import mlflow.pytorch

    mlflow.set_tracking_uri(two_level.uri)
    logged = mlflow.pytorch.load_model(res["model_uri"])
    final, _ = load_checkpoint(res["checkpoint"])
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(logged(x), final(x), rtol=0, atol=0)
    info = mlflow.models.get_model_info(res["model_uri"])
    assert list(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == [-1, 1, 16, 16]
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.json", "final_checkpoint", "config.json"} <= arts
    assert {a.path for a in client.list_artifacts(kids[1].info.run_id, "checkpoint")} == {
        "checkpoint/model.json", "checkpoint/model.pt", "checkpoint/lineage.json"}
    assert {r.info.status for r in [parent, *kids]} == {"FINISHED"}


def test_cross_resolution_evaluation_of_the_two_stages(two_level):
    from pipelines.evaluate import evaluate_checkpoints

    cfg, res, d, client = two_level.cfg, two_level.res, two_level.d, two_level.client
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", two_level.uri)
        rows = evaluate_checkpoints(d / "L1-n16-N1.best", d / "L0-n8-N1.best",
                                    Path(cfg.pyramid_root) / "syn", experiment="test")
    got = {(r["direction"], r["method"]): r["accuracy"] for r in rows}
    moves = {(d, m + p) for d in ("coarse->fine", "fine->coarse") for m in ("galerkin", "naive")
             for p in ("", "-prefilter")}  # the fine stage carries the pyramid's blur: both ways
    moves |= {("coarse->fine", "dilate"), ("coarse->fine", "dilate-prefilter")}  # free stencils, up
    moves |= {("coarse->fine", m + "-prefilter-chosen") for m in ("galerkin", "naive", "dilate")}
    assert set(got) == {("fine", "native"), ("coarse", "native")} | moves
    assert got[("coarse", "native")] == pytest.approx(res["stages"][0]["best_val_accuracy"])
    assert got[("fine", "native")] == pytest.approx(res["stages"][1]["best_val_accuracy"])
    ev = client.search_runs([client.get_experiment_by_name("test").experiment_id], "tags.kind = 'evaluate'")
    assert len(ev) == 1 and "full-weighting/coarse_to_fine/galerkin" in ev[0].data.metrics
    assert "full-weighting/coarse_to_fine/naive-prefilter" in ev[0].data.metrics
    chosen = ev[0].data.metrics["full-weighting/coarse_to_fine/naive-prefilter-chosen/sigma"]
    assert chosen in {r["sigma"] for r in rows if r["method"] == "naive-prefilter-chosen"}


def test_a_rerun_skips_finished_levels_and_resumes_at_the_first_unfinished(two_level):
    cfg, res, d = two_level.cfg, two_level.res, two_level.d
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", two_level.uri)
        stamp = (d / "L0-n8-N1.done.json").stat().st_mtime_ns
        again = run_schedule(cfg, log=lambda s: None)  # everything finished: nothing recomputed
        assert again["final_val_accuracy"] == res["final_val_accuracy"]
        (d / "L1-n16-N1.done.json").unlink()
        logs = []
        run_schedule(cfg, log=logs.append)
    assert (d / "L0-n8-N1.done.json").stat().st_mtime_ns == stamp
    assert any("L0-n8-N1: finished before, skipped" in s for s in logs)
    assert any(s.startswith("[2/2] L1-n16-N1: 1 epoch(s)") for s in logs)
    # the same outputs against another MLflow store (the old one gone): new runs, not an error
    other = f"sqlite:///{d}/other.db"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", other)
        logs = []
        run_schedule(cfg, log=logs.append)
    assert any("this schedule gets new runs" in s for s in logs)
    c = MlflowClient(other)
    parents = c.search_runs([c.get_experiment_by_name("test").experiment_id], "tags.kind = 'multiscale'")
    assert [p.info.status for p in parents] == ["FINISHED"]


def test_depth_schedule_doubles_steps(local_ray, tmp_path, mlflow_uri):
    cfg = _cfg(tmp_path, [{"n": 8, "steps": 1, "epochs": 1}, {"n": 8, "steps": 2, "epochs": 1}],
               kind="depth", name="depth", scaling={"num_workers": 1})
    res = run_schedule(cfg, log=lambda s: None)
    d = _run_dir(cfg)
    shallow, _ = load_checkpoint(d / "L0-n8-N1.best")
    init, lineage = load_checkpoint(d / "L1-n8-N2.init")
    assert init.units[0].K.shape[0] == 2 and lineage["transfers"] == ["to_depth([2])"]
    torch.testing.assert_close(init.units[0].K, to_depth(shallow, 2).units[0].K, rtol=0, atol=0)
    assert [s["steps"] for s in res["stages"]] == [[1], [2]]


def _checkpoint_states(d: Path) -> list[dict]:
    """``train_state.json`` of every checkpoint Ray Train persisted in the run folder ``d``, in the
    order they were written (a folder still being written, without it, is left out)."""
    return [json.loads((p / "train_state.json").read_text()) for p in sorted(d.glob("checkpoint_*"))
            if (p / "train_state.json").exists()]


def test_one_worker_group_for_the_schedule_trains_the_same_networks(local_ray, tmp_path, mlflow_uri):
    """``scaling.worker_group: schedule``: both levels in one Ray Train run (one worker group, the
    handover done in the worker) train the same networks as a Ray Train run per level, to the last
    bit, with the same files and MLflow runs; a worker that dies in the fine level is restarted from
    that level's checkpoint, not from the coarse level's."""
    levels = [{"n": 8, "steps": 1, "epochs": 1, "optim": {"batch_size": 32}},
              {"n": 16, "steps": 1, "epochs": 3, "optim": {"batch_size": 32}, "lam": 0.5,
               "galerkin": ["units"], "prefilter": True}]
    per = _cfg(tmp_path, levels, name="per", scaling={"worker_group": "level"})
    one = _cfg(tmp_path, levels, name="one", scaling={"worker_group": "schedule"}, max_failures=1)
    marker = tmp_path / "failed-once"
    res = {"per": run_schedule(per, log=lambda s: None)}
    logs: list[str] = []
    # 192 training images / 32 = 6 steps per epoch: the fine level's step 14 is in its third epoch;
    # 0.1 s per batch puts its first epoch's report well before the failure (a report made just
    # before a worker dies can be lost: the restart then runs that epoch again)
    res["one"] = run_schedule(one, log=logs.append,
                              extra={"fail_once": {"rank": 0, "step": 14, "marker": str(marker)},
                                     "batch_sleep": 0.1})
    assert marker.read_text() == "failed at step 14\n"
    assert any("from the level before (moved in the worker group)" in s for s in logs)
    for key in ("val_accuracy", "train_loss", "global_epoch", "epoch", "fine_equiv_epochs"):
        assert ([[h[key] for h in s["history"]] for s in res["one"]["stages"]]
                == [[h[key] for h in s["history"]] for s in res["per"]["stages"]]), key
    assert [s["init"] for s in res["one"]["stages"]] == [s["init"] for s in res["per"]["stages"]]
    for name in ("L0-n8-N1.best", "L1-n16-N1.init", "L1-n16-N1.best"):
        (a, la), (b, lb) = load_checkpoint(_run_dir(per) / name), load_checkpoint(_run_dir(one) / name)
        for k, v in a.state_dict().items():
            assert torch.equal(b.state_dict()[k], v), (name, k)
        assert la["transfers"] == lb["transfers"] and (la["from"] is None) == ("L0" in name)
        if "L1" in name:
            assert la["from"].endswith("L0-n8-N1.best") and lb["from"].endswith("L0-n8-N1.best")
    assert lb["transfers"] == ["to_resolution(16, prefilter=1.22474, lam=0.5, galerkin=['units'])"]
    # one Ray Train run for both levels; the fine level started no worker group of its own
    trainer_dirs = sorted(p.name for p in _run_dir(one).iterdir() if p.is_dir() and p.name.startswith("one-"))
    assert trainer_dirs == [f"one-{one.config_hash()}-L0-n8-N1..L1-n16-N1"]
    coarse, fine = (s["phases"] for s in res["one"]["stages"])
    assert coarse["worker_start"] > 0.5 and fine["worker_start"] == fine["datasets"] == 0
    # after the restart the phases are the last attempt's: its epochs, not the ones before it
    assert 0 < fine["epochs"] < res["one"]["stages"][1]["seconds"]
    # the restart went on from the fine level's checkpoint: neither the coarse level's epoch nor the
    # fine level's first was written again (a restart of the level or of the group writes them
    # again), and Adam counted the fine level's 3 epochs of 6 steps
    d = _run_dir(one) / trainer_dirs[0]
    written = [(st["group_index"], st["epoch"]) for st in _checkpoint_states(d)]
    assert written.count((0, 0)) == 1 and written.count((1, 0)) == 1, written
    last = sorted(p for p in d.glob("checkpoint_*") if p.is_dir())[-1]
    adam = torch.load(last / "step.pt", weights_only=True)["optimizer"]["state"]
    assert {int(v["step"]) for v in adam.values()} == {18}
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("test").experiment_id
    for stage, steps in (("L0-n8-N1", [0]), ("L1-n16-N1", [1, 2, 3])):
        run = client.search_runs([exp], f"tags.stage = '{stage}' and tags.schedule = 'one'")[0]
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")) == steps
        assert run.info.status == "FINISHED" and "transfers" in run.data.params


def _watchers() -> int:
    """Ray Train preemption watcher actors created in this Ray session so far (alive or dead)."""
    import ray

    return sum(1 for a in ray._private.state.actors().values()
               if a["ActorClassName"].endswith("PreemptionWatcher"))


def test_train_extras_are_off_on_one_node_and_on_when_asked(local_ray, tmp_path, mlflow_uri):
    """``scaling.train_extras``: on this one-node Ray, ``auto`` starts no preemption watcher
    actor for the stage; ``on`` starts one (Ray Train's default). The variables are set only
    around ``fit``."""
    import os

    for extras, more in (("auto", 0), ("on", 1)):
        before = _watchers()
        cfg = _cfg(tmp_path, [{"n": 8, "steps": 1, "epochs": 1}], kind="single", name=f"x-{extras}",
                   scaling={"num_workers": 1, "train_extras": extras})
        res = run_schedule(cfg, log=lambda s: None)
        assert res["stages"][0]["epochs_run"] == 1
        assert _watchers() - before == more, extras
        assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ


def test_worker_failure_mid_stage_is_recovered_without_losing_epochs(local_ray, tmp_path, mlflow_uri):
    """Two DDP workers; rank 1 exits hard once in the third epoch. FailureConfig restarts the
    group from the last checkpoint and the stage reports every epoch exactly once."""
    cfg = _cfg(tmp_path, [{"n": 16, "steps": 1, "epochs": 4, "optim": {"batch_size": 32}}],
               kind="single", name="fail", scaling={"num_workers": 2}, max_failures=1)
    marker = tmp_path / "failed-once"
    # 192 training images / (32 x 2 workers) = 3 steps per epoch: step 8 is in epoch 2
    res = run_schedule(cfg, log=lambda s: None,
                       extra={"fail_once": {"rank": 1, "step": 8, "marker": str(marker)}})
    assert marker.read_text() == "failed at step 8\n"
    stage = res["stages"][0]
    assert [h["epoch"] for h in stage["history"]] == [0, 1, 2, 3]
    assert stage["epochs_run"] == 4
    # resumed, not retrained: epoch 0 ran once (one MLflow point), every epoch is there, and the
    # optimiser went on from its checkpointed state: 4 epochs x 3 steps in all, counted by Adam
    # itself (a restart from scratch, or without the optimiser's state, counts fewer). Epoch 1 may
    # run twice: Ray Train V2 can lose a checkpoint reported just before a worker dies, and the
    # MLflow point of that epoch, logged by rank 0 before the report, is then logged again.
    _assert_resumed(cfg, mlflow_uri, epochs=4, steps_per_epoch=3)


def _assert_resumed(cfg, uri: str, epochs: int, steps_per_epoch: int) -> None:
    """The stage of ``cfg`` went on from its checkpoint after a failure, it did not start over:
    the checkpoint folders Ray Train persisted hold every epoch, the first epoch once (a restart
    from scratch writes it again; epochs written after the last checkpoint Train had registered
    when the worker died are run, and written, again: CI once saw two), the optimiser's own step
    count is that of ``epochs`` epochs (a resume without its state counts fewer), and MLflow holds
    every epoch once on the global axis, in the level's run and in the parent's."""
    d = _run_dir(cfg) / f"{cfg.name}-{cfg.config_hash()}-L0-n16-N1"
    ckpts = sorted(p for p in d.glob("checkpoint_*") if p.is_dir())
    written = [st["epoch"] for st in _checkpoint_states(d)]
    assert written.count(0) == 1 and set(written) == set(range(epochs)), written
    assert written[-1] == epochs - 1 and len(ckpts) - len(written) <= 1, [p.name for p in ckpts]
    adam = torch.load(ckpts[-1] / "step.pt", weights_only=True)["optimizer"]["state"]
    assert {int(v["step"]) for v in adam.values()} == {epochs * steps_per_epoch}
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("test").experiment_id
    stage_run = client.search_runs([exp], "tags.stage = 'L0-n16-N1'")[0]
    parent = client.get_run(stage_run.data.tags["mlflow.parentRunId"])
    for run in (stage_run, parent):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert sorted(steps) == list(range(epochs)), steps
    assert parent.info.status == stage_run.info.status == "FINISHED"


def _epochs_logged(uri: str, stage: str) -> int:
    """Epochs of ``stage`` in MLflow: the driver-side callback logs an epoch once Ray Train has
    registered its checkpoint (a checkpoint folder appears earlier, while it is being written)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("test")
    runs = client.search_runs([exp.experiment_id], f"tags.stage = '{stage}'") if exp else []
    return len(client.get_metric_history(runs[0].info.run_id, "val_accuracy")) if runs else 0


def _train_worker_pids() -> list[int]:
    """PIDs of live Ray Train worker processes (Ray names them ``ray::RayTrainWorker...``)."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and (d / "cmdline").read_bytes().startswith(b"ray::RayTrainWorker"):
                out.append(int(d.name))
        except OSError:
            pass
    return sorted(out)


def test_a_worker_killed_by_sigkill_mid_level_resumes_from_its_checkpoint(local_ray, tmp_path,
                                                                            mlflow_uri):
    """A real signal from outside: SIGKILL to one of the two Train worker processes once two
    epochs are checkpointed; the stage goes on from the checkpoint and ends with every epoch once."""
    import os
    import signal
    import threading
    import time

    cfg = _cfg(tmp_path, [{"n": 16, "steps": 1, "epochs": 6, "optim": {"batch_size": 32}}],
               kind="single", name="sigkill", max_failures=1,
               scaling={"num_workers": 2, "reader": "ray_data"})  # the Ray Data path: split shards
    d = _run_dir(cfg) / f"{cfg.name}-{cfg.config_hash()}-L0-n16-N1"
    killed: dict = {}

    def killer():
        end = time.time() + 400
        while time.time() < end and not killed:
            pids = _train_worker_pids()
            if _epochs_logged(mlflow_uri, "L0-n16-N1") >= 2 and len(pids) == 2:
                os.kill(pids[-1], signal.SIGKILL)
                killed.update(pid=pids[-1], checkpoints=len(list(d.glob("checkpoint_*"))))
            time.sleep(0.05)

    t = threading.Thread(target=killer, daemon=True)
    t.start()
    res = run_schedule(cfg, log=lambda s: None, extra={"batch_sleep": 0.15})
    t.join(5)
    assert killed and 2 <= killed["checkpoints"] < 6, killed
    assert [h["epoch"] for h in res["stages"][0]["history"]] == list(range(6))
    _assert_resumed(cfg, mlflow_uri, epochs=6, steps_per_epoch=3)


def _kill_driver_and_rerun(cfg, tmp_path, uri: str, stage: str, trainer: str, index: int = 0) -> dict:
    """Runs ``cfg``'s driver as a process of its own joined to this Ray, SIGKILLs it once two
    epochs of ``stage`` are logged (its Train controller and workers die with it; the Ray Train run
    folder ``trainer`` then holds 2 to 5 checkpoints of that stage, the ``index``-th level of the
    run), runs it again to the end, and returns its ``results.json``."""
    import signal
    import subprocess
    import sys
    import time

    import ray
    import yaml

    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    driver = ("import sys, yaml\n"
              "from pipelines.config import ScheduleConfig\n"
              "from pipelines.runtime import init_ray\n"
              "from pipelines.schedule import run_schedule\n"
              "init_ray(sys.argv[2])\n"
              "cfg = ScheduleConfig.model_validate(yaml.safe_load(open(sys.argv[1])))\n"
              "run_schedule(cfg, extra={'batch_sleep': float(sys.argv[3])})\n")
    gcs = ray.get_runtime_context().gcs_address
    d = _run_dir(cfg) / trainer
    args = [sys.executable, "-c", driver, str(tmp_path / "cfg.yaml"), gcs]
    first = subprocess.Popen([*args, "0.3"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    end = time.time() + 300
    while time.time() < end and _epochs_logged(uri, stage) < 2 and first.poll() is None:
        time.sleep(0.05)
    seen = _checkpoint_states(d)
    first.send_signal(signal.SIGKILL)
    first.wait(30)
    mine = sum(st.get("group_index", 0) == index for st in seen)  # the stage's checkpoints
    assert 2 <= mine < 6, (mine, first.stderr.read()[-3000:])
    assert not (_run_dir(cfg) / "results.json").exists()
    time.sleep(3)  # the dead driver's Train controller and workers go with its job
    again = subprocess.run([*args, "0"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    return json.loads((_run_dir(cfg) / "results.json").read_text())


def test_a_driver_killed_by_sigkill_mid_level_resumes_when_rerun(local_ray, tmp_path, mlflow_uri):
    """The schedule's driver is SIGKILLed once two epochs are checkpointed; running it again
    resumes the level from the checkpoint, and MLflow ends with every epoch once in the same runs."""
    cfg = _cfg(tmp_path, [{"n": 16, "steps": 1, "epochs": 6, "optim": {"batch_size": 32}}],
               kind="single", name="drvkill", scaling={"num_workers": 1})
    res = _kill_driver_and_rerun(cfg, tmp_path, mlflow_uri, "L0-n16-N1",
                                 f"{cfg.name}-{cfg.config_hash()}-L0-n16-N1")
    assert [h["epoch"] for h in res["stages"][0]["history"]] == list(range(6))
    _assert_resumed(cfg, mlflow_uri, epochs=6, steps_per_epoch=6)  # 192 images / 32, one worker


def test_a_driver_killed_in_the_fine_level_of_one_worker_group_resumes_there(local_ray, tmp_path,
                                                                                mlflow_uri):
    """One worker group for both levels: the driver is SIGKILLed in the fine level's third epoch;
    running it again resumes the fine level from its checkpoint (the coarse level is not trained
    again: its one epoch was checkpointed once), and each level's MLflow run holds its epochs once."""
    cfg = _cfg(tmp_path, [{"n": 8, "steps": 1, "epochs": 1, "optim": {"batch_size": 32}},
                          {"n": 16, "steps": 1, "epochs": 5, "optim": {"batch_size": 32}, "prefilter": True}],
               name="grpkill", scaling={"num_workers": 1})
    trainer = f"{cfg.name}-{cfg.config_hash()}-L0-n8-N1..L1-n16-N1"
    res = _kill_driver_and_rerun(cfg, tmp_path, mlflow_uri, "L1-n16-N1", trainer, index=1)
    assert [[h["global_epoch"] for h in s["history"]] for s in res["stages"]] == [[0], [1, 2, 3, 4, 5]]
    states = _checkpoint_states(_run_dir(cfg) / trainer)
    assert [st.get("group_index", 0) for st in states].count(0) == 1  # the coarse epoch, once
    fine = [st["epoch"] for st in states if st.get("group_index") == 1]
    assert fine.count(0) == 1 and set(fine) == set(range(5)), fine  # resumed, not started over
    client = MlflowClient(mlflow_uri)
    exp = client.get_experiment_by_name("test").experiment_id
    for stage, steps in (("L0-n8-N1", [0]), ("L1-n16-N1", [1, 2, 3, 4, 5])):
        run = client.search_runs([exp], f"tags.stage = '{stage}'")[0]
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss")) == steps
        assert run.info.status == "FINISHED"


def test_bad_schedule_configs_name_the_field(tmp_path):
    with pytest.raises(ValueError, match=r"levels\.0[\s\S]*n=14 must be divisible by 2\*\*2"):
        _cfg(tmp_path, [{"n": 14, "epochs": 1}], model={"channels": [4, 4, 4], "classes": 4})
    p = tmp_path / "s.yaml"
    p.write_text("name: s\nkind: multiscale\npyramid: nowhere.yaml\nlevels: [{n: 8, epochz: 1}]\n")
    with pytest.raises(ConfigError, match=r"s\.yaml: invalid ScheduleConfig:[\s\S]*pyramid: "
                                          r"[\s\S]*nowhere\.yaml[\s\S]*levels\.0\.epochz"):
        load_config(p, ScheduleConfig)


def test_level_missing_from_pyramid_is_a_clear_error_before_ray(tmp_path):
    """Found when the schedule validates (no Ray, no pyramid build): the pyramid has 16 and 8."""
    msg = r"levels\.0\.n: n=4 is not a level of pyramid syn \(has n in \[16, 8\]\)"
    with pytest.raises(ValueError, match=msg):
        _cfg(tmp_path, [{"n": 4, "steps": 1, "epochs": 1}])


def test_resnet34_schedule_hands_over_galerkin_prolonged_convolutions(local_ray, tmp_path, mlflow_uri):
    """``model.arch: resnet34`` (the paper's Sec. 4.3 network) through the same Ray Train stages:
    coarse, then fine from ``resnet_to_resolution`` of the coarse stage's best checkpoint."""
    cfg = _cfg(tmp_path, [{"n": 8, "epochs": 1, "optim": {"name": "adamw", "lr": 1e-3, "batch_size": 64}},
                          {"n": 16, "epochs": 1, "optim": {"name": "adamw", "lr": 1e-3, "batch_size": 64}}],
               name="resnet", model={"arch": "resnet34", "in_channels": 1, "classes": 4},
               scaling={"num_workers": 1})
    res = run_schedule(cfg, log=lambda s: None)
    d = _run_dir(cfg)
    coarse, _ = load_checkpoint(d / "L0-n8-N2.best")
    init, lineage = load_checkpoint(d / "L1-n16-N2.init")
    assert isinstance(coarse.config, ResNetConfig) and coarse.config.n == 8
    assert init.config == ResNetConfig(classes=4, in_channels=1, n=16)
    assert lineage["transfers"] == ["resnet_to_resolution(16)"]
    # every 3x3 convolution is the Galerkin prolongation of the coarse one; the rest is copied
    want = resnet_to_resolution(coarse, 1).state_dict()
    for k, v in init.state_dict().items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0)
    torch.testing.assert_close(init.conv1.weight, prolong_stencil(coarse.conv1.weight), rtol=1e-5, atol=1e-6)
    assert torch.equal(init.fc.weight, coarse.fc.weight)
    fine, _ = load_checkpoint(res["checkpoint"])
    assert fine.config.n == 16 and not torch.equal(fine.conv1.weight, init.conv1.weight)
    assert [s["steps"] for s in res["stages"]] == [None, None]
    assert res["fine_equiv_epochs"] == pytest.approx(0.25 + 1)  # cost ~ pixels
    # the recorded start of the fine stage is the handed-over network's own val accuracy
    assert res["stages"][1]["init"]["init_val_accuracy"] == pytest.approx(_val_accuracy(cfg, init), abs=1e-9)


def test_bcd_optimizer_in_a_two_worker_ddp_stage(local_ray, tmp_path, mlflow_uri):
    """The paper's optimiser inside a Ray Train stage with two workers (reductions across them)."""
    cfg = _cfg(tmp_path, [{"n": 8, "steps": 2, "epochs": 2,
                           "optim": {"name": "bcd", "batch_size": 48, "newton_steps": 2,
                                     "cg_iters": 3}}],
               kind="single", name="bcd", scaling={"num_workers": 2})
    res = run_schedule(cfg, log=lambda s: None)
    hist = res["stages"][0]["history"]
    assert len(hist) == 2 and all(h["train_loss"] == h["train_loss"] for h in hist)  # not NaN
    assert hist[1]["train_loss"] < hist[0]["train_loss"]
    assert len(set(res["stages"][0]["nodes"])) == 1 and len(res["stages"][0]["nodes"]) == 2


def test_a_second_run_of_the_same_schedule_is_refused(local_ray, tmp_path, mlflow_uri):
    cfg = _cfg(tmp_path, [{"n": 8, "steps": 1, "epochs": 1}], name="lock")
    with exclusive(_run_dir(cfg).resolve() / ".lock", "a first run"):
        with pytest.raises(RuntimeError, match=r"schedule lock \(.*\) is already running \(pid \d+ on "):
            run_schedule(cfg, log=lambda s: None)
    assert not MlflowClient(mlflow_uri).search_experiments(filter_string="name = 'test'")  # nothing logged


def test_a_failed_stage_ends_its_runs_failed(local_ray, tmp_path, mlflow_uri):
    """Ray Train V2 raises on failure: the parent and stage runs end FAILED, not RUNNING."""
    cfg = _cfg(tmp_path, [{"n": 8, "steps": 1, "epochs": 2}], name="fails", max_failures=0,
               kind="single")
    with pytest.raises(Exception, match=r"(?i)fail|died|exit"):
        run_schedule(cfg, log=lambda s: None,
                     extra={"fail_once": {"rank": 0, "step": 1, "marker": str(tmp_path / "marker")}})
    client = MlflowClient(mlflow_uri)
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FAILED"}
    # and a report leaves a failed schedule out unless asked
    from pipelines.report import collect_runs

    assert collect_runs("test") == [] and len(collect_runs("test", unfinished=True)) == 1


def test_a_level_with_multilevel_gradient_estimation(local_ray, tmp_path, mlflow_uri):
    """``estimator: {name: mge}`` runs as any level does, and its compute counts pixels: batches
    of 24 images at 4x4 and 8 at 8x8 + 4x4 instead of 32 at 8x8."""
    lv = {"n": 8, "steps": 1, "epochs": 2, "optim": {"batch_size": 32},
          "estimator": {"name": "mge", "levels": 2, "batch_sizes": [24, 8]}}
    cfg = _cfg(tmp_path, [lv], kind="single", name="mge", model={"channels": 4, "classes": 4,
                                                                  "stencil": "gaussian"})
    res = run_schedule(cfg, log=lambda s: None)
    hist = res["stages"][0]["history"]
    assert len(hist) == 2 and hist[1]["train_loss"] < hist[0]["train_loss"]
    share = (24 * 16 + 8 * (64 + 16)) / (32 * 64)
    assert res["fine_equiv_epochs"] == pytest.approx(2 * share)
    with pytest.raises(ValueError, match=r"estimator\.batch_sizes: \[24, 4\] needs 2 entries adding up to"):
        _cfg(tmp_path, [lv | {"estimator": {"name": "mge", "batch_sizes": [24, 4]}}])
