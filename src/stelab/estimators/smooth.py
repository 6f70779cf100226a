"""The smooth surrogates: ApproxSign, SwishSign, logistic, DSQ's soft staircase and
EWGS (docs/estimators.md)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, check_positive
from .base import Context, Estimator, register

# the shared helpers (public in base), under the names the bodies below have always used
from .base import bin_coordinate as _bin_coordinate
from .base import finite as _finite
from .base import indicator as _indicator
from .base import integer_bound as _integer_bound
from .base import next_float as _next


@register("approx_sign")
class ApproxSign(Estimator):
    """ApproxSign (Bi-Real Net): q̂'(x) = max(0, 2 - 2|x|).

    The derivative of the piecewise-quadratic approximation of sign; integrates to 2
    over [-1, 1], the height of the sign jump.
    """

    formula = "max(0, 2 - 2|x|)"
    reference = "Liu et al. 2018 (Bi-Real Net); Larq approx_sign"
    serves = frozenset({"sign", "ternary"})

    def derivative(self, x: Tensor, ctx: Context) -> Tensor:
        return (2 - 2 * x.abs()).clamp_min(0)


_SWISH_CUT = 1.0e4


@register("swish_sign")
class SwishSign(Estimator):
    """SwishSign (BNN+): q̂'(x) = β(2 - βx·tanh(βx/2)) / (1 + cosh(βx)).

    The derivative of 2σ(βx)(1 + βx(1 - σ(βx))) - 1; ``beta`` > 0, default 5.
    """

    formula = "beta * (2 - beta*x*tanh(beta*x/2)) / (1 + cosh(beta*x))"
    reference = "Darabi et al. 2018 (BNN+); Larq swish_sign"
    serves = frozenset({"sign", "ternary"})

    def __init__(self, beta: float = 5.0):
        self.beta = check_positive("beta", beta)

    def params(self) -> dict[str, Any]:
        return {"beta": self.beta}

    def derivative(self, x: Tensor, ctx: Context) -> Tensor:
        # 1 + cosh(bx) overflows for |bx| > ~710 (float64) / ~89 (float32); the
        # numerator grows only linearly, so the limit there is 0.
        # Rewrite with e = exp(-|bx|): 1 + cosh = (1 + e)^2 / (2e), and multiply the
        # linear factor by e before any scaling so that no product overflows. Beyond
        # |bx| = _SWISH_CUT the value is below 1e4·e^(-1e4) (0 in every dtype), so bx
        # is clamped there: βx itself may overflow to ±inf for finite x.
        bx = (self.beta * x).clamp_(-_SWISH_CUT, _SWISH_CUT)
        e = torch.exp(-bx.abs())
        return ((2 - bx * torch.tanh(bx / 2)) * e).mul_(2 * self.beta).div_((1 + e) ** 2)


@register("logistic")
class Logistic(Estimator):
    """Logistic-derivative ("deep ST") estimator [S20].

    q̂'(x) = (hi - lo) · s · σ'(s·x), with σ' = σ(1 - σ): the derivative of the
    smooth relaxation lo + (hi - lo)·σ(s·x). For sign that is 2σ'(x), for heaviside
    σ'(x) (``scale`` s = 1); it is the mean of sign(x - Z), Z standard logistic.
    """

    formula = "(hi - lo) * s * sigmoid(s*x) * (1 - sigmoid(s*x))"
    reference = "Shekhovtsov & Yanush 2020; Shekhovtsov, Yanush, Flach 2020 (NeurIPS)"
    serves = frozenset({"sign", "heaviside"})

    def __init__(self, scale: float = 1.0):
        self.scale = check_positive("scale", scale)

    def params(self) -> dict[str, Any]:
        return {"scale": self.scale}

    def derivative(self, x: Tensor, ctx: Context) -> Tensor:
        s = torch.sigmoid(self.scale * x)
        return (ctx.hi - ctx.lo) * self.scale * s * (1 - s)


@register("dsq")
class DSQ(Estimator):
    """DSQ soft staircase for multi-bit quantizers (Gong et al. 2019).

    Between two adjacent levels (an interval of width Δ centred on a jump m) the
    staircase is replaced by (Δ/2)(1 + s·tanh(k(x - m)/Δ)) + level, s = 1/tanh(k/2),
    whose derivative is

        q̂'(x) = (s·k/2) · sech²(k(x - m)/Δ),  m the jump nearest to x,

    periodic with period Δ, peaking at the jumps, averaging exactly 1 over a bin.
    ``k`` > 0 is the sharpness in units of the step ([S24]'s kΔ,
    docs/papers/disguise2024.md). Beyond the outer half-bins of a clipped quantizer the
    derivative is 0.
    """

    formula = "(s*k/2) * sech(k*(x - m)/step)^2,  s = 1/tanh(k/2), m = nearest jump"
    reference = "Gong et al. 2019 (Differentiable Soft Quantization)"
    serves = frozenset({"uniform", "act"})
    cyclical = True

    def __init__(self, k: float = 3.0):
        self.k = check_positive("k", k)
        self._s = 1.0 / math.tanh(self.k / 2)

    def params(self) -> dict[str, Any]:
        return {"k": self.k}

    def derivative(self, x: Tensor, ctx: Context) -> Tensor:
        step = ctx.step
        u = _bin_coordinate((x - ctx.jump_offset) / step)
        r = u - torch.round(u)  # position relative to the nearest jump, in steps
        # sech²(kr) = 4e/(1 + e)², e = exp(-2k|r|): one exp instead of cosh's two (no
        # cancellation in the tails, unlike 4σ(1 - σ)), fused by the compiler into one loop
        e = torch.exp((-2 * self.k) * r.abs())
        d = (2 * self._s * self.k) * e / (1 + e) ** 2
        lo = ctx.first_jump - step / 2
        hi = ctx.last_jump + step / 2
        if _finite(lo) or _finite(hi):
            d = d * _indicator((x >= lo) & (x <= hi), x)
        return d

    def _minus_k(self, like: Tensor) -> Tensor:
        """-k as a 0-d tensor of ``like``'s dtype and device, made once (four tiny
        kernels per backward otherwise)."""
        key = (like.dtype, like.device)
        cache = self.__dict__.setdefault("_minus_k_cache", {})
        if key not in cache:
            cache[key] = torch.tensor(-self.k, dtype=like.dtype, device=like.device)
        return cache[key]

    def grad_input(self, x: Tensor | None, y: Tensor | None, g: Tensor, ctx: Context) -> Tensor:
        if not isinstance(ctx.step, float) or torch.is_grad_enabled() or x.dtype != g.dtype:
            # a tensor step (learned, per-channel, torch.compile) or a differentiable
            # backward: the formula as one expression, which the compiler fuses
            return super().grad_input(x, y, g, ctx)
        # eager with a float step: the same formula in in-place passes over one new
        # tensor (a second one, e.g. round(t), costs more than a pass: fresh pages).
        # |r| = 1/2 - ||frac(t)| - 1/2| is the distance to the nearest jump (frac is
        # exact and vectorized; round would need a buffer, remainder is ~10x slower).
        # sech²(z) = 4σ(2z)(1 - σ(2z)), so g·sech²(kr) = 4·sigmoid_backward(g, σ(-2k|r|))
        # (one fused kernel; σ is ~3x cheaper than tanh on CPU). The argument is taken
        # <= 0: there σ(1 - σ) has no cancellation, so the tails keep their relative
        # accuracy for any k (σ(+k) rounds to 1 and 1 - σ to 0 for k >~ 17 in float32,
        # 37 in float64). The range indicator is one hardtanh_backward (its open
        # interval widened by an ulp); both write into the buffer they read
        if ctx.jump_offset:
            t = torch.sub(x, ctx.jump_offset).div_(ctx.step)
        else:
            t = torch.div(x, ctx.step)
        lo = ctx.first_jump - ctx.step / 2
        hi = ctx.last_jump + ctx.step / 2
        if not (math.isfinite(lo) and math.isfinite(hi)):
            # see _bin_coordinate; within a clipped range t is finite, and beyond it
            # hardtanh_backward below selects 0 (it does not multiply a NaN by 0)
            b = _integer_bound(x.dtype)
            t.clamp_(-b, b)
        t.frac_().abs_().sub_(0.5).abs_()  # 1/2 - |r|
        # -2k|r| = 2k·(1/2 - |r|) - k in one pass; its rounding error (an ulp of k) is
        # largest near the jumps, where sech² is flat
        torch.add(self._minus_k(t), t, alpha=2 * self.k, out=t).sigmoid_()
        torch.ops.aten.sigmoid_backward.grad_input(g, t, grad_input=t)
        if math.isfinite(lo) or math.isfinite(hi):
            torch.ops.aten.hardtanh_backward.grad_input(
                t, x, _next(lo, -math.inf, x.dtype), _next(hi, math.inf, x.dtype), grad_input=t
            )
        return t.mul_(2 * self._s * self.k)


@register("ewgs")
class EWGS(Estimator):
    """Element-wise gradient scaling (Lee et al. 2021).

    g_in = g_out · (1 + δ·sign(g_out)·(x - q(x))): the gradient is enlarged for
    elements whose quantization error points the way the update would move them.
    ``delta`` δ >= 0 (default 0.2; δ = 0 is the identity STE). x - q(x) is in the
    units of x (docs/estimators.md).
    """

    formula = "g * (1 + delta * sign(g) * (x - q(x)))"
    reference = "Lee, Kim, Ham 2021 (CVPR), Network Quantization with Element-wise Gradient Scaling"
    needs_output = True

    def __init__(self, delta: float = 0.2):
        self.delta = check_positive("delta", delta, allow_zero=True)

    def params(self) -> dict[str, Any]:
        return {"delta": self.delta}

    def derivative(self, x: Tensor, ctx: Context) -> Tensor:
        raise ConfigError(
            "estimator 'ewgs' depends on the incoming gradient: it has no derivative "
            "q̂'(x) of x alone (use grad_input)"
        )

    def grad_input(self, x: Tensor | None, y: Tensor | None, g: Tensor, ctx: Context) -> Tensor:
        # g·(1 + δ·sign(g)·(x - q)) = g + δ·|g|·(x - q): three passes, no sign(); one
        # expression, which torch.compile fuses into one loop. Eager, the result goes
        # into |g|'s buffer (two new tensors, not three: each one is page faults on CPU);
        # a differentiable backward (create_graph) takes the expression (out= is not)
        if torch.is_grad_enabled() or torch.compiler.is_compiling():
            return torch.addcmul(g, g.abs(), x - y, value=self.delta)
        a = g.abs()
        return torch.addcmul(g, a, x - y, value=self.delta, out=a)
