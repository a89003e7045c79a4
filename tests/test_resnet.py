"""ResNet-34 (Sec. 4.3) and its transfer across resolutions; image folders as tensors."""

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from mscnn.data import load_image_folder
from mscnn.resnet import resnet34, resnet_to_resolution
from mscnn.transfer import prolong_stencil, restrict_stencil


def test_resnet34_has_a_3x3_stem_and_global_pooling_into_the_classifier():
    net = resnet34(classes=7)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (1, 1)
    assert isinstance(net.avgpool, nn.AdaptiveAvgPool2d) and net.fc.out_features == 7
    net.eval()
    for n in (16, 40):  # any input size
        assert net(torch.zeros(1, 3, n, n)).shape == (1, 7)
    assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3) for m in net.modules()) == 33


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
