import gzip
import json

import numpy as np
import pytest
import torch

from mscnn.checkpoint import load_checkpoint, save_checkpoint
from mscnn.data import MNIST_SCALE, find_mnist_dir, load_mnist, mnist_splits, read_idx, split_indices
from mscnn.hierarchy import to_resolution
from mscnn.ode import ODENet


def _idx(arr: np.ndarray) -> bytes:
    head = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return head + arr.astype(np.uint8).tobytes()


def test_read_idx_round_trip_and_errors(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "ok.gz").write_bytes(gzip.compress(_idx(a)))
    np.testing.assert_array_equal(read_idx(tmp_path / "ok.gz"), a)
    (tmp_path / "short").write_bytes(_idx(a)[:-5])
    with pytest.raises(ValueError, match=r"short: IDX payload has 19 bytes.*\(2, 3, 4\) needs 24"):
        read_idx(tmp_path / "short")
    (tmp_path / "bad.gz").write_bytes(gzip.compress(_idx(a))[:30])
    with pytest.raises(ValueError, match=r"bad\.gz: not a readable gzip file"):
        read_idx(tmp_path / "bad.gz")
    (tmp_path / "magic").write_bytes(b"\x12\x34" + _idx(a)[2:])
    with pytest.raises(ValueError, match=r"magic: bad IDX magic"):
        read_idx(tmp_path / "magic")


def test_mismatched_label_count_names_both_files(tmp_path):
    names = {
        "train-images-idx3-ubyte.gz": np.zeros((3, 28, 28)),
        "train-labels-idx1-ubyte.gz": np.zeros(2),
        "t10k-images-idx3-ubyte.gz": np.zeros((1, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": np.zeros(1),
    }
    for f, a in names.items():
        (tmp_path / f).write_bytes(gzip.compress(_idx(a)))
    with pytest.raises(ValueError, match=r"train-images.*has 3 images but .*train-labels.* 2 labels"):
        load_mnist("train", tmp_path)


def test_missing_mnist_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MSCNN_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match=r"MNIST files not found.*Looked in: .*nowhere"):
        load_mnist("test", tmp_path / "nowhere")


def _mnist_or_skip():
    try:
        return find_mnist_dir()
    except FileNotFoundError as e:
        pytest.skip(f"real MNIST not staged here: {e}")


def test_real_mnist_from_shared_data():
    """The staged original files (../shared/data/mnist): counts and known first labels; the split
    is the pyramid's (split_indices, seed 0) and the scale makes the training split's std 1."""
    _mnist_or_skip()
    s = mnist_splits()
    assert (len(s["train"]), len(s["val"]), len(s["test"])) == (50_000, 10_000, 10_000)
    raw_x, raw_y = load_mnist("train")
    tr, va = split_indices(60_000, 10_000, 0)
    assert s["train"].y.tolist() == raw_y[tr].tolist() and s["val"].y.tolist() == raw_y[va].tolist()
    assert raw_y[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert s["test"].y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert s["train"].x.shape[1:] == (1, 28, 28) and s["train"].x.dtype == torch.float32
    assert s["train"].x.double().std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert (raw_x * MNIST_SCALE).mean().item() == pytest.approx(0.13066, abs=1e-4)


def test_checkpoint_round_trip_is_exact_and_atomic(tmp_path):
    net = ODENet(channels=[2, 3], steps=[1, 2], n=8, classes=4)
    p = save_checkpoint(tmp_path / "ck", net, {"stage": "level-0"})
    assert sorted(f.name for f in p.iterdir()) == ["lineage.json", "model.json", "model.pt"]
    back, lineage = load_checkpoint(p)
    assert back.config == net.config and lineage == {"stage": "level-0"}
    for k, v in net.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=0)
    # overwrite with a moved network; no temporary folders are left behind
    save_checkpoint(p, to_resolution(net, 16), {"transfer": "to_resolution(16)"})
    assert load_checkpoint(p)[0].n == 16
    assert [f.name for f in tmp_path.iterdir()] == ["ck"]


def test_incomplete_or_mismatched_checkpoint_errors(tmp_path):
    p = save_checkpoint(tmp_path / "ck", ODENet(channels=2, n=8))
    (p / "lineage.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"ck is incomplete: missing \['lineage.json'\]"):
        load_checkpoint(p)
    p = save_checkpoint(tmp_path / "ck2", ODENet(channels=2, n=8))
    (p / "model.json").write_text(json.dumps(ODENet(channels=3, n=8).config.to_dict()))
    with pytest.raises(ValueError, match=r"model\.pt does not match .*model\.json"):
        load_checkpoint(p)


def test_checkpoint_sizes_are_checked_before_allocating(tmp_path):
    """A small model.pt with a model.json that promises a large network (W of 10x64x1000x1000
    float32 = 2.6 GB) fails on the shape check, before anything of that size is allocated."""
    import resource

    p = save_checkpoint(tmp_path / "ck", ODENet(channels=2, n=8))
    cfg = json.loads((p / "model.json").read_text())
    (p / "model.json").write_text(json.dumps(cfg | {"channels": 64, "n": 1000}))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match=r"model\.pt does not match .*: tensors differ .*classifier\.W"):
        load_checkpoint(p)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 1_000_000  # KiB: < 1 GB more


def test_write_idx_is_byte_exact_atomic_and_refuses_other_dtypes(tmp_path):
    from mscnn.data import write_idx

    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a", a)
    assert (tmp_path / "a").read_bytes() == _idx(a)  # the header MNIST's own files carry
    write_idx(tmp_path / "a.gz", a)
    assert gzip.decompress((tmp_path / "a.gz").read_bytes()) == _idx(a)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), a)
    with pytest.raises(ValueError, match=r"b\.gz: write_idx takes uint8 .* float64 of shape \(2,\)"):
        write_idx(tmp_path / "b.gz", np.zeros(2))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "a.gz"]  # nothing half written


