import pytest
import torch

from mscnn.hierarchy import interpolate_in_time, levels_between, to_depth, to_resolution
from mscnn.ode import ODENet, activation
from mscnn.transfer import prolong_image, prolong_stencil, restrict_image, restrict_stencil


def _net(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    net = ODENet(**kw).double()
    with torch.no_grad():  # non-trivial biases and classifier
        for u in net.units:
            u.b.normal_()
        net.classifier.mu.normal_()
    return net


@pytest.mark.parametrize("pair", ["full-weighting", "average"])
def test_linear_opening_layer_moved_to_coarse_grid_reproduces_fine_layer(pair):
    fine = _net(channels=3, steps=1, n=16, activation="identity", pair=pair)
    coarse = to_resolution(fine, 8)
    yH = torch.randn(2, 1, 8, 8, dtype=torch.float64)
    left = coarse.opening(yH)
    right = restrict_image(fine.opening(prolong_image(yH, pair)), pair)
    torch.testing.assert_close(left[..., 1:-1, 1:-1], right[..., 1:-1, 1:-1], rtol=0, atol=1e-12)


def test_one_linear_euler_step_commutes_with_transfer_for_average_pair():
    """With R P = I the skip connection commutes too: R(P y + dt K_h P y) = y + dt K_H y.
    (A product of two layers does not: R K2 K1 P != (R K2 P)(R K1 P).)"""
    fine = _net(channels=2, steps=1, n=32, activation="identity", pair="average")
    coarse = to_resolution(fine, 16)
    yH = torch.randn(3, 2, 16, 16, dtype=torch.float64)
    left = coarse.units[0](yH)
    right = restrict_image(fine.units[0](prolong_image(yH, "average")), "average")
    torch.testing.assert_close(left[..., 1:-1, 1:-1], right[..., 1:-1, 1:-1], rtol=0, atol=1e-12)


def test_to_resolution_moves_each_parameter_as_specified():
    net = _net(channels=[3, 4], steps=2, n=16, classes=5)
    c = to_resolution(net, 8)
    f = to_resolution(net, 64)
    assert c.n == 8 and c.h == 1 / 8 and c.classifier.W.shape == (5, 4, 4, 4)
    assert f.n == 64 and f.classifier.W.shape == (5, 4, 32, 32)
    torch.testing.assert_close(c.units[1].K, restrict_stencil(net.units[1].K))
    torch.testing.assert_close(c.opening.weight, restrict_stencil(net.opening.weight))
    torch.testing.assert_close(f.units[0].K, prolong_stencil(prolong_stencil(net.units[0].K)))
    torch.testing.assert_close(c.classifier.W, restrict_image(net.classifier.W))
    torch.testing.assert_close(f.classifier.W, prolong_image(prolong_image(net.classifier.W)))
    for name in ("units.0.b", "opening.bias", "connectives.0.conv.weight", "classifier.mu"):
        torch.testing.assert_close(c.state_dict()[name], net.state_dict()[name])
    # restriction undoes prolongation exactly for stencils
    back = to_resolution(f, 16)
    torch.testing.assert_close(back.units[0].K, net.units[0].K)
    assert net.n == 16  # the input model is untouched
    assert c(torch.randn(2, 1, 8, 8, dtype=torch.float64)).shape == (2, 5)


def test_naive_transfer_keeps_stencils_and_moves_W():
    net = _net(channels=2, n=8)
    c = to_resolution(net, 4, naive=True)
    torch.testing.assert_close(c.units[0].K, net.units[0].K)
    torch.testing.assert_close(c.classifier.W, restrict_image(net.classifier.W))


def test_to_resolution_errors():
    net = _net(channels=[2, 2], n=12)
    with pytest.raises(ValueError, match="not 12 \\* 2\\*\\*k"):
        to_resolution(net, 18)
    with pytest.raises(ValueError, match="cannot move a 12x12 network to 3x3"):
        to_resolution(net, 3)  # 3 is not divisible by 2 for the connective
    assert levels_between(7, 28) == 2


def test_interpolation_in_time_keeps_constants_and_lines():
    const = torch.full((3, 2, 2), 1.7, dtype=torch.float64)
    for steps in (1, 2, 5, 6, 12):
        torch.testing.assert_close(interpolate_in_time(const, steps), const[:1].expand(steps, 2, 2))
    t = torch.arange(4, dtype=torch.float64) / 4  # theta(t) = 2 - 3 t at t_k = k/4
    line = (2 - 3 * t).view(4, 1)
    for steps in (2, 3, 8, 16):
        tn = torch.arange(steps, dtype=torch.float64) / steps
        torch.testing.assert_close(interpolate_in_time(line, steps), (2 - 3 * tn).view(steps, 1))


def test_to_depth_keeps_constant_and_linear_parameters():
    net = _net(channels=2, steps=4, n=8)
    with torch.no_grad():
        net.units[0].K.copy_(net.units[0].K[:1].expand(4, -1, -1, -1, -1))
        net.units[0].b.copy_(torch.tensor([0.0, 0.25, 0.5, 0.75]).view(4, 1).expand(4, 2))
    deep = to_depth(net, 16)
    assert deep.units[0].steps == 16 and deep.config.steps == 16 and deep.config.T == net.config.T
    torch.testing.assert_close(deep.units[0].K, net.units[0].K[:1].expand(16, -1, -1, -1, -1))
    b = (torch.arange(16, dtype=torch.float64) / 16).view(16, 1).expand(16, 2)
    torch.testing.assert_close(deep.units[0].b, b)
    torch.testing.assert_close(deep.classifier.W, net.classifier.W)


def test_to_depth_output_changes_at_first_order():
    """The network with the interpolated parameters converges as forward Euler: the change of the
    output halves each time the depth doubles."""
    net = _net(channels=3, steps=2, n=8, seed=3)
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    outs = [to_depth(net, N).features(x) for N in (4, 8, 16, 32, 64)]
    d = [(b - a).norm().item() for a, b in zip(outs, outs[1:], strict=False)]
    ratios = [b / a for a, b in zip(d, d[1:], strict=False)]
    assert all(0.4 < r < 0.6 for r in ratios), ratios


def test_to_depth_per_unit_and_errors():
    net = _net(channels=[2, 3], steps=[2, 4], n=8)
    deep = to_depth(net, [4, 8])
    assert [u.steps for u in deep.units] == [4, 8]
    with pytest.raises(ValueError, match="expected 2 step counts"):
        to_depth(net, [4])


@pytest.mark.parametrize("k,channels,n", [(1, 3, 6), (2, 3, 6), (1, [3, 2], 8), (2, [3, 2, 4], 8)])
def test_dilated_move_runs_the_coarse_network_on_each_interleaved_subgrid(k, channels, n):
    # a free network moved k levels finer by dilation: its state at final time, read on the
    # sub-grid of phase (i, j), is the coarse network's state on that sub-grid of the fine image,
    # exactly (zero padding included; with several units, when the connectives restrict each
    # sub-grid on its own, ``subgrid_connectives``); with the "average" pair (W prolonged by
    # copying) its logits are the mean over the 4**k sub-grids of the coarse network's
    torch.manual_seed(0)
    net = ODENet(channels=channels, steps=2, n=n, pair="average", subgrid_connectives=True).double()
    with torch.no_grad():
        net.classifier.mu.normal_()
    up = to_resolution(net, n * 2**k, dilate=True)
    assert up.config.dilation == 2**k and up.opening.dilation == (2**k, 2**k)
    assert torch.equal(up.units[0].K, net.units[0].K) and torch.equal(up.opening.weight, net.opening.weight)
    x = torch.randn(2, 1, n * 2**k, n * 2**k, dtype=torch.float64)
    s = 2**k
    feats, logits = up.features(x), up(x)
    coarse = [(i, j, x[..., i::s, j::s]) for i in range(s) for j in range(s)]
    for i, j, xc in coarse:
        torch.testing.assert_close(feats[..., i::s, j::s], net.features(xc), rtol=0, atol=1e-12)
    mean = torch.stack([net(xc) for _, _, xc in coarse]).mean(0)
    torch.testing.assert_close(logits, mean, rtol=0, atol=1e-12)
    back = to_resolution(up, n, dilate=True)  # and back down, exactly
    assert back.config == net.config
    for (a, ta), (b, tb) in zip(back.state_dict().items(), net.state_dict().items(), strict=True):
        assert a == b and torch.equal(ta, tb), a
    naive = to_resolution(net, n * 2**k, naive=True)  # the same weights with adjacent taps differ
    assert (naive(x) - logits).abs().max() > 1e-3
    if up.connectives:  # per sub-grid, and not so without subgrid_connectives (they mix)
        y = torch.randn(1, up.connectives[0].conv.in_channels, n * 2**k, n * 2**k, dtype=torch.float64)
        plain = restrict_image(activation(up.config.activation)(up.connectives[0].conv(y)), "average")
        assert (up.connectives[0](y) - plain).abs().max() > 1e-3
        mixed = ODENet(up.config.replace(subgrid_connectives=False)).double()
        mixed.load_state_dict(up.state_dict())
        torch.testing.assert_close(mixed.connectives[0](y), plain, rtol=0, atol=0)
        assert (mixed.features(x)[..., 0::s, 0::s] - net.features(x[..., 0::s, 0::s])).abs().max() > 1e-3
    assert ("subgrid_connectives" in up.config.to_dict()) and "subgrid_connectives" not in \
        ODENet(channels=2, steps=1, n=8).config.to_dict()  # files of other networks are unchanged


def test_a_dilated_network_needs_whole_sub_grids_at_every_unit():
    with pytest.raises(ValueError, match="divisible by dilation x 2..1 = 8"):
        ODENet(channels=[2, 2], steps=1, n=12, dilation=4, subgrid_connectives=True)
    ODENet(channels=[2, 2], steps=1, n=16, dilation=4, subgrid_connectives=True)
    ODENet(channels=[2, 2], steps=1, n=12, dilation=4)  # the plain connectives restrict the whole grid
    ODENet(channels=2, steps=1, n=12, dilation=4, subgrid_connectives=True)  # one unit: any n


def test_dilated_move_errors_name_the_cause():
    net = ODENet(channels=2, steps=1, n=8)
    with pytest.raises(ValueError, match="dilation 1 to 4x4.*closer than one pixel"):
        to_resolution(net, 4, dilate=True)
    with pytest.raises(ValueError, match="dilate moves free stencils; stencil 'gaussian'"):
        to_resolution(ODENet(channels=2, steps=1, n=8, stencil="gaussian"), 16, dilate=True)
    with pytest.raises(ValueError, match="ODENetConfig.dilation: 2 applies to free stencils only"):
        ODENet(channels=2, steps=1, n=8, stencil="moment", dilation=2)
    assert "dilation" not in net.config.to_dict()  # files of undilated networks are unchanged
    assert to_resolution(net, 16, dilate=True).config.to_dict()["dilation"] == 2


def test_choose_prefilter_returns_the_sigma_that_classifies_the_validation_split_best():
    from mscnn.data import Split
    from mscnn.hierarchy import choose_prefilter
    from mscnn.train import accuracy

    torch.manual_seed(3)
    net = ODENet(channels=2, steps=1, n=8, stencil="gaussian", classes=3)
    # a label that a 16x16 image's fine detail decides: blurring it away changes the answers
    x = torch.randn(60, 1, 16, 16)
    y = net.to(torch.float32)(restrict_image(x)).argmax(1)
    val = Split(x, y)
    best, scores = choose_prefilter(net, 16, val, [2.0, 0.0, 1.0])
    assert list(scores) == [0.0, 1.0, 2.0]
    for s, acc in scores.items():  # each score is the moved network's own accuracy
        assert acc == accuracy(to_resolution(net, 16, prefilter=s), val)
    assert scores[best] == max(scores.values())
    assert len(set(scores.values())) > 1  # the data decides; the choice is not a default


def test_choose_prefilter_breaks_ties_towards_less_blur_and_checks_its_input():
    from mscnn.data import Split
    from mscnn.hierarchy import choose_prefilter

    net = ODENet(channels=2, steps=1, n=8, classes=3)
    with torch.no_grad():  # constant logits: every sigma scores the same
        for p in net.classifier.parameters():
            p.zero_()
    val = Split(torch.randn(10, 1, 16, 16), torch.zeros(10, dtype=torch.long))
    best, scores = choose_prefilter(net, 16, val, [1.5, 0.5, 1.0])
    assert best == 0.5 and set(scores.values()) == {1.0}
    with pytest.raises(ValueError, match="validation images are \\(8, 8\\)"):
        choose_prefilter(net, 16, Split(torch.randn(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)), [1.0])
    with pytest.raises(ValueError, match="sigmas must be"):
        choose_prefilter(net, 16, val, [-1.0])
