"""Nothing silent: labels from folders and IDX files, subsets, damaged pyramids, locks, run status.
Each case of issue 17 that can run here, with the error it must give."""

import gzip
import os

import numpy as np
import pytest
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
    """Without the lock beside the SQLite file, 4 of 4 such starts failed here in alembic's
    migrations ("table datasets already exists", "expected to match one row")."""
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