def test_idx_from_images_writes_an_mnist_format_set_that_mnist_splits_reads(tmp_path):
    """benchmarks/idx_from_images.py: each photo becomes 5 grayscale crops (whole, 4 corners),
    train/ -> the training file, val/ -> the test file, under MNIST's file names."""
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 3), ("val", 1)):
        for c in ("cat", "dog"):
            (tmp_path / "src" / split / c).mkdir(parents=True)
            for i in range(count):
                Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(
                    tmp_path / "src" / split / c / f"{i}.png")
    # one photo of known content: left half black, right half white
    half = np.zeros((40, 40, 3), np.uint8)
    half[:, 20:] = 255
    Image.fromarray(half).save(tmp_path / "src" / "val" / "dog" / "0.png")
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "idx_from_images.py"
    subprocess.run([sys.executable, script, "--src", tmp_path / "src", "--out", tmp_path / "out",
                    "--size", "8"], check=True, capture_output=True, timeout=120)
    x = read_idx(tmp_path / "out" / "t10k-images-idx3-ubyte.gz")
    y = read_idx(tmp_path / "out" / "t10k-labels-idx1-ubyte.gz")
    assert x.shape == (10, 8, 8) and y.tolist() == [0] * 5 + [1] * 5
    # the whole image: 4 black columns, 4 white; the top-left 30x30 crop: columns 0-19 black, 20-29 white
    np.testing.assert_array_equal(x[5], np.repeat([[0] * 4 + [255] * 4], 8, axis=0))
    assert x[6, :, :5].max() == 0 and x[6, :, 6:].min() == 255
    d = mnist_splits(tmp_path / "out", n_val=5)
    assert [len(d[k].y) for k in ("train", "val", "test")] == [25, 5, 10]
    # labels are class indices: a val/ with other classes than train/ is refused, naming both
    (tmp_path / "src" / "val" / "emu").mkdir()
    Image.fromarray(half).save(tmp_path / "src" / "val" / "emu" / "0.png")
    bad = subprocess.run([sys.executable, script, "--src", tmp_path / "src", "--out", tmp_path / "bad"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode != 0 and "val: classes ['cat', 'dog', 'emu'] differ from" in bad.stderr
    assert not (tmp_path / "bad").exists()
