"""Moving a whole trained ``ODENet`` across resolution and depth.

``to_resolution(model, n)``: every 3x3 stencil by Galerkin restriction/prolongation
(``mscnn.transfer``), the quadrature classifier's ``W`` like an image; 1x1 kernels, biases and the
pooling classifier unchanged. The input images are never touched: the new model takes ``n x n``.
Options: ``galerkin`` names the layer groups whose stencils get Galerkin transfer (``"opening"``,
``"units"``; the others keep their stencils, as ``naive=True`` does for all), ``lam`` regularises the
prolongation (``mscnn.transfer.prolong_stencil``), ``prefilter`` (the pyramid's blur, in pixels) makes a
network moved to a finer grid blur its input as the pyramid blurred the coarse images
(``ODENetConfig.input_blur``, see ``pyramid_blur``), so it starts at the bandwidth it was trained at,
and takes that blur off again on the way down. ``dilate`` keeps every free stencil at its physical
offsets: moved ``k`` levels finer its taps are ``2**k`` pixels apart (``ODENetConfig.dilation``), so
the moved network is the old one run on each of the ``4**k`` interleaved sub-grids of the finer image
(the a-trous construction; with several units exactly so when ``ODENetConfig.subgrid_connectives``,
else the connectives mix the sub-grids); with the prefilter it sees the bandwidth it was trained at. A dilated
network moves back down exactly; one with adjacent taps cannot move down this way.
``resolution_state`` is the same map on a state dict, differentiable, for training one set of
parameters at several resolutions (``mscnn.multires``).

The connective layers are 1x1 (pointwise) kernels and always move unchanged: the Galerkin product of
a pointwise ``c I`` is ``c R P``, which is ``c I`` for the ``"average"`` pair and a 3x3 stencil (not a
1x1 kernel) for full weighting.

``to_depth(model, steps)``: ``T`` fixed, the stacked parameters of each unit interpolated linearly
in time (the paper's Sec. 3.3). Step ``k`` of a unit with ``N`` steps acts at ``t_k = k T / N``
(forward Euler evaluates the right-hand side at the left end of each step); new steps at
``t'_j = j T / N'`` take the piecewise-linear interpolant through ``(t_k, theta_k)``, extended
linearly past ``t_{N-1}``. Constants stay exactly constant and linear functions of time stay on
their line.
"""

from __future__ import annotations

import functools
import math

import torch

from mscnn.ode import ODENet, ODENetConfig
from mscnn.transfer import prolong_image, prolong_stencil, restrict_image, restrict_stencil

__all__ = [
    "LAYER_GROUPS",
    "PREFILTER_FACTORS",
    "RESTRICTION_VARIANCE",
    "choose_prefilter",
    "handover_sigma",
    "interpolate_in_time",
    "levels_between",
    "prefiltered_blur",
    "pyramid_blur",
    "resolution_state",
    "to_depth",
    "to_resolution",
]

LAYER_GROUPS = ("opening", "units")


def levels_between(n_from: int, n_to: int) -> int:
    """``k`` with ``n_to = n_from * 2**k`` (``k < 0``: coarser); ``ValueError`` if there is none.

    >>> levels_between(28, 7), levels_between(14, 28)
    (-2, 1)
    """
    if n_from < 1 or n_to < 1:
        raise ValueError(f"resolutions must be >= 1, got {n_from} -> {n_to}")
    k = round(math.log2(n_to / n_from))
    if n_from * 2.0**k != n_to:
        raise ValueError(f"resolution {n_to} is not {n_from} * 2**k for an integer k")
    return k


