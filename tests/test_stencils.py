"""Scale-consistent stencils (mscnn.stencils): convergence under refinement, exactness on
polynomials, resolution-free parameters, differentiability, clear errors."""

from pathlib import Path

import pytest
import torch
from torch.func import functional_call

from mscnn.hierarchy import resolution_state, to_resolution
from mscnn.ode import STENCILS, ODENet, ODENetConfig
from mscnn.stencils import stencil_conv

CONSISTENT = ["moment", "gaussian"]


def _grid(n):
    """Vertex grid on the unit square, x_i = i / n (x along the last axis)."""
    t = torch.arange(n, dtype=torch.float64) / n
    return t.view(1, n), t.view(n, 1)


def _apply(kind, theta, f, n, scale):
    x, y = _grid(n)
    field = f(x, y).expand(n, n).reshape(1, 1, n, n)
    return stencil_conv(field, theta.view(1, 1, 6), None, kind, scale)[0, 0]


@pytest.mark.parametrize("kind", CONSISTENT)
def test_refinement_converges_at_second_order(kind):
    """The same theta on grids 16, 32, 64, 128 applied to a smooth function: the differences at
    shared interior points shrink about 4x per halving of h."""
    theta = torch.tensor([0.3, -1.2, 0.7, 0.5, -0.8, 0.4], dtype=torch.float64)

    def f(x, y):
        return torch.sin(2 * torch.pi * x) * torch.cos(2 * torch.pi * y) + 0.5 * torch.cos(4 * torch.pi * x)

    ops = {n: _apply(kind, theta, f, n, 0.1) for n in (16, 32, 64, 128)}

    def at16(op, n):  # the 16-grid's interior points [0.3, 0.7] on grid n
        k = n // 16
        return op[::k, ::k][5:12, 5:12]

    errs = [(at16(ops[n], n) - at16(ops[2 * n], 2 * n)).abs().max().item() for n in (16, 32, 64)]
    ratios = [errs[0] / errs[1], errs[1] / errs[2]]
    assert all(3.0 < r < 5.5 for r in ratios), (errs, ratios)


@pytest.mark.parametrize("kind", CONSISTENT)
def test_constants_and_linear_functions_are_exact(kind):
    n, L = 64, 0.05  # gaussian: sigma 3.2 pixels, radius 13
    e = torch.eye(6, dtype=torch.float64)
    inner = (slice(16, 48), slice(16, 48))  # away from the zero border
    const = _apply(kind, e[0], lambda x, y: 0 * x + 0 * y + 2.5, n, L)
    torch.testing.assert_close(const[inner], torch.full((32, 32), 2.5, dtype=torch.float64))

    def lin(x, y):
        return 3 * x - 2 * y + 1

    dx, dy = _apply(kind, e[1], lin, n, L), _apply(kind, e[2], lin, n, L)
    torch.testing.assert_close(dx[inner], torch.full((32, 32), 3 * L, dtype=torch.float64))
    torch.testing.assert_close(dy[inner], torch.full((32, 32), -2 * L, dtype=torch.float64))
    for a in (3, 4, 5):  # second derivatives of a linear function vanish
        assert _apply(kind, e[a], lin, n, L)[inner].abs().max().item() < 1e-12


@pytest.mark.parametrize("kind", ["moment", "gaussian", "moment-blur"])
def test_to_resolution_keeps_the_continuous_parameters(kind):
    torch.manual_seed(0)
    net = ODENet(channels=[3, 4], steps=2, n=16, stencil=kind, pair="average")
    down = to_resolution(net, 8)
    for k, v in net.state_dict().items():
        if k != "classifier.W":
            assert torch.equal(down.state_dict()[k], v), k
    assert down.config == net.config.replace(n=8)
    # the round trip 16 -> 32 -> 16 is exact (R P = I for the average pair moves W back exactly)
    back = to_resolution(to_resolution(net, 32), 16)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(back.state_dict()[k], v, rtol=0, atol=1e-6)
    x = torch.randn(4, 1, 16, 16)
    torch.testing.assert_close(back(x), net(x), rtol=1e-5, atol=1e-5)


