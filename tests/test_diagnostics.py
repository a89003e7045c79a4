"""What a move across resolution does to a network (mscnn.diagnostics) and the prefiltered move
(ODENetConfig.input_blur, to_resolution(prefilter=...)): exact values on small grids."""

import math

import pytest
import torch

from mscnn.diagnostics import cfl_steps, operator_norm, state_rms, step_norms
from mscnn.hierarchy import pyramid_blur, to_resolution
from mscnn.ode import ODENet, activation
from mscnn.stencils import blur


@pytest.mark.parametrize("n", [5, 8])
def test_operator_norm_of_the_laplacian_is_its_largest_dirichlet_eigenvalue(n):
    lap = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3)
    assert operator_norm(lap, n, iters=300) == pytest.approx(4 + 4 * math.cos(math.pi / (n + 1)), rel=1e-6)


def test_operator_norm_of_a_moment_stencil_scales_with_the_grid():
    """theta = d_xx only: the stencil is (L/h)^2 [1, -2, 1] along x, norm (L/h)^2 (2 + 2 cos(pi/(n+1)))."""
    theta = torch.zeros(1, 1, 6)
    theta[0, 0, 3] = 1.0
    for n in (8, 16):
        want = (0.1 * n) ** 2 * (2 + 2 * math.cos(math.pi / (n + 1)))
        assert operator_norm(theta, n, "moment", 0.1, iters=400) == pytest.approx(want, rel=1e-5)


def test_step_norms_and_the_cfl_rule():
    torch.manual_seed(0)
    ref = ODENet(channels=3, steps=2, n=8, T=2.0)
    fast = ODENet(ref.config)
    fast.load_state_dict(ref.state_dict())
    with torch.no_grad():
        fast.units[0].K.mul_(3.0)  # three times the operator norm in every step
    a, b = step_norms(ref)[0], step_norms(fast)[0]
    assert len(a) == 2 and b == pytest.approx([3 * v for v in a], rel=1e-6)
    assert a[0] == pytest.approx(1.0 * operator_norm(ref.units[0].K[0], 8), rel=1e-9)  # dt = T / N = 1
    assert cfl_steps(fast, ref) == [6]
    assert cfl_steps(ref, fast) == [2]  # the rule never removes steps


def test_state_rms_follows_the_forward_pass():
    torch.manual_seed(1)
    net = ODENet(channels=4, steps=3, n=8).eval()
    x = torch.randn(5, 1, 8, 8)
    rms = state_rms(net, x)
    assert len(rms) == 1 + 3
    first = activation("tanh")(net.opening(x))
    assert rms[0] == pytest.approx(first.pow(2).mean().sqrt().item(), rel=1e-6)
    assert rms[-1] == pytest.approx(net.features(x).pow(2).mean().sqrt().item(), rel=1e-6)


def test_pyramid_blur_adds_each_levels_gaussian_in_quadrature():
    assert pyramid_blur(14, 28) == pytest.approx(1 / 28)
    assert pyramid_blur(28, 14, 2.0) == pytest.approx(2 / 28)
    assert pyramid_blur(7, 28) == pytest.approx(math.sqrt(1 / 28**2 + 1 / 14**2))
    assert pyramid_blur(28, 28) == 0.0


def test_input_blur_is_a_blur_before_the_network():
    torch.manual_seed(2)
    plain = ODENet(channels=2, steps=1, n=16)
    blurred = ODENet(plain.config.replace(input_blur=0.1))
    blurred.load_state_dict(plain.state_dict())
    x = torch.randn(3, 1, 16, 16)
    torch.testing.assert_close(blurred(x), plain(blur(x, 0.1)), rtol=0, atol=0)
    assert not torch.allclose(blurred(x), plain(x))
    with pytest.raises(ValueError, match="input_blur"):
        plain.config.replace(input_blur=-1.0)


@pytest.mark.parametrize("stencil", ["free", "gaussian"])
def test_a_prefiltered_move_adds_the_pyramids_blur_and_takes_it_off_again(stencil):
    torch.manual_seed(3)
    coarse = ODENet(channels=2, steps=1, n=14, stencil=stencil)
    up = to_resolution(coarse, 28, naive=True, prefilter=1.0)
    assert up.config.input_blur == pytest.approx(1 / 28)
    assert to_resolution(coarse, 28, naive=True).config.input_blur == 0.0
    back = to_resolution(up, 14, naive=True, prefilter=1.0)
    assert back.config == coarse.config
    two = to_resolution(ODENet(channels=2, steps=1, n=7, stencil=stencil), 28, naive=True, prefilter=1.0)
    assert two.config.input_blur == pytest.approx(math.sqrt(1 / 28**2 + 1 / 14**2))
    # the moved network is the unfiltered move applied to the blurred input
    x = torch.randn(2, 1, 28, 28)
    plain = to_resolution(coarse, 28, naive=True)
    torch.testing.assert_close(up(x), plain(blur(x, 1 / 28)), rtol=0, atol=0)
