import pytest
import torch
import torch.nn.functional as F

from mscnn.ode import EulerUnit, ODENet, ODENetConfig


def test_shapes_of_a_multi_unit_network():
    net = ODENet(in_channels=3, channels=[4, 8], steps=[2, 3], T=1.0, n=16, classes=5)
    assert net.units[0].K.shape == (2, 4, 4, 3, 3) and net.units[1].b.shape == (3, 8)
    assert net.classifier.W.shape == (5, 8, 8, 8)
    assert net.config.n_out == 8 and net.h == 1 / 16
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 5)
    assert net.features(torch.randn(2, 3, 16, 16)).shape == (2, 8, 8, 8)


def test_pool_classifier_network():
    net = ODENet(channels=4, n=8, classifier="pool")
    assert net(torch.randn(3, 1, 8, 8)).shape == (3, 10)


def test_quadrature_classifier_is_h2_inner_product():
    net = ODENet(channels=2, steps=1, n=4, classes=3)
    y = torch.randn(5, 2, 4, 4)
    want = torch.einsum("bchw,kchw->bk", y, net.classifier.W) / 16 + net.classifier.mu
    torch.testing.assert_close(net.classifier(y), want)


def test_euler_unit_is_forward_euler():
    torch.manual_seed(0)
    unit = EulerUnit(channels=2, steps=3, T=1.5, act="tanh")
    y0 = torch.randn(1, 2, 5, 5)
    y = y0.clone()
    for k in range(3):
        y = y + 0.5 * torch.tanh(F.conv2d(y, unit.K[k], unit.b[k], padding=1))
    torch.testing.assert_close(unit(y0), y)


def _conv_matrix(K, n):
    """Dense matrix of y -> conv2d(y, K, padding=1) on (C, n, n), built from the linear map."""
    C = K.shape[0]
    return torch.func.jacrev(lambda v: F.conv2d(v.view(1, C, n, n), K, padding=1).flatten())(
        torch.zeros(C * n * n, dtype=K.dtype)
    )


def test_first_order_convergence_on_linear_ode():
    """y' = A y with A = conv(K): Euler with N steps vs exp(T A); error halves as N doubles."""
    g = torch.Generator().manual_seed(1)
    C, n, T = 2, 4, 1.0
    K = torch.randn(C, C, 3, 3, dtype=torch.float64, generator=g) * 0.5
    y0 = torch.randn(1, C, n, n, dtype=torch.float64, generator=g)
    A = _conv_matrix(K, n)
    exact = (torch.linalg.matrix_exp(T * A) @ y0.flatten()).view_as(y0)
    errs = []
    for N in (8, 16, 32, 64, 128):
        unit = EulerUnit(C, N, T, act="identity").double()
        with torch.no_grad():
            unit.K.copy_(K.expand(N, *K.shape))
            unit.b.zero_()
            errs.append((unit(y0) - exact).norm().item())
    ratios = [b / a for a, b in zip(errs, errs[1:], strict=False)]
    assert all(0.45 < r < 0.56 for r in ratios), ratios
    assert errs[-1] < 0.05 * exact.norm().item()


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="unknown activation 'sigmoid'.*tanh"):
        ODENet(activation="sigmoid")
    with pytest.raises(ValueError, match=r"ODENetConfig\.n: n=14 must be divisible by 2\*\*2"):
        ODENet(channels=[4, 4, 4], n=14)
    with pytest.raises(ValueError, match=r"ODENetConfig\.steps: expected 2 entries"):
        ODENet(channels=[4, 4], steps=[1, 2, 3])
    with pytest.raises(ValueError, match="ODENetConfig.T"):
        ODENet(T=0.0)
    with pytest.raises(ValueError, match="classifier"):
        ODENet(classifier="svm")


def test_input_shape_error():
    with pytest.raises(ValueError, match=r"expected input \(B, 1, 28, 28\), got \(2, 1, 14, 14\)"):
        ODENet()(torch.zeros(2, 1, 14, 14))


def test_config_round_trips_through_dict():
    cfg = ODENetConfig(channels=[4, 8], steps=[2, 4], n=16, pair="average")
    assert ODENetConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown fields.*'width'"):
        ODENetConfig.from_dict({"width": 3})


def test_gradcheck_network():
    torch.manual_seed(0)
    net = ODENet(channels=[2, 2], steps=2, n=4, classes=3).double()
    x = torch.randn(2, 1, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(net, (x,))
