"""Image pyramids on a real local Ray (no mocks)."""

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mscnn.data import find_mnist_dir
from mscnn.images import channel_stats, read_image
from mscnn.transfer import gaussian_blur, restrict_image
from pipelines.config import ConfigError, load_config
from pipelines.pyramid import (
    PyramidConfig,
    SourceConfig,
    build_pyramid,
    level_tensors,
    load_level,
    next_level,
    read_manifest,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]



def _syn(name="syn", **kw):
    src = SourceConfig(kind="synthetic", size=16, count=kw.pop("count", 120), classes=4)
    kw.setdefault("sigma", 0.8)
    return PyramidConfig(name=name, source=src, levels=3, shard_rows=50, **kw)


def test_next_level_is_blur_then_restrict():
    x = np.random.default_rng(0).random((3, 2, 8, 8)).astype(np.float32)
    out = next_level({"image": x, "label": np.arange(3)}, 0.8, "average")
    want = restrict_image(gaussian_blur(torch.from_numpy(x).double(), 0.8), "average").numpy()
    np.testing.assert_allclose(out["image"], want, rtol=1e-6, atol=1e-7)  # float64, rounded once
    np.testing.assert_array_equal(out["label"], np.arange(3))


def test_the_build_task_never_imports_torch(tmp_path):
    """The Ray Data task of the build (its module and a call) runs without torch: a cold worker
    importing torch cost seconds per build."""
    import subprocess
    import sys

    from PIL import Image

    Image.fromarray(np.array([[[0, 10, 20], [30, 40, 50]], [[60, 70, 80], [90, 100, 255]]], np.uint8)).save(
        tmp_path / "a.png")
    code = ("import sys, numpy as np; import pipelines.pyramid_write as w; "
            "w.write_levels({'image': np.zeros((2, 1, 4, 4), np.uint8), 'label': np.zeros(2), "
            "'index': np.arange(2), 'split': np.array(['train']), 'part': np.array([0])}, "
            f"{str(tmp_path)!r}, [np.full((2, 4), 0.25)]); "
            "r = w.write_levels({'path': np.array([" f"{str(tmp_path / 'a.png')!r}" "]), "
            "'label': np.zeros(1), "
            "'index': np.arange(1), 'split': np.array(['val']), 'part': np.array([1])}, "
            f"{str(tmp_path)!r}, [np.full((1, 2), 0.5)], size=2); "
            "print('torch' in sys.modules, r['sum'].tolist(), r['sumsq'].tolist(), r['pixels'].tolist())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # a PNG decoded in the task (no torch there either), its level-0 sums exact per RGB channel
    assert out.stdout.strip() == ("False [[180, 220, 405]] [[12600, 16600, 74325]] [4]")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.parquet")) == [
        "level=0/split=train/part-00000.parquet", "level=0/split=val/part-00001.parquet",
        "level=1/split=train/part-00000.parquet", "level=1/split=val/part-00001.parquet"]


def test_a_block_goes_through_the_levels_in_chunks(tmp_path, monkeypatch):
    """A block larger than a chunk is written in row groups of ``chunk_rows`` images, with the
    same images and sums as in one piece."""
    import pyarrow.parquet as pq

    import pipelines.pyramid_write as w
    from mscnn.images import channel_sums

    assert w.chunk_rows(1, 28) == 10_699 and w.chunk_rows(3, 224) == 55
    x = np.random.default_rng(0).integers(0, 256, (10, 1, 8, 8), dtype=np.uint8)
    op = np.random.default_rng(1).random((4, 8))
    monkeypatch.setattr(w, "CHUNK_BYTES", 3 * 8 * 64)  # 3 images per chunk
    r = w.write_levels({"image": x, "label": np.arange(10), "index": np.arange(10, 20),
                        "split": np.array(["train"]), "part": np.array([2])}, str(tmp_path), [op])
    s, s2, pixels = channel_sums(x)
    assert r["sum"][0].tolist() == s.tolist() and r["sumsq"][0].tolist() == s2.tolist()
    assert r["pixels"][0] == pixels == 640
    for k, want in enumerate([x / np.float32(255.0), w.apply_level(x / np.float32(255.0), op)]):
        f = pq.ParquetFile(tmp_path / f"level={k}" / "split=train" / "part-00002.parquet")
        assert f.metadata.num_row_groups == 4  # 3 + 3 + 3 + 1
        t = f.read()
        img = t.column("image").combine_chunks()
        got = np.asarray(img.storage.flatten() if hasattr(img, "storage") else img.flatten(), np.float32)
        np.testing.assert_array_equal(got.reshape(want.shape), want)
        assert t.column("index").to_pylist() == list(range(10, 20))


