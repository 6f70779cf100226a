"""Deriving [S24]'s equivalent STE of an estimator: check that q̂' repeats from bin to
bin and stays positive, tabulate Φ and build the :class:`Equivalence`
(:func:`equivalent_ste`); which estimators are cyclical (:func:`is_cyclical`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .. import estimators as _est
from ..errors import ConfigError, StelabTypeError, check_int, check_positive
from ..estimators import Estimator
from ..quantizers import Forward
from .equivalence import Equivalence, describe_r
from .table import N_MAX, build_table

__all__ = ["DegenerateEstimatorWarning", "equivalent_ste", "is_cyclical"]

_F64 = torch.float64
# below this fraction of its maximum, q̂' counts as vanishing (α would be below it too)
_MIN_RATIO = 1e-20
# an estimator whose table fails counts as nearly vanishing (degenerate, α -> 0) only if
# its minimum is below this fraction of its maximum; above, the table failed on a jump
_SHARP_RATIO = 1e-6
# regularisation of a degenerate estimator (allow_degenerate=True)
_EPS_DEGENERATE = 1e-4
# bins (besides bin 0) on which an estimator is checked to repeat itself
_CHECK_BINS = (-1000, -37, -5, -1, 1, 2, 8, 123, 4096)


class DegenerateEstimatorWarning(UserWarning):
    """An estimator outside the [S24] class (vanishing or negative in a bin) was mapped
    anyway (``allow_degenerate=True``); the result is a limit, not an equivalence."""


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
        return d.to(_F64).expand(r.shape)

    notes: list[str] = []
    # 1. cyclical: the same function on other bins (inside the range when clipped)
    r_chk = (torch.arange(256, dtype=_F64) + 0.5) / 256 - 0.5
    g0 = g_of_r(r_chk)
    scale = float(g0.abs().max()) if bool(torch.isfinite(g0).all()) else 1.0
    bins = _CHECK_BINS
    if bits is not None:
        lo_b, hi_b = Forward("uniform", bits).qrange
        bins = tuple(b for b in bins if lo_b < b < hi_b) + (int(lo_b) + 1, int(hi_b) - 1)
    for b in bins:
        gb = est.derivative((b + r_chk) * step, ctx).to(_F64)
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
    r_dense = torch.linspace(-0.5, 0.5, 8193, dtype=_F64)
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
        table = build_table(lambda r: 1.0 / g_of_r(r), tol)
        if table is None:
            sharp = f"1/q̂' is too sharp to integrate to tol={tol:g} with {N_MAX} panels"
            if g_min >= _SHARP_RATIO * g_max:
                # bounded away from 0, so α is not small: a jump or a narrow dip inside
                # the bin, which a looser tolerance tabulates (α = 0 would be wrong)
                raise ConfigError(
                    f"estimator {name}: {sharp} (q̂' ranges over [{g_min:.3g}, {g_max:.3g}] "
                    "on a bin: a jump or a narrow dip inside it); a larger tol (below "
                    "1e-3) tabulates it"
                )
            degenerate = True
            why = (
                f"estimator {name} nearly vanishes (min q̂' = {g_min:.3g} at "
                f"{describe_r(r_min)}, max {g_max:.3g}): {sharp}"
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
        table = build_table(lambda r: 1.0 / (g_of_r(r).clamp_min(0) + eps), 1e-6)
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
