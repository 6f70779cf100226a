"""The tabulated map Φ of [S24] (float64, torch only): Gauss-Legendre panel integrals of
1/q̂', a monotone cubic Hermite table with Horner evaluation, and its inverse look-up.

Used by :class:`stelab.disguise.equivalence.Equivalence`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["N_MAX", "N_START", "Table", "build_table", "gauss_legendre", "horner"]

_F64 = torch.float64
GL_ORDER = 10  # Gauss-Legendre nodes per panel
N_START = 64  # panels of the first table tried
N_MAX = 1 << 16  # most panels tried before giving up


def gauss_legendre(order: int) -> tuple[Tensor, Tensor]:
    """Nodes and weights of Gauss-Legendre quadrature on [-1, 1] (Golub-Welsch)."""
    k = torch.arange(1, order, dtype=_F64)
    b = k / torch.sqrt(4 * k * k - 1)
    jac = torch.diag(b, 1) + torch.diag(b, -1)
    x, v = torch.linalg.eigh(jac)
    return x, 2 * v[0] ** 2


_GL_X, _GL_W = gauss_legendre(GL_ORDER)


def _panel_integrals(inv_g: Callable[[Tensor], Tensor], a: Tensor, h: float) -> Tensor:
    """∫_{a_j}^{a_j + h} inv_g for every left end a_j (Gauss-Legendre)."""
    nodes = a[:, None] + (h / 2) * (1 + _GL_X)[None, :]
    return (h / 2) * (inv_g(nodes) * _GL_W).sum(dim=1)


@dataclass(frozen=True)
class Table:
    """Φ on N equal panels of [-1/2, 1/2]: Horner coefficients per panel and nodes."""

    n: int
    coef: Tensor  # (N, 4): Φ = c0 + u(c1 + u(c2 + u c3)), u ∈ [0, 1] within a panel
    cols: tuple[Tensor, Tensor, Tensor, Tensor]  # the four columns, contiguous (fast gather)
    cols_centred: tuple[Tensor, Tensor, Tensor, Tensor]  # the same for Φ - 1/2 (used by M)
    phi: Tensor  # (N + 1,) Φ at the panel ends, Φ_0 = 0, Φ_N = 1
    integral: float  # ∫_{-1/2}^{1/2} dρ/g(ρ)
    interp_error: float  # max Hermite error at the panel midpoints (units of Φ)
    quad_change: float  # relative change of the integral at the last doubling
    # inverse look-up: on a uniform grid of len(jinv) - 1 cells over p ∈ [0, 1], the panel
    # holding each cell's left end; a p in cell k lies in panel jinv[k] .. jinv[k] + hops
    jinv: Tensor
    hops: int


def build_table(inv_g: Callable[[Tensor], Tensor], tol: float) -> Table | None:
    """Tabulate Φ with N doubling until ``tol`` is met; None if N_MAX does not suffice."""
    prev_integral = None
    n = N_START
    while n <= N_MAX:
        h = 1.0 / n
        edges = (torch.arange(n + 1, dtype=_F64) - n // 2) / n  # exact; holds 0 and ±1/2
        panels = _panel_integrals(inv_g, edges[:-1], h)
        cum = torch.cat([torch.zeros(1, dtype=_F64), torch.cumsum(panels, 0)])
        integral = float(cum[-1])
        phi = cum / integral
        phi[-1] = 1.0
        d = inv_g(edges) / integral * h  # h·Φ' at the panel ends
        p0, p1, d0, d1 = phi[:-1], phi[1:], d[:-1], d[1:]
        dp = p1 - p0
        coef = torch.stack([p0, d0, 3 * dp - 2 * d0 - d1, -2 * dp + d0 + d1], dim=1)
        # Hermite at panel midpoints vs. quadrature from the left end
        half = _panel_integrals(inv_g, edges[:-1], h / 2) / integral
        herm = (p0 + p1) / 2 + (d0 - d1) / 8
        interp_error = float((herm - (p0 + half)).abs().max())
        quad_change = (
            math.inf if prev_integral is None else abs(integral - prev_integral) / integral
        )
        # monotone cubic Hermite: slopes within [0, 3] secants (Fritsch-Carlson)
        ratio = torch.cat([d0 / dp, d1 / dp])
        monotone = bool(((ratio >= 0) & (ratio <= 3)).all())
        if interp_error <= tol and quad_change <= tol and monotone:
            cols = tuple(coef[:, i].contiguous() for i in range(4))
            centred = (cols[0] - 0.5, *cols[1:])
            cells = min(8 * n, 1 << 20)
            grid = torch.arange(cells + 1, dtype=_F64) / cells
            jinv = (torch.searchsorted(phi, grid, right=True) - 1).clamp_(0, n - 1)
            hops = int((jinv[1:] - jinv[:-1]).max())
            return Table(n, coef, cols, centred, phi, integral, interp_error, quad_change,
                          jinv.to(torch.int32), hops)  # fmt: skip
        prev_integral = integral
        n *= 2
    return None


def horner(cols: Sequence[Tensor], j: Tensor, u: Tensor) -> Tensor:
    """c0[j] + u(c1[j] + u(c2[j] + u c3[j])) for 1-D ``j`` and ``u``.

    1-D gathers (``index_select``, much faster than rows of a (N, 4) table) into two
    buffers, alternating, each step one fused ``addcmul_``.
    """
    c0, c1, c2, c3 = cols
    a = c3.index_select(0, j)
    b = torch.index_select(c2, 0, j).addcmul_(u, a)
    a = torch.index_select(c1, 0, j, out=a).addcmul_(u, b)
    return torch.index_select(c0, 0, j, out=b).addcmul_(u, a)
