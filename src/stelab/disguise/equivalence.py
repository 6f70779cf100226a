"""α, M and M⁻¹ of a cyclical estimator [S24] (see :mod:`stelab.disguise`).

Numerics. Φ is computed in float64 on one bin, in units of the step:
r ∈ [-1/2, 1/2] is the position from the bin centre and

    Φ(r) = ∫_{-1/2}^{r} dρ / g(ρ)  /  ∫_{-1/2}^{1/2} dρ / g(ρ),   g(ρ) = q̂'(Δ·ρ),

so that α = 1 / ∫_{-1/2}^{1/2} dρ/g(ρ) and M(w) = Δ·(n - 1/2 + Φ(r)), n = round(w/Δ).
Φ is tabulated by composite Gauss-Legendre quadrature (order 10) on N equal
panels and interpolated by the cubic Hermite polynomial that uses the exact
derivative Φ' = α/g at the panel ends; N doubles until both the Hermite error
(checked against quadrature at every panel midpoint) and the change of the bin
integral are below ``tol`` (default 1e-10). The integer part n is taken exactly
as the quantizer takes it (``torch.round(w / step)`` in the weight's dtype, halves
to even; r = w/step - n is then exact in that dtype), and every result is nudged
by at most a few ulps into its own bin, so Q(M(w)) == Q(w) and Q(M⁻¹(w)) == Q(w)
hold exactly, also at change points.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import estimators as _est
from ..errors import ConfigError, StelabTypeError, check_int, check_positive
from ..estimators import Estimator
from ..quantizers import Forward

__all__ = ["DegenerateEstimatorWarning", "Equivalence", "equivalent_ste", "is_cyclical"]


F64 = torch.float64
_GL_ORDER = 10
_N_START = 64
_N_MAX = 1 << 16
# elements per pass of M: one chunk's temporaries (~1.5 MB) stay near L2 (measured best)
_CHUNK = 1 << 15
# below this fraction of its maximum, q̂' counts as vanishing (α would be below it too)
_MIN_RATIO = 1e-20
# regularisation of a degenerate estimator (allow_degenerate=True)
_EPS_DEGENERATE = 1e-4
# bins (besides bin 0) on which an estimator is checked to repeat itself
_CHECK_BINS = (-1000, -37, -5, -1, 1, 2, 8, 123, 4096)


class DegenerateEstimatorWarning(UserWarning):
    """An estimator outside the [S24] class (vanishing or negative in a bin) was mapped
    anyway (``allow_degenerate=True``); the result is a limit, not an equivalence."""


# ---------------------------------------------------------------------------
# Quadrature helpers (float64, torch only)
# ---------------------------------------------------------------------------


def _gauss_legendre(order: int) -> tuple[Tensor, Tensor]:
    """Nodes and weights of Gauss-Legendre quadrature on [-1, 1] (Golub-Welsch)."""
    k = torch.arange(1, order, dtype=F64)
    b = k / torch.sqrt(4 * k * k - 1)
    jac = torch.diag(b, 1) + torch.diag(b, -1)
    x, v = torch.linalg.eigh(jac)
    return x, 2 * v[0] ** 2


_GL_X, _GL_W = _gauss_legendre(_GL_ORDER)


def _panel_integrals(inv_g: Callable[[Tensor], Tensor], a: Tensor, h: float) -> Tensor:
    """∫_{a_j}^{a_j + h} inv_g for every left end a_j (Gauss-Legendre)."""
    nodes = a[:, None] + (h / 2) * (1 + _GL_X)[None, :]
    return (h / 2) * (inv_g(nodes) * _GL_W).sum(dim=1)


@dataclass(frozen=True)
class _Table:
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


def _build_table(inv_g: Callable[[Tensor], Tensor], tol: float) -> _Table | None:
    """Tabulate Φ with N doubling until ``tol`` is met; None if N_MAX does not suffice."""
    prev_integral = None
    n = _N_START
    while n <= _N_MAX:
        h = 1.0 / n
        edges = (torch.arange(n + 1, dtype=F64) - n // 2) / n  # exact; holds 0 and ±1/2
        panels = _panel_integrals(inv_g, edges[:-1], h)
        cum = torch.cat([torch.zeros(1, dtype=F64), torch.cumsum(panels, 0)])
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
            grid = torch.arange(cells + 1, dtype=F64) / cells
            jinv = (torch.searchsorted(phi, grid, right=True) - 1).clamp_(0, n - 1)
            hops = int((jinv[1:] - jinv[:-1]).max())
            return _Table(n, coef, cols, centred, phi, integral, interp_error, quad_change,
                          jinv.to(torch.int32), hops)  # fmt: skip
        prev_integral = integral
        n *= 2
    return None


def _horner(cols: Sequence[Tensor], j: Tensor, u: Tensor) -> Tensor:
    """c0[j] + u(c1[j] + u(c2[j] + u c3[j])) for 1-D ``j`` and ``u``.

    1-D gathers (``index_select``, much faster than rows of a (N, 4) table) into two
    buffers, alternating, each step one fused ``addcmul_``.
    """
    c0, c1, c2, c3 = cols
    a = c3.index_select(0, j)
    b = torch.index_select(c2, 0, j).addcmul_(u, a)
    a = torch.index_select(c1, 0, j, out=a).addcmul_(u, b)
    return torch.index_select(c0, 0, j, out=b).addcmul_(u, a)


# ---------------------------------------------------------------------------
# The equivalence
# ---------------------------------------------------------------------------


def _runs(r: Tensor, mask: Tensor) -> list[tuple[float, float]]:
    """The maximal intervals [first, last] of consecutive grid points ``r`` where
    ``mask`` holds (e.g. a q̂' <= 0 around both change points gives two)."""
    idx = mask.nonzero().flatten().tolist()
    runs: list[tuple[float, float]] = []
    start = prev = idx[0]
    for i in idx[1:]:
        if i != prev + 1:
            runs.append((float(r[start]), float(r[prev])))
            start = i
        prev = i
    runs.append((float(r[start]), float(r[prev])))
    return runs


def describe_r(r: float) -> str:
    if abs(abs(r) - 0.5) < 1e-12:
        return "the change points (w = ±Δ/2 from a level)"
    if abs(r) < 1e-12:
        return "the bin centres (the levels)"
    return f"w = level {r:+.4g}·Δ"


class Equivalence:
    """The STE equivalent of a cyclical estimator [S24]: α, M and M⁻¹.

    Built by :func:`equivalent_ste`. Attributes:

    * ``estimator``, ``step`` (Δ), ``bits`` (None: unclipped quantizer);
    * ``alpha``: α = Δ / ∫_bin ds/q̂'(s), the learning-rate factor of the STE;
    * ``ste``: the name of the equivalent estimator: ``"ste"`` (identity) for an
      unclipped quantizer, ``"clipped"`` (1 inside the quantizer's range, 0 outside,
      where the cyclical estimators vanish too) for a clipped one;
    * ``g_min``/``g_max`` and ``r_min``/``r_max``: the extremes of q̂' over a bin and
      where they sit (position from the bin centre in units of Δ);
    * ``max_shift``: max |M(w) - w| / Δ;
    * ``degenerate``: True when q̂' vanishes or is negative in a bin (only with
      ``allow_degenerate=True``): α = 0 and M is the limit of the map of
      max(q̂', 0) + ε·max q̂' with ε = 1e-4 (a finite-ε stand-in for the ε → 0 limit);
    * ``panels``, ``interp_error``: the quadrature table's size and its checked error.

    ``M(w)``, ``M_inv(w)``, ``M_prime(w)`` = α/q̂'(w) and ``derivative(w)`` = q̂'(w)
    act elementwise on tensors of any shape, floating dtype and device, and return the
    input's dtype. ``M_many`` maps a list of tensors (all weights of a model) in one
    pass, much faster than one call per tensor.
    """

    def __init__(
        self,
        estimator: Estimator,
        step: float,
        bits: int | None,
        table: _Table,
        alpha: float,
        extremes: tuple[float, float, float, float],
        degenerate: bool,
        scale_free: bool,
        notes: list[str],
    ):
        self.estimator = estimator
        self.step = step
        self.bits = bits
        self._table = table
        self.alpha = alpha
        self.g_min, self.r_min, self.g_max, self.r_max = extremes
        self.degenerate = degenerate
        self.scale_free = scale_free
        self.notes = notes
        self._fwd = Forward("uniform", bits)
        self._device_tables: dict[torch.device, Any] = {}
        self._lo, self._hi = self._fwd.qrange
        r = torch.linspace(-0.5, 0.5, 4097, dtype=F64)
        self.max_shift = float((self._phi(r.clone()) - 0.5 - r).abs().max())
        self.symmetric = abs(float(self._phi(torch.zeros(1, dtype=F64))) - 0.5) < 1e-9

    # -- properties ----------------------------------------------------------

    @property
    def ste(self) -> str:
        """Name of the equivalent estimator: 'ste' (unclipped) or 'clipped' (clipped)."""
        return "ste" if self.bits is None else "clipped"

    @property
    def panels(self) -> int:
        return self._table.n

    @property
    def interp_error(self) -> float:
        return self._table.interp_error

    def __repr__(self) -> str:
        b = "" if self.bits is None else f", bits={self.bits}"
        d = ", degenerate" if self.degenerate else ""
        return f"Equivalence({self.estimator!r}, step={self.step:g}{b}: alpha={self.alpha:.6g}{d})"

    # -- Φ and its inverse on one bin ----------------------------------------

    def _on(
        self, device: torch.device
    ) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...], Tensor, Tensor]:
        """The table's columns, centred columns, Φ nodes and inverse index on ``device``."""
        t = self._table
        if device.type == "cpu":
            return t.cols, t.cols_centred, t.phi, t.jinv
        if device not in self._device_tables:
            moved = [tuple(c.to(device) for c in cs) for cs in (t.cols, t.cols_centred)]
            self._device_tables[device] = (*moved, t.phi.to(device), t.jinv.to(device))
        return self._device_tables[device]

    def _phi(self, r: Tensor, centred: bool = False) -> Tensor:
        """Φ(r) (``centred``: Φ(r) - 1/2) for 1-D float64 r ∈ [-1/2, 1/2]. Consumes ``r``."""
        n = self._table.n
        x = r.mul_(n).add_(n / 2)  # (r + 1/2)·N ∈ [0, N]
        # floor for x >= 0; outside [0, N] (r out of range, NaN) j is clamped, u is junk
        j = x.to(torch.int32).clamp_(0, n - 1)
        cols, cols_centred, _, _ = self._on(r.device)
        return _horner(cols_centred if centred else cols, j, x.sub_(j))

    def _phi_inv(self, p: Tensor) -> Tensor:
        """r with Φ(r) = p for 1-D float64 p ∈ [0, 1]: bracket, then Newton on the cubic."""
        t = self._table
        n = t.n
        cols, _, phi, jinv = self._on(p.device)
        p = p.clamp_(0, 1).nan_to_num_(0.5)
        if t.hops <= 4:  # the panel: a uniform-grid look-up, then a few exact hops
            cells = jinv.numel() - 1
            j = jinv.index_select(0, p.mul(cells).to(torch.int32).clamp_(0, cells - 1))
            for _ in range(t.hops):
                j += (phi.index_select(0, j + 1) <= p).to(torch.int32)
                j.clamp_(max=n - 1)
        else:  # a very uneven Φ: binary search
            j = (torch.searchsorted(phi, p, right=True) - 1).to(torch.int32).clamp_(0, n - 1)
        p0, p1 = phi.index_select(0, j), phi.index_select(0, j + 1)
        u = ((p - p0) / (p1 - p0)).nan_to_num_(0.5).clamp_(0, 1)
        c0, c1, c2, c3 = (c.index_select(0, j) for c in cols)
        for _ in range(3):
            f = c0 + u * (c1 + u * (c2 + u * c3)) - p
            df = c1 + u * (2 * c2 + 3 * u * c3)
            u = (u - f / df).nan_to_num_(0.5).clamp_(0, 1)
        return (j.to(F64) + u) / n - 0.5

    # -- the maps --------------------------------------------------------------

    def _step_for(self, w: Tensor, step: float | Tensor | None) -> float | Tensor:
        if step is None:
            return self.step
        if isinstance(step, Tensor):
            if step.numel() > 1 and not self.scale_free:
                raise ConfigError(
                    f"a per-channel step needs an estimator defined in units of the step; "
                    f"{self.estimator!r} is a function of w (build one Equivalence per step)"
                )
            if not step.is_floating_point():
                raise StelabTypeError(f"step must be a floating-point tensor, got {step.dtype}")
            try:
                torch.broadcast_shapes(step.shape, w.shape)
            except RuntimeError:
                raise ConfigError(
                    f"step of shape {tuple(step.shape)} does not broadcast to the weight's "
                    f"shape {tuple(w.shape)}"
                ) from None
            return step.detach()
        return check_positive("step", step)

    @torch.no_grad()
    def _map(
        self,
        ws: Sequence[Tensor],
        steps: Sequence[float | Tensor | None] | None,
        inverse: bool,
    ) -> list[Tensor]:
        ws = list(ws)
        steps = [None] * len(ws) if steps is None else list(steps)
        if len(steps) != len(ws):
            raise ConfigError(f"M_many got {len(ws)} tensors but {len(steps)} steps")
        # Tensors that compute in the same dtype on the same device are mapped together,
        # in chunks of _CHUNK elements copied into two reused buffers: a few dozen
        # kernels per chunk instead of per tensor, no large allocations (page faults),
        # and each chunk's float64 temporaries stay in L2.
        groups: dict[tuple[torch.dtype, torch.dtype, torch.device], list[int]] = {}
        st_of = []
        for i, (w, step) in enumerate(zip(ws, steps, strict=True)):
            if not isinstance(w, Tensor) or not w.is_floating_point():
                raise StelabTypeError(
                    f"M expects a floating-point tensor, got {type(w).__name__}"
                    + (f" of dtype {w.dtype}" if isinstance(w, Tensor) else "")
                )
            st = self._step_for(w, step)
            st_of.append(st)
            # the dtype of the quantizer's own w / step (a 0-d step does not promote)
            groups.setdefault((w.dtype, torch.result_type(w, st), w.device), []).append(i)
        out: list[Tensor] = [None] * len(ws)  # type: ignore[list-item]
        for (dtype, cdt, device), idx in groups.items():
            sizes = [ws[i].numel() for i in idx]
            res = torch.empty(sum(sizes), dtype=dtype, device=device)
            chunk = min(_CHUNK, res.numel())
            w_buf = torch.empty(chunk, dtype=cdt, device=device)
            st_buf = torch.empty_like(w_buf)
            done = fill = 0  # elements mapped / in the chunk buffers
            for i in idx:
                w, st = ws[i].detach().reshape(-1), st_of[i]
                per_weight = isinstance(st, Tensor) and st.dim() > 0  # per-channel steps
                if per_weight:
                    st = st.to(device=device, dtype=cdt).expand(ws[i].shape).reshape(-1)
                k = 0
                if not per_weight:
                    # whole chunks of a tensor with one step: mapped in place of the
                    # copy, with the step as a 0-d tensor of the compute dtype (the
                    # same rounded value the buffer would hold; no step array to read)
                    st0 = (st.to(device=device, dtype=cdt) if isinstance(st, Tensor)
                           else torch.tensor(st, dtype=cdt, device=device))  # fmt: skip
                    while fill == 0 and w.numel() - k >= chunk > 0 and w.dtype == cdt:
                        self._map_chunk(w[k : k + chunk], st0, res[done : done + chunk], inverse)
                        k, done = k + chunk, done + chunk
                while k < w.numel():
                    take = min(chunk - fill, w.numel() - k)
                    w_buf[fill : fill + take].copy_(w[k : k + take])
                    if per_weight:
                        st_buf[fill : fill + take].copy_(st[k : k + take])
                    else:  # w / (st cast to the compute dtype) == w / st, bit for bit
                        st_buf[fill : fill + take].fill_(st)
                    k, fill = k + take, fill + take
                    if fill == chunk:
                        self._map_chunk(w_buf, st_buf, res[done : done + fill], inverse)
                        done, fill = done + fill, 0
            if fill:
                self._map_chunk(w_buf[:fill], st_buf[:fill], res[done : done + fill], inverse)
            for i, piece in zip(idx, res.split(sizes), strict=True):
                # own storage per result (a view would drag the whole buffer into torch.save)
                out[i] = (
                    piece.view(ws[i].shape) if len(idx) == 1 else piece.clone().view(ws[i].shape)
                )
        return out

    def _map_chunk(self, w: Tensor, st: Tensor, out: Tensor, inverse: bool) -> None:
        """M or M⁻¹ of the 1-D ``w`` (steps ``st``, both in the compute dtype) into ``out``."""
        clipped = self.bits is not None
        s = w / st
        n = s.round()  # exactly the quantizer's expression (halves to even)
        if clipped:
            n.clamp_(self._lo, self._hi)
        # r = w/Δ - n ∈ [-1/2, 1/2] (the subtraction is exact); NaN/±inf inputs give
        # r = 0 and come out as n·Δ = NaN/±inf again
        r = torch.sub(s, n, out=torch.empty(s.shape, dtype=F64, device=s.device))
        r.nan_to_num_(0.0)
        if inverse:  # w = Δ(n - 1/2 + Φ(r')) -> r'
            y = self._phi_inv(r.add_(0.5))
        else:  # Δ(n - 1/2 + Φ(r))
            y = self._phi(r, centred=True)
        y = y.add_(n).mul_(st)
        keep = None
        if clipped:  # outside [lo·Δ, hi·Δ]: M(w) = w
            mid, half = (self._lo + self._hi) / 2, (self._hi - self._lo) / 2
            keep = s.sub_(mid).abs_() > half
            y = torch.where(keep, w, y)
        out.copy_(y)
        _into_bins(out, n, st, self._lo if clipped else None, self._hi, keep)

    def M(self, w: Tensor, step: float | Tensor | None = None) -> Tensor:
        """M(w) = w_b + α ∫_{w_b}^{w} ds/q̂'(s), elementwise; same shape and dtype as ``w``.

        ``step``: override Δ (a number, or a tensor broadcastable to ``w``, e.g. the
        quantizer's step buffer or per-channel steps; only for estimators defined in
        units of the step, see :func:`is_cyclical`). With a clipped quantizer M is the
        identity outside [lo·Δ, hi·Δ]. The bin index is ``torch.round(w / step)``, the
        quantizer's own expression, so pass the quantizer's step tensor to get
        Q(M(w)) == Q(w) bit for bit. Accuracy: float64 to ~1e-15·Δ; a float32 ``w``
        is divided by the step in float32, as the quantizer does, which costs at most
        a few float32 ulps of M(w).
        """
        return self._map([w], [step], inverse=False)[0]

    def M_inv(self, w: Tensor, step: float | Tensor | None = None) -> Tensor:
        """The inverse map: M⁻¹(M(w)) = w (to ~1e-15·Δ in float64)."""
        return self._map([w], [step], inverse=True)[0]

    def M_many(
        self, ws: Sequence[Tensor], steps: Sequence[float | Tensor | None] | None = None
    ) -> list[Tensor]:
        """``[self.M(w, s) for w, s in zip(ws, steps)]`` (e.g. all weights of a model).

        ``steps``: one step per tensor (a number, a tensor broadcastable to it, or None
        for ``self.step``). Much faster than mapping tensor by tensor: the tensors are
        mapped together in cache-sized chunks.
        """
        return self._map(ws, steps, inverse=False)

    def derivative(self, w: Tensor) -> Tensor:
        """q̂'(w) of the estimator (paired with this quantizer)."""
        ctx = self._fwd.context(self.step)
        return self.estimator.derivative(w, ctx)

    def M_prime(self, w: Tensor) -> Tensor:
        """M'(w) = α / q̂'(w)."""
        return self.alpha / self.derivative(w)


