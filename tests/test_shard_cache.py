"""The stage's worker-local cache of its data shard (``pipelines.stage.ShardCache``), how the
worker gets its level, and the Ray Train extras around a stage (no Ray needed)."""

import pytest
import torch

from pipelines.stage import TRAIN_POLL_ENV, ShardCache, train_extras_env, train_poll_env, worker_reads


class FakeShard:
    """What ``ray.train.get_dataset_shard`` gives, over fixed tensors; counts its passes."""

    def __init__(self, x, y):
        self.x, self.y, self.passes = x, y, 0

    def iter_torch_batches(self, batch_size, device=None, local_shuffle_buffer_size=None,
                           local_shuffle_seed=None):
        self.passes += 1
        for i in range(0, len(self.y), batch_size):
            yield {"image": self.x[i:i + batch_size], "label": self.y[i:i + batch_size]}


def _data(n=10):
    return torch.arange(n * 4, dtype=torch.float32).view(n, 1, 2, 2), torch.arange(n)


def test_a_shard_that_fits_is_read_once_then_served_shuffled_from_memory():
    x, y = _data()
    shard = FakeShard(x, y)
    cache = ShardCache(shard, limit_bytes=1e6, scale=torch.tensor(2.0))
    first = list(cache.batches(4, "cpu", seed=0))
    assert [len(b[1]) for b in first] == [4, 4, 2] and torch.equal(first[0][0], 2 * x[:4])
    for seed in (1, 2):
        again = list(cache.batches(4, "cpu", seed=seed))
        assert [len(b[1]) for b in again] == [4, 4, 2]
        labels = torch.cat([b[1] for b in again])
        assert sorted(labels.tolist()) == list(range(10)) and labels.tolist() != list(range(10))
        images = torch.cat([b[0] for b in again])
        torch.testing.assert_close(images, 2 * x[labels])  # each image stays with its label
    assert shard.passes == 1
    assert torch.equal(cache.x, 2 * x)  # held scaled: no multiply per batch
    # unshuffled (validation): the shard's order
    assert torch.equal(torch.cat([b[1] for b in cache.batches(3, "cpu")]), y)


def test_a_shard_over_the_limit_streams_every_epoch():
    x, y = _data()
    shard = FakeShard(x, y)
    cache = ShardCache(shard, limit_bytes=x[:5].nelement() * 4)  # half the shard
    for _ in range(3):
        assert torch.equal(torch.cat([b[1] for b in cache.batches(4, "cpu", 0)]), y)
    assert shard.passes == 3 and cache.x is None
    off = FakeShard(x, y)
    cache = ShardCache(off, limit_bytes=0)  # worker_cache_mb: 0
    for _ in range(2):
        list(cache.batches(4, "cpu"))
    assert off.passes == 2


def test_a_worker_reading_the_split_itself_takes_every_world_th_row_and_trims_training_to_equal():
    """``scaling.reader: worker``: rank r keeps rows r, r + world, ...; training shards are trimmed
    to the same count (DDP steps in lockstep), validation keeps every row (its sums are all-reduced)."""
    x, y = _data(11)
    train = [ShardCache.of_tensors(x, y, r, 3, "cpu", equal=True) for r in range(3)]
    assert [c.y.tolist() for c in train] == [[0, 3, 6], [1, 4, 7], [2, 5, 8]]  # 11 // 3 = 3 each
    val = [ShardCache.of_tensors(x, y, r, 3, "cpu", equal=False, scale=torch.tensor(0.5)) for r in range(3)]
    assert [c.y.tolist() for c in val] == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    got = list(val[1].batches(3, "cpu"))  # served from memory, in order, scaled
    assert torch.equal(torch.cat([b[1] for b in got]), torch.tensor([1, 4, 7, 10]))
    assert torch.equal(torch.cat([b[0] for b in got]), 0.5 * x[[1, 4, 7, 10]])
    shuffled = torch.cat([b[1] for b in train[0].batches(2, "cpu", seed=5)])
    assert sorted(shuffled.tolist()) == [0, 3, 6]


