"""Stencil parameterisations of the ODE network's spatial convolutions (``ODENetConfig.stencil``).

* ``"free"``: today's 3x3 weights ``(out, in, 3, 3)``, one fixed grid; moved across resolution by
  ``mscnn.hierarchy.to_resolution`` (Galerkin or naive).
* ``"moment"`` (PDE-Net's moment kernels): ``K_h = sum_{|a|<=2} theta_a L^|a| D_a(h)``, ``D_a`` the
  central-difference stencil of ``d^a`` on the grid of spacing ``h``, ``L = length`` a physical
  length (a fraction of the image width; ``scale`` unless given). ``theta (out, in, 6)`` is
  resolution-free: on a finer grid the same ``theta`` gives the same differential operator
  (Galerkin's moment scaling, restricted to the orders a 3x3 stencil resolves well).
* ``"gaussian"`` (Gaussian-derivative / N-jet networks, Lindeberg; Pintea et al.'s N-JetNet):
  ``K = sum_{|a|<=2} theta_a L^|a| d^a G_sigma`` with ``sigma = scale`` fixed in physical units,
  discretised on each grid (a sampled, normalised Gaussian of ``sigma / h`` pixels, then central
  differences). A finer grid gets a wider support and the *same* band-limited operator, so a network
  sees the same features at every resolution. Applied as a separable blur (two products with a
  banded matrix) and one dense 3x3 conv with the effective moment kernel: no wide kernel.

* ``"moment-blur"``: ``"gaussian"`` in the opening layer (the input band-limited at ``sigma``, the
  cheap place: one channel in), ``"moment"`` in the Euler steps: consistent at the cost of free 3x3.

``L`` (``length``, ``ODENetConfig.stencil_length``; ``scale`` unless given) only normalises the
coefficients: every ``L`` spans the same operators (``theta_a L^|a|`` is what acts), but it sets how
large a derivative term a unit step of the optimiser makes. ``L`` below the grid spacing damps the
derivative terms on the training grid (``(L / h)^|a|``): measured (MNIST, 3 seeds), ``L = sigma``
(0.7 px at 14x14) cost 1.5-2 points of native accuracy, ``L = 0.14`` (2 px) left both kinds within
0.4 points of free stencils (benchmarks/RESULTS.md).

Boundaries (``boundary``; a network's comes from its transfer pair, ``ODENetConfig.boundary``):
``"zero"`` pads the field with zeros, so an image whose border is not black has an edge there that
the difference stencils see as ``1/h`` and ``1/h^2`` terms: a different operator on every grid.
``"neumann"`` mirrors the blur's taps at the border and repeats the border pixel for the
differences: a constant image gives constant features on every grid. Measured on natural images
(Imagenette in gray, 28x28, 3 seeds): the Gaussian network moved 14 -> 28 lost 15.4 points under
zero padding and 2.9 with Neumann boundaries, the full-weighting-neumann pair and
``stencil_scale_growth`` 2 (benchmarks/RESULTS.md).

The consistent kinds take ``h`` from their input (``h = 1 / width``: the image spans the unit
square at every layer), so one module serves every grid: moving a network re-discretises nothing
by hand and solves no 9x9 system. The six derivative fields, in order: ``1, d_x, d_y, d_xx, d_xy,
d_yy`` (``x`` along the last axis); their orders: ``ORDERS``.
"""

from __future__ import annotations

import math
from functools import cache, lru_cache

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["BOUNDARIES", "ORDERS", "STENCILS", "StencilConv", "blur", "derivative_stencils", "gaussian_taps",
           "layer_kind", "stencil_kind"]

ORDERS = (0, 1, 1, 2, 2, 2)


