"""The indicator STEs: identity, clipped, ReLU and clipped-ReLU (docs/estimators.md)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, check_positive
from .base import Context, Estimator, register

# the shared helpers (public in base), under the names the bodies below have always used
from .base import finite as _finite
from .base import indicator as _indicator
from .base import next_float as _next


@register("ste")
class Identity(Estimator):
    """Identity straight-through estimator: q̂'(x) = 1 (Bengio et al. 2013)."""

    formula = "1"
    reference = "Bengio, Leonard, Courville 2013"
    needs_input = False

    def derivative(self, x: Tensor, ctx: Context) -> Tensor:
        return torch.ones_like(x)

    def grad_input(self, x: Tensor | None, y: Tensor | None, g: Tensor, ctx: Context) -> Tensor:
        return g


@register("clipped")
class Clipped(Estimator):
    """Clipped STE (hardtanh'): q̂'(x) = 1{|x| <= c}.

    ``c`` defaults to ``None``: use the quantizer's output range,
    q̂'(x) = 1{lo <= x <= hi} (|x| <= 1 for sign, as in BinaryNet and Larq's
    ``ste_sign``). The edges themselves pass the gradient.
    """

    formula = "1{|x| <= c}   (c=None: 1{lo <= x <= hi}, the quantizer's range)"
    reference = "Hubara et al. 2016 (BinaryNet); Larq ste_sign"

    def __init__(self, c: float | None = None):
        self.c = None if c is None else check_positive("c", c)

    def params(self) -> dict[str, Any]:
        return {"c": self.c}

    def derivative(self, x: Tensor, ctx: Context) -> Tensor:
        if self.c is None:
            return _indicator((x >= ctx.lo) & (x <= ctx.hi), x)
        return _indicator(x.abs() <= self.c, x)

    def grad_input(self, x: Tensor | None, y: Tensor | None, g: Tensor, ctx: Context) -> Tensor:
        lo, hi = (ctx.lo, ctx.hi) if self.c is None else (-self.c, self.c)
        if isinstance(lo, float) and isinstance(hi, float):
            # one fused kernel; its interval is open, so widen it by one ulp of x's dtype
            return torch.ops.aten.hardtanh_backward(
                g, x, _next(lo, -math.inf, x.dtype), _next(hi, math.inf, x.dtype)
            )
        return super().grad_input(x, y, g, ctx)


@register("relu")
class ReLU(Estimator):
    """ReLU STE [Y19]: q̂'(x) = 1{x > 0} (derivative of the ReLU)."""

    formula = "1{x > 0}"
    reference = "Yin et al. 2019 (ICLR), arXiv:1903.05662"

    def derivative(self, x: Tensor, ctx: Context) -> Tensor:
        return _indicator(x > 0, x)

    def grad_input(self, x: Tensor | None, y: Tensor | None, g: Tensor, ctx: Context) -> Tensor:
        return torch.ops.aten.threshold_backward(g, x, 0.0)  # g·1{x > 0}, one fused kernel


@register("clipped_relu")
class ClippedReLU(Estimator):
    """Clipped-ReLU STE [Y19]: q̂'(x) = 1{0 < x < top}.

    ``top`` defaults to the quantizer's highest level: 1 for heaviside,
    (2^b - 1)·α for the [Y19] activation quantizer σ_α.
    """

    formula = "1{0 < x < top}   (top=None: the quantizer's highest level)"
    reference = "Yin et al. 2019 (ICLR), arXiv:1903.05662"

    def __init__(self, top: float | None = None):
        self.top = None if top is None else check_positive("top", top)

    def params(self) -> dict[str, Any]:
        return {"top": self.top}

    def derivative(self, x: Tensor, ctx: Context) -> Tensor:
        top = ctx.hi if self.top is None else self.top
        return _indicator((x > 0) & (x < top), x)

    def grad_input(self, x: Tensor | None, y: Tensor | None, g: Tensor, ctx: Context) -> Tensor:
        top = ctx.hi if self.top is None else self.top
        if isinstance(top, float):
            # g·1{0 < x < top} in one fused kernel (hardtanh's open interval)
            return torch.ops.aten.hardtanh_backward(g, x, 0.0, top)
        return super().grad_input(x, y, g, ctx)

    def check(self, ctx: Context) -> None:
        super().check(ctx)
        if self.top is None and not _finite(ctx.hi):
            raise ConfigError(
                "estimator 'clipped_relu' needs a finite top level; the quantizer "
                f"{ctx.kind!r} is unclipped, so pass top=... explicitly"
            )