def test_resolution_state_is_differentiable():
    torch.manual_seed(0)
    net = ODENet(channels=2, steps=1, n=8, stencil="gaussian", classes=3).double()
    x = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    template = ODENet(resolution_state(net, 16)[0]).double()
    names = [k for k, _ in net.named_parameters()]

    def logits(*params):
        _, state = resolution_state(net, 16, state=dict(zip(names, params, strict=True)))
        return functional_call(template, state, (x,))

    params = tuple(p.detach().clone().requires_grad_() for p in net.parameters())
    assert torch.autograd.gradcheck(logits, params, eps=1e-6, atol=1e-5)


def test_unknown_kind_names_the_valid_ones():
    assert STENCILS == ("free", "moment", "gaussian", "moment-blur")
    with pytest.raises(ValueError, match=r"stencil: unknown stencil kind 'njet'; valid: \['free'"):
        ODENetConfig(stencil="njet")
    with pytest.raises(ValueError, match=r"stencil_scale: must be > 0"):
        ODENetConfig(stencil="gaussian", stencil_scale=0.0)


def test_free_stencils_are_unchanged_and_consistent_kinds_are_no_costlier_in_parameters():
    free, moment = ODENet(channels=4, n=8), ODENet(channels=4, n=8, stencil="moment")
    assert free.units[0].K.shape == (2, 4, 4, 3, 3) and moment.units[0].K.shape == (2, 4, 4, 6)
    assert sum(p.numel() for p in moment.parameters()) < sum(p.numel() for p in free.parameters())


@pytest.mark.parametrize("kind", ["moment", "gaussian", "moment-blur"])
def test_stencil_length_only_renormalises_the_coefficients(kind):
    """``theta_a L^|a|`` is what acts: a network with ``stencil_length`` L equals the network with
    the default (L = stencil_scale s) whose coefficients are ``theta_a (L / s)^|a|``, on its own grid
    and moved to a finer and a coarser one."""
    from mscnn.stencils import ORDERS

    torch.manual_seed(0)
    s, L = 0.05, 0.14
    long = ODENet(channels=[3, 4], steps=2, n=16, stencil=kind, stencil_scale=s, stencil_length=L).double()
    plain = ODENet(long.config.replace(stencil_length=None)).double()
    factor = torch.tensor([(L / s) ** k for k in ORDERS], dtype=torch.float64)
    # the derivative coefficients: the opening's (out, in, 6) and the units' (N, C, C, 6)
    state = {k: v * factor if v.dim() >= 3 and v.shape[-1] == 6 else v for k, v in long.state_dict().items()}
    plain.load_state_dict(state)
    assert long.opening.length == long.units[1].length == L and plain.units[0].length == s
    for n in (16, 32, 8):
        a, b = to_resolution(long, n), to_resolution(plain, n)
        assert a.config.stencil_length == L and b.config.stencil_length is None
        x = torch.randn(3, 1, n, n, dtype=torch.float64)
        torch.testing.assert_close(a(x), b(x), rtol=1e-12, atol=1e-12)
        same_theta = ODENet(a.config.replace(stencil_length=None)).double()
        same_theta.load_state_dict(a.state_dict())
        assert (same_theta(x) - a(x)).abs().max() > 1e-3  # the same theta with another L: another network
    with pytest.raises(ValueError, match=r"stencil_length: must be > 0 \(or null\), got 0\.0"):
        ODENetConfig(stencil="moment", stencil_length=0.0)


def test_stencil_length_travels_in_checkpoints(tmp_path):
    from mscnn.checkpoint import load_checkpoint, save_checkpoint

    net = ODENet(channels=3, steps=1, n=8, stencil="gaussian", stencil_length=0.14)
    save_checkpoint(tmp_path / "m", net, {})
    back, _ = load_checkpoint(tmp_path / "m")
    assert back.config.stencil_length == 0.14 and back.units[0].length == 0.14
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(back(x), net(x), rtol=0, atol=0)


