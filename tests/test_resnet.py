"""ResNet-34 (Sec. 4.3) and its transfer across resolutions; image folders as tensors."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mscnn.checkpoint import load_checkpoint, save_checkpoint
from mscnn.data import load_image_folder
from mscnn.resnet import ResNetConfig, build_resnet, resnet34, resnet_to_resolution
from mscnn.transfer import prolong_stencil, restrict_stencil
from pipelines.config import ScheduleConfig


def test_resnet34_has_a_3x3_stem_and_global_pooling_into_the_classifier():
    net = resnet34(classes=7)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.avgpool, nn.AdaptiveAvgPool2d) and net.fc.out_features == 7
    net.eval()
    for n in (16, 40):  # any input size
        assert net(torch.zeros(1, 3, n, n)).shape == (1, 7)
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in net.modules()) == 33


@pytest.mark.slow  # the full ResNet-34 moved twice: the one ResNet test that takes seconds
def test_resnet_to_resolution_moves_3x3_stencils_only():
    torch.manual_seed(0)
    net = resnet34()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_()
    up = resnet_to_resolution(net, 1)
    down = resnet_to_resolution(net, -2)
    same = resnet_to_resolution(net, 1, naive=True)
    mods = dict(net.named_modules())
    for name, m in up.named_modules():
        if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
            w = mods[name].weight.double()
            torch.testing.assert_close(m.weight, prolong_stencil(w).float())
            d = dict(down.named_modules())[name].weight
            torch.testing.assert_close(d, restrict_stencil(restrict_stencil(w)).float())
    sd, su, ss = net.state_dict(), up.state_dict(), same.state_dict()
    for k, v in sd.items():
        assert torch.equal(ss[k], v), k
        if "downsample.0" in k or k.startswith(("fc.", "bn")) or "running" in k:
            assert torch.equal(su[k], v), k
    assert not torch.equal(su["conv1.weight"], sd["conv1.weight"])
    assert up is not net and net.conv1.weight.data_ptr() != up.conv1.weight.data_ptr()


def test_load_image_folder(tmp_path):
    for c, colour in (("b", (0, 0, 255)), ("a", (255, 0, 0))):
        (tmp_path / c).mkdir()
        for i in range(2):
            Image.new("RGB", (10, 6), colour).save(tmp_path / c / f"{i}.png")
    classes, split = load_image_folder(tmp_path, 8)
    assert classes == ["a", "b"] and split.x.shape == (4, 3, 8, 8) and split.x.dtype == torch.float32
    assert split.y.tolist() == [0, 0, 1, 1]
    np.testing.assert_allclose(split.x[0, :, 3, 3].numpy(), [1.0, 0.0, 0.0])
    np.testing.assert_allclose(split.x[3, :, 3, 3].numpy(), [0.0, 0.0, 1.0])
    (tmp_path / "a" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png: cannot decode"):
        load_image_folder(tmp_path, 8)


def test_resnet_checkpoint_round_trip_names_the_architecture(tmp_path):
    torch.manual_seed(0)
    net = build_resnet(ResNetConfig(classes=5, in_channels=1, n=16))
    save_checkpoint(tmp_path / "c", net, {"stage": "x"})
    assert json.loads((tmp_path / "c" / "model.json").read_text())["arch"] == "resnet34"
    back, lineage = load_checkpoint(tmp_path / "c")
    assert back.config == net.config and lineage == {"stage": "x"}
    state = back.state_dict()
    assert all(torch.equal(state[k], v) for k, v in net.state_dict().items())
    # moving it records the new resolution in the copy's config, not in the original's
    assert resnet_to_resolution(net, 1).config.n == 32 and net.config.n == 16
    assert resnet_to_resolution(net, -1, naive=True).config.n == 8
    (tmp_path / "c" / "model.json").write_text(json.dumps({"arch": "vgg", "n": 16}))
    with pytest.raises(ValueError, match=r"model\.json: unknown arch 'vgg'"):
        load_checkpoint(tmp_path / "c")


def test_resnet_schedules_reject_ode_network_options():
    base = {"name": "r", "kind": "multiscale",
            "pyramid": {"name": "syn", "source": {"kind": "synthetic", "size": 16}, "levels": 2},
            "model": {"arch": "resnet34", "in_channels": 1, "classes": 4}}
    cfg = ScheduleConfig.model_validate(base | {"levels": [{"n": 8}, {"n": 16, "naive": True}]})
    assert cfg.model_config_for(1) == ResNetConfig(classes=4, in_channels=1, n=16)
    with pytest.raises(ValueError, match=r"levels\.0\.optim\.name: bcd trains the ODE network"):
        ScheduleConfig.model_validate(base | {"levels": [{"n": 8, "optim": {"name": "bcd"}}]})
    with pytest.raises(ValueError, match=r"levels\.1\.galerkin: layer groups are ODE-network parts"):
        ScheduleConfig.model_validate(base | {"levels": [{"n": 8}, {"n": 16, "galerkin": ["units"]}]})
    with pytest.raises(ValueError, match=r"levels\.1\.prefilter: an input blur of the ODE network"):
        ScheduleConfig.model_validate(base | {"levels": [{"n": 8}, {"n": 16, "prefilter": True}]})