def pyramid_blur(n_from: int, n_to: int, sigma_px: float = 1.0) -> float:
    """The blur, in image widths, that a pyramid built with ``sigma_px`` (``restrict(blur(x,
    sigma_px))`` per level) puts between grids ``n_from`` and ``n_to``: the Gaussians of each
    level add in quadrature, ``sqrt(sum_m (sigma_px / m)^2)`` over the finer grid of every level
    in between (the restriction's own smoothing is not counted).

    >>> pyramid_blur(14, 28) == 1 / 28, round(pyramid_blur(28, 7) * 28, 4)
    (True, 2.2361)
    """
    k = levels_between(n_from, n_to)
    fine = max(n_from, n_to)
    return math.sqrt(sum((sigma_px / (fine >> j)) ** 2 for j in range(abs(k))))


# the variance, in fine-grid pixels^2 per axis, of a restriction's own smoothing: full weighting's
# [1, 2, 1] / 4 and the average pair's [1, 1] / 2
RESTRICTION_VARIANCE = {"full-weighting": 0.5, "full-weighting-neumann": 0.5, "average": 0.25}


def handover_sigma(sigma_px: float, pair: str) -> float:
    """The Gaussian (in fine pixels) that takes a fine image to the bandwidth of the coarse images a
    pyramid step makes (``restrict(blur(x, sigma_px), pair)``): the pyramid's blur and the
    restriction's own smoothing, in quadrature. As a dilating handover's prefilter it makes every
    sub-grid of the moved network's input close to the coarse images its network was trained on
    (``benchmarks/handover_prefilter.py``).

    >>> round(handover_sigma(1.0, "full-weighting"), 4), handover_sigma(0.0, "average")
    (1.2247, 0.5)
    """
    if pair not in RESTRICTION_VARIANCE:
        raise ValueError(f"handover_sigma: unknown pair {pair!r}; expected one of "
                         f"{sorted(RESTRICTION_VARIANCE)}")
    return math.sqrt(sigma_px**2 + RESTRICTION_VARIANCE[pair])


def prefiltered_blur(input_blur: float, n_from: int, n_to: int, prefilter: float) -> float:
    """``ODENetConfig.input_blur`` after a move ``n_from -> n_to`` with ``prefilter`` (the pyramid's
    sigma in pixels; 0: unchanged): the pyramid's blur added on the way to a finer grid, taken off
    on the way to a coarser one (never below 0), in quadrature.

    >>> prefiltered_blur(0.0, 14, 28, 1.0) == 1 / 28, prefiltered_blur(1 / 28, 28, 14, 1.0)
    (True, 0.0)
    """
    if not prefilter or n_from == n_to:
        return input_blur
    sign = 1.0 if n_to > n_from else -1.0
    var = input_blur**2 + sign * pyramid_blur(n_from, n_to, prefilter) ** 2
    return math.sqrt(var) if var > 1e-12 else 0.0


def _move(t: torch.Tensor, k: int, down, up) -> torch.Tensor:
    for _ in range(abs(k)):
        t = down(t) if k < 0 else up(t)
    return t


def _group(name: str) -> str | None:
    """The layer group of a 3x3 stencil parameter (``None``: not a stencil that may be moved)."""
    head = name.split(".")[0]
    return head if head in LAYER_GROUPS else None


