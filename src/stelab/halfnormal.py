"""The resolution α of [Y19]'s σ_α for a half-Gaussian input, in closed form.

[Y19] fixes α per bit width as the MSE-optimal uniform quantizer of the
half-Gaussian |N(0, 1)| that follows a batch norm without affine parameters.
σ_α maps the bin ((k-1)α, kα] to the level kα (k = 1..2^b-1, the top bin
unbounded), so with the bin's probability ΔP and first two moments ΔM1, ΔM2

    E[(σ_α(X) - X)²] = Σ_k (kα)²·ΔP_k - 2kα·ΔM1_k + ΔM2_k,
    P(t) = 2Φ(t), M1(t) = 2(φ(0) - φ(t)), M2(t) = 2Φ(t) - 2tφ(t)   (up to constants).

Everything here is float64 and depends on torch only.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import ConfigError, check_int

__all__ = ["halfnormal_alpha", "halfnormal_mse", "lloyd_alpha"]

_SQRT2 = math.sqrt(2.0)
_SQRT_2PI = math.sqrt(2 * math.pi)


def _parts(t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(P, M1, M2) at the bin ends ``t``, each up to a constant that cancels in a bin."""
    cdf = 1 + torch.erf(t / _SQRT2)  # 2Φ(t)
    phi = torch.exp(-0.5 * t * t) / _SQRT_2PI
    tphi = torch.where(torch.isinf(t), 0.0, t * phi)
    return cdf, 2 * (1 / _SQRT_2PI - phi), cdf - 2 * tphi


def _bins(alpha: float, bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Level indices k = 1..2^b-1 and each bin's (ΔP, ΔM1, ΔM2) for X ~ |N(0, 1)|."""
    k = torch.arange(1, 2**bits, dtype=torch.float64)
    hi = k * alpha
    hi[-1] = math.inf
    p1, m1, s1 = _parts(hi)
    p0, m0, s0 = _parts((k - 1) * alpha)
    return k, p1 - p0, m1 - m0, s1 - s0


def _mse(alpha: float, bits: int) -> float:
    k, dp, dm1, dm2 = _bins(alpha, bits)
    level = k * alpha
    return float((level**2 * dp - 2 * level * dm1 + dm2).sum())


def halfnormal_mse(alpha: float, bits: int) -> float:
    """E[(σ_α(X) - X)²] for X ~ |N(0, 1)|, in closed form (float64)."""
    bits = check_int("bits", bits, 1, 16)
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"alpha must be a finite number > 0, got {alpha!r}")
    return _mse(alpha, bits)


def halfnormal_alpha(bits: int, *, tol: float = 1e-12) -> float:
    """The α that minimises :func:`halfnormal_mse` (golden-section search).

    1 bit gives α = E|x| = sqrt(2/π). This is the α of [Y19]'s σ_α used by
    :mod:`stelab.models` for each bit width.
    """
    bits = check_int("bits", bits, 1, 16)
    qp = 2**bits - 1
    lo, hi = 1e-6, 10.0 / qp + 1.0
    g = (math.sqrt(5) - 1) / 2
    c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    fc, fd = _mse(c, bits), _mse(d, bits)
    while hi - lo > tol * max(1.0, hi):
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - g * (hi - lo)
            fc = _mse(c, bits)
        else:
            lo, c, fc = c, d, fd
            d = lo + g * (hi - lo)
            fd = _mse(d, bits)
    return (lo + hi) / 2


def lloyd_alpha(bits: int, *, tol: float = 1e-14, max_iter: int = 100_000) -> float:
    """The fixed point of the Lloyd-style iteration α ← E[k(X) X] / E[k(X)²], X ~ |N(0, 1)|.

    ``k(x) = σ_α(x) / α`` is the level index under the current α; the update is the
    least-squares scale for fixed bin assignments. It differs from the MSE minimiser
    (:func:`halfnormal_alpha`) for b >= 2 because the ceil-based σ_α's error jumps at
    the bin edges, so moving α also moves mass between bins. For b = 1 both equal
    E[X] = sqrt(2/π).
    """
    bits = check_int("bits", bits, 1, 16)
    a = math.sqrt(2 / math.pi) / max(1, 2 ** (bits - 1))
    for _ in range(max_iter):
        k, dp, dm1, _ = _bins(a, bits)
        new = float((k * dm1).sum() / (k * k * dp).sum())
        if abs(new - a) <= tol * max(1.0, a):
            return new
        a = new
    raise ConfigError(f"lloyd_alpha(bits={bits}) did not converge in max_iter={max_iter} steps")
