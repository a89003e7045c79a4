"""``mscnn predict`` / ``mscnn export``: a checkpoint used on image files of any resolution."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from mscnn.checkpoint import save_checkpoint
from mscnn.hierarchy import to_resolution
from mscnn.ode import ODENet
from mscnn.transfer import gaussian_blur, restrict_image
from pipelines.predict import export, predict

DATA = {"input_scale": [2.0], "classes": ["a", "b", "c"], "sigma": 1.0, "pair": "full-weighting"}


@pytest.fixture
def net_ckpt(tmp_path):
    torch.manual_seed(0)
    net = ODENet(channels=3, steps=1, n=8, classes=3).eval()
    return net, save_checkpoint(tmp_path / "ckpt", net, {"data": DATA})


def _pngs(tmp_path, n: int, count: int = 4, seed: int = 0, size=None):
    rng = np.random.default_rng(seed)
    arrays = rng.integers(0, 256, (count, *(size or (n, n))), dtype=np.uint8)
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / f"img{n}-{i}.png")
        Image.fromarray(a).save(paths[-1])
    return paths, torch.from_numpy(arrays.astype(np.float32) / 255)[:, None]


@torch.no_grad()
def _expect(net, x):
    return torch.softmax(net(x), dim=1)


def test_predict_at_the_network_resolution_finer_and_coarser(net_ckpt, tmp_path):
    net, ckpt = net_ckpt
    # native 8x8: the network on the scaled pixels
    paths, x = _pngs(tmp_path, 8)
    rows = predict(ckpt, paths)
    p = _expect(net, 2.0 * x)
    assert [r["label"] for r in rows] == p.argmax(1).tolist()
    assert [r["class"] for r in rows] == [DATA["classes"][i] for i in p.argmax(1).tolist()]
    assert [r["probability"] for r in rows] == pytest.approx(p.max(1).values.tolist(), abs=1e-6)
    assert rows[0]["how"] == "native 8x8"
    # 16x16 images: coarsened as the pyramid coarsens (blur sigma 1 + full weighting) to 8x8
    paths, x = _pngs(tmp_path, 16, seed=1)
    rows = predict(ckpt, paths)
    p = _expect(net, 2.0 * restrict_image(gaussian_blur(x, 1.0)))
    assert [r["probability"] for r in rows] == pytest.approx(p.max(1).values.tolist(), abs=1e-6)
    assert rows[0]["how"].startswith("images coarsened 16 -> 8")
    # 4x4 images: the network moves to them (free stencils kept, W restricted)
    paths, x = _pngs(tmp_path, 4, seed=2)
    rows = predict(ckpt, paths, top=3)
    p = _expect(to_resolution(net, 4, naive=True), 2.0 * x)
    assert [r["probability"] for r in rows] == pytest.approx(p.max(1).values.tolist(), abs=1e-6)
    assert rows[0]["how"] == "network moved 8 -> 4 (stencils kept, prefilter 1.22 px)"
    assert len(rows[0]["top"]) == 3
    # 16x16 images, the network moved up to them: its stencils dilated (taps 2 pixels apart),
    # and it blurs them to the bandwidth of its own 8x8 images: the pyramid's blur (1 px) and full
    # weighting's own [1, 2, 1] / 4 (0.5 px^2), 1.5 ** 0.5 px at 16
    paths, x = _pngs(tmp_path, 16, seed=4)
    rows = predict(ckpt, paths, method="move-network")
    up = to_resolution(net, 16, naive=True, prefilter=1.5**0.5, dilate=True)
    assert up.config.input_blur == pytest.approx(1.5**0.5 / 16) and up.config.dilation == 2
    want = _expect(up, 2.0 * x).max(1).values.tolist()
    assert [r["probability"] for r in rows] == pytest.approx(want, abs=1e-6)
    assert rows[0]["how"] == "network moved 8 -> 16 (stencils dilated, prefilter 1.22 px)"
    # 12x12: not a power-of-2 multiple: resized to 8x8
    paths, _ = _pngs(tmp_path, 12, seed=3)
    assert predict(ckpt, paths)[0]["how"] == "images resized 12 -> 8"


def test_bad_images_and_checkpoints_give_clear_errors(net_ckpt, tmp_path):
    net, ckpt = net_ckpt
    a, _ = _pngs(tmp_path, 8, count=1)
    b, _ = _pngs(tmp_path, 16, count=1)
    with pytest.raises(ValueError, match=r"images of several sizes \[8, 16\]: pass --n"):
        predict(ckpt, a + b)
    assert len(predict(ckpt, a + b, n=16)) == 2  # read at one size: fine
    wide, _ = _pngs(tmp_path, 0, count=1, size=(8, 12))  # 12 wide, 8 high: centre-cropped
    assert predict(ckpt, wide)[0]["how"] == "native 8x8"
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"broken\.png: cannot decode image"):
        predict(ckpt, [bad])
    old = save_checkpoint(tmp_path / "old", net, {})
    with pytest.raises(ValueError, match=r"does not record its input scale"):
        predict(old, a)


def test_the_cli_prints_predictions_as_json(net_ckpt, tmp_path, capsys):
    from pipelines.cli import main

    _, ckpt = net_ckpt
    paths, _ = _pngs(tmp_path, 16, count=2)
    assert main(["predict", "--checkpoint", str(ckpt), "--json", *map(str, paths)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in rows] == [str(p) for p in paths]
    assert rows == predict(ckpt, paths)


@pytest.mark.slow
@pytest.mark.parametrize("stencil", ["free", "gaussian"])
def test_export_gives_the_eager_logits_in_torchscript_and_onnx(tmp_path, stencil):
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net = ODENet(channels=3, steps=2, n=8, classes=3, stencil=stencil)
    ckpt = save_checkpoint(tmp_path / "ckpt", net, {"data": DATA})
    info = export(ckpt, tmp_path / "out", n=16)  # moved to 16x16 first
    assert info["n"] == 16 and info["classes"] == DATA["classes"]
    assert max(info["max_abs_diff"].values()) <= 1e-4
    x = torch.randn(5, 1, 16, 16)  # another batch size than exported with: the batch axis is free
    ts = torch.jit.load(str(tmp_path / "out" / "model.ts"))
    import onnxruntime as ort

    sess = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"))
    free = stencil == "free"
    want = to_resolution(net, 16, naive=free, prefilter=1.5**0.5, dilate=free)(x).detach()
    torch.testing.assert_close(ts(x), want, atol=1e-4, rtol=0)
    got = sess.run(None, {"images": x.numpy()})[0]
    np.testing.assert_allclose(got, want.numpy(), atol=1e-4, rtol=0)