def test_synthetic_pyramid_content_manifest_and_rebuild(local_ray, tmp_path):
    cfg = _syn()
    path, built = build_pyramid(cfg, tmp_path)
    assert built and path == tmp_path / "syn"
    m = read_manifest(path)
    assert [lv["n"] for lv in m["levels"]] == [16, 8, 4]
    assert m["counts"]["train"]["total"] + m["counts"]["val"]["total"] == 120
    assert m["counts"]["val"]["total"] == 24 and sum(m["counts"]["train"]["per_class"]) == 96
    assert m["sigma"] == 0.8 and m["pair"] == "full-weighting" and len(m["config_hash"]) == 16
    # every level k equals k times restrict(blur(.)) of level 0, for sampled images
    x0 = level_tensors(path, 0, "train")
    assert x0.x.shape == (96, 1, 16, 16)
    idx = torch.tensor([0, 7, 50, 95])
    want = x0.x[idx]
    for k in (1, 2):
        want = restrict_image(gaussian_blur(want, 0.8))
        got = level_tensors(path, k, "train")
        torch.testing.assert_close(got.x[idx], want, rtol=1e-5, atol=1e-6)
        assert torch.equal(got.y, x0.y)
    # the same config again: no work, nothing touched
    stamp = (path / "manifest.json").stat().st_mtime_ns
    assert build_pyramid(cfg, tmp_path) == (path, False)
    assert (path / "manifest.json").stat().st_mtime_ns == stamp
    # a different config at the same target is refused
    with pytest.raises(FileExistsError, match="holds a different pyramid"):
        build_pyramid(_syn(sigma=0.5), tmp_path)
    # the Ray Data reader: fixed-shape tensor column, batches as torch tensors
    ds = load_level(path, 1, "val")
    assert ds.count() == 24
    batch = next(iter(ds.iter_torch_batches(batch_size=8)))
    assert batch["image"].shape == (8, 1, 8, 8) and batch["label"].dtype == torch.int64
    assert sorted(p.name for p in (path / "level=0" / "split=train").iterdir())[0].startswith("part-")
    with pytest.raises(ValueError, match="level 3 out of range"):
        load_level(path, 3, "train")


def test_image_folder_pyramid(local_ray, tmp_path):
    """Class-per-folder JPEG/PNG (one grayscale), resized, converted to RGB, train/ and val/."""
    from PIL import Image

    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    for split, count in (("train", 3), ("val", 1)):
        for c in ("ant", "bee"):
            (root / split / c).mkdir(parents=True)
            for i in range(count):
                arr = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
                img = Image.fromarray(arr).convert("L") if i == 0 else Image.fromarray(arr)
                img.save(root / split / c / f"{i}.{'png' if i == 1 else 'jpg'}")
    cfg = PyramidConfig(name="folder", source=SourceConfig(kind="folder", path=str(root), size=16),
                        levels=2)
    path, _ = build_pyramid(cfg, tmp_path / "out")
    m = read_manifest(path)
    assert m["source"]["classes"] == ["ant", "bee"] and m["channels"] == 3
    assert m["counts"]["train"] == {"total": 6, "per_class": [3, 3]}
    assert m["counts"]["val"]["total"] == 2 and len(m["checksums"]) == 8
    s = level_tensors(path, 1, "train")
    assert s.x.shape == (6, 3, 8, 8) and s.y.tolist() == [0, 0, 0, 1, 1, 1]
    first = level_tensors(path, 0, "train").x[0]
    torch.testing.assert_close(first[0], first[1])  # the grayscale image became RGB
    # decoded in the build's tasks; the normalisation from their exact sums, as from all the images
    x0 = np.stack([read_image(f, 16) for c in ("ant", "bee") for f in sorted((root / "train" / c).iterdir())])
    assert m["normalisation"] == channel_stats(x0)
    torch.testing.assert_close(level_tensors(path, 0, "train").x, torch.from_numpy(x0 / np.float32(255.0)))


