"""Issue 9: regularised prolongation, partial transfer, multi-resolution training, recalibration."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mscnn.data import Split
from mscnn.hierarchy import resolution_state, to_resolution
from mscnn.multires import fit_multiresolution
from mscnn.ode import ODENet
from mscnn.recalibrate import recalibrate_batchnorm, refit_classifier
from mscnn.regularizers import stencil_smoothness
from mscnn.transfer import (
    galerkin_matrix,
    high_frequency_matrix,
    prolong_image,
    prolong_stencil,
    restrict_image,
)


def test_high_frequency_matrix_against_quadrature_of_the_symbol():
    m = 400  # midpoint rule on [-pi, pi]^2, the high part outside [-pi/2, pi/2]^2
    w = (np.arange(m) + 0.5) / m * 2 * np.pi - np.pi
    W1, W2 = np.meshgrid(w, w, indexing="ij")
    hi = (np.abs(W1) > np.pi / 2) | (np.abs(W2) > np.pi / 2)
    rng = np.random.default_rng(0)
    Q = high_frequency_matrix().numpy()
    for _ in range(3):
        s = rng.standard_normal((3, 3))
        symbol = sum(s[a + 1, b + 1] * np.exp(1j * (a * W1 + b * W2)) for a in (-1, 0, 1)
                     for b in (-1, 0, 1))
        want = np.mean(np.abs(symbol[hi]) ** 2)
        assert s.ravel() @ Q @ s.ravel() == pytest.approx(want, rel=1e-4)
    assert np.linalg.eigvalsh(Q).min() > 0.05  # positive definite: every stencil has HF energy
    # the checkerboard stencil lives only on high frequencies: energy 4/3 of its total power
    chk = np.array([[1, -1, 1], [-1, 1, -1], [1, -1, 1]], float) / 3
    assert chk.ravel() @ Q @ chk.ravel() > 4 * (np.ones(9) / 9) @ Q @ (np.ones(9) / 9)


@pytest.mark.parametrize("lam", [0.1, 1.0, 10.0])
def test_regularised_prolongation_solves_the_least_squares_problem(lam):
    G, Q = galerkin_matrix(), high_frequency_matrix()
    L = torch.linalg.cholesky(Q)  # lam s^T Q s = |sqrt(lam) L^T s|^2
    s_H = torch.randn(5, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    A = torch.cat([G, math.sqrt(lam) * L.T])
    b = torch.cat([s_H.reshape(5, 9).T, torch.zeros(9, 5, dtype=torch.float64)])
    want = torch.linalg.lstsq(A, b).solution.T.reshape(5, 3, 3)
    got = prolong_stencil(s_H, lam=lam)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    # more regularisation: less high-frequency energy, larger Galerkin residual
    exact = prolong_stencil(s_H)
    assert stencil_smoothness(got) < stencil_smoothness(exact)
    gs = prolong_stencil(s_H, lam=lam * 10)
    assert stencil_smoothness(gs) < stencil_smoothness(got)
    with pytest.raises(ValueError, match="lam"):
        prolong_stencil(s_H, lam=-1.0)


def _net(**kw):
    torch.manual_seed(0)
    return ODENet(**kw).double()


def test_partial_transfer_moves_only_the_named_groups():
    net = _net(channels=[2, 3], steps=2, n=16)
    up = to_resolution(net, 32, galerkin=["units"], lam=0.5)
    torch.testing.assert_close(up.opening.weight, net.opening.weight, rtol=0, atol=0)
    for u, v in zip(up.units, net.units, strict=True):
        torch.testing.assert_close(u.K, prolong_stencil(v.K, lam=0.5), rtol=0, atol=0)
    torch.testing.assert_close(up.connectives[0].conv.weight, net.connectives[0].conv.weight)
    torch.testing.assert_close(up.classifier.W, prolong_image(net.classifier.W))
    down = to_resolution(net, 8, galerkin=["opening"])
    torch.testing.assert_close(down.units[1].K, net.units[1].K, rtol=0, atol=0)
    assert not torch.equal(down.opening.weight, net.opening.weight)
    with pytest.raises(ValueError, match="connective"):
        to_resolution(net, 32, galerkin=["connectives"])


def test_multiresolution_gradient_reaches_the_coarse_parameters_through_the_adjoints():
    """One SGD step on a 16x16 batch, parameters at 8x8: the update of each coarse stencil is
    -lr G^{-T} g_h and of W is -lr P^T g_W, with g the gradient of the prolonged network
    (an ordinary module, ordinary autograd)."""
    coarse = _net(channels=2, steps=1, n=8)
    x = torch.randn(6, 1, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    fine = to_resolution(coarse, 16)
    F.cross_entropy(fine(x), y).backward()
    before = {k: v.detach().clone() for k, v in coarse.named_parameters()}
    lr = 0.5
    fit_multiresolution(coarse, {16: Split(x, y)}, epochs=1, lr=lr, batch_size=6, optimizer="sgd",
                        cosine=False)
    Ginv = galerkin_matrix(inverse=True)
    gK = fine.units[0].K.grad.reshape(-1, 9) @ Ginv  # G^{-T} g, row-wise
    torch.testing.assert_close(coarse.units[0].K - before["units.0.K"],
                               -lr * gK.reshape(coarse.units[0].K.shape), rtol=1e-9, atol=1e-12)
    gW = 4 * restrict_image(fine.classifier.W.grad)  # P = 4 R^T, so P^T g = 4 R g
    torch.testing.assert_close(coarse.classifier.W - before["classifier.W"], -lr * gW,
                               rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(coarse.units[0].b - before["units.0.b"], -lr * fine.units[0].b.grad)


def test_resolution_state_is_differentiable_and_matches_to_resolution():
    net = _net(channels=2, steps=2, n=8)
    cfg, state = resolution_state(net, 16, lam=0.3)
    assert cfg.n == 16 and state["units.0.K"].requires_grad
    moved = to_resolution(net, 16, lam=0.3)
    for k, v in moved.state_dict().items():
        torch.testing.assert_close(state[k].detach(), v, rtol=0, atol=0)


def test_multiresolution_training_fits_two_resolutions_with_one_set_of_parameters():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 2, (256,), generator=g)
    x = torch.randn(256, 1, 16, 16, generator=g) * 0.3
    x[:, :, :8] += (2 * y - 1).float().view(-1, 1, 1, 1)  # the class is the sign of the top half
    levels = {16: Split(x, y), 8: Split(restrict_image(x), y)}
    torch.manual_seed(0)
    net = ODENet(channels=2, steps=1, n=8, classes=2)
    hist = fit_multiresolution(net, levels, epochs=4, lr=5e-2, batch_size=32, seed=0)
    assert hist[-1]["loss"] < 0.2 < hist[0]["loss"]
    assert sum(hist[0]["batches"].values()) == 8 and min(hist[0]["batches"].values()) > 0
    from mscnn.train import accuracy
    assert accuracy(net, levels[8]) > 0.95 and accuracy(to_resolution(net, 16), levels[16]) > 0.95
    with pytest.raises(ValueError, match="level 8 holds images of shape"):
        fit_multiresolution(net, {8: Split(x, y)})


def test_refit_classifier_changes_only_the_classifier():
    net = _net(channels=2, steps=1, n=8).float()
    x = torch.randn(64, 1, 8, 8)
    y = torch.randint(0, 10, (64,))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    losses = refit_classifier(net, Split(x, y), steps=200, lr=0.2, batch_size=64)
    after = net.state_dict()
    for k in before:
        assert torch.equal(before[k], after[k]) == (not k.startswith("classifier.")), k
    assert losses[-1] < 0.5 * losses[0]
    assert all(p.requires_grad for p in net.parameters())


def test_recalibrate_batchnorm_gives_the_exact_mean_over_the_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU())
    model.eval()
    xs = [torch.randn(16, 1, 6, 6) + i for i in range(4)]
    assert recalibrate_batchnorm(model, xs) == 4
    with torch.no_grad():
        feats = [model[0](x) for x in xs]
    want_mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    want_var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in feats]).mean(0)
    bn = model[1]
    torch.testing.assert_close(bn.running_mean, want_mean)
    torch.testing.assert_close(bn.running_var, want_var)
    assert bn.momentum == 0.1 and not model.training
    with pytest.raises(ValueError, match="no batch-norm"):
        recalibrate_batchnorm(nn.Linear(2, 2), xs)


def test_evaluation_rows_move_free_networks_by_dilation_both_ways():
    from mscnn.transfer import pyramid_step
    from pipelines.evaluate import transfer_rows

    torch.manual_seed(0)
    coarse = ODENet(channels=2, steps=1, n=8, classes=3)
    fine = to_resolution(coarse, 16, dilate=True, prefilter=1.0)  # a dilated fine network
    x, y = torch.rand(64, 1, 16, 16), torch.randint(0, 3, (64,))
    fine_eval, coarse_eval = Split(x, y), Split(pyramid_step(x, 1.0), y)
    rows = {(r["direction"], r["method"]): r["accuracy"]
            for r in transfer_rows(fine, coarse, fine_eval, coarse_eval, "full-weighting", 1.0)}
    # moved back down, the dilated network is the coarse one again: the same accuracy exactly
    assert rows[("fine->coarse", "dilate-prefilter")] == rows[("coarse", "native")]
    # and moved up, the coarse network is the fine one
    assert rows[("coarse->fine", "dilate-prefilter")] == rows[("fine", "native")]
    assert ("coarse->fine", "dilate") in rows


def test_evaluation_rows_with_the_prefilter_chosen_on_validation():
    from mscnn.hierarchy import PREFILTER_FACTORS, choose_prefilter
    from mscnn.train import accuracy
    from mscnn.transfer import pyramid_step
    from pipelines.evaluate import transfer_rows

    torch.manual_seed(0)
    coarse = ODENet(channels=2, steps=1, n=8, classes=3, stencil="gaussian")
    fine = ODENet(channels=2, steps=1, n=16, classes=3, stencil="gaussian")
    x, y = torch.rand(64, 1, 16, 16), torch.randint(0, 3, (64,))
    xv, yv = torch.rand(48, 1, 16, 16), torch.randint(0, 3, (48,))
    fine_eval, coarse_eval, val = Split(x, y), Split(pyramid_step(x, 1.0), y), Split(xv, yv)
    rows = transfer_rows(fine, coarse, fine_eval, coarse_eval, "full-weighting", 1.2, choose_on=val)
    (row,) = [r for r in rows if r["method"] == "consistent-prefilter-chosen"]
    best, _ = choose_prefilter(coarse, 16, val, [f * 1.2 for f in PREFILTER_FACTORS])
    assert row["sigma"] == best and row["direction"] == "coarse->fine"
    assert row["accuracy"] == accuracy(to_resolution(coarse, 16, prefilter=best), fine_eval)
    # without validation images there is nothing to choose on: no such rows
    assert not any(r["method"].endswith("-chosen")
                   for r in transfer_rows(fine, coarse, fine_eval, coarse_eval, "full-weighting", 1.2))