@pytest.mark.parametrize("n,sigma", [(14, 0.05), (28, 0.05), (7, 0.05), (7, 0.45)])
def test_neumann_blur_and_differences_match_a_mirrored_reference(n, sigma):
    """``boundary="neumann"``: the blur is the sampled Gaussian correlated with the half-sample
    mirrored image (scipy's ``reflect``, also where the taps are wider than the image: 0.45 x 7
    is 3.2 px, radius 13), then the difference kernel on the field with its border repeated; a
    constant image gives theta_0 times it at every pixel, the border included, on every grid
    (zero padding does not: checked too)."""
    import numpy as np
    import scipy.ndimage

    from mscnn.stencils import blur, derivative_stencils, gaussian_taps

    g = torch.Generator().manual_seed(n)
    y = torch.randn(2, 3, n, n, dtype=torch.float64, generator=g)
    taps = gaussian_taps(sigma * n).numpy()
    ref = scipy.ndimage.correlate1d(y.numpy(), taps, axis=-1, mode="reflect")
    ref = scipy.ndimage.correlate1d(ref, taps, axis=-2, mode="reflect")
    torch.testing.assert_close(blur(y, sigma, "neumann"), torch.from_numpy(ref), rtol=0, atol=1e-12)

    theta = torch.randn(4, 3, 6, dtype=torch.float64, generator=g)
    kernel = torch.einsum("oia,apq->oipq", theta, derivative_stencils(1 / n, 0.14)).numpy()
    want = np.zeros((2, 4, n, n))
    for o in range(4):
        for i in range(3):
            want[:, o] += scipy.ndimage.correlate(ref[:, i], kernel[o, i][None], mode="nearest")
    got = stencil_conv(y, theta, None, "gaussian", sigma, length=0.14, boundary="neumann")
    torch.testing.assert_close(got, torch.from_numpy(want), rtol=0, atol=1e-11)

    const = torch.full((1, 3, n, n), 2.0, dtype=torch.float64)
    for kind in CONSISTENT:
        out = stencil_conv(const, theta, None, kind, sigma, length=0.14, boundary="neumann")
        torch.testing.assert_close(out, 2.0 * theta[..., 0].sum(1).view(1, 4, 1, 1).expand(1, 4, n, n))
        zero = stencil_conv(const, theta, None, kind, sigma, length=0.14)
        assert (zero - out)[..., 0, :].abs().max() > 0.1  # the zero border is an edge


def test_network_boundary_and_scale_growth():
    """The pair sets the boundary of every consistent layer and of the prefilter; unit u's sigma is
    ``stencil_scale * growth**u``; both travel in checkpoints, and a constant image's features are
    constant on every grid with the Neumann pair."""
    from mscnn.checkpoint import load_checkpoint

    net = ODENet(channels=[3, 4, 5], steps=1, n=16, stencil="gaussian", stencil_scale=0.05,
                 stencil_scale_growth=2.0, pair="full-weighting-neumann", input_blur=0.04)
    assert [u.scale for u in net.units] == [0.05, 0.1, 0.2] and net.opening.scale == 0.05
    assert {u.boundary for u in net.units} == {net.opening.boundary} == {"neumann"}
    assert ODENet(channels=2, steps=1, n=8, stencil="gaussian").units[0].boundary == "zero"
    assert "stencil_scale_growth" not in ODENetConfig().to_dict()  # old model.json unchanged
    d = net.config.to_dict()
    assert d["stencil_scale_growth"] == 2.0 and ODENetConfig.from_dict(d) == net.config
    with pytest.raises(ValueError, match=r"stencil_scale_growth: must be >= 1, got 0.5"):
        ODENetConfig(stencil_scale_growth=0.5)
    with torch.no_grad():
        for n in (16, 32, 64):
            moved = to_resolution(net, n)
            feats = moved.features(torch.full((1, 1, n, n), 0.7))
            assert (feats - feats[..., :1, :1]).abs().max() < 1e-5, n
    import tempfile

    from mscnn.checkpoint import save_checkpoint
    with tempfile.TemporaryDirectory() as d:
        save_checkpoint(Path(d) / "m", net, {})
        back, _ = load_checkpoint(Path(d) / "m")
    assert [u.scale for u in back.units] == [0.05, 0.1, 0.2] and back.config.boundary == "neumann"
