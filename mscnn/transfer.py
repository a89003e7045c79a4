"""Grid transfer of images and 3x3 convolution stencils.

An ``n x n`` image lives on the unit square with spacing ``h = 1/n``. A *transfer pair* is a
restriction ``R`` (fine -> coarse, ``n -> n/2``) and a prolongation ``P`` (coarse -> fine) that act
on each axis separately (2D operators are tensor products of 1D ones):

``"full-weighting"`` (default)
    vertex-centred linear interpolation ``P`` (fine pixel ``2I`` copies coarse pixel ``I``, fine
    pixel ``2I+1`` is the mean of coarse ``I`` and ``I+1``; zero outside) and full weighting
    ``R = P^T / 4``: the stencil ``[[1,2,1],[2,4,2],[1,2,1]]/16`` at the even fine pixels.
``"average"``
    cell-centred ``2x2`` averaging ``R`` and piecewise-constant ``P = 4 R^T``; ``R P = I``.
``"full-weighting-neumann"``
    full weighting with the weights that fall inside the image renormalised at its border
    (``R 1 = 1``, ``P 1 = 1``): the same operators in the interior (and the same Galerkin stencil
    map), no darkened border ring. The zero boundary of ``"full-weighting"`` is harmless for MNIST
    (black background) but makes every image's border an edge, on a different ring at each grid,
    for natural images and for features that are not 0 there (benchmarks/RESULTS.md).

A stencil ``s`` acts as a ``torch.nn.functional.conv2d`` weight (cross-correlation,
``(K y)[i] = sum_k s[k] y[i+k]``). Its coarse-grid version is the Galerkin product
``K_H = R K_h P``; for both pairs ``K_H`` is again a 3x3 stencil, and the map
``vec(s_h) -> vec(s_H)`` is a fixed 9x9 matrix ``G`` (the Kronecker square of a 3x3 matrix ``M``).
Stencil prolongation solves ``G s_h = s_H``. ``G`` is formed once per pair, from the 1D ``R`` and
``P``; no grid-sized matrix is ever built here.

Regularised prolongation (``prolong_stencil(s, lam=...)``) solves
``min ||G s_h - s_H||^2 + lam * s_h^T Q s_h`` instead, where ``s_h^T Q s_h`` is the energy of the
stencil's Fourier symbol ``sum_k s_h[k] exp(i k.w)`` on the high frequencies: the modes ``w`` in
``[-pi, pi]^2`` outside ``[-pi/2, pi/2]^2``, which a grid twice as coarse cannot represent
(``high_frequency_matrix``, a closed form). Exact Galerkin prolongation multiplies derivative-like
stencil components by 2 (first differences) and 4 (second differences); ``Q`` damps exactly the
components that act on the fine-only modes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F

__all__ = [
    "PAIRS",
    "TransferPair",
    "galerkin_matrix",
    "gaussian_blur",
    "get_pair",
    "high_frequency_matrix",
    "level_operator",
    "prolong_image",
    "prolong_stencil",
    "pyramid_step",
    "restrict_image",
    "restrict_stencil",
]


@dataclass(frozen=True)
class TransferPair:
    """A restriction/prolongation pair, given by its 1D weights.

    ``r[i]`` is the weight of fine pixel ``2I + r_offset + i`` in coarse pixel ``I``;
    ``p[j]`` is the weight of coarse pixel ``I`` in fine pixel ``2I + p_offset + j``.
    """

    name: str
    r: tuple[float, ...]
    r_offset: int
    p: tuple[float, ...]
    p_offset: int
    # "zero": values beyond the image are 0 (the paper's convention: full weighting darkens the
    # first row and column by 3/4, linear interpolation the last by 1/2); "neumann": the weights
    # that fall inside are renormalised to sum 1 (``R 1 = 1``, ``P 1 = 1``), so an image's border
    # is not an edge on any grid
    boundary: str = "zero"


PAIRS: dict[str, TransferPair] = {
    "full-weighting": TransferPair("full-weighting", (0.25, 0.5, 0.25), -1, (0.5, 1.0, 0.5), -1),
    "average": TransferPair("average", (0.5, 0.5), 0, (1.0, 1.0), 0),
    # full weighting in the interior, no darkened border ring: the pair for images whose
    # background is not 0 (natural images), and for networks whose features are not 0 at the border
    "full-weighting-neumann": TransferPair("full-weighting-neumann", (0.25, 0.5, 0.25), -1,
                                           (0.5, 1.0, 0.5), -1, "neumann"),
}


def get_pair(pair: str) -> TransferPair:
    """Look up a transfer pair by name; an unknown name raises ``ValueError`` listing the valid."""
    try:
        return PAIRS[pair]
    except (KeyError, TypeError):
        raise ValueError(f"unknown transfer pair {pair!r}; valid pairs: {sorted(PAIRS)}") from None


def _check_image(x: torch.Tensor, what: str, need_even: bool) -> None:
    if x.dim() < 3:
        raise ValueError(f"{what}: expected an image of shape (..., C, n, n), got {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h != w:
        raise ValueError(f"{what}: expected a square image (..., C, n, n), got {tuple(x.shape)}")
    if need_even and h % 2:
        raise ValueError(
            f"{what}: image size n={h} is odd; restriction needs n divisible by 2 "
            f"(shape {tuple(x.shape)})"
        )


def _as_4d(x: torch.Tensor) -> tuple[torch.Tensor, torch.Size]:
    lead = x.shape[:-2]
    return x.reshape(-1, 1, *x.shape[-2:]), lead


def _kernel_2d(w: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    v = torch.tensor(w, dtype=like.dtype, device=like.device)
    return torch.outer(v, v)[None, None]


def restrict_image(x: torch.Tensor, pair: str = "full-weighting") -> torch.Tensor:
    """Restrict images to a grid twice as coarse: ``x: (..., C, n, n) -> (..., C, n/2, n/2)``.

    ``x_H = R x_h`` with zero boundary values. Full weighting averages the 3x3 neighbourhood of
    each even fine pixel with weights ``[[1,2,1],[2,4,2],[1,2,1]]/16``:

    >>> x = torch.arange(16.).reshape(1, 4, 4)
    >>> restrict_image(x)
    tensor([[[ 0.9375,  2.5000],
             [ 6.2500, 10.0000]]])
    >>> restrict_image(x, pair="average")
    tensor([[[ 2.5000,  4.5000],
             [10.5000, 12.5000]]])
    """
    _check_image(x, "restrict_image", need_even=True)
    pr = get_pair(pair)
    y, lead = _as_4d(x)
    k = _kernel_2d(pr.r, x)
    pad = -pr.r_offset
    y = F.conv2d(y, k, stride=2, padding=pad)
    if pr.boundary == "neumann":
        y = y / _inside_weight(pr.name, "r", x.shape[-1], x.dtype, x.device)
    return y.reshape(*lead, *y.shape[-2:])


def prolong_image(x: torch.Tensor, pair: str = "full-weighting") -> torch.Tensor:
    """Prolong images to a grid twice as fine: ``x: (..., C, n, n) -> (..., C, 2n, 2n)``.

    ``x_h = P x_H`` with ``P = 4 R^T`` (linear interpolation, zero beyond the last coarse
    pixel, for full weighting; piecewise constant for ``"average"``):

    >>> prolong_image(torch.tensor([[[0., 4.], [8., 12.]]]))
    tensor([[[ 0.,  2.,  4.,  2.],
             [ 4.,  6.,  8.,  4.],
             [ 8., 10., 12.,  6.],
             [ 4.,  5.,  6.,  3.]]])
    """
    _check_image(x, "prolong_image", need_even=False)
    pr = get_pair(pair)
    y, lead = _as_4d(x)
    k = _kernel_2d(pr.p, x)
    pad = -pr.p_offset
    # output size (n-1)*2 - 2*pad + len(p) + output_padding = 2n
    out_pad = 2 * y.shape[-1] - ((y.shape[-1] - 1) * 2 - 2 * pad + len(pr.p))
    y = F.conv_transpose2d(y, k, stride=2, padding=pad, output_padding=out_pad)
    if pr.boundary == "neumann":
        y = y / _inside_weight(pr.name, "p", x.shape[-1], x.dtype, x.device)
    return y.reshape(*lead, *y.shape[-2:])


def _weights_1d(pair: str, which: str, n: int) -> torch.Tensor:
    """The 1D restriction (``n -> n/2``, ``which="r"``) or prolongation (``n -> 2n``, ``"p"``)
    matrix of ``pair``'s weights with zero boundary, float64."""
    pr = get_pair(pair)
    w, off, m = (pr.r, pr.r_offset, n // 2) if which == "r" else (pr.p, pr.p_offset, 2 * n)
    a = torch.zeros(m, n, dtype=torch.float64)
    if which == "r":
        for big in range(m):
            for j, v in enumerate(w):
                if 0 <= 2 * big + off + j < n:
                    a[big, 2 * big + off + j] = v
    else:
        for big in range(n):
            for j, v in enumerate(w):
                if 0 <= 2 * big + off + j < m:
                    a[2 * big + off + j, big] = v
    return a


@cache
def _inside_weight(pair: str, which: str, n: int, dtype: torch.dtype, device) -> torch.Tensor:
    """The 2D sums of the weights that fall inside an ``n x n`` image: what a ``"neumann"`` pair
    divides by (1 in the interior); cached per dtype and device (connectives call it every step)."""
    s = _weights_1d(pair, which, n).sum(dim=1)
    return torch.outer(s, s).to(dtype=dtype, device=device)


def level_operator(n: int, sigma: float, pair: str = "full-weighting") -> torch.Tensor:
    """One pyramid step as a 1D matrix ``M`` (``n/2 x n``, float64):
    ``restrict_image(gaussian_blur(x, sigma), pair) == M @ x @ M.T`` for every channel of every
    ``n x n`` image, because both operators are separable (the same 1D operator along rows and
    columns): ``M = R B`` with ``B`` the 1D Gaussian with replicate padding and ``R`` the pair's
    restriction with zero boundary. Two small matrix products instead of four single-channel
    convolutions (the pyramid build applies it with numpy).

    >>> x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    >>> M = level_operator(8, 1.0)
    >>> torch.allclose(M @ x @ M.T, restrict_image(gaussian_blur(x, 1.0)))
    True
    """
    if n % 2 or n < 2:
        raise ValueError(f"level_operator: n must be even and >= 2, got {n}")
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise ValueError(f"level_operator: sigma must be a finite number >= 0, got {sigma!r}")
    pr = get_pair(pair)
    blur = torch.eye(n, dtype=torch.float64)
    if sigma > 0:
        rad = math.ceil(3 * sigma)
        d = torch.arange(-rad, rad + 1, dtype=torch.float64)
        g = torch.exp(-(d**2) / (2 * sigma**2))
        g = g / g.sum()
        blur = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            for k in range(2 * rad + 1):
                blur[i, min(max(i + k - rad, 0), n - 1)] += g[k]
    r = _weights_1d(pair, "r", n)
    if pr.boundary == "neumann":
        r = r / r.sum(dim=1, keepdim=True)
    return r @ blur


@cache
def _level_operator(n: int, sigma: float, pair: str) -> torch.Tensor:
    return level_operator(n, sigma, pair)


def pyramid_step(x: torch.Tensor, sigma: float, pair: str = "full-weighting") -> torch.Tensor:
    """One pyramid level, ``(..., n, n) -> (..., n/2, n/2)``: ``restrict_image(gaussian_blur(x,
    sigma), pair)`` computed as ``M x M^T`` (``level_operator``, cached per grid; the matrix in
    ``x``'s dtype) -- the step ``mscnn.data.coarsen`` and ``mscnn predict`` share (the pyramid
    build applies the same ``level_operator`` with numpy).

    >>> x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    >>> torch.allclose(pyramid_step(x, 1.0), restrict_image(gaussian_blur(x, 1.0)))
    True
    """
    _check_image(x, "pyramid_step", need_even=True)
    M = _level_operator(x.shape[-1], float(sigma), pair).to(dtype=x.dtype, device=x.device)
    return M @ x @ M.T


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of images: ``x: (..., C, n, n) -> (..., C, n, n)``.

    Kernel ``exp(-d^2 / (2 sigma^2))`` (in pixels) on ``|d| <= ceil(3 sigma)``, normalised to sum
    1, replicate padding at the border (so constant images stay constant). ``sigma = 0`` returns
    the input unchanged.

    >>> gaussian_blur(torch.ones(1, 4, 4), 1.0).allclose(torch.ones(1, 4, 4))
    True
    """
    _check_image(x, "gaussian_blur", need_even=False)
    if not (sigma >= 0 and math.isfinite(sigma)):
        raise ValueError(f"gaussian_blur: sigma must be a finite number >= 0, got {sigma!r}")
    if sigma == 0:
        return x
    rad = math.ceil(3 * sigma)
    d = torch.arange(-rad, rad + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-(d**2) / (2 * sigma**2))
    g = g / g.sum()
    y, lead = _as_4d(x)
    y = F.pad(y, (rad, rad, rad, rad), mode="replicate")
    y = F.conv2d(y, g.view(1, 1, 1, -1))
    y = F.conv2d(y, g.view(1, 1, -1, 1))
    return y.reshape(*lead, *y.shape[-2:])


@cache
def _galerkin_1d(pair: str) -> tuple[tuple[float, ...], ...]:
    """The 3x3 matrix ``M[d, k]`` of the 1D Galerkin product ``R K(s) P`` for stencil offsets
    ``k, d`` in ``{-1, 0, 1}``: coarse ``s_H[d] = sum_k M[d, k] s_h[k]`` (exact rationals)."""
    pr = get_pair(pair)
    M = [[0.0] * 3 for _ in range(3)]
    # s_H[d] = (R K_h P)[0, d] = sum_{i, j} R[0, i] K_h[i, j] P[j, d],
    # with R[0, i] = r(i), K_h[i, i + k] = s[k], P[j, d] = p(j - 2d).
    for a, r in enumerate(pr.r):
        i = pr.r_offset + a
        for k in (-1, 0, 1):
            for b, p in enumerate(pr.p):
                # j = i + k = 2 d + p_offset + b
                twice_d = i + k - pr.p_offset - b
                if twice_d % 2:
                    continue
                if not -1 <= twice_d // 2 <= 1:  # the coarse stencil would be wider than 3x3
                    raise ValueError(f"pair {pair!r}: Galerkin stencil is not 3x3")
                M[twice_d // 2 + 1][k + 1] += r * p
    return tuple(tuple(row) for row in M)


@cache
def _galerkin_9x9(pair: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``G`` (9x9, float64) with ``vec(s_H) = G vec(s_h)``, and its inverse. Formed once per pair."""
    M = torch.tensor(_galerkin_1d(pair), dtype=torch.float64)
    G = torch.kron(M, M)  # the Galerkin product R K P acts on each axis: G = M (x) M
    M_inv = torch.linalg.inv(M)
    return G, torch.kron(M_inv, M_inv)


def galerkin_matrix(pair: str = "full-weighting", inverse: bool = False) -> torch.Tensor:
    """The 9x9 map ``vec(s_h) -> vec(s_H)`` of the Galerkin product (row-major ``vec``), float64.

    >>> G = galerkin_matrix()
    >>> round(torch.linalg.cond(G).item(), 2)
    26.85
    """
    G, G_inv = _galerkin_9x9(get_pair(pair).name)
    return (G_inv if inverse else G).clone()


def _check_stencil(s: torch.Tensor, what: str) -> None:
    if s.dim() < 2 or tuple(s.shape[-2:]) != (3, 3):
        raise ValueError(f"{what}: expected stencils of shape (..., 3, 3), got {tuple(s.shape)}")


def _apply_9x9(s: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    A = A.to(dtype=s.dtype, device=s.device)
    return (s.reshape(*s.shape[:-2], 9) @ A.T).reshape(s.shape)


def restrict_stencil(s: torch.Tensor, pair: str = "full-weighting") -> torch.Tensor:
    """Galerkin restriction of 3x3 stencils: ``s: (..., 3, 3) -> (..., 3, 3)``, ``K_H = R K(s) P``.

    The paper's Example 1 (its fine stencil is printed rounded to two decimals, so the
    coarse one agrees with the paper's to 0.01):

    >>> s = torch.tensor([[-0.89, -2.03, 4.30], [-2.07, 0.00, -2.07], [4.39, -2.03, 1.28]])
    >>> restrict_stencil(s).round(decimals=2)
    tensor([[-0.4800, -0.1700,  0.8200],
            [-0.1600, -0.8100,  0.3600],
            [ 0.8400,  0.4000,  0.0600]])
    """
    _check_stencil(s, "restrict_stencil")
    G, _ = _galerkin_9x9(get_pair(pair).name)
    return _apply_9x9(s, G)


def _low_1d(m: int) -> float:
    """``(1 / 2 pi) * int_{-pi/2}^{pi/2} cos(m w) dw``."""
    return 0.5 if m == 0 else math.sin(m * math.pi / 2) / (m * math.pi)


@cache
def _high_frequency_9x9() -> torch.Tensor:
    offsets = [(a, b) for a in (-1, 0, 1) for b in (-1, 0, 1)]
    Q = torch.zeros(9, 9, dtype=torch.float64)
    for i, (a, b) in enumerate(offsets):
        for j, (c, d) in enumerate(offsets):
            m1, m2 = a - c, b - d
            full = 1.0 if (m1, m2) == (0, 0) else 0.0  # mean of cos over the whole square
            Q[i, j] = (full - _low_1d(m1) * _low_1d(m2)) / 0.75  # mean over the high part
    return Q


def high_frequency_matrix() -> torch.Tensor:
    """The 9x9 ``Q`` (float64, symmetric positive definite) with ``s^T Q s`` the mean of
    ``|sum_k s[k] exp(i k.w)|^2`` over the frequencies ``w`` in ``[-pi, pi]^2`` outside
    ``[-pi/2, pi/2]^2`` (row-major ``vec(s)``, offsets ``k`` in ``{-1, 0, 1}^2``).

    A stencil's symbol at ``w`` is its response to the Fourier mode ``exp(i k.w)``; constant
    stencils pass all modes alike, so the identity stencil has energy 1:

    >>> Q = high_frequency_matrix()
    >>> e = torch.zeros(9, dtype=torch.float64); e[4] = 1
    >>> round((e @ Q @ e).item(), 6)
    1.0
    >>> box = torch.full((9,), 1 / 9, dtype=torch.float64)  # a local mean damps high frequencies
    >>> round((box @ Q @ box).item(), 4)
    0.0215
    """
    return _high_frequency_9x9().clone()


@cache
def _regularised_inverse(pair: str, lam: float) -> torch.Tensor:
    G, _ = _galerkin_9x9(pair)
    return torch.linalg.solve(G.T @ G + lam * _high_frequency_9x9(), G.T)


def prolong_stencil(s: torch.Tensor, pair: str = "full-weighting", lam: float = 0.0) -> torch.Tensor:
    """Galerkin prolongation of 3x3 stencils: ``s: (..., 3, 3) -> (..., 3, 3)``.

    ``lam = 0``: the unique fine stencil ``s_h`` with ``restrict_stencil(s_h, pair) == s`` (the 9x9
    system ``G s_h = s`` is solved with the inverse formed once per pair).
    ``lam > 0``: ``argmin ||G s_h - s||^2 + lam * s_h^T Q s_h`` with ``Q = high_frequency_matrix()``
    (closed form ``(G^T G + lam Q)^{-1} G^T s``; one 9x9 matrix per ``(pair, lam)``). Differentiable
    in ``s``.

    >>> s = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    >>> torch.allclose(restrict_stencil(prolong_stencil(s)), s)
    True
    >>> torch.allclose(prolong_stencil(s, lam=1e-12), prolong_stencil(s))
    True
    """
    _check_stencil(s, "prolong_stencil")
    if not (lam >= 0 and math.isfinite(lam)):
        raise ValueError(f"prolong_stencil: lam must be a finite number >= 0, got {lam!r}")
    name = get_pair(pair).name
    if lam == 0:
        return _apply_9x9(s, _galerkin_9x9(name)[1])
    return _apply_9x9(s, _regularised_inverse(name, float(lam)))