def _into_bins(
    out: Tensor,
    n: Tensor,
    step: Tensor,
    lo: float | None,
    hi: float,
    skip: Tensor | None,
) -> None:
    """Nudge ``out`` in place by ulps towards the bin centre n·step until Q(out) == n·step.

    ``skip``: elements left as they are (outside a clipped range); NaN is skipped too.
    """

    def q(v: Tensor) -> Tensor:
        m = (v / step).round_()
        return m if lo is None else m.clamp_(lo, hi)

    qo = q(out)
    if torch.equal(qo, n):  # the common case (NaN is never equal: takes the loop)
        return
    bad = qo != n
    skip = torch.isnan(n) if skip is None else skip | torch.isnan(n)
    bad &= ~skip
    centre = (n * step).to(out.dtype)
    for _ in range(64):
        if not bool(bad.any()):
            return
        out.copy_(torch.where(bad, torch.nextafter(out, centre), out))
        bad = (q(out) != n) & ~skip
    raise AssertionError("stelab.disguise: could not place M(w) in its bin (please report)")


def _as_estimator(
    estimator: str | Estimator | Callable[[Tensor], Tensor], params: Mapping[str, Any] | None
) -> Estimator:
    params = dict(params or {})
    if isinstance(estimator, (str, Estimator)) or callable(estimator):
        return _est.get(estimator, **params)
    raise StelabTypeError(
        "estimator must be a registered name, an Estimator or a function of w, "
        f"got {type(estimator).__name__}"
    )


