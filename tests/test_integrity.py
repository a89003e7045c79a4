"""Nothing silent: labels from folders and IDX files, subsets, damaged pyramids, locks, run status.
Each case of issue 17 that can run here, with the error it must give."""

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from mscnn.data import list_image_folder, stratified_limit
from pipelines.pyramid import (
    PyramidConfig,
    SourceConfig,
    _load_source,
    build_pyramid,
    level_tensors,
    load_level,
)
from pipelines.runtime import exclusive

ROOT = Path(__file__).resolve().parent.parent


def _folder(root, counts: dict[str, int], split="train"):
    for c, k in counts.items():
        (root / split / c).mkdir(parents=True, exist_ok=True)
        for i in range(k):
            Image.new("RGB", (8, 8), (10 * i, 0, 0)).save(root / split / c / f"{i}.png")


def test_hidden_folders_and_files_are_not_classes(tmp_path):
    _folder(tmp_path, {"cat": 2, "dog": 1})
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "train" / "cat" / ".hidden.png").write_bytes(b"not an image")
    classes, items = list_image_folder(tmp_path / "train")
    assert classes == ["cat", "dog"] and [lab for _, lab in items] == [0, 0, 1]


def test_limit_is_stratified_per_class(tmp_path):
    # 12 of classes with 23, 9 and 5 items: 4 of each, each class's first ones (not 12 of class 0)
    assert stratified_limit(np.array([0] * 23 + [1] * 9 + [2] * 5), 12).tolist() == \
        [0, 1, 2, 3, 23, 24, 25, 26, 32, 33, 34, 35]
    _folder(tmp_path, {"a": 23, "b": 9, "c": 3})
    cfg = PyramidConfig(name="f", levels=1, source=SourceConfig(kind="folder", path=str(tmp_path), size=8,
                                                                 limit=9))
    _, _, splits = _load_source(cfg)
    x, y = splits["train"], splits["val"]
    counts = np.bincount(np.concatenate([x[1], y[1]]), minlength=3).tolist()
    assert counts == [3, 3, 3]


def test_a_test_folder_is_kept_when_there_is_no_val(tmp_path):
    _folder(tmp_path, {"a": 5, "b": 5})
    _folder(tmp_path, {"a": 2, "b": 2}, split="test")
    cfg = PyramidConfig(name="f", levels=1, source=SourceConfig(kind="folder", path=str(tmp_path), size=8))
    _, _, splits = _load_source(cfg)
    assert sorted(splits) == ["test", "train", "val"] and splits["test"][1].tolist() == [0, 0, 1, 1]


def test_idx_labels_outside_the_classes_name_the_file(tmp_path):
    d = tmp_path / "mnist"
    d.mkdir()
    head = bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 28, 0, 0, 0, 28])
    for f in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        (d / f).write_bytes(gzip.compress(head + b"\0" * (2 * 28 * 28)))
    (d / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 2, 3, 11])))
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 2, 1, 2])))
    cfg = PyramidConfig(name="m", levels=1, n_val=1, source=SourceConfig(kind="mnist", path=str(d)))
    with pytest.raises(ValueError, match=r"train-labels-idx1-ubyte\.gz: labels must be in 0\.\.9 .*\[11\]"):
        _load_source(cfg)


def test_a_second_holder_of_a_lock_is_refused_with_the_holder_named(tmp_path):
    with exclusive(tmp_path / ".lock", "schedule x"):
        with pytest.raises(RuntimeError, match=rf"schedule x is already running \(pid {os.getpid()} on "):
            with exclusive(tmp_path / ".lock", "schedule x"):
                pass
    with exclusive(tmp_path / ".lock", "schedule x"):  # released: free again
        pass


