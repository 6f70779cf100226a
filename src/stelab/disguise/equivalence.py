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

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, StelabTypeError, check_positive
from ..estimators import Estimator
from ..quantizers import Forward
from .table import Table, horner

__all__ = ["Equivalence", "describe_r"]


_F64 = torch.float64
# elements per pass of M: one chunk's temporaries (~1.5 MB) stay near L2 (measured best)
CHUNK = 1 << 15


def describe_r(r: float) -> str:
    """Where on the bin a position r (in steps, within [-1/2, 1/2]) lies, in words."""
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
        table: Table,
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
        r = torch.linspace(-0.5, 0.5, 4097, dtype=_F64)
        self.max_shift = float((self._phi(r.clone()) - 0.5 - r).abs().max())
        self.symmetric = abs(float(self._phi(torch.zeros(1, dtype=_F64))) - 0.5) < 1e-9

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
        return horner(cols_centred if centred else cols, j, x.sub_(j))

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
        return (j.to(_F64) + u) / n - 0.5

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
        # in chunks of CHUNK elements copied into two reused buffers: a few dozen
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
            chunk = min(CHUNK, res.numel())
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
        r = torch.sub(s, n, out=torch.empty(s.shape, dtype=_F64, device=s.device))
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