def test_crash_mid_build_leaves_no_pyramid(local_ray, tmp_path, monkeypatch):
    import pipelines.pyramid as pyr

    def boom():
        raise RuntimeError("simulated crash after the shards were written")

    monkeypatch.setattr(pyr, "_versions", boom)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_pyramid(_syn(name="crash", count=40), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [".crash.lock"]  # no pyramid, no temporary folder


def test_a_second_build_of_the_same_pyramid_waits_for_the_first(local_ray, tmp_path):
    """Two sweep trials starting at once build the same pyramid: the second waits for the lock
    (it was refused before: the trial failed) and then finds the pyramid the first built."""
    import threading
    import time

    from pipelines.runtime import exclusive

    first = build_pyramid(_syn(name="once", count=40), tmp_path)
    held, release = threading.Event(), threading.Event()

    def other_build():
        with exclusive(tmp_path / ".once.lock", "the other build"):
            held.set()
            release.wait(30)

    t = threading.Thread(target=other_build)
    t.start()
    held.wait(30)
    threading.Timer(2.0, release.set).start()
    t0 = time.perf_counter()
    second = build_pyramid(_syn(name="once", count=40), tmp_path)
    t.join()
    assert time.perf_counter() - t0 >= 1.5  # it waited for the holder
    assert first == (tmp_path / "once", True) and second == (tmp_path / "once", False)


def test_bad_inputs_fail_before_any_work(tmp_path):
    # size not divisible by 2**(levels-1)
    cfg = PyramidConfig(name="x", source=SourceConfig(kind="synthetic", size=12, count=10), levels=4)
    with pytest.raises(ValueError, match=r"image size 12 is not divisible by 2\*\*3"):
        build_pyramid(cfg, tmp_path)
    # image folders: an empty class, then a corrupt JPEG
    root = tmp_path / "imgs"
    (root / "train" / "cat").mkdir(parents=True)
    (root / "train" / "dog").mkdir(parents=True)
    from PIL import Image

    Image.new("RGB", (10, 10), "red").save(root / "train" / "cat" / "a.jpg")
    fcfg = PyramidConfig(name="f", source=SourceConfig(kind="folder", path=str(root), size=8), levels=2)
    with pytest.raises(ValueError, match=r"train/dog: empty class folder"):
        build_pyramid(fcfg, tmp_path / "out")
    (root / "train" / "dog" / "b.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    with pytest.raises(ValueError, match=r"train/dog/b\.jpg: cannot decode image"):
        build_pyramid(fcfg, tmp_path / "out")
    # a JPEG cut inside its pixel data opens (the driver's check passes) and fails in a Ray task
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(
        root / "train" / "dog" / "b.jpg")
    whole = (root / "train" / "dog" / "b.jpg").read_bytes()
    (root / "train" / "dog" / "b.jpg").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ValueError, match=r"^\S+train/dog/b\.jpg: cannot decode image \(image file is trunc"):
        build_pyramid(fcfg, tmp_path / "built")
    assert [p.name for p in (tmp_path / "built").iterdir()] == [".f.lock"]  # nothing half written
    # MNIST: truncated images file
    d = tmp_path / "mnist"
    d.mkdir()
    for f in ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        head = bytes([0, 0, 8, 3, 0, 0, 0, 5, 0, 0, 0, 28, 0, 0, 0, 28])
        (d / f).write_bytes(gzip.compress(head + b"\0" * 100))
    for f in ("train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (d / f).write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 5]) + b"\0" * 5))
    mcfg = PyramidConfig(name="m", source=SourceConfig(kind="mnist", path=str(d)), levels=2)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte\.gz: IDX payload has 100 bytes"):
        build_pyramid(mcfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_config_errors_name_file_and_field(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nsource: {kind: mnist}\nlevels: 0\nsigmaa: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: invalid PyramidConfig:[\s\S]*levels:[\s\S]*sigmaa"):
        load_config(p, PyramidConfig)
    p.write_text("name: x\nsource: {kind: mnist}\n")
    msg = r"bad\.yaml: invalid PyramidConfig:[\s\S]*unknown transfer pair 'cubic'"
    with pytest.raises(ConfigError, match=msg):
        load_config(p, PyramidConfig, {"pair": "cubic"})
    assert load_config(p, PyramidConfig, {"source.limit": 5}).source.limit == 5


def _mnist_or_skip():
    try:
        return find_mnist_dir()
    except FileNotFoundError as e:
        pytest.skip(f"real MNIST files not present: {e}")


def test_real_mnist_pyramid(local_ray, tmp_path):
    d = _mnist_or_skip()
    cfg = load_config(Path(__file__).parents[1] / "configs" / "pyramid_mnist.yaml", PyramidConfig,
                      {"source.path": str(d), "source.limit": 600})
    path, built = build_pyramid(cfg, tmp_path)
    m = read_manifest(path)
    assert m["checksums"]["train-images-idx3-ubyte.gz"].startswith("440fcabf73cc546f")
    assert m["checksums"]["t10k-labels-idx1-ubyte.gz"].startswith("f7ae60f92e00ec6d")
    assert {s: c["total"] for s, c in m["counts"].items()} == {"train": 600, "val": 600, "test": 600}
    assert [lv["n"] for lv in m["levels"]] == [28, 14, 7]
    test7 = level_tensors(path, 2, "test")
    assert test7.y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert test7.x.shape == (600, 1, 7, 7)
    json.dumps(m)  # plain JSON