@cache
def _unit_stencils() -> torch.Tensor:
    """The six central-difference stencils on a unit grid, ``(6, 3, 3)`` float64, as conv2d
    (cross-correlation) weights: ``out[i, j] = sum s[p, q] y[i + p - 1, j + q - 1]``."""
    s = torch.zeros(6, 3, 3, dtype=torch.float64)
    s[0, 1, 1] = 1.0
    s[1, 1, 2], s[1, 1, 0] = 0.5, -0.5  # d/dx: (y[j+1] - y[j-1]) / 2
    s[2, 2, 1], s[2, 0, 1] = 0.5, -0.5  # d/dy
    s[3, 1, :] = torch.tensor([1.0, -2.0, 1.0])  # d2/dx2
    s[4] = torch.tensor([[1.0, 0, -1], [0, 0, 0], [-1, 0, 1]]) / 4  # d2/dxdy
    s[5, :, 1] = torch.tensor([1.0, -2.0, 1.0])  # d2/dy2
    return s


def derivative_stencils(h: float, scale: float) -> torch.Tensor:
    """``(6, 3, 3)`` float64: ``scale^|a| D_a(h)``, the scaled central differences for grid
    spacing ``h``.

    >>> derivative_stencils(0.5, 0.5)[1]  # scale/h = 1: the plain central difference
    tensor([[ 0.0000,  0.0000,  0.0000],
            [-0.5000,  0.0000,  0.5000],
            [ 0.0000,  0.0000,  0.0000]], dtype=torch.float64)
    """
    r = scale / h
    return _unit_stencils() * torch.tensor([r**k for k in ORDERS], dtype=torch.float64).view(6, 1, 1)


def gaussian_taps(sigma_px: float) -> torch.Tensor:
    """A sampled Gaussian of standard deviation ``sigma_px`` pixels, normalised to sum 1, radius
    ``ceil(4 sigma_px)`` (at least 1; the tail left out is below 1e-4), float64. Below a third of
    a pixel it is the identity.

    >>> gaussian_taps(0.1).tolist()
    [0.0, 1.0, 0.0]
    """
    if sigma_px <= 1 / 3:
        return torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)
    r = max(1, math.ceil(4 * sigma_px))
    k = torch.arange(-r, r + 1, dtype=torch.float64)
    g = torch.exp(-0.5 * (k / sigma_px) ** 2)
    return g / g.sum()


class StencilConv(nn.Module):
    """A spatial convolution ``(B, in, n, n) -> (B, out, n, n)`` of the given ``kind`` (see the
    module docstring), zero padding, optional bias. ``weight``: ``(out, in, 3, 3)`` for ``"free"``,
    ``(out, in, 6)`` for the consistent kinds (derivative coefficients)."""

    def __init__(self, c_in: int, c_out: int, kind: str = "free", scale: float = 0.05,
                 bias: bool = True, length: float | None = None, boundary: str = "zero") -> None:
        super().__init__()
        stencil_kind(kind)
        self.kind, self.scale, self.boundary = kind, float(scale), _boundary(boundary)
        self.length = float(length) if length is not None else self.scale
        shape = (c_out, c_in, 3, 3) if kind == "free" else (c_out, c_in, 6)
        fan_in = c_in * (9 if kind == "free" else 6)
        bound = 1.0 / math.sqrt(fan_in)  # nn.Conv2d's default scale
        self.weight = nn.Parameter(torch.empty(shape).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(c_out).uniform_(-bound, bound)) if bias else None

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return stencil_conv(y, self.weight, self.bias, self.kind, self.scale, length=self.length,
                            boundary=self.boundary)


BOUNDARIES = ("zero", "neumann")


def _boundary(boundary: str) -> str:
    if boundary not in BOUNDARIES:
        raise ValueError(f"unknown stencil boundary {boundary!r}; valid: {list(BOUNDARIES)}")
    return boundary


@lru_cache(maxsize=64)
def _blur_matrix(n: int, sigma_px: float, boundary: str = "zero") -> torch.Tensor | None:
    """The ``n x n`` banded matrix ``G`` of ``gaussian_taps(sigma_px)``, float64, applied as
    ``G @ y @ G.T``; ``None`` where the taps are the identity. ``"zero"``: zero padding (symmetric;
    the border darkens); ``"neumann"``: taps beyond the border fold back onto their half-sample
    mirror images (pixel ``-1 - k`` is pixel ``k``), so every row sums to 1 and a constant image
    stays constant on every grid."""
    g = gaussian_taps(sigma_px)
    r = (len(g) - 1) // 2
    if r == 1 and g[1] == 1:
        return None
    i = torch.arange(n)
    j = i.view(n, 1) + torch.arange(-r, r + 1).view(1, -1)  # (n, taps): the column of each tap
    if boundary == "zero":
        inside = (j >= 0) & (j < n)
        w, j = torch.where(inside, g.view(1, -1), torch.zeros((), dtype=torch.float64)), j.clamp(0, n - 1)
    else:
        while ((j < 0) | (j >= n)).any():  # fold until inside (taps wider than the image)
            j = torch.where(j < 0, -1 - j, torch.where(j >= n, 2 * n - 1 - j, j))
        w = g.view(1, -1).expand(n, -1)
    return torch.zeros(n, n, dtype=torch.float64).scatter_add_(1, j, w.contiguous())