def test_the_reader_is_the_worker_for_levels_that_fit_the_cache_and_ray_data_otherwise():
    man = {"channels": 1, "levels": [{"n": 28}, {"n": 14}],
           "counts": {"train": {"total": 50_000}, "val": {"total": 10_000}}}
    big = 50_000 * 28 * 28 * 4  # the train split at 28x28: 157 MB
    auto = {"reader": "auto", "worker_cache_mb": big / 2**20}
    assert worker_reads(auto, man, 0, "/data/p") is True
    assert worker_reads(auto | {"worker_cache_mb": big / 2**20 - 1}, man, 0, "/data/p") is False
    assert worker_reads(auto | {"worker_cache_mb": big / 2**20 / 4}, man, 1, "/data/p") is True  # 14x14
    assert worker_reads(auto, man, 0, "s3://bucket/p") is False  # a URI: Ray Data reads it
    assert worker_reads(auto | {"worker_cache_mb": 0}, man, 1, "/data/p") is False  # caching off
    assert worker_reads({"reader": "ray_data", "worker_cache_mb": 1e9}, man, 1, "/data/p") is False
    assert worker_reads({"reader": "worker", "worker_cache_mb": 0}, man, 0, "/data/p") is True
    with pytest.raises(ValueError, match="reader: worker.*s3://b/p is a URI"):
        worker_reads({"reader": "worker", "worker_cache_mb": 0}, man, 0, "s3://b/p")


def test_train_extras_follow_the_setting_and_the_node_count_and_leave_a_users_variable(monkeypatch):
    import os

    keys = ("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_METRICS_ENABLED")
    for k in keys:
        monkeypatch.delenv(k, raising=False)
    for setting, nodes, want in (("auto", 1, False), ("auto", 3, True), ("on", 1, True),
                                 ("off", 3, False)):
        with train_extras_env(setting, nodes=nodes) as on:
            assert on == dict.fromkeys(keys, want)
            assert [os.environ[k] for k in keys] == ["1" if want else "0"] * 2
        assert not any(k in os.environ for k in keys)
    monkeypatch.setenv("RAY_TRAIN_METRICS_ENABLED", "1")  # the user's choice wins, and stays
    with train_extras_env("off", nodes=1) as on:  # what is in force, not the setting
        assert on == {"RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": False, "RAY_TRAIN_METRICS_ENABLED": True}
        assert os.environ["RAY_TRAIN_METRICS_ENABLED"] == "1"
        assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert os.environ["RAY_TRAIN_METRICS_ENABLED"] == "1"


def test_train_poll_interval_is_set_around_fit_and_a_users_variable_wins(monkeypatch):
    import os

    monkeypatch.delenv(TRAIN_POLL_ENV, raising=False)
    with train_poll_env(0.5) as seconds:
        assert seconds == 0.5 and os.environ[TRAIN_POLL_ENV] == "0.5"
    assert TRAIN_POLL_ENV not in os.environ
    monkeypatch.setenv(TRAIN_POLL_ENV, "3")
    with train_poll_env(0.5) as seconds:
        assert seconds == 3.0 and os.environ[TRAIN_POLL_ENV] == "3"
    assert os.environ[TRAIN_POLL_ENV] == "3"


def test_the_mlflow_callback_opens_its_store_when_it_arrives_in_the_controller(tmp_path):
    """Ray Train unpickles the callback in its controller: the store opens there in the background
    (not at the first report, where it took a core from the training), and each epoch is still
    logged once."""
    import pickle

    from pipelines.stage import MlflowStageCallback
    from pipelines.tracking import Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker("cb", uri)
    run = tracker.client.create_run(tracker.experiment_id).info.run_id
    tracker.log_metrics(run, {"val_accuracy": 0.25}, step=0)  # epoch 0 logged before a restart
    cb = MlflowStageCallback(uri, "cb", run)
    assert cb._warm is None and cb._tracker is None  # on the driver: nothing opened
    there = pickle.loads(pickle.dumps(cb))
    there._warm.join(60)
    assert there._tracker is not None and there._seen == {0}  # opened before any report
    there.after_report(None, [{"global_epoch": 0, "val_accuracy": 0.5}], None)  # again: skipped
    there.after_report(None, [{"global_epoch": 1, "val_accuracy": 0.75}], None)
    hist = tracker.client.get_metric_history(run, "val_accuracy")
    assert sorted((m.step, m.value) for m in hist) == [(0, 0.25), (1, 0.75)]