@pytest.mark.ray
@pytest.mark.slow
def test_a_damaged_pyramid_is_an_error_naming_the_shard(local_ray, tmp_path):
    cfg = PyramidConfig(name="syn", levels=2, shard_rows=20,
                        source=SourceConfig(kind="synthetic", size=16, count=100))
    path, _ = build_pyramid(cfg, tmp_path)
    assert level_tensors(path, 1, "val").x.shape == (20, 1, 8, 8)
    shard = sorted((path / "level=1" / "split=train").glob("*.parquet"))[-1]
    data = shard.read_bytes()
    # changed in place, same size: the cheap check passes, --verify's checksums do not
    shard.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    assert build_pyramid(cfg, tmp_path) == (path, False)
    with pytest.raises(ValueError, match=rf"shard {shard} does not match its SHA-256"):
        build_pyramid(cfg, tmp_path, verify=True)
    shard.write_bytes(data)
    assert build_pyramid(cfg, tmp_path, verify=True) == (path, False)
    shard.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match=rf"shard {shard} has \d+ bytes, the manifest says {len(data)}"):
        load_level(path, 1, "train")
    with pytest.raises(ValueError, match=r"is damaged"):  # not "up to date"
        build_pyramid(cfg, tmp_path)
    shard.unlink()  # deleted
    with pytest.raises(ValueError, match=rf"shard {shard} is missing"):
        level_tensors(path, 1, "train")
    # a stale temporary folder of a killed build is removed by the next build
    (tmp_path / ".other.tmp-abc").mkdir()
    build_pyramid(cfg.model_copy(update={"name": "other"}), tmp_path)
    assert not (tmp_path / ".other.tmp-abc").exists()


def test_pyramid_and_schedule_identity_come_from_content_not_the_path_spelling(tmp_path):
    _folder(tmp_path / "data", {"a": 3, "b": 3})
    (tmp_path / "link").symlink_to(tmp_path / "data")
    hashes = set()
    for spelling in (tmp_path / "data", f"{tmp_path / 'data'}/", tmp_path / "link",
                     tmp_path / "data" / ".." / "data"):
        cfg = PyramidConfig(name="f", levels=1, source=SourceConfig(kind="folder", path=str(spelling),
                                                                     size=8))
        hashes.add(cfg.config_hash(_load_source(cfg)[1]))
    assert len(hashes) == 1
    # other content under the same settings: another hash
    Image.new("RGB", (8, 8), (255, 255, 255)).save(tmp_path / "data" / "train" / "a" / "0.png")
    assert cfg.config_hash(_load_source(cfg)[1]) not in hashes
    # a manifest written when the path was hashed is still recognised by its content
    checksums = _load_source(cfg)[1]
    legacy = {"config_hash": "0123456789abcdef", "config": cfg.model_dump(), "checksums": checksums}
    moved = cfg.model_copy(update={"source": cfg.source.model_copy(update={"path": "/elsewhere"})})
    assert moved.same_content(legacy, checksums)
    assert not moved.same_content(legacy | {"checksums": {"x": "y"}}, checksums)
    assert not moved.model_copy(update={"sigma": 2.0}).same_content(legacy, checksums)
    # a schedule's identity (its run folder) does not depend on where its data was found
    from pipelines.config import ScheduleConfig

    base = {"name": "s", "kind": "single", "levels": [{"n": 8}], "model": {"channels": 2, "classes": 2},
            "pyramid": {"name": "f", "levels": 1, "source": {"kind": "folder", "size": 8}}}
    h = {ScheduleConfig.model_validate(base | {"pyramid": base["pyramid"] | {
        "source": {"kind": "folder", "size": 8, "path": p}}}).config_hash() for p in (None, "/a", "/b/")}
    assert len(h) == 1


