"""Multilevel gradient estimation (mscnn.mge): what it computes, its cost, and that it is unbiased."""

import math

import pytest
import torch
import torch.nn.functional as F

from mscnn.data import Split, coarsen
from mscnn.hierarchy import to_resolution
from mscnn.mge import MultilevelStep, mge_loss, variance_ratio
from mscnn.multires import MultiResolutionForward
from mscnn.ode import ODENet


def _data(count=64, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(count, 1, n, n)
    y = torch.randint(0, 3, (count,), generator=g)
    for i in range(count):  # a bar whose orientation is the class, plus noise
        c = int(y[i])
        if c == 0:
            x[i, 0, n // 2 - 1 : n // 2 + 1, 2:-2] = 1
        elif c == 1:
            x[i, 0, 2:-2, n // 2 - 1 : n // 2 + 1] = 1
        else:
            x[i, 0, 4:-4, 4:-4] = 1
    return Split(x + 0.3 * torch.randn(x.shape, generator=g), y)


def _net(stencil="gaussian"):
    torch.manual_seed(0)
    return ODENet(channels=3, steps=1, n=16, classes=3, stencil=stencil, stencil_scale=0.1)


def _grad(net, loss):
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(net.parameters()))])


def test_mge_gradient_is_the_telescoping_sum_on_independent_sample_sets():
    net, d = _net(), _data()
    fwd = MultiResolutionForward(net, [8, 16])
    loss, info = mge_loss(fwd, d.x[:12], d.y[:12], [8, 16], [8, 4])
    x8 = coarsen(Split(d.x[:12], d.y[:12]), 1, 1.0).x
    want = (F.cross_entropy(fwd(x8[:8]), d.y[:8]) + F.cross_entropy(fwd(d.x[8:12]), d.y[8:12])
            - F.cross_entropy(fwd(x8[8:12]), d.y[8:12]))
    torch.testing.assert_close(_grad(net, loss), _grad(net, want))
    assert info["pixels"] == 8 * 8**2 + 4 * (16**2 + 8**2)


def test_mge_is_unbiased_for_the_full_batch_fine_gradient():
    """The mean of many ``mge_loss`` gradients over random disjoint sample sets (40 images for the
    coarse term, 8 for the correction, drawn afresh each time) approaches the full-batch gradient at
    the fine grid: within 4 standard errors on nearly every component, and within 10% in norm."""
    net, d = _net(), _data(count=48)
    fwd = MultiResolutionForward(net, [8, 16])
    full = _grad(net, F.cross_entropy(fwd(d.x), d.y))
    g = torch.Generator().manual_seed(1)
    draws = []
    for _ in range(300):
        perm = torch.randperm(48, generator=g)
        loss, _ = mge_loss(fwd, d.x[perm], d.y[perm], [8, 16], [40, 8])
        draws.append(_grad(net, loss))
    draws = torch.stack(draws)
    mean, se = draws.mean(0), draws.std(0) / len(draws) ** 0.5
    assert ((mean - full).abs() <= 4 * se + 1e-7).float().mean() > 0.97
    assert (mean - full).norm() / full.norm() < 0.1


def test_multilevel_step_trains_and_counts_pixels():
    net, d = _net(), _data(count=96)
    step = MultilevelStep(net, torch.optim.Adam(net.parameters(), 2e-2), [8, 16], [24, 8])
    fwd = MultiResolutionForward(net, [16])
    before = F.cross_entropy(fwd(d.x), d.y).item()
    for i in range(30):
        idx = torch.arange(32) + 32 * (i % 3)
        step(d.x[idx], d.y[idx])
    assert F.cross_entropy(fwd(d.x), d.y).item() < 0.7 * before
    assert step.pixels == 30 * (24 * 64 + 8 * (256 + 64))
    with pytest.raises(ValueError, match=r"sizes \[4, 16\] must double"):
        MultilevelStep(net, torch.optim.Adam(net.parameters()), [4, 16], [8, 8])(d.x[:16], d.y[:16])


def test_consistent_stencils_make_the_coarse_gradient_a_better_control_variate():
    """rho = Var[g_f - g_c] / Var[g_f] for the same network with free stencils moved naively and
    with Gaussian-derivative stencils re-discretised: the consistent levels agree better."""
    d = _data(count=128, seed=3)
    rho_free = variance_ratio(_net("free"), d, 16, 8, move="naive")
    rho_gauss = variance_ratio(_net("gaussian"), d, 16, 8)
    assert rho_gauss < rho_free and rho_gauss < 0.5, (rho_gauss, rho_free)


def test_a_network_carrying_an_input_blur_loses_it_on_the_coarse_grids():
    """After a prefiltered handover the fine network blurs its input by the pyramid's sigma; the
    coarse samples of MGE are already blurred and restricted, so the coarse copy must not blur."""
    torch.manual_seed(0)
    net = ODENet(channels=2, steps=1, n=16, classes=3, input_blur=1 / 16)
    step = MultilevelStep(net, torch.optim.SGD(net.parameters(), 0.1), [8, 16], [4, 4], sigma=1.0)
    assert step.forward.templates[16].config.input_blur == pytest.approx(1 / 16)
    assert step.forward.templates[8].config.input_blur == 0.0
    x = torch.randn(3, 1, 8, 8)
    plain = to_resolution(net, 8, naive=False, prefilter=1.0)
    torch.testing.assert_close(step.forward(x), plain(x), rtol=1e-5, atol=1e-6)


