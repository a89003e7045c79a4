"""The ODE-ResNet of the paper: a ResNet read as forward Euler on ``y' = act(K(s(t)) y + b(t))``.

Architecture (``ODENetConfig``)::

    x (B, in_channels, n, n)
      -> opening layer: act(conv3x3(x))                 in_channels -> channels[0]
      -> unit 0: steps[0] Euler steps, dt = T / steps[0]
            y <- y + dt * act(conv3x3(y, s_k) + b_k)    k = 0 .. N-1
      -> connective: restrict_image(act(conv1x1(y)))    channels[u] -> channels[u+1], n -> n/2
      -> unit 1 ... (one per entry of ``channels``)
      -> classifier ("quadrature": h^2 <W, y> + mu on the last grid; "pool": mean + linear)

The parameters of a unit are stored stacked over time: ``K: (N, C, C, 3, 3)``, ``b: (N, C)``, so a
unit is a discretised function of time (``mscnn.hierarchy.to_depth`` interpolates it).
All convolutions use zero padding, which matches the zero boundary of ``mscnn.transfer``.

``stencil`` chooses how the spatial convolutions (opening and Euler steps) are parameterised
(``mscnn.stencils``): ``"free"`` 3x3 weights ``K: (N, C, C, 3, 3)``, or a scale-consistent kind
(``"moment"``, ``"gaussian"``) with resolution-free derivative coefficients ``K: (N, C, C, 6)``
re-discretised on every grid (``stencil_scale``: their physical length, a fraction of the width).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn
from torch.nn import functional as F

from mscnn.classifier import CLASSIFIERS
from mscnn.fields import omit_later
from mscnn.stencils import STENCILS, StencilConv, blur, layer_kind, stencil_conv, stencil_kind
from mscnn.transfer import get_pair, restrict_image

__all__ = ["ACTIVATIONS", "STENCILS", "EulerUnit", "ODENet", "ODENetConfig", "activation"]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "identity": lambda y: y,
}


def activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """Look up an activation by name; an unknown name raises ``ValueError`` listing the valid."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}") from None


def _as_list(v: int | list[int], units: int, name: str) -> list[int]:
    out = [int(v)] * units if isinstance(v, int) else [int(x) for x in v]
    if len(out) != units:
        raise ValueError(f"ODENetConfig.{name}: expected {units} entries (one per unit), got {v!r}")
    return out


