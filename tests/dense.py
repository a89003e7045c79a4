"""Dense "gold" operators on small grids: R, P and convolution matrices, built entry by entry from
their definitions (not from the code under test). Images are vectorised row-major: (i, j) -> i*n+j.
"""

from __future__ import annotations

import torch

# 1D weights, written out independently of mscnn.transfer:
# full weighting: coarse I <- fine 2I-1, 2I, 2I+1 with 1/4, 1/2, 1/4;
#   linear P: fine 2I <- coarse I (1), fine 2I+1 <- coarse I and I+1 (1/2 each)
# average: coarse I <- fine 2I, 2I+1 with 1/2 each; P: fine 2I, 2I+1 <- coarse I (1)
ONE_D = {
    "full-weighting": {"R": {-1: 0.25, 0: 0.5, 1: 0.25}, "P": {0: 1.0, 1: 0.5, -1: 0.5}},
    "average": {"R": {0: 0.5, 1: 0.5}, "P": {0: 1.0, 1: 1.0}},
}


def restriction_1d(n: int, pair: str, periodic: bool = False) -> torch.Tensor:
    R = torch.zeros(n // 2, n, dtype=torch.float64)
    for I in range(n // 2):
        for off, w in ONE_D[pair]["R"].items():
            j = 2 * I + off
            if periodic:
                j %= n
            if 0 <= j < n:
                R[I, j] += w
    return R


def prolongation_1d(n: int, pair: str, periodic: bool = False) -> torch.Tensor:
    """(2n x n): the coarse grid has n points."""
    P = torch.zeros(2 * n, n, dtype=torch.float64)
    for I in range(n):
        for off, w in ONE_D[pair]["P"].items():
            j = 2 * I + off
            if periodic:
                j %= 2 * n
            if 0 <= j < 2 * n:
                P[j, I] += w
    return P


def restriction(n: int, pair: str, periodic: bool = False) -> torch.Tensor:
    R1 = restriction_1d(n, pair, periodic)
    return torch.kron(R1, R1)


def prolongation(n: int, pair: str, periodic: bool = False) -> torch.Tensor:
    P1 = prolongation_1d(n, pair, periodic)
    return torch.kron(P1, P1)


def convolution(s: torch.Tensor, n: int, periodic: bool = False) -> torch.Tensor:
    """Dense matrix of cross-correlation with a 3x3 stencil: (K y)[i,j] = sum s[a,b] y[i+a-1, j+b-1]."""
    K = torch.zeros(n * n, n * n, dtype=torch.float64)
    for i in range(n):
        for j in range(n):
            for a in range(3):
                for b in range(3):
                    p, q = i + a - 1, j + b - 1
                    if periodic:
                        p, q = p % n, q % n
                    if 0 <= p < n and 0 <= q < n:
                        K[i * n + j, p * n + q] += s[a, b]
    return K


def stencil_of(K: torch.Tensor, n: int, i: int, j: int, periodic: bool = False) -> torch.Tensor:
    """Read the 3x3 stencil of row (i, j) of a dense operator on an n x n grid."""
    s = torch.zeros(3, 3, dtype=torch.float64)
    for a in range(3):
        for b in range(3):
            p, q = i + a - 1, j + b - 1
            if periodic:
                p, q = p % n, q % n
            s[a, b] = K[i * n + j, p * n + q]
    return s