def test_with_the_dilating_move_levels_that_agree_exactly_give_the_fine_gradient():
    """A fine network with its taps 2 pixels apart (``dilation=2``), on images constant on 2x2
    blocks, with the ``average`` pair and no blur: moved down by ``dilate`` it computes exactly
    what it computes at the fine grid, so every MGE correction vanishes, the estimate is the fine
    gradient of the coarse sample set, and rho is 0. The Galerkin move of an undilated network
    does not agree (rho well above 0)."""
    torch.manual_seed(0)
    net = ODENet(channels=3, steps=1, n=16, classes=3, pair="average", dilation=2)
    d = _data(count=24, n=8, seed=2)
    x = d.x.repeat_interleave(2, -1).repeat_interleave(2, -2)  # 16x16, constant on 2x2 blocks
    fwd = MultiResolutionForward(net, [8, 16], dilate=True)
    torch.testing.assert_close(fwd(d.x), fwd(x), rtol=0, atol=1e-6)
    loss, _ = mge_loss(fwd, x, d.y, [8, 16], [16, 8], sigma=0.0, pair="average")
    fine = F.cross_entropy(fwd(x[:16]), d.y[:16])
    torch.testing.assert_close(_grad(net, loss), _grad(net, fine), rtol=0, atol=1e-6)
    blocks = Split(x, d.y)
    assert variance_ratio(net, blocks, 16, 8, batch_size=8, batches=4, move="dilate", sigma=0.0) < 1e-8
    plain = ODENet(channels=3, steps=1, n=16, classes=3, pair="average")
    assert variance_ratio(plain, blocks, 16, 8, batch_size=8, batches=4, move="galerkin", sigma=0.0) > 1e-2
    with pytest.raises(ValueError, match=r"mge: unknown move 'dilated'; valid: \['galerkin', 'naive'"):
        variance_ratio(net, blocks, 16, 8, move="dilated")


def test_make_step_hands_the_pyramids_blur_to_the_multilevel_step():
    """A schedule's MGE level makes its coarse samples as its pyramid made the levels: the sigma in
    ``make_step(mge=...)`` reaches the step (it was fixed at 1 px before session 12), and the step's
    first update equals one on ``mge_loss`` with that sigma."""
    from mscnn.train import make_step

    d = _data(count=32)
    nets = [_net(), _net()]
    nets[1].load_state_dict(nets[0].state_dict())
    step = make_step(nets[0], "sgd", 0.1, cosine=False,
                     mge={"sizes": [8, 16], "batch_sizes": [24, 8], "move": "galerkin", "sigma": 2.0})
    assert isinstance(step, MultilevelStep) and step.sigma == 2.0
    step(d.x, d.y)
    loss, _ = mge_loss(MultiResolutionForward(nets[1], [8, 16]), d.x, d.y, [8, 16], [24, 8], 2.0,
                       nets[1].config.pair)
    loss.backward()
    with torch.no_grad():
        for p in nets[1].parameters():
            p -= 0.1 * p.grad
    for a, b in zip(nets[0].parameters(), nets[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    one = make_step(_net(), "sgd", 0.1, cosine=False, mge={"sizes": [8, 16], "batch_sizes": [24, 8]})
    assert one.sigma == 1.0  # without one: the pipeline's default pyramid blur


def test_the_handovers_input_blur_comes_off_exactly_on_the_coarse_grids():
    """A level entered by a prefiltered handover of ``p`` px carries ``pyramid_blur(8, 16, p)``; its
    MGE step takes that blur off on the coarse grid (``prefilter``), not the pyramid's 1 px (which
    left ``sqrt(p^2 - 1)`` px on the coarse grid before session 13), while the coarse samples keep
    the pyramid's sigma."""
    from mscnn.hierarchy import handover_sigma, pyramid_blur
    from mscnn.train import make_step

    p = handover_sigma(1.0, "full-weighting")
    torch.manual_seed(0)
    net = ODENet(channels=3, steps=1, n=16, classes=3, input_blur=pyramid_blur(8, 16, p))
    opt = torch.optim.SGD(net.parameters(), 0.1)
    old = MultilevelStep(net, opt, [8, 16], [24, 8], sigma=1.0)
    assert old.forward.templates[8].config.input_blur == pytest.approx(math.sqrt(p**2 - 1) / 16, rel=1e-12)
    new = make_step(net, "sgd", 0.1, cosine=False,
                    mge={"sizes": [8, 16], "batch_sizes": [24, 8], "sigma": 1.0, "prefilter": p})
    assert new.sigma == 1.0 and new.prefilter == p
    assert new.forward.templates[8].config.input_blur == 0.0
    assert new.forward.templates[16].config.input_blur == pytest.approx(pyramid_blur(8, 16, p))
