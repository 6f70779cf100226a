"""Cyclical weight-gradient estimators [S24].

Schoenbauer, Moro, Lew, Howard 2024, "Custom Gradient Estimators are
Straight-Through Estimators in Disguise", arXiv:2405.05171. Each estimator here
is a function of the position inside a bin only (period Δ = the quantizer's
step), positive for the parameters the theorem covers; stelab.disguise maps any
of them to the equivalent STE (learning-rate factor α and weight map M).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, StelabTypeError, check_positive
from .base import Context, Estimator, register

# the shared helpers (public in base), under the names the bodies below have always used
from .base import bin_coordinate as _bin_coordinate
from .base import finite as _finite
from .base import indicator as _indicator


def _check_real(name: str, value: Any, allowed: str) -> float:
    """``value`` as a finite float, or an error naming the parameter and ``allowed``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise StelabTypeError(f"{name} must be a number ({allowed}), got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")
    return v


class CyclicEstimator(Estimator):
    """Base of the cyclical weight estimators: q̂'(w) = profile(r), period Δ.

    r = v - round(v) in [-1/2, 1/2) is the position inside the bin, in units of
    the step, measured from the bin centre: v = (w - c)/Δ with c = jump_offset - Δ/2
    (c = 0 for ``uniform``, whose bins are centred on the levels). r = ±1/2 are the
    change points (exact half-integers map to r = -1/2). Subclasses implement
    :meth:`profile`. For a clipped quantizer q̂' is 0 beyond the outer half-bins,
    i.e. outside [first_jump - Δ/2, last_jump + Δ/2] (as ``dsq``).
    """

    serves = frozenset({"uniform"})
    #: a function of the position inside a bin only (used by stelab.disguise.to_ste)
    cyclical = True

    def profile(self, r: Tensor) -> Tensor:
        """q̂' as a function of the position r in [-1/2, 1/2) inside a bin."""
        raise NotImplementedError

    def derivative(self, x: Tensor, ctx: Context) -> Tensor:
        step = ctx.step
        v = _bin_coordinate((x - (ctx.jump_offset - step / 2)) / step)
        r = v - torch.round(v)  # exact; in [-1/2, 1/2]
        r = torch.where(r >= 0.5, r - 1, r)  # [-1/2, 1/2)
        d = self.profile(r)
        lo = ctx.first_jump - step / 2
        hi = ctx.last_jump + step / 2
        if _finite(lo) or _finite(hi):
            d = d * _indicator((x >= lo) & (x <= hi), x)
        return d


@register("cosine")
class Cosine(CyclicEstimator):
    """Cosine cyclical estimator [S24]: q̂'(w) = 1 + a·cos(2π·w/Δ).

    Period Δ, mean 1 over a bin, largest (1 + |a|) at the bin centres for a > 0
    and at the change points for a < 0. The [S24] theorem needs |a| < 1; its
    equivalent STE has α = sqrt(1 - a²). |a| >= 1 may be constructed (q̂' then
    vanishes or turns negative) but stelab.disguise reports it as degenerate.
    """

    formula = "1 + a*cos(2*pi*w/step)   (|a| < 1 for the [S24] theorem)"
    reference = "Schoenbauer, Moro, Lew, Howard 2024, arXiv:2405.05171"

    def __init__(self, a: float = 0.5):
        self.a = _check_real("a", a, "a finite number; |a| < 1 keeps q̂' > 0")

    def params(self) -> dict[str, Any]:
        return {"a": self.a}

    def profile(self, r: Tensor) -> Tensor:
        return 1 + self.a * torch.cos((2 * math.pi) * r)