@dataclass(frozen=True)
class ODENetConfig:
    """Architecture of an ``ODENet``: plain data, saved as ``model.json`` beside a checkpoint.

    ``channels``/``steps``: an int (one unit) or a list with one entry per unit (``steps`` may stay
    an int for all units). ``n`` is the input resolution; each connective layer halves it.
    """

    in_channels: int = 1
    channels: int | tuple[int, ...] = 16
    steps: int | tuple[int, ...] = 2
    T: float = 2.0
    n: int = 28
    classes: int = 10
    activation: str = "tanh"
    pair: str = "full-weighting"
    classifier: str = "quadrature"
    stencil: str = "free"  # mscnn.stencils.STENCILS
    stencil_scale: float = 0.05  # consistent kinds: sigma (gaussian) or L (moment), image widths
    # consistent kinds: the length L their derivative coefficients are normalised by (theta_a L^|a|),
    # image widths; None: stencil_scale. The same operators for every L; a larger L trains the
    # derivative terms faster (mscnn.stencils)
    stencil_length: float | None = None
    # consistent kinds: unit u's Gaussian sigma (gaussian) / the opening's is stencil_scale * growth**u;
    # 2: the same sigma in each unit's own pixels (every connective halves the grid), so the last
    # unit's operator stays resolved when the network moves to a coarser grid (1: one sigma for all)
    stencil_scale_growth: float = 1.0
    # a Gaussian applied to the input, sigma in image widths (0: none); set by a prefiltered move
    # (mscnn.hierarchy.to_resolution(prefilter=...)) so a finer grid sees the coarse bandwidth
    input_blur: float = 0.0
    # spacing of the free 3x3 stencils' taps, in pixels (1: adjacent). A free network moved k
    # levels finer by ``to_resolution(dilate=True)`` keeps each stencil at its physical offsets:
    # dilation 2**k, the coarse network run on each of the fine grid's 4**k interleaved sub-grids
    # (exactly for one unit; with several, when ``subgrid_connectives``)
    dilation: int = 1
    # with dilation d > 1, the connectives restrict each of the d x d sub-grids on its own
    # (``Connective``): the network is then exactly the undilated one on every sub-grid, through all
    # its units, but its sub-grids never mix; False (plain restriction): they mix at each connective.
    # No effect at dilation 1; moves keep it
    subgrid_connectives: bool = False

    def __post_init__(self) -> None:
        for key in ("channels", "steps"):  # lists from JSON/YAML become tuples (hashable, frozen)
            v = getattr(self, key)
            if isinstance(v, list):
                object.__setattr__(self, key, tuple(v))
        activation(self.activation)
        get_pair(self.pair)
        try:
            stencil_kind(self.stencil)
        except ValueError as e:
            raise ValueError(f"ODENetConfig.stencil: {e}") from None
        if not (self.stencil_scale > 0 and math.isfinite(self.stencil_scale)):
            raise ValueError(f"ODENetConfig.stencil_scale: must be > 0, got {self.stencil_scale!r}")
        if self.stencil_length is not None and not (
                self.stencil_length > 0 and math.isfinite(self.stencil_length)):
            raise ValueError(
                f"ODENetConfig.stencil_length: must be > 0 (or null), got {self.stencil_length!r}")
        if not (self.stencil_scale_growth >= 1 and math.isfinite(self.stencil_scale_growth)):
            raise ValueError(f"ODENetConfig.stencil_scale_growth: must be >= 1, got "
                             f"{self.stencil_scale_growth!r}")
        if not (self.input_blur >= 0 and math.isfinite(self.input_blur)):
            raise ValueError(f"ODENetConfig.input_blur: must be >= 0, got {self.input_blur!r}")
        if not (isinstance(self.dilation, int) and self.dilation >= 1):
            raise ValueError(f"ODENetConfig.dilation: must be an int >= 1, got {self.dilation!r}")
        if self.dilation > 1 and self.stencil != "free":
            raise ValueError(
                f"ODENetConfig.dilation: {self.dilation} applies to free stencils only; "
                f"stencil {self.stencil!r} is re-discretised on each grid"
            )
        if self.classifier not in CLASSIFIERS:
            raise ValueError(
                f"ODENetConfig.classifier: unknown {self.classifier!r}; valid: {sorted(CLASSIFIERS)}"
            )
        if self.T <= 0 or not math.isfinite(self.T):
            raise ValueError(f"ODENetConfig.T: final time must be > 0, got {self.T!r}")
        if min(self.unit_channels) < 1 or min(self.unit_steps) < 1:
            raise ValueError(
                f"ODENetConfig: channels and steps must be >= 1, got {self.channels}, {self.steps}"
            )
        units = len(self.unit_channels)
        if self.n < 1 or self.n % 2 ** (units - 1):
            raise ValueError(
                f"ODENetConfig.n: n={self.n} must be divisible by 2**{units - 1} "
                f"({units} units, each connective layer halves the grid)"
            )
        if units > 1 and self.subgrid_connectives and self.n % (self.dilation * 2 ** (units - 1)):
            raise ValueError(
                f"ODENetConfig.n: n={self.n} must be divisible by dilation x 2**{units - 1} = "
                f"{self.dilation * 2 ** (units - 1)} (each connective halves every one of the "
                f"{self.dilation}x{self.dilation} sub-grids of the dilated taps)"
            )

    @property
    def unit_channels(self) -> list[int]:
        c = self.channels
        return [int(c)] if isinstance(c, int) else [int(x) for x in c]

    @property
    def unit_steps(self) -> list[int]:
        return _as_list(
            self.steps if isinstance(self.steps, int) else list(self.steps),
            len(self.unit_channels),
            "steps",
        )

    @property
    def n_out(self) -> int:
        """Resolution of the last unit (the classifier's grid)."""
        return self.n // 2 ** (len(self.unit_channels) - 1)

    @property
    def h(self) -> float:
        return 1.0 / self.n

    @property
    def boundary(self) -> str:
        """The network's boundary condition, its transfer pair's (``mscnn.transfer.PAIRS``):
        ``"neumann"`` with ``"full-weighting-neumann"`` (the consistent kinds' blur and differences
        too, and the input's prefilter), else ``"zero"``."""
        return get_pair(self.pair).boundary

    def replace(self, **changes) -> ODENetConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = self.unit_channels if not isinstance(self.channels, int) else self.channels
        d["steps"] = list(self.steps) if not isinstance(self.steps, int) else self.steps
        # model.json of networks without them stays as it was
        return omit_later(d, {"dilation": 1, "subgrid_connectives": False, "stencil_scale_growth": 1.0})

    @classmethod
    def from_dict(cls, d: dict) -> ODENetConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - known - {"h"})
        if unknown:
            raise ValueError(f"ODENetConfig: unknown fields {unknown}; valid: {sorted(known)}")
        return cls(**{k: v for k, v in d.items() if k in known})