def is_cyclical(estimator: Estimator) -> bool:
    """Whether ``estimator`` is known to be cyclical (a function of w/Δ mod 1 only).

    True for ``dsq`` and the [S24] estimators (``cosine``, ``triangle_wave``,
    ``soft_staircase``, ``periodic``): every estimator whose ``cyclical`` attribute is
    set. The identity STE is trivially cyclical but needs no conversion (False).
    """
    return bool(estimator.cyclical)


def equivalent_ste(
    estimator: str | Estimator | Callable[[Tensor], Tensor],
    step: float | Tensor,
    *,
    params: Mapping[str, Any] | None = None,
    bits: int | None = None,
    allow_degenerate: bool = False,
    tol: float = 1e-10,
) -> Equivalence:
    """The STE that a cyclical weight estimator is in disguise [S24].

    Args:
        estimator: a registered name (with ``params``), an :class:`Estimator`, or a
            function ``w -> q̂'(w)`` (it must repeat with period ``step``).
        step: the quantizer's step Δ > 0. Pass the exact value the quantizer uses
            (for a ``Quantizer`` that is ``q.step.item()``).
        params: the estimator's parameters when it is given by name, e.g. ``{"a": 0.5}``.
        bits: None for the unclipped quantizer Δ·round(w/Δ) (the [S24] setting);
            b for the clipped signed b-bit quantizer. Clipped: M is the identity outside
            [lo·Δ, hi·Δ] and the equivalent estimator is ``clipped`` (0 outside, as the
            cyclical estimators).
        allow_degenerate: map an estimator that vanishes (or is negative) somewhere in
            a bin anyway: α = 0 (the limit) and M the limit map, with a
            :class:`DegenerateEstimatorWarning`. Otherwise such estimators raise
            ``ConfigError`` naming where they vanish.
        tol: accuracy of the tabulated map in units of Δ (the table is refined until the
            checked error is below it).

    Returns:
        An :class:`Equivalence` with ``alpha`` = Δ / ∫_bin ds/q̂'(s) and the maps
        ``M(w) = w_b + α ∫_{w_b}^{w} ds/q̂'(s)``, ``M_inv``.

    Raises:
        ConfigError: the estimator cannot serve a uniform quantizer, is not cyclical
        with period Δ (e.g. ``clipped`` with a fixed c, which is 0 far out), vanishes or
        is negative in a bin (clipped STE, sharp DSQ where sech² underflows), or is too
        sharp to tabulate accurately.
    """
    est = _as_estimator(estimator, params)
    if isinstance(step, Tensor):
        if step.numel() != 1:
            raise ConfigError(
                f"step must be one number here (got a tensor of shape {tuple(step.shape)}); "
                "for per-channel steps build the Equivalence with one of them and pass the "
                "tensor to M(w, step=...)"
            )
        step = float(step.detach().reshape(()).item())
    step = check_positive("step", step)
    if bits is not None:
        bits = check_int("bits", bits, 2, 16)
    if not (isinstance(tol, (int, float)) and 0 < tol < 1e-3):
        raise ConfigError(f"tol must be a number in (0, 1e-3), got {tol!r}")
    fwd_free = Forward("uniform", None)
    ctx = fwd_free.context(step)
    est.check(ctx)
    name = repr(est)

    def g_of_r(r: Tensor) -> Tensor:
        d = est.derivative(r * step, ctx)
        if not isinstance(d, Tensor):
            raise StelabTypeError(f"estimator {name} returned {type(d).__name__}, not a tensor")
        return d.to(F64).expand(r.shape)

    notes: list[str] = []
    # 1. cyclical: the same function on other bins (inside the range when clipped)
    r_chk = (torch.arange(256, dtype=F64) + 0.5) / 256 - 0.5
    g0 = g_of_r(r_chk)
    scale = float(g0.abs().max()) if bool(torch.isfinite(g0).all()) else 1.0
    bins = _CHECK_BINS
    if bits is not None:
        lo_b, hi_b = Forward("uniform", bits).qrange
        bins = tuple(b for b in bins if lo_b < b < hi_b) + (int(lo_b) + 1, int(hi_b) - 1)
    for b in bins:
        gb = est.derivative((b + r_chk) * step, ctx).to(F64)
        diff = (gb - g0).abs()
        bad = ~(diff <= 1e-6 * max(scale, 1e-300) + 1e-12)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0])
            w_bad = (b + float(r_chk[i])) * step
            raise ConfigError(
                f"estimator {name} is not cyclical with period step={step:g}: "
                f"q̂'({w_bad:.6g}) = {float(gb[i]):.6g} on bin {b} but "
                f"q̂'({float(r_chk[i]) * step:.6g}) = {float(g0[i]):.6g} on bin 0. "
                "The [S24] equivalence covers only estimators that repeat on every bin "
                "(e.g. cosine, triangle_wave, soft_staircase, periodic, dsq)"
            )

    # 2. positive and finite on the whole bin (dense grid incl. edges and centre)
    r_dense = torch.linspace(-0.5, 0.5, 8193, dtype=F64)
    g_dense = g_of_r(r_dense)
    if not bool(torch.isfinite(g_dense).all()):
        i = int((~torch.isfinite(g_dense)).nonzero()[0, 0])
        raise ConfigError(
            f"estimator {name} is not finite at w = {float(r_dense[i]) * step:.6g} "
            f"(q̂' = {float(g_dense[i])}); the [S24] theorem needs a bounded q̂'"
        )
    i_min, i_max = int(g_dense.argmin()), int(g_dense.argmax())
    g_min, g_max = float(g_dense[i_min]), float(g_dense[i_max])
    r_min, r_max = float(r_dense[i_min]), float(r_dense[i_max])
    extremes = (g_min, r_min, g_max, r_max)
    degenerate = g_min <= 0.0
    why = ""
    if degenerate:
        kind = "vanishes" if g_min == 0.0 else "is negative"
        zero = r_dense[g_dense <= 0]
        if zero.numel() == 1 or bool((zero.abs() == 0.5).all()):
            where = describe_r(r_min)
        else:
            frac = zero.numel() / r_dense.numel()
            runs = _runs(r_dense, g_dense <= 0)
            where = f"{frac:.0%} of every bin, " + " and ".join(
                f"between w = level {a:+.4g}·Δ and level {b:+.4g}·Δ" for a, b in runs
            )
        why = (
            f"estimator {name} {kind} at {where} (q̂' = {g_min:.3g} at "
            f"w = {r_min * step:+.6g} with step {step:g}); the [S24] theorem needs "
            "q̂' > 0 on the whole bin (its harmonic mean α would be 0)"
        )

    table = None
    if not degenerate and g_min < _MIN_RATIO * g_max:
        degenerate = True
        why = (
            f"estimator {name} nearly vanishes (min q̂' = {g_min:.3g} at {describe_r(r_min)}, "
            f"below {_MIN_RATIO:g} × its max {g_max:.3g}): α would be below ~{_MIN_RATIO:g}"
        )
    if not degenerate:
        table = _build_table(lambda r: 1.0 / g_of_r(r), tol)
        if table is None:
            degenerate = True
            why = (
                f"estimator {name} nearly vanishes (min q̂' = {g_min:.3g} at "
                f"{describe_r(r_min)}, max {g_max:.3g}): 1/q̂' is too sharp to integrate "
                f"to tol={tol:g} with {_N_MAX} panels"
            )
    if degenerate:
        if not allow_degenerate:
            raise ConfigError(why + "; pass allow_degenerate=True for the limit (α = 0)")
        warnings.warn(
            why + f". Returning the limit α = 0; M is the map of max(q̂', 0) + {_EPS_DEGENERATE:g}"
            "·max q̂' (a finite-ε stand-in for the limit map)",
            DegenerateEstimatorWarning,
            stacklevel=2,
        )
        eps = _EPS_DEGENERATE * max(g_max, 1e-300)
        table = _build_table(lambda r: 1.0 / (g_of_r(r).clamp_min(0) + eps), 1e-6)
        if table is None:  # pragma: no cover - the regularised integrand is bounded
            raise ConfigError(why)
        alpha = 0.0
        notes.append(why)
    else:
        alpha = 1.0 / table.integral
        if alpha < 1e-6:
            notes.append(
                f"α = {alpha:.3g}: the equivalent STE barely moves (q̂' ranges over "
                f"[{g_min:.3g}, {g_max:.3g}])"
            )
    scale_free = is_cyclical(est)
    eq = Equivalence(est, step, bits, table, alpha, extremes, degenerate, scale_free, notes)
    if bits is not None and not eq.symmetric:
        notes.append(
            "q̂' is not symmetric about the bin centre: M moves the outermost levels' "
            "centres, so the clipped half-bins are not mapped onto themselves exactly"
        )
    return eq