@lru_cache(maxsize=64)
def _blur_on(n: int, sigma: float, dtype: torch.dtype, device: torch.device,
             boundary: str = "zero") -> torch.Tensor | None:
    G = _blur_matrix(n, sigma * n, boundary)
    return None if G is None else G.to(dtype=dtype, device=device)


@lru_cache(maxsize=64)
def _differences_on(n: int, scale: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return derivative_stencils(1.0 / n, scale).to(dtype=dtype, device=device)


def blur(y: torch.Tensor, sigma: float, boundary: str = "zero") -> torch.Tensor:
    """``G_sigma y`` for images ``(..., n, n)`` on the unit square (``sigma`` in image widths):
    the separable sampled Gaussian of ``sigma * n`` pixels, zero padding (``boundary="zero"``) or
    half-sample mirrored (``"neumann"``), as two products with a banded ``n x n`` matrix (BLAS;
    several times faster than a depthwise convolution)."""
    G = _blur_on(y.shape[-1], float(sigma), y.dtype, y.device, boundary)
    return y if G is None else G @ y @ G.T


def stencil_conv(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kind: str,
                 scale: float, dilation: int = 1, length: float | None = None,
                 boundary: str = "zero") -> torch.Tensor:
    """The functional form of ``StencilConv`` (what ``EulerUnit`` calls with one time step's
    weights). The consistent kinds build their effective 3x3 kernel ``sum_a theta_a D_a`` and run
    one dense conv, on the Gaussian-blurred input for ``"gaussian"`` (``D_a G y = D_a (G y)``:
    the derivatives of the blurred field), so they cost a free 3x3 conv plus, for ``"gaussian"``,
    one separable blur. ``dilation``: the free stencil's tap spacing in pixels; ``length``: the
    consistent kinds' normalising length ``L`` (``scale`` when ``None``); ``boundary``: the
    consistent kinds' boundary condition, ``"zero"`` (zero padding: the field jumps to 0 at the
    border, and the difference stencils see that jump as ``1/h`` and ``1/h^2`` terms that grow on
    finer grids) or ``"neumann"`` (the blur mirrored and the field's border pixel repeated: no
    jump, the same operator on every grid; free stencils keep zero padding)."""
    if kind == "free":
        return F.conv2d(y, weight, bias, padding=dilation, dilation=dilation)
    _boundary(boundary)
    d = _differences_on(y.shape[-1], float(scale if length is None else length), weight.dtype,
                        weight.device)
    kernel = torch.einsum("oia,apq->oipq", weight, d)
    if kind == "gaussian":
        y = blur(y, scale, boundary)
    if boundary == "neumann":
        return F.conv2d(F.pad(y, (1, 1, 1, 1), mode="replicate"), kernel, bias)
    return F.conv2d(y, kernel, bias, padding=1)


STENCILS = ("free", "moment", "gaussian", "moment-blur")


def layer_kind(kind: str, layer: str) -> str:
    """The kind a layer (``"opening"`` or ``"units"``) of a network of ``kind`` uses."""
    if kind == "moment-blur":
        return "gaussian" if layer == "opening" else "moment"
    return kind


def stencil_kind(kind: str) -> str:
    """``kind`` if it is one of ``STENCILS``; else ``ValueError`` listing the valid ones."""
    if kind not in STENCILS:
        raise ValueError(f"unknown stencil kind {kind!r}; valid: {list(STENCILS)}")
    return kind
