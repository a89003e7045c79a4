"""Every YAML file shipped in ``configs/`` validates as what it is (sweep, schedule or pyramid), so
the commands in the README do not fail on a stale config."""

from pathlib import Path

import pytest
import yaml

from pipelines.config import ScheduleConfig, load_config
from pipelines.pyramid import PyramidConfig
from pipelines.sweep import SweepConfig, load_sweep

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs_of_each_kind():
    names = {p.name for p in CONFIGS}
    assert {"demo_single.yaml", "sweep_mnist.yaml", "sweep_bcd.yaml", "pyramid_mnist.yaml",
            "imagenet10_resnet.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_config_validates(path):
    raw = yaml.safe_load(path.read_text())
    if "space" in raw:
        cfg = load_sweep(path)
        assert isinstance(cfg, SweepConfig)
        # the base schedule's pyramid file was found next to it and read
        assert isinstance(cfg.schedule({}).pyramid, PyramidConfig)
    elif isinstance(raw.get("levels"), list):
        cfg = load_config(path, ScheduleConfig)
        assert cfg.name == raw["name"] and len(cfg.levels) == len(raw["levels"])
    else:
        cfg = load_config(path, PyramidConfig)
        assert cfg.name == raw["name"]


def test_the_depth_schedule_doubles_to_64_steps():
    depth = load_config(CONFIGS[0].parent / "mnist_depth.yaml", ScheduleConfig)
    assert [lv.steps for lv in depth.levels] == [2, 4, 8, 16, 32, 64]


def test_fields_added_later_keep_the_hash_of_schedules_that_leave_them_at_their_default():
    """Runs resume by the config hash: adding a field (model.input_blur, levels[].prefilter) must not
    orphan every run on disk. The values are those before the fields existed."""
    path = CONFIGS[0].parent
    single = load_config(path / "demo_single.yaml", ScheduleConfig)
    full = load_config(path / "mnist_single.yaml", ScheduleConfig)
    galerkin = load_config(path / "demo_multiscale_galerkin.yaml", ScheduleConfig)
    assert (single.config_hash(), full.config_hash()) == ("9d93ec772aab", "bd76aade5b43")
    changed = load_config(path / "demo_multiscale_galerkin.yaml", ScheduleConfig,
                          {"levels.1.prefilter": True})
    assert changed.config_hash() != galerkin.config_hash()


def test_a_prefiltered_level_declares_the_input_blur_its_handover_gives():
    """Each stage checks the incoming network against its level's config: a prefiltered handover
    must be part of that config (and end at a fresh start)."""
    base = {"name": "p", "kind": "multiscale",
            "pyramid": {"name": "syn", "source": {"kind": "synthetic", "size": 16}, "levels": 3,
                        "sigma": 2.0}}
    cfg = ScheduleConfig.model_validate(base | {"levels": [
        {"n": 4}, {"n": 8, "prefilter": True}, {"n": 16, "prefilter": True}, {"n": 8, "prefilter": True},
        {"n": 16, "init": "random"}]})
    blurs = [cfg.model_config_for(i).input_blur for i in range(5)]
    # `true`: the pyramid's 2 px and full weighting's own [1, 2, 1] / 4 (variance 0.5 px^2)
    s2 = 2.0**2 + 0.5
    assert blurs[0] == 0.0 and blurs[1] == pytest.approx((s2 / 64) ** 0.5)
    assert blurs[2] == pytest.approx((s2 / 64 + s2 / 256) ** 0.5)  # 2.12 px at 8, then at 16
    assert blurs[3] == pytest.approx((s2 / 64) ** 0.5) and blurs[4] == 0.0  # taken off going down; fresh
    # a number is the sigma in pixels: 2.0 is the pyramid's blur alone (what `true` meant before)
    two = ScheduleConfig.model_validate(base | {"levels": [{"n": 4}, {"n": 8, "prefilter": 2.0}]})
    assert two.model_config_for(1).input_blur == pytest.approx(2 / 8)
    assert cfg.config_hash() != ScheduleConfig.model_validate(base | {"levels": [
        {"n": 4}, {"n": 8, "prefilter": 2.0}, {"n": 16, "prefilter": 2.0}, {"n": 8, "prefilter": 2.0},
        {"n": 16, "init": "random"}]}).config_hash()
    with pytest.raises(ValueError, match=r"levels\.1\.prefilter\n.*-1\.0 is not true, false or a sigma"):
        ScheduleConfig.model_validate(base | {"levels": [{"n": 4}, {"n": 8, "prefilter": -1}]})


def test_a_dilating_level_declares_its_dilation_and_hands_over_the_sub_grid_network():
    """``levels[].dilate``: the level's network config carries the dilation its handovers give
    (times the grid ratio, back to the base at a fresh start), the handover is
    ``to_resolution(dilate=True)`` (same weights, taps 2 pixels apart), and the choices that
    cannot go with it are refused by field."""
    import torch

    from mscnn.hierarchy import to_resolution
    from mscnn.ode import ODENet
    from pipelines.schedule import _transfer

    base = {"name": "d", "kind": "multiscale", "model": {"channels": 3, "classes": 4},
            "pyramid": {"name": "syn", "source": {"kind": "synthetic", "size": 16}, "levels": 3}}
    cfg = ScheduleConfig.model_validate(base | {"levels": [
        {"n": 4}, {"n": 8, "dilate": True}, {"n": 16, "dilate": True, "prefilter": True},
        {"n": 8, "dilate": True}, {"n": 16}, {"n": 16, "init": "random"}]})
    assert [cfg.model_config_for(i).dilation for i in range(6)] == [1, 2, 4, 2, 2, 1]
    torch.manual_seed(0)
    coarse = ODENet(cfg.model_config_for(1).replace(n=8, dilation=1))
    moved, done = _transfer(coarse, cfg, 2)
    want = to_resolution(coarse, 16, prefilter=1.5**0.5, dilate=True)  # handover_sigma(1, full weighting)
    assert done == ["to_resolution(16, dilate, prefilter=1.22474)"]
    assert moved.config == want.config == cfg.model_config_for(2).replace(dilation=2)
    assert torch.equal(moved.units[0].K, coarse.units[0].K)
    x = torch.randn(2, 1, 16, 16)
    assert torch.allclose(moved(x), want(x), atol=0, rtol=0)
    # a hash that only a schedule using it sees
    plain = ScheduleConfig.model_validate(base | {"levels": [{"n": 8}, {"n": 16}]})
    dil = ScheduleConfig.model_validate(base | {"levels": [{"n": 8}, {"n": 16, "dilate": True}]})
    assert plain.config_hash() != dil.config_hash()
    with pytest.raises(ValueError, match=r"levels\.1\.dilate: choose dilate or naive"):
        ScheduleConfig.model_validate(base | {"levels": [{"n": 8}, {"n": 16, "dilate": True, "naive": True}]})
    with pytest.raises(ValueError, match=r"dilation 1 moved from n=16 to n=8 would space its taps 0\.5"):
        ScheduleConfig.model_validate(base | {"levels": [{"n": 16}, {"n": 8, "dilate": True}]})
    with pytest.raises(ValueError, match=r"levels\.1\.dilate: moves free stencils; model\.stencil 'gauss"):
        ScheduleConfig.model_validate(base | {"model": {"channels": 3, "classes": 4, "stencil": "gaussian"},
                                              "levels": [{"n": 8}, {"n": 16, "dilate": True}]})


def test_a_dilated_estimator_needs_a_network_whose_taps_reach_the_coarsest_grid():
    base = {"name": "e", "kind": "multiscale", "model": {"channels": 3, "classes": 4},
            "pyramid": {"name": "syn", "source": {"kind": "synthetic", "size": 16}, "levels": 3}}
    mge = {"name": "mge", "levels": 2, "batch_sizes": [96, 32], "move": "dilate"}
    ok = ScheduleConfig.model_validate(base | {"levels": [{"n": 8},
                                                          {"n": 16, "dilate": True, "estimator": mge}]})
    assert ok.levels[1].estimator.move == "dilate" and ok.model_config_for(1).dilation == 2
    with pytest.raises(ValueError, match=r"levels\.1\.estimator\.move: dilate needs [\s\S]*>= 4 pixels"):
        three = mge | {"levels": 3, "batch_sizes": [64, 32, 32]}
        ScheduleConfig.model_validate(base | {"levels": [{"n": 8},
                                                         {"n": 16, "dilate": True, "estimator": three}]})
    plain = {"levels": [{"n": 8}, {"n": 16, "estimator": mge | {"move": "galerkin"}}]}
    explicit = ScheduleConfig.model_validate(base | plain)
    implicit = ScheduleConfig.model_validate(base | {"levels": [{"n": 8}, {"n": 16, "estimator": {
        "name": "mge", "levels": 2, "batch_sizes": [96, 32]}}]})
    assert explicit.config_hash() == implicit.config_hash()  # the default move leaves hashes as they were


def test_scale_growth_and_the_neumann_pair_are_schedule_fields():
    """``model.stencil_scale_growth`` and ``model.pair: full-weighting-neumann`` reach every level's
    network and the hash; a schedule without them keeps its hash (checked above); a bad growth
    names the field."""
    path = CONFIGS[0].parent
    base = load_config(path / "mnist_multiscale_consistent.yaml", ScheduleConfig)
    new = load_config(path / "mnist_multiscale_consistent.yaml", ScheduleConfig,
                      {"model.stencil_scale_growth": 2.0, "model.pair": "full-weighting-neumann"})
    assert new.config_hash() != base.config_hash()
    for i in range(len(new.levels)):
        cfg = new.model_config_for(i)
        assert (cfg.stencil_scale_growth, cfg.boundary) == (2.0, "neumann")
    assert base.model_config_for(0).boundary == "zero"
    with pytest.raises(ValueError, match=r"stencil_scale_growth: must be >= 1, got 0\.5"):
        load_config(path / "mnist_multiscale_consistent.yaml", ScheduleConfig,
                    {"model.stencil_scale_growth": 0.5})