def resolution_state(
    model: ODENet,
    n: int,
    naive: bool = False,
    pair: str | None = None,
    lam: float = 0.0,
    galerkin: tuple[str, ...] | list[str] = LAYER_GROUPS,
    state: dict[str, torch.Tensor] | None = None,
    prefilter: float = 0.0,
    dilate: bool = False,
) -> tuple[ODENetConfig, dict[str, torch.Tensor]]:
    """The config and state dict of ``model`` moved to ``n x n`` images (see ``to_resolution``).

    ``state`` defaults to ``dict(model.named_parameters())`` (plus buffers); every map used is
    linear, so gradients flow from the returned tensors back to ``state``.
    """
    cfg = model.config
    k = levels_between(cfg.n, n)
    pair = pair or cfg.pair
    unknown = sorted(set(galerkin) - set(LAYER_GROUPS))
    if unknown:
        raise ValueError(
            f"to_resolution: unknown layer groups {unknown} in galerkin; valid: {list(LAYER_GROUPS)} "
            "(connective layers are 1x1 and always move unchanged)"
        )
    dilation = cfg.dilation
    if dilate:
        if cfg.stencil != "free":
            raise ValueError(f"to_resolution: dilate moves free stencils; stencil {cfg.stencil!r} is "
                             "re-discretised on each grid (move it without dilate)")
        if cfg.dilation * 2.0**k < 1:
            raise ValueError(
                f"to_resolution: dilate cannot move a {cfg.n}x{cfg.n} network with dilation "
                f"{cfg.dilation} to {n}x{n} (its taps would be closer than one pixel); "
                "use naive or Galerkin stencils"
            )
        dilation = round(cfg.dilation * 2.0**k)
    try:
        blur = prefiltered_blur(cfg.input_blur, cfg.n, n, prefilter)
        new_cfg = cfg.replace(n=n, pair=pair, input_blur=blur, dilation=dilation)
    except ValueError as e:
        raise ValueError(
            f"to_resolution: cannot move a {cfg.n}x{cfg.n} network to {n}x{n}: {e}"
        ) from None
    if state is None:
        state = dict(model.named_parameters()) | dict(model.named_buffers())
    groups = () if naive or dilate else tuple(galerkin)
    down_s = functools.partial(restrict_stencil, pair=pair)
    up_s = functools.partial(prolong_stencil, pair=pair, lam=lam)
    down_i = functools.partial(restrict_image, pair=pair)
    up_i = functools.partial(prolong_image, pair=pair)
    out = {}
    for name, t in state.items():
        if t.dim() >= 2 and tuple(t.shape[-2:]) == (3, 3) and _group(name) in groups:
            t = _move(t, k, down_s, up_s)
        elif name == "classifier.W":
            t = _move(t, k, down_i, up_i)
        out[name] = t
    return new_cfg, out


@torch.no_grad()
def to_resolution(
    model: ODENet,
    n: int,
    naive: bool = False,
    pair: str | None = None,
    lam: float = 0.0,
    galerkin: tuple[str, ...] | list[str] = LAYER_GROUPS,
    prefilter: float = 0.0,
    dilate: bool = False,
) -> ODENet:
    """A new ``ODENet`` for ``n x n`` images (``n = model.n * 2**k``), no retraining.

    ``naive=True`` keeps the stencils and moves only ``W`` (the paper's baseline); ``galerkin``
    chooses the layer groups that get Galerkin stencils (the rest are kept, as with ``naive``);
    ``lam`` regularises prolongation (``mscnn.transfer.prolong_stencil``; restriction ignores it).
    ``prefilter``: the pyramid's ``sigma`` in pixels (0: none) -- moving to a finer grid, the new
    network blurs its input as the pyramid blurred the images the old one saw (``input_blur``);
    moving to a coarser grid, that blur is taken off (the pyramid's images carry it).
    ``dilate=True``: free stencils keep their weights and their physical tap offsets
    (``ODENetConfig.dilation`` times ``n / model.n``), only ``W`` moves (see the module docstring).
    ``pair`` defaults to the model's transfer pair. The result is on the device and dtype of ``model``.

    >>> net = ODENet(channels=2, steps=1, n=8)
    >>> up = to_resolution(net, 16, galerkin=["units"])
    >>> torch.equal(up.opening.weight, net.opening.weight), up.classifier.W.shape
    (True, torch.Size([10, 2, 16, 16]))
    """
    new_cfg, state = resolution_state(model, n, naive, pair, lam, galerkin, state=model.state_dict(),
                                      prefilter=prefilter, dilate=dilate)
    p = next(model.parameters())
    new = ODENet(new_cfg).to(device=p.device, dtype=p.dtype)
    new.load_state_dict(state)
    return new