class EulerUnit(nn.Module):
    """``N`` forward-Euler steps ``y <- y + dt * act(conv(y, K[k]) + b[k])``, ``dt = T / N``.

    ``y: (B, C, n, n) -> (B, C, n, n)``; parameters ``K: (N, C, C, 3, 3)`` (``stencil="free"``) or
    ``(N, C, C, 6)`` (consistent kinds, ``mscnn.stencils``), ``b: (N, C)``.
    """

    def __init__(self, channels: int, steps: int, T: float, act: str = "tanh",
                 stencil: str = "free", scale: float = 0.05, dilation: int = 1,
                 length: float | None = None, boundary: str = "zero") -> None:
        super().__init__()
        self.T, self.dilation, self.boundary = float(T), int(dilation), boundary
        self.act_name, self.stencil, self.scale = act, stencil_kind(stencil), float(scale)
        self.length = float(length) if length is not None else self.scale
        taps = (3, 3) if stencil == "free" else (6,)
        bound = 1.0 / math.sqrt(math.prod(taps) * channels)  # nn.Conv2d's default scale
        self.K = nn.Parameter(torch.empty(steps, channels, channels, *taps).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.zeros(steps, channels))

    @property
    def steps(self) -> int:
        return self.K.shape[0]

    @property
    def dt(self) -> float:
        return self.T / self.steps

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        act, dt = activation(self.act_name), self.dt
        for k in range(self.steps):
            y = y + dt * act(stencil_conv(y, self.K[k], self.b[k], self.stencil, self.scale,
                                          self.dilation, self.length, self.boundary))
        return y


class Connective(nn.Module):
    """Channel change and 2x coarsening: ``(B, C_in, n, n) -> (B, C_out, n/2, n/2)``,
    ``restrict_image(act(conv1x1(y)))``. With ``dilation`` ``d > 1`` (the units' taps ``d`` pixels
    apart) each of the ``d x d`` interleaved sub-grids is restricted on its own and they interleave
    again (``pixel_unshuffle``, ``restrict_image``, ``pixel_shuffle``), so a dilated network stays
    the undilated one run on every sub-grid through all its units:

    >>> c = Connective(1, 1, "identity", "average", dilation=2)
    >>> _ = nn.init.ones_(c.conv.weight), nn.init.zeros_(c.conv.bias)
    >>> c(torch.arange(16.).view(1, 1, 4, 4)).tolist()  # sub-grid (0, 0) is 0, 2, 8, 10: mean 5
    [[[[5.0, 6.0], [9.0, 10.0]]]]
    """

    def __init__(self, c_in: int, c_out: int, act: str, pair: str, dilation: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 1)
        self.act_name, self.pair, self.dilation = act, pair, int(dilation)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        y, d = activation(self.act_name)(self.conv(y)), self.dilation
        if d == 1:
            return restrict_image(y, self.pair)
        return F.pixel_shuffle(restrict_image(F.pixel_unshuffle(y, d), self.pair), d)


class ODENet(nn.Module):
    """The paper's ODE-ResNet classifier: ``x: (B, in_channels, n, n) -> logits (B, classes)``.

    >>> net = ODENet(in_channels=1, channels=16, steps=2, T=2.0, n=28, classes=10)
    >>> net(torch.zeros(5, 1, 28, 28)).shape
    torch.Size([5, 10])
    >>> net.h == 1 / 28, net.units[0].K.shape
    (True, torch.Size([2, 16, 16, 3, 3]))
    """

    def __init__(self, config: ODENetConfig | None = None, **kwargs) -> None:
        super().__init__()
        if config is None:
            config = ODENetConfig(**kwargs)
        elif kwargs:
            config = config.replace(**kwargs)
        self.config = config
        chans, steps = config.unit_channels, config.unit_steps
        kind, scale, length = config.stencil, config.stencil_scale, config.stencil_length
        d, bc, growth = config.dilation, config.boundary, config.stencil_scale_growth
        self.opening = (nn.Conv2d(config.in_channels, chans[0], 3, padding=d, dilation=d) if kind == "free"
                        else StencilConv(config.in_channels, chans[0], layer_kind(kind, "opening"), scale,
                                         length=length, boundary=bc))
        self.units = nn.ModuleList(
            EulerUnit(c, s, config.T, config.activation, layer_kind(kind, "units"), scale * growth**u,
                      d, length, bc)
            for u, (c, s) in enumerate(zip(chans, steps, strict=True))
        )
        self.connectives = nn.ModuleList(
            Connective(a, b, config.activation, config.pair, d if config.subgrid_connectives else 1)
            for a, b in zip(chans[:-1], chans[1:], strict=True)
        )
        self.classifier = CLASSIFIERS[config.classifier](config.classes, chans[-1], config.n_out)

    @property
    def n(self) -> int:
        return self.config.n

    @property
    def h(self) -> float:
        return self.config.h

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The state at final time of the last unit: ``(B, in_channels, n, n) -> (B, C, n_out, n_out)``."""
        c = self.config
        if x.dim() != 4 or x.shape[1] != c.in_channels or tuple(x.shape[-2:]) != (c.n, c.n):
            raise ValueError(
                f"ODENet: expected input (B, {c.in_channels}, {c.n}, {c.n}), got {tuple(x.shape)}"
            )
        if c.input_blur:
            x = blur(x, c.input_blur, c.boundary)
        y = activation(c.activation)(self.opening(x))
        for u, unit in enumerate(self.units):
            if u:
                y = self.connectives[u - 1](y)
            y = unit(y)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))