@register("triangle_wave")
class TriangleWave(CyclicEstimator):
    """Piecewise-linear cyclical estimator: q̂'(w) = m + 4(1 - m)·|r|.

    A triangle wave of period Δ: the value ``m`` at the bin centres (r = 0), 2 - m
    at the change points (r = ±1/2), linear in between, mean exactly 1 over a bin.
    0 <= m <= 2; m < 1 peaks at the change points (like dsq), m > 1 at the
    centres, m = 1 is the STE. m = 0 or m = 2 vanish somewhere (degenerate).
    Harmonic mean: α = 2(1 - m) / ln((2 - m)/m)  (α = 1 at m = 1).
    """

    formula = "m + 4*(1 - m)*|r|,  r = w/step - round(w/step)   (0 <= m <= 2)"
    reference = "stelab (a piecewise-linear member of the [S24] class, arXiv:2405.05171)"

    def __init__(self, m: float = 0.5):
        m = _check_real("m", m, "a number in [0, 2]")
        if not 0.0 <= m <= 2.0:
            raise ConfigError(f"m must be a number in [0, 2] (outside, q̂' < 0), got {m!r}")
        self.m = m

    def params(self) -> dict[str, Any]:
        return {"m": self.m}

    def profile(self, r: Tensor) -> Tensor:
        return self.m + (4 * (1 - self.m)) * r.abs()


@register("soft_staircase")
class SoftStaircase(CyclicEstimator):
    """Logistic soft staircase: q̂'(w) = k·σ'(k·ρ) / (σ(k/2) - σ(-k/2)).

    ρ = r ∓ 1/2 in [-1/2, 1/2] is the position relative to the nearest change
    point, σ the logistic sigmoid, σ' = σ(1 - σ). It is the derivative of the
    staircase whose every step is the rescaled sigmoid
    level + Δ·(σ(kρ) - σ(-k/2)) / (σ(k/2) - σ(-k/2)), so it averages exactly 1 over
    a bin and peaks at the change points. ``k`` > 0 is the sharpness in units of
    the step. Since σ'(z) = sech²(z/2)/4 and σ(k/2) - σ(-k/2) = tanh(k/4), it is
    DSQ with sharpness k/2: soft_staircase(k) == dsq(k/2).
    """

    formula = "k * sigmoid'(k*rho) / (sigmoid(k/2) - sigmoid(-k/2)),  rho = offset to nearest jump"
    reference = "Gong et al. 2019 (DSQ), logistic form; [S24] arXiv:2405.05171"

    def __init__(self, k: float = 6.0):
        self.k = check_positive("k", k)
        self._norm = self.k / math.tanh(self.k / 4)

    def params(self) -> dict[str, Any]:
        return {"k": self.k}

    def profile(self, r: Tensor) -> Tensor:
        z = self.k * (r.abs() - 0.5)  # <= 0
        s = torch.sigmoid(z)
        return self._norm * s * (1 - s)


@register("periodic")
class Periodic(CyclicEstimator):
    """Any cyclical estimator from a function of the position in a bin: q̂'(w) = func(r).

    r = w/Δ - round(w/Δ) in [-1/2, 1/2) (r = ±1/2 are the change points, 0 the bin
    centre). ``func`` must be a pure torch function returning a tensor like r; for the
    [S24] theorem it should be positive. ``func=None`` is the constant 1 (the STE).
    (The parameter is not called ``fn``: that is the Quantizer's forward-function name.)
    Example::

        bump = lambda r: 1 + 0.3 * torch.sin(2 * math.pi * r)
        Quantizer("uniform", "periodic", step=0.1, func=bump)
    """

    formula = "func(r),  r = w/step - round(w/step) in [-1/2, 1/2)"
    reference = "[S24] arXiv:2405.05171 (the class of cyclical estimators)"

    def __init__(self, func: Callable[[Tensor], Tensor] | None = None):
        if func is not None and not callable(func):
            raise StelabTypeError(f"func must be a function r -> q̂'(r) or None, got {func!r}")
        self.func = func

    def params(self) -> dict[str, Any]:
        return {"func": self.func}

    def profile(self, r: Tensor) -> Tensor:
        if self.func is None:
            return torch.ones_like(r)
        d = self.func(r)
        if not isinstance(d, Tensor):
            raise StelabTypeError(
                f"periodic estimator func must return a tensor, got {type(d).__name__}"
            )
        return d