@pytest.mark.slow
def test_processes_opening_a_fresh_mlflow_store_at_once_all_succeed(tmp_path):
    """Without the lock beside the SQLite file, 11 of 12 such starts (3 trials of 4 processes)
    failed here in alembic's migrations ("table datasets already exists", "expected to match one
    row")."""
    import subprocess
    import sys
    import time

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    code = ("import sys, time\n"
            "from pipelines.tracking import Tracker\n"
            "while time.time() < float(sys.argv[2]): time.sleep(0.005)\n"
            "t = Tracker('race', sys.argv[1]); r = t.start_run('r'); t.end_run(r)\n")
    go = str(time.time() + 8)  # past the imports of all of them: they open the store together
    procs = [subprocess.Popen([sys.executable, "-c", code, uri, go], stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(e[-1500:] for e in errs)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("race")
    assert len(client.search_runs([exp.experiment_id])) == 3


def _idx(path, arr: np.ndarray) -> None:
    arr = np.asarray(arr, np.uint8)
    head = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
    path.write_bytes(gzip.compress(head + arr.tobytes()))


def test_any_idx_data_set_without_code(tmp_path):
    """``source.kind: idx``: another data set's IDX files by name, its class names recorded."""
    rng = np.random.default_rng(0)
    _idx(tmp_path / "tr-img.gz", rng.integers(0, 255, (40, 8, 8)))
    _idx(tmp_path / "tr-lab.gz", np.arange(40) % 3)
    _idx(tmp_path / "te-img.gz", rng.integers(0, 255, (6, 8, 8)))
    _idx(tmp_path / "te-lab.gz", np.arange(6) % 3)
    cfg = PyramidConfig.model_validate({
        "name": "shapes", "levels": 2, "n_val": 10,
        "source": {"kind": "idx", "path": str(tmp_path), "class_names": ["a", "b", "c"],
                   "idx": {"train": ["tr-img.gz", "tr-lab.gz"], "test": ["te-img.gz", "te-lab.gz"]}}})
    info, checksums, splits = _load_source(cfg)
    assert info["classes"] == ["a", "b", "c"] and info["kind"] == "idx"
    assert {k: v[0].shape for k, v in splits.items()} == {
        "train": (30, 1, 8, 8), "val": (10, 1, 8, 8), "test": (6, 1, 8, 8)}
    assert sorted(checksums) == ["te-img.gz", "te-lab.gz", "tr-img.gz", "tr-lab.gz"]
    # without class names: 0..max label; a label beyond the names is an error naming the file
    no_names = cfg.model_copy(update={"source": cfg.source.model_copy(update={"class_names": None})})
    assert _load_source(no_names)[0]["classes"] == ["0", "1", "2"]
    two = cfg.model_copy(update={"source": cfg.source.model_copy(update={"class_names": ["a", "b"]})})
    with pytest.raises(ValueError, match=r"tr-lab\.gz: labels must be in 0\.\.1 \(2 classes\); found \[2\]"):
        _load_source(two)
    # pad: zero pixels on every side, the images themselves in the middle
    padded = cfg.model_copy(update={"source": cfg.source.model_copy(update={"pad": 2})})
    tr, tr_p = splits["train"][0], _load_source(padded)[2]["train"][0]
    assert tr_p.shape == (30, 1, 12, 12) and np.array_equal(tr_p[..., 2:10, 2:10], tr)
    assert tr_p.sum() == tr.sum() and padded.identity()["source"]["pad"] == 2
    assert "pad" not in cfg.identity()["source"]  # unset: the old pyramids keep their hashes
    with pytest.raises(ValueError, match=r"pad are for kinds 'idx' and 'mnist', not 'synthetic'"):
        SourceConfig(kind="synthetic", pad=2)
    with pytest.raises(FileNotFoundError, match=r"source\.idx: .*te-img\.gz not found"):
        (tmp_path / "te-img.gz").unlink()
        _load_source(cfg)
    with pytest.raises(ValueError, match=r"kind 'idx' needs path"):
        SourceConfig(kind="idx", path=str(tmp_path))


def test_a_source_field_added_later_keeps_old_hashes_when_unset():
    """``idx``/``class_names`` (added after pyramids and schedules were hashed) enter the hashes
    only when set: a pyramid or schedule that does not use them keeps its identity."""
    cfg = PyramidConfig(name="m", source=SourceConfig(kind="synthetic"))
    assert "idx" not in cfg.identity()["source"] and "class_names" not in cfg.identity()["source"]


def test_a_dead_ray_head_is_a_clear_error_within_seconds(tmp_path, monkeypatch):
    """``ray.init`` retries a dead head for minutes (over 200 s measured here); ``init_ray``
    checks the address first. A stale record of a dead ``ray start`` cluster means a local Ray."""
    import socket
    import time

    from pipelines.runtime import resolve_address

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
    t0 = time.perf_counter()
    with pytest.raises(RuntimeError, match=rf"no Ray head answers at {dead} \(tried for 2 s\)"):
        resolve_address(dead, timeout=2)
    assert time.perf_counter() - t0 < 10
    record = tmp_path / "ray_current_cluster"
    record.write_text(dead)
    monkeypatch.setattr("ray._private.utils.get_ray_address_file", lambda temp_dir: str(record))
    assert resolve_address(None, timeout=2) == "local"
    with pytest.raises(RuntimeError, match=r"address auto: no running Ray cluster .* does not answer"):
        resolve_address("auto", timeout=2)
    with socket.socket() as live:  # a head that answers is joined
        live.bind(("127.0.0.1", 0))
        live.listen()
        record.write_text(f"127.0.0.1:{live.getsockname()[1]}")
        assert resolve_address(None, timeout=2) == record.read_text()


@pytest.mark.ray
def test_use_gpu_true_asks_the_autoscaler_and_fails_clearly_when_no_gpu_comes(local_ray):
    """On a cluster whose GPU nodes are not up (here: none at all), ``use_gpu: true`` requests
    them and waits ``gpu_wait_s``, then names what it asked for; ``auto`` trains on the CPUs."""
    import time

    from pipelines.stage import resolve_gpu

    scaling = {"use_gpu": True, "num_workers": 2, "gpus_per_worker": 0.5, "cpus_per_worker": 1,
               "gpu_wait_s": 2}
    t0 = time.monotonic()
    want = (r"use_gpu: true needs 1 GPU\(s\) \(2 worker\(s\) x 0\.5\); the cluster has 0 and no "
            r"GPU node came up within scaling\.gpu_wait_s = 2 s")
    with pytest.raises(ValueError, match=want):
        resolve_gpu(scaling, poll_s=0.5)
    assert 2 <= time.monotonic() - t0 < 10
    assert resolve_gpu(scaling | {"use_gpu": "auto"}) is False
    assert resolve_gpu(scaling | {"use_gpu": False}) is False


@pytest.mark.ray
def test_use_gpu_auto_asks_for_the_gpus_the_autoscalers_node_types_offer(local_ray):
    """A GPU node group at min_workers 0 has no GPU yet: ``auto`` read only the GPUs present and
    trained on the head's CPUs. Now it reads the node types the autoscaler reports to the GCS (the
    real report's key and protobuf, written here as an autoscaler would), requests the GPUs and
    waits for them; with no GPU group offered it stays on the CPUs at once."""
    import time

    import ray._raylet as raylet
    from ray.core.generated import autoscaler_pb2
    from ray.experimental.internal_kv import _internal_kv_del, _internal_kv_put

    from pipelines.stage import resolve_gpu, scalable_gpus

    ns, key = raylet.GCS_AUTOSCALER_STATE_NAMESPACE, raylet.GCS_AUTOSCALER_CLUSTER_CONFIG_KEY
    config = autoscaler_pb2.ClusterConfig(node_group_configs=[
        autoscaler_pb2.NodeGroupConfig(name="head", resources={"CPU": 4}, max_count=1),
        autoscaler_pb2.NodeGroupConfig(name="gpu", resources={"CPU": 8, "GPU": 1}, min_count=0,
                                       max_count=4)])
    scaling = {"use_gpu": "auto", "num_workers": 2, "gpus_per_worker": 1, "cpus_per_worker": 1,
               "gpu_wait_s": 2}
    assert scalable_gpus() == 0
    _internal_kv_put(key, config.SerializeToString(), overwrite=True, namespace=ns)
    try:
        assert scalable_gpus() == 4
        logs = []
        t0 = time.monotonic()
        with pytest.raises(ValueError, match=r"use_gpu: auto needs 2 GPU\(s\) \(2 worker\(s\) x 1\); "
                                             r"the cluster has 0 and no GPU node came up within"):
            resolve_gpu(scaling, poll_s=0.5, log=logs.append)
        assert 2 <= time.monotonic() - t0 < 10
        assert logs == ["use_gpu: auto: no GPU yet, the autoscaler's node types offer 4; requesting 2 "
                        "and waiting up to 2 s"]
        assert resolve_gpu(scaling | {"num_workers": 5}, log=logs.append) is False  # 5 > 4 offered
    finally:
        _internal_kv_del(key, namespace=ns)
    assert scalable_gpus() == 0


@pytest.mark.ray
def test_use_gpu_auto_reads_the_launchers_node_types_on_the_head(local_ray, tmp_path, monkeypatch):
    """Ray 2.60's autoscalers do not report node types to the GCS; ``ray up`` writes them to the
    head (``~/ray_bootstrap_config.yaml``, resources filled in per instance type). Here: this
    project's ``cluster/aws-gpu.yaml`` as the launcher writes it (g5.xlarge: 4 CPUs, 1 GPU), read
    through ``MSCNN_AUTOSCALER_CONFIG``: its gpu group (0 to 4 nodes) offers 4 GPUs."""
    from pipelines.stage import resolve_gpu, scalable_gpus

    config = yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text())
    config["available_node_types"]["gpu"]["resources"] = {"CPU": 4, "GPU": 1}
    (tmp_path / "bootstrap.yaml").write_text(json.dumps(config))  # the launcher writes JSON
    monkeypatch.setenv("MSCNN_AUTOSCALER_CONFIG", str(tmp_path / "bootstrap.yaml"))
    assert scalable_gpus() == 4
    logs = []
    with pytest.raises(ValueError, match=r"use_gpu: auto needs 1 GPU\(s\)"):
        resolve_gpu({"use_gpu": "auto", "num_workers": 1, "gpus_per_worker": 1, "cpus_per_worker": 1,
                     "gpu_wait_s": 1}, poll_s=0.5, log=logs.append)
    assert "the autoscaler's node types offer 4" in logs[0]
    monkeypatch.setenv("MSCNN_AUTOSCALER_CONFIG", str(tmp_path / "none.yaml"))
    assert scalable_gpus() == 0


@pytest.mark.ray
@pytest.mark.slow
def test_the_source_path_is_given_once(local_ray, tmp_path, monkeypatch):
    """The first build records where its images were; a later build (every ``mscnn train``)
    without ``--data-dir`` finds them there and the pyramid is up to date."""
    monkeypatch.delenv("MSCNN_DATA_DIR", raising=False)
    _folder(tmp_path / "data", {"a": 5, "b": 5})
    cfg = PyramidConfig(name="f", levels=2, source=SourceConfig(kind="folder", path=str(tmp_path / "data"),
                                                                 size=8))
    path, built = build_pyramid(cfg, tmp_path / "pyr")
    assert built
    no_path = cfg.model_copy(update={"source": cfg.source.model_copy(update={"path": None})})
    assert build_pyramid(no_path, tmp_path / "pyr") == (path, False)
    with pytest.raises(ValueError, match=r"source\.path: required for kind 'folder'"):
        build_pyramid(no_path, tmp_path / "elsewhere")  # nothing recorded there
