"""The stage's worker-local cache of its data shard (``pipelines.stage.ShardCache``)."""

import torch

from pipelines.stage import ShardCache


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
    cache = ShardCache(shard, limit_bytes=1e6)
    scale = torch.tensor(2.0)
    first = list(cache.batches(4, scale, "cpu", seed=0))
    assert [len(b[1]) for b in first] == [4, 4, 2] and torch.equal(first[0][0], 2 * x[:4])
    for seed in (1, 2):
        again = list(cache.batches(4, scale, "cpu", seed=seed))
        assert [len(b[1]) for b in again] == [4, 4, 2]
        labels = torch.cat([b[1] for b in again])
        assert sorted(labels.tolist()) == list(range(10)) and labels.tolist() != list(range(10))
        images = torch.cat([b[0] for b in again])
        torch.testing.assert_close(images, 2 * x[labels])  # each image stays with its label
    assert shard.passes == 1
    # unshuffled (validation): the shard's order
    assert torch.equal(torch.cat([b[1] for b in cache.batches(3, scale, "cpu")]), y)


def test_a_shard_over_the_limit_streams_every_epoch():
    x, y = _data()
    shard = FakeShard(x, y)
    cache = ShardCache(shard, limit_bytes=x[:5].nelement() * 4)  # half the shard
    for _ in range(3):
        assert torch.equal(torch.cat([b[1] for b in cache.batches(4, torch.tensor(1.0), "cpu", 0)]), y)
    assert shard.passes == 3 and cache.x is None
    off = FakeShard(x, y)
    cache = ShardCache(off, limit_bytes=0)  # worker_cache_mb: 0
    for _ in range(2):
        list(cache.batches(4, torch.tensor(1.0), "cpu"))
    assert off.passes == 2