# the prefilters choose_prefilter tries, as multiples of handover_sigma (for the pyramid's 1 px
# with full weighting: 0.8, 0.98, 1.22, 1.53, 1.84, 2.2 px); Imagenette-28 chose 1.5 px in every
# seed, above handover_sigma (benchmarks/move_gap.py)
PREFILTER_FACTORS = (0.65, 0.8, 1.0, 1.25, 1.5, 1.8)


def choose_prefilter(model: ODENet, n: int, val, sigmas, **move) -> tuple[float, dict[float, float]]:
    """The prefilter (pixels per level, ``to_resolution(prefilter=...)``) among ``sigmas`` whose
    moved network classifies ``val`` (a ``mscnn.data.Split`` of ``n x n`` images: a validation
    split, never the test set) best, and every sigma's accuracy. Ties go to the smaller sigma (less
    of the fine image blurred away). ``move``: the other ``to_resolution`` options (``naive``,
    ``dilate``, ...). ``handover_sigma`` is the pyramid's bandwidth, the default a schedule uses;
    measured on natural images the best sigma is often larger (``benchmarks/move_gap.py``)."""
    from mscnn.train import accuracy

    sigmas = sorted({float(s) for s in sigmas})
    if not sigmas or sigmas[0] < 0:
        raise ValueError(f"choose_prefilter: sigmas must be a non-empty list of values >= 0, got {sigmas}")
    if tuple(val.x.shape[-2:]) != (n, n):
        raise ValueError(f"choose_prefilter: validation images are {tuple(val.x.shape[-2:])}, the move "
                         f"is to {n}x{n}")
    scores = {s: accuracy(to_resolution(model, n, prefilter=s, **move), val) for s in sigmas}
    best = max(sigmas, key=lambda s: (scores[s], -s))
    return best, scores


def interpolate_in_time(theta: torch.Tensor, steps: int) -> torch.Tensor:
    """Resample parameters stacked over time: ``theta: (N, ...) -> (steps, ...)``.

    ``theta[k]`` sits at ``t_k = k / N`` (in units of ``T``); the result at ``j / steps`` is the
    piecewise-linear interpolant, extended linearly past the last node.

    >>> interpolate_in_time(torch.tensor([0.0, 1.0]), 4)
    tensor([0.0000, 0.5000, 1.0000, 1.5000])
    """
    N = theta.shape[0]
    if steps < 1:
        raise ValueError(f"interpolate_in_time: steps must be >= 1, got {steps}")
    if N == 1:
        return theta.expand(steps, *theta.shape[1:]).clone()
    s = torch.arange(steps, dtype=torch.float64) * (N / steps)  # new times in old step units
    i = s.floor().long().clamp(max=N - 2)
    w = (s - i).to(theta.dtype).to(theta.device).view(-1, *([1] * (theta.dim() - 1)))
    return (1 - w) * theta[i] + w * theta[i + 1]


@torch.no_grad()
def to_depth(model: ODENet, steps: int | list[int]) -> ODENet:
    """A new ``ODENet`` with ``steps`` Euler steps per unit (an int, or one per unit), ``T`` fixed.

    >>> net = ODENet(channels=4, steps=2, n=8)
    >>> to_depth(net, 8).units[0].K.shape
    torch.Size([8, 4, 4, 3, 3])
    """
    cfg = model.config
    units = len(cfg.unit_channels)
    new_steps = [int(steps)] * units if isinstance(steps, int) else [int(s) for s in steps]
    if len(new_steps) != units:
        raise ValueError(f"to_depth: expected {units} step counts (one per unit), got {steps!r}")
    p = next(model.parameters())
    new = ODENet(cfg.replace(steps=new_steps if units > 1 else new_steps[0]))
    new = new.to(device=p.device, dtype=p.dtype)
    state = model.state_dict()
    for u, N in enumerate(new_steps):
        for key in ("K", "b"):
            name = f"units.{u}.{key}"
            state[name] = interpolate_in_time(state[name], N)
    new.load_state_dict(state)
    return new
