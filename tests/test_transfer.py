import numpy as np
import pytest
import scipy.ndimage
import torch
import torch.nn.functional as F

import mscnn.transfer as tr
from mscnn.transfer import (
    gaussian_blur,
    prolong_image,
    prolong_stencil,
    restrict_image,
    restrict_stencil,
)
from tests import dense

PAIRS = ["full-weighting", "average"]


def _rng(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("pair", PAIRS)
def test_restrict_and_prolong_image_match_dense_operators(pair):
    n = 8
    x = torch.randn(3, n, n, dtype=torch.float64, generator=_rng())
    R = dense.restriction(n, pair)
    got = restrict_image(x, pair)
    want = (R @ x.reshape(3, -1).T).T.reshape(3, n // 2, n // 2)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)

    c = torch.randn(2, 4, 4, dtype=torch.float64, generator=_rng(1))
    P = dense.prolongation(4, pair)
    got = prolong_image(c, pair)
    want = (P @ c.reshape(2, -1).T).T.reshape(2, 8, 8)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-14)


@pytest.mark.parametrize("pair", PAIRS)
def test_dense_pairs_satisfy_P_equals_4_R_transpose(pair):
    torch.testing.assert_close(dense.prolongation(4, pair), 4 * dense.restriction(8, pair).T)


def test_average_pair_has_R_P_identity():
    x = torch.randn(1, 6, 6, dtype=torch.float64, generator=_rng())
    torch.testing.assert_close(restrict_image(prolong_image(x, "average"), "average"), x)


@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_galerkin_stencil_equals_R_K_P_on_periodic_grid(pair, seed):
    """On a periodic grid R K_h P is exactly the convolution with the Galerkin stencil everywhere."""
    n = 12
    s = torch.randn(3, 3, dtype=torch.float64, generator=_rng(seed))
    KH = dense.restriction(n, pair, periodic=True) @ dense.convolution(s, n, periodic=True)
    KH = KH @ dense.prolongation(n // 2, pair, periodic=True)
    want = dense.convolution(restrict_stencil(s, pair), n // 2, periodic=True)
    torch.testing.assert_close(KH, want, rtol=0, atol=1e-13)


@pytest.mark.parametrize("pair", PAIRS)
def test_galerkin_stencil_equals_R_K_P_in_the_interior_of_zero_padded_grid(pair):
    n = 16
    s = torch.randn(3, 3, dtype=torch.float64, generator=_rng(5))
    KH = dense.restriction(n, pair) @ dense.convolution(s, n) @ dense.prolongation(n // 2, pair)
    sH = restrict_stencil(s, pair)
    m = n // 2
    for i in range(1, m - 1):
        for j in range(1, m - 1):
            torch.testing.assert_close(dense.stencil_of(KH, m, i, j), sH, rtol=0, atol=1e-13)
            # nothing outside the 3x3 neighbourhood
            row = KH[i * m + j].reshape(m, m).clone()
            row[i - 1 : i + 2, j - 1 : j + 2] = 0
            assert row.abs().max() < 1e-14


def test_paper_example_1():
    s = torch.tensor([[-0.89, -2.03, 4.30], [-2.07, 0.00, -2.07], [4.39, -2.03, 1.28]])
    want = torch.tensor([[-0.48, -0.17, 0.82], [-0.15, -0.80, 0.37], [0.84, 0.40, 0.07]])
    assert (restrict_stencil(s) - want).abs().max() <= 0.01


def test_identity_stencil_under_each_pair():
    e = torch.zeros(3, 3, dtype=torch.float64)
    e[1, 1] = 1
    # average: identity stays identity (R P = I)
    torch.testing.assert_close(restrict_stencil(e, "average"), e)
    torch.testing.assert_close(prolong_stencil(e, "average"), e)
    # full weighting: R P has stencil [1/8, 3/4, 1/8] (x) itself; the exact prolongation of the
    # identity is a sharpening stencil with centre 4
    m = torch.tensor([1 / 8, 3 / 4, 1 / 8], dtype=torch.float64)
    torch.testing.assert_close(restrict_stencil(e), torch.outer(m, m))
    assert prolong_stencil(e)[1, 1].item() == pytest.approx(4.0)


@pytest.mark.parametrize("pair", PAIRS)
def test_prolong_is_the_exact_inverse_of_restrict(pair):
    s = torch.randn(5, 4, 3, 3, dtype=torch.float64, generator=_rng(3))
    torch.testing.assert_close(restrict_stencil(prolong_stencil(s, pair), pair), s)
    torch.testing.assert_close(prolong_stencil(restrict_stencil(s, pair), pair), s)


def test_galerkin_matrix_condition_number():
    G = tr.galerkin_matrix()
    assert torch.linalg.cond(G).item() == pytest.approx(26.85, abs=0.01)
    torch.testing.assert_close(G @ tr.galerkin_matrix(inverse=True), torch.eye(9, dtype=G.dtype))


@pytest.mark.parametrize("pair", PAIRS)
def test_transfer_identity_for_batched_conv_weights(pair):
    """conv2d(y_H, R s) == R conv2d(P y_H, s) away from the border, for a whole conv weight."""
    g = _rng(7)
    s = torch.randn(5, 3, 3, 3, dtype=torch.float64, generator=g)  # (out, in, 3, 3)
    yH = torch.randn(2, 3, 10, 10, dtype=torch.float64, generator=g)
    left = F.conv2d(yH, restrict_stencil(s, pair), padding=1)
    right = restrict_image(F.conv2d(prolong_image(yH, pair), s, padding=1), pair)
    torch.testing.assert_close(left[..., 2:-2, 2:-2], right[..., 2:-2, 2:-2], rtol=0, atol=1e-12)
    if pair == "full-weighting":  # linear P is not zero-boundary consistent: the border differs
        assert (left - right).abs().max() > 1e-3
    else:  # piecewise-constant P with zero outside: the identity holds up to the border
        torch.testing.assert_close(left, right, rtol=0, atol=1e-12)


def test_dtype_device_and_shape_are_kept():
    devices = ["cpu", "meta"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        for dt in (torch.float32, torch.float64):
            s = torch.randn(2, 3, 3, 3, dtype=dt, device=dev)
            for out in (restrict_stencil(s), prolong_stencil(s)):
                assert (out.dtype, out.device.type, out.shape) == (dt, torch.device(dev).type, s.shape)
            x = torch.randn(2, 3, 8, 8, dtype=dt, device=dev)
            for out, shape in ((restrict_image(x), (2, 3, 4, 4)), (prolong_image(x), (2, 3, 16, 16)),
                               (gaussian_blur(x, 1.0), (2, 3, 8, 8))):
                assert (out.dtype, out.device.type, tuple(out.shape)) == (dt, torch.device(dev).type, shape)


def test_nine_by_nine_map_is_formed_once_per_pair():
    tr._galerkin_9x9.cache_clear()
    for _ in range(5):
        for pair in PAIRS:
            restrict_stencil(torch.randn(3, 3), pair)
            prolong_stencil(torch.randn(2, 3, 3), pair)
    assert tr._galerkin_9x9.cache_info().misses == len(PAIRS)


def test_gradcheck_of_every_transfer():
    g = _rng(11)
    s = torch.randn(2, 3, 3, dtype=torch.float64, generator=g, requires_grad=True)
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, generator=g, requires_grad=True)
    for pair in PAIRS:
        assert torch.autograd.gradcheck(lambda t, p=pair: restrict_stencil(t, p), (s,))
        assert torch.autograd.gradcheck(lambda t, p=pair: prolong_stencil(t, p), (s,))
        assert torch.autograd.gradcheck(lambda t, p=pair: restrict_image(t, p), (x,))
        assert torch.autograd.gradcheck(lambda t, p=pair: prolong_image(t, p), (x,))
    assert torch.autograd.gradcheck(lambda t: gaussian_blur(t, 0.7), (x,))


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_gaussian_blur_matches_scipy(sigma):
    x = torch.randn(2, 16, 16, dtype=torch.float64, generator=_rng(2))
    want = [scipy.ndimage.gaussian_filter(a.numpy(), sigma, mode="nearest", truncate=3.0) for a in x]
    torch.testing.assert_close(gaussian_blur(x, sigma), torch.from_numpy(np.stack(want)))


def test_bad_shapes_and_names_raise_clear_errors():
    with pytest.raises(ValueError, match=r"odd.*\(1, 7, 7\)"):
        restrict_image(torch.zeros(1, 7, 7))
    with pytest.raises(ValueError, match=r"square.*\(1, 8, 6\)"):
        restrict_image(torch.zeros(1, 8, 6))
    with pytest.raises(ValueError, match=r"square.*\(2, 4, 8\)"):
        prolong_image(torch.zeros(2, 4, 8))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, 3\).*\(4, 5, 5\)"):
        restrict_stencil(torch.zeros(4, 5, 5))
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, 3\).*\(3,\)"):
        prolong_stencil(torch.zeros(3))
    with pytest.raises(ValueError, match=r"unknown transfer pair 'cubic'.*average"):
        restrict_image(torch.zeros(1, 4, 4), pair="cubic")
    with pytest.raises(ValueError, match="sigma"):
        gaussian_blur(torch.zeros(1, 4, 4), -1.0)


@pytest.mark.parametrize("pair", ["full-weighting", "average", "full-weighting-neumann"])
@pytest.mark.parametrize("sigma", [0.0, 0.6, 1.0, 2.5])
@pytest.mark.parametrize("n", [4, 8, 12])
def test_level_operator_is_the_pyramid_step_as_one_matrix(pair, sigma, n):
    """M x M^T equals restrict(blur(x)) in float64 on random multi-channel images (both separable),
    and M's rows are the dense 1D operator: a constant row is kept by the blur (replicate padding)
    and the interior restriction rows sum to 1."""
    from mscnn.transfer import level_operator

    x = torch.rand(3, 2, n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    M = level_operator(n, sigma, pair)
    assert M.shape == (n // 2, n) and M.dtype == torch.float64
    want = restrict_image(gaussian_blur(x, sigma), pair)
    torch.testing.assert_close(M @ x @ M.T, want, rtol=0, atol=1e-12)
    if pair != "full-weighting":  # the zero boundary's first row sums to 3/4
        torch.testing.assert_close(M.sum(1), torch.ones(n // 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="n must be even"):
        level_operator(n + 1, sigma, pair)


def test_neumann_pair_is_full_weighting_renormalised_at_the_border():
    """Dense reference: each row of the zero-boundary full-weighting R and P divided by its sum.
    Constants are kept on every grid (the zero boundary darkens the first ring by 3/4 and the last
    by 1/2), the interior is full weighting's, and so is the Galerkin stencil map."""
    n = 8
    x = torch.randn(3, n, n, dtype=torch.float64, generator=_rng())
    R1 = dense.restriction_1d(n, "full-weighting")
    R1 = R1 / R1.sum(1, keepdim=True)
    want = (torch.kron(R1, R1) @ x.reshape(3, -1).T).T.reshape(3, n // 2, n // 2)
    torch.testing.assert_close(restrict_image(x, "full-weighting-neumann"), want, rtol=0, atol=1e-14)
    c = torch.randn(2, 4, 4, dtype=torch.float64, generator=_rng(1))
    P1 = dense.prolongation_1d(4, "full-weighting")
    P1 = P1 / P1.sum(1, keepdim=True)
    want = (torch.kron(P1, P1) @ c.reshape(2, -1).T).T.reshape(2, 8, 8)
    torch.testing.assert_close(prolong_image(c, "full-weighting-neumann"), want, rtol=0, atol=1e-14)

    ones = torch.ones(1, n, n, dtype=torch.float64)
    torch.testing.assert_close(restrict_image(ones, "full-weighting-neumann"), ones[..., :4, :4])
    torch.testing.assert_close(prolong_image(ones[..., :4, :4], "full-weighting-neumann"), ones)
    zero_bc = restrict_image(ones, "full-weighting")
    assert zero_bc[0, 0, 0].item() == 0.5625 and zero_bc[0, 0, 1].item() == 0.75  # what it mends
    assert prolong_image(ones[..., :4, :4], "full-weighting")[0, -1, 2].item() == 0.5
    fw, nb = restrict_image(x, "full-weighting"), restrict_image(x, "full-weighting-neumann")
    torch.testing.assert_close(nb[..., 1:, 1:], fw[..., 1:, 1:], rtol=0, atol=0)
    torch.testing.assert_close(tr.galerkin_matrix("full-weighting-neumann"),
                               tr.galerkin_matrix("full-weighting"))
