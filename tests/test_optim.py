"""The paper's optimiser and regularisers (pure PyTorch)."""

import numpy as np
import pytest
import scipy.optimize
import torch
import torch.nn.functional as F

from mscnn.hierarchy import interpolate_in_time, to_depth, to_resolution
from mscnn.ode import ODENet
from mscnn.optim import BCD, newton_step
from mscnn.regularizers import network_regularizer, space_smoothness, time_smoothness


def _softmax_problem(seed=0, B=120, C=2, n=4, k=3):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(B, C, n, n, dtype=torch.float64, generator=g)
    W_true = torch.randn(k, C, n, n, dtype=torch.float64, generator=g) * 4
    y = (feats.flatten(1) @ W_true.flatten(1).T / n**2 + 0.5 * torch.randn(B, k, generator=g,
                                                                            dtype=torch.float64)).argmax(1)
    alpha = 1e-2

    def f(theta):
        W, mu = theta[: k * C * n * n].view(k, C, n, n), theta[k * C * n * n:]
        logits = torch.einsum("bchw,kchw->bk", feats, W) / n**2 + mu
        # + a small ridge: softmax is blind to adding one image to every class's W (and a constant
        # to every mu), so without it the optimum is not unique
        return F.cross_entropy(logits, y) + alpha * space_smoothness(W) + 1e-4 * theta.pow(2).sum()

    return f, k * C * n * n + k


def test_newton_reaches_the_lbfgs_optimum_with_quadratic_convergence():
    f, dim = _softmax_problem()
    theta = torch.zeros(dim, dtype=torch.float64)
    norms = []
    for _ in range(8):
        theta, info = newton_step(f, theta, cg_iters=200)
        norms.append(info["grad_norm"])

    def fun(v):
        t = torch.tensor(v, requires_grad=True)
        val = f(t)
        val.backward()
        return val.item(), t.grad.numpy().copy()

    ref = scipy.optimize.minimize(fun, np.zeros(dim), jac=True, method="L-BFGS-B",
                                  options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 5000})
    assert f(theta).item() == pytest.approx(ref.fun, abs=1e-10)
    np.testing.assert_allclose(theta.numpy(), ref.x, atol=1e-4)
    # quadratic convergence: once close, each step squares the gradient norm (up to a constant)
    # (above the round-off floor, about 1e-10 here)
    pairs = [(a, b) for a, b in zip(norms, norms[1:], strict=False) if 1e-8 < a < 1e-1]
    assert len(pairs) >= 2, norms
    for a, b in pairs:
        assert b < 10 * a**2, norms
    assert min(norms) < 1e-9


def test_gauss_newton_direction_is_a_descent_direction():
    torch.manual_seed(0)
    net = ODENet(channels=3, steps=2, n=8, classes=4).double()
    x = torch.randn(32, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 4, (32,))
    opt = BCD(net, alpha_time=1e-2, cg_iters=5)
    theta, g, d, objective = opt.gauss_newton_direction(x, y)
    assert (g @ d).item() < 0
    # a small step along d lowers the objective
    assert objective(theta + 1e-3 * d) < objective(theta)


def test_bcd_iterations_lower_the_objective():
    torch.manual_seed(1)
    net = ODENet(channels=3, steps=2, n=8, classes=3)
    x = torch.randn(64, 1, 8, 8)
    y = (x.mean(dim=(1, 2, 3)) > 0).long() + (x[:, 0, :4].mean(dim=(1, 2)) > 0).long()
    opt = BCD(net, newton_steps=3, cg_iters=5)
    before = F.cross_entropy(net(x), y).item()
    for _ in range(3):
        info = opt.step(x, y)
    after = F.cross_entropy(net(x), y).item()
    assert after < before and info["loss"] <= before + 1e-6


def test_regulariser_gradients_match_finite_differences():
    g = torch.Generator().manual_seed(3)
    theta = torch.randn(4, 2, 3, dtype=torch.float64, generator=g, requires_grad=True)
    W = torch.randn(2, 3, 6, 6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: time_smoothness(t, 2.0), (theta,))
    assert torch.autograd.gradcheck(space_smoothness, (W,))


def test_time_regulariser_is_invariant_under_to_depth_for_linear_parameters():
    torch.manual_seed(0)
    net = ODENet(channels=2, steps=2, n=8).double()
    with torch.no_grad():  # K(t) = A + t B, b(t) = c t, sampled at t_k = k T / N
        t = torch.arange(2, dtype=torch.float64) * (2.0 / 2)
        A, B = torch.randn(2, 2, 3, 3, dtype=torch.float64), torch.randn(2, 2, 3, 3, dtype=torch.float64)
        net.units[0].K.copy_(A + t.view(2, 1, 1, 1, 1) * B)
        net.units[0].b.copy_(t.view(2, 1) * torch.tensor([0.5, -1.0], dtype=torch.float64))
    r2 = network_regularizer(net, alpha_time=1.0)
    want = 2.0 * (B.pow(2).sum() + 1.25)  # T * |theta'|^2
    assert r2.item() == pytest.approx(want.item(), rel=1e-12)
    for N in (4, 8, 16):
        assert network_regularizer(to_depth(net, N), alpha_time=1.0).item() == pytest.approx(
            want.item(), rel=1e-12)
    # a curved function of time is not linear: its value changes with N (the test can fail)
    curved = torch.tensor([0.0, 1.0, 3.0, 0.0], dtype=torch.float64)
    assert time_smoothness(curved, 1.0) != pytest.approx(
        time_smoothness(interpolate_in_time(curved, 8), 1.0).item())


def test_space_regulariser_is_consistent_across_grids():
    """The same smooth w on a coarse and a fine grid gives nearly the same value (O(h))."""
    def sample(n):
        x = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        return torch.sin(torch.pi * x).view(1, n) * torch.cos(torch.pi * x).view(n, 1)

    exact = torch.pi**2 / 2  # int |grad (sin(pi x) cos(pi y))|^2 over the unit square
    errs = [abs(space_smoothness(sample(n)).item() - exact) for n in (16, 32, 64)]
    assert errs[1] < 0.6 * errs[0] and errs[2] < 0.6 * errs[1]
    # the classifier's W moves as a field: a smooth W sampled at 16 on the vertex grid (x_i = i h,
    # zero beyond the last pixel), prolonged to 32, equals the same W sampled at 32 to O(h^2), and
    # its smoothness energy within 2% of the sampled field's (both O(h) below the exact value)
    def vertex(n):
        x = torch.arange(n, dtype=torch.float64) / n
        return torch.sin(torch.pi * x).view(1, n) * torch.sin(torch.pi * x).view(n, 1)

    net = ODENet(channels=1, n=16, classes=1)
    with torch.no_grad():
        net.classifier.W.copy_(vertex(16).view(1, 1, 16, 16).to(net.classifier.W.dtype))
    W32 = to_resolution(net, 32).classifier.W.double()[0, 0]
    assert (W32 - vertex(32)).abs().max().item() < 0.01
    assert space_smoothness(W32).item() == pytest.approx(space_smoothness(vertex(32)).item(), rel=0.02)
