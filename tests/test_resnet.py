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
    with pytest.raises(ValueError, match=r"levels\.1\.dilate: dilated stencils are an ODE-network"):
        ScheduleConfig.model_validate(base | {"levels": [{"n": 8}, {"n": 16, "dilate": True}]})
    # the stencil fields added later leave a free ResNet schedule's hash as it was (value from c2992ab)
    assert cfg.config_hash() == "1a85475ad4fa"
    consistent = base | {"model": base["model"] | {"stencil": "gaussian"}}
    other = ScheduleConfig.model_validate(consistent | {"levels": [{"n": 16}]})
    assert other.config_hash() != cfg.config_hash()


def test_a_resnet_schedule_carries_the_prefilter_into_the_level_and_the_handover():
    from mscnn.hierarchy import handover_sigma, pyramid_blur
    from pipelines.schedule import _transfer

    base = {"name": "r", "kind": "multiscale",
            "pyramid": {"name": "syn", "source": {"kind": "synthetic", "size": 32}, "levels": 2},
            "model": {"arch": "resnet34", "in_channels": 1, "classes": 4, "stencil": "gaussian",
                      "pair": "full-weighting-neumann"}}
    cfg = ScheduleConfig.model_validate(base | {"levels": [{"n": 16}, {"n": 32, "prefilter": True}]})
    want = pyramid_blur(16, 32, handover_sigma(cfg.pyramid.sigma, cfg.pyramid.pair))
    assert cfg.model_config_for(0).input_blur == 0.0
    assert cfg.model_config_for(1).input_blur == pytest.approx(want, rel=1e-12) and want > 0
    torch.manual_seed(0)
    coarse = build_resnet(cfg.model_config_for(0))
    moved, done = _transfer(coarse, cfg, 1)
    assert moved.config == cfg.model_config_for(1)  # what the stage checks against the level
    assert done == [f"resnet_to_resolution(32, prefilter={cfg.prefilter_px(cfg.levels[1]):g})"]


def _consistent(kind="gaussian", n=16, pair="full-weighting-neumann", **kw):
    torch.manual_seed(0)
    net = build_resnet(ResNetConfig(classes=5, n=n, stencil=kind, pair=pair, stencil_length=0.14, **kw))
    with torch.no_grad():  # batch-norm statistics that are not the identity
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return net.eval()


def test_consistent_resnet_swaps_every_grid_operation_and_validates_its_fields():
    from mscnn.resnet import ConsistentConv, Restrict, RestrictedConv1x1

    net = _consistent()
    convs = [m for m in net.modules() if isinstance(m, ConsistentConv)]
    assert len(convs) == 33 and sum(c.stride == 2 for c in convs) == 3
    assert all(c.weight.shape[-1] == 6 for c in convs)
    assert sum(isinstance(m, RestrictedConv1x1) for m in net.modules()) == 3
    assert isinstance(net.maxpool, Restrict) and not any(isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)
                                                         for m in net.modules())
    # sigma doubles with every coarsening: the stem at stencil_scale, layer1 after the pooling
    assert net.conv1.scale == 0.05 and net.layer1[0].conv1.scale == 0.1
    assert net.layer2[0].conv1.scale == 0.1 and net.layer2[0].conv2.scale == 0.2
    assert net.layer4[2].conv2.scale == 0.8
    assert ResNetConfig(n=32).to_dict() == {"classes": 10, "in_channels": 3, "n": 32, "stem_stride": 1,
                                            "pair": "full-weighting"}  # model.json as before
    with pytest.raises(ValueError, match="unknown stencil kind 'hat'"):
        ResNetConfig(n=32, stencil="hat")
    with pytest.raises(ValueError, match="'moment-blur' does not apply to a ResNet"):
        ResNetConfig(n=32, stencil="moment-blur")
    with pytest.raises(ValueError, match=r"n divisible by 16\), got n=24"):
        ResNetConfig(n=24, stencil="gaussian")
    with pytest.raises(ValueError, match="ResNetConfig.input_blur: must be >= 0"):
        ResNetConfig(n=32, input_blur=-0.1)
    ResNetConfig(n=24)  # a free ResNet takes any n >= 8


@pytest.mark.parametrize("kind", ["gaussian"])
def test_consistent_resnet_gives_a_constant_image_the_same_logits_on_every_grid(kind):
    """In float64: 33 layers of second differences amplify float32 round-off at the 2x2 and 1x1
    grids of a 16x16 input (a constant stays constant only up to it)."""
    net = _consistent(kind).double()
    logits = [resnet_to_resolution(net, k)(torch.full((2, 3, n, n), 0.7, dtype=torch.float64))
              for k, n in ((0, 16), (1, 32), (2, 64))]
    assert logits[0].abs().max() > 0.1  # not a network that outputs nothing
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-7, atol=1e-7)
    torch.testing.assert_close(logits[2], logits[0], rtol=1e-7, atol=1e-7)
    # a free ResNet (zero padding, max-pool, strided 3x3) does not: the test can tell
    free = build_resnet(ResNetConfig(classes=5, n=16)).eval()
    f16, f32 = free(torch.full((2, 3, 16, 16), 0.7)), free(torch.full((2, 3, 32, 32), 0.7))
    assert (f16 - f32).abs().max() > 1e-3


def test_consistent_resnet_moves_by_keeping_its_weights_and_the_prefilter_blurs_its_input():
    from mscnn.hierarchy import prefiltered_blur
    from mscnn.stencils import blur

    net = _consistent()
    up = resnet_to_resolution(net, 1, naive=True)  # naive or not: the weights are kept
    assert up.config == net.config.replace(n=32)
    assert all(torch.equal(up.state_dict()[k], v) for k, v in net.state_dict().items())
    pre = resnet_to_resolution(net, 1, prefilter=1.2247)
    assert pre.config.input_blur == prefiltered_blur(0.0, 16, 32, 1.2247) and not pre.training
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(pre(x), up(blur(x, pre.config.input_blur, "neumann")), rtol=0, atol=1e-5)
    back = resnet_to_resolution(pre, -1, prefilter=1.2247)
    assert back.config == net.config and back.config.input_blur == 0.0
    # a free ResNet carries the prefilter too (its stencils move as before)
    free = build_resnet(ResNetConfig(classes=5, n=16))
    fp = resnet_to_resolution(free, 1, naive=True, prefilter=1.0)
    assert fp.config.input_blur == prefiltered_blur(0.0, 16, 32, 1.0)
    assert all(torch.equal(fp.state_dict()[k], v) for k, v in free.state_dict().items())
