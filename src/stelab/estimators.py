"""Gradient estimators: the backward rule of a quantizer.

A quantizer ``q`` is piecewise constant, so ``dq/dx = 0`` almost everywhere. An
*estimator* replaces it in the backward pass by a surrogate ``q̂'(x)``:

    g_in = q̂'(x) * g_out

Forward function and estimator are chosen independently (see
:mod:`stelab.quantizers`); any estimator can be paired with any quantizer it
*serves*. An estimator is a small object with

* ``derivative(x, ctx)``: the surrogate ``q̂'(x)`` as a tensor like ``x``;
  ``ctx`` is the :class:`Context` of the quantizer it is paired with (its output
  range and step), so ``clipped_relu`` knows where the top level is;
* ``grad_input(x, y, g, ctx)``: the input gradient (default
  ``derivative(x, ctx) * g``); override it for rules that look at the incoming
  gradient or the forward output (EWGS);
* ``serves``: the quantizer kinds it can be paired with (``None`` = all).

Adding an estimator takes one short function::

    @stelab.register_estimator("triangle")
    def triangle(x):
        "q̂'(x) = max(0, 1 - |x|)"
        return (1 - x.abs()).clamp_min(0)

after which ``Quantizer("sign", estimator="triangle")``, ``quantize(...)``, the
CLI and configs accept ``"triangle"`` by name.

All estimators are pure torch (no host syncs), so they run unchanged on CUDA
tensors and inside ``torch.compile``.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import ConfigError, StelabTypeError, check_positive, unknown
from .registry import Registry

__all__ = [
    "Context",
    "Estimator",
    "custom",
    "get",
    "names",
    "register",
    "REGISTRY",
    "describe",
    "DEFAULTS",
    "default_for",
]

Number = float | Tensor


@dataclass(frozen=True)
class Context:
    """What an estimator may know about the quantizer it is paired with.

    ``kind``: the forward function's name (``"sign"``, ``"uniform"``, ...).
    ``lo``, ``hi``: the lowest and highest output level (``±inf`` when unclipped).
    ``step``: spacing of the levels (a float, or a tensor for learned/per-channel steps).
    ``jump_offset``: the jumps of the staircase sit at ``jump_offset + i * step``.
    ``first_jump``, ``last_jump``: the outermost jumps (``±inf`` when unclipped).
    """

    kind: str
    lo: Number
    hi: Number
    step: Number
    jump_offset: Number
    first_jump: Number
    last_jump: Number


class Estimator:
    """Base class: a surrogate derivative ``q̂'(x)`` for a piecewise-constant forward.

    Subclasses set ``name``, ``formula`` (plain-text math), ``reference`` and
    implement :meth:`derivative`. Parameters are validated in ``__init__``.
    """

    name: str = "estimator"
    formula: str = ""
    reference: str = ""
    #: quantizer kinds this estimator can be paired with; None means every kind
    serves: frozenset[str] | None = None
    #: whether :meth:`grad_input` reads the forward output ``y``
    needs_output: bool = False
    #: whether :meth:`grad_input` reads the input ``x`` (identity STE does not)
    needs_input: bool = True
    #: a function of the position inside a bin only, period = step ([S24]'s class)
    cyclical: bool = False

    def derivative(self, x: Tensor, ctx: Context) -> Tensor:
        raise NotImplementedError

    def grad_input(self, x: Tensor | None, y: Tensor | None, g: Tensor, ctx: Context) -> Tensor:
        """Input gradient ``q̂'(x) * g``."""
        return self.derivative(x, ctx) * g

    def params(self) -> dict[str, Any]:
        """The constructor parameters (for repr, summaries and configs)."""
        return {}

    def check(self, ctx: Context) -> None:
        """Raise ConfigError if this estimator cannot serve the quantizer ``ctx``."""
        if self.serves is not None and ctx.kind not in self.serves:
            raise ConfigError(
                f"estimator {self.name!r} cannot serve quantizer {ctx.kind!r}; "
                f"it serves: {', '.join(sorted(self.serves))}"
            )

    def __repr__(self) -> str:
        p = ", ".join(f"{k}={v!r}" for k, v in self.params().items() if v is not None)
        return f"{self.name}({p})" if p else self.name

    def __eq__(self, other: object) -> bool:
        return (
            type(self) is type(other)
            and self.name == other.name  # type: ignore[attr-defined]
            and self.params() == other.params()  # type: ignore[attr-defined]
        )

    def __hash__(self) -> int:
        return hash((type(self), self.name, tuple(sorted(self.params().items()))))


def _indicator(mask: Tensor, like: Tensor) -> Tensor:
    return mask.to(like.dtype)


@functools.lru_cache(maxsize=256)
def _next(v: float, toward: float, dtype: torch.dtype) -> float:
    """The neighbour of ``v`` toward ``toward`` in ``dtype``, as a Python float."""
    if not math.isfinite(v):
        return v
    t = torch.tensor(v, dtype=dtype)
    return float(torch.nextafter(t, torch.tensor(toward, dtype=dtype)))


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

#: every registered estimator: name -> Estimator subclass or factory (see :func:`register`)
REGISTRY: Registry[Callable[..., Estimator]] = Registry("estimator")


def register(name: str, *, overwrite: bool = False) -> Callable[[Any], Any]:
    """Register an estimator under ``name``.

    Decorates either an :class:`Estimator` subclass (its constructor keywords
    become the estimator's parameters) or a plain function ``fn(x) -> q̂'(x)``
    (wrapped with :func:`custom`; its docstring is used as the formula).
    """
    REGISTRY.check_name(name)

    def deco(obj: Any) -> Any:
        if inspect.isclass(obj) and issubclass(obj, Estimator):
            REGISTRY.add(name, obj, overwrite=overwrite)
            obj.name = name
        elif callable(obj):
            formula = (inspect.getdoc(obj) or "").strip().splitlines()
            REGISTRY.add(
                name,
                lambda: custom(obj, name=name, formula=formula[0] if formula else ""),
                overwrite=overwrite,
            )
        else:
            raise StelabTypeError(
                f"register({name!r}) expects an Estimator subclass or a function, "
                f"got {type(obj).__name__}"
            )
        return obj

    return deco


def names() -> list[str]:
    """Names of every registered estimator."""
    return REGISTRY.names()


def get(name: str | Estimator | Callable[[Tensor], Tensor], **params: Any) -> Estimator:
    """An estimator by name with its parameters, e.g. ``get("swish_sign", beta=5)``.

    An :class:`Estimator` instance is returned as is; a plain function becomes
    :func:`custom`.
    """
    if isinstance(name, Estimator):
        if params:
            raise ConfigError(f"parameters {sorted(params)} given with an estimator instance")
        return name
    if not isinstance(name, str):
        if callable(name):
            return custom(name, **params)
        raise StelabTypeError(
            f"estimator must be a name, an Estimator or a function, got {type(name).__name__}"
        )
    return REGISTRY.build(name, **params)


#: The estimator a quantizer gets when none is given, per forward function, and the
#: measurement behind the choice (shown by ``stelab estimators`` and in summaries).
DEFAULTS: dict[str, tuple[str, str]] = {
    "identity": ("ste", "q(x) = x: the identity STE is its true derivative"),
    "sign": (
        "clipped",
        "[S20] reproduction (stelab gradcheck: a sign net with 3 hidden layers, its "
        "gradient against the stochastic net's exact one): relative error 1-7 in the "
        "hidden layers with the clipped STE, 7-1900 with the identity STE",
    ),
    "ternary": ("clipped", "as sign: the clipped STE over the output range [-1, 1]"),
    "heaviside": (
        "clipped_relu",
        "[Y19] two-layer model: the clipped-ReLU STE's expected coarse gradient is a "
        "descent direction that vanishes at minima; the identity STE's does not vanish "
        "there (0.1857 at the closed-form minimum)",
    ),
    "act": (
        "clipped_relu",
        "[Y19] reproduction, Fashion-MNIST LeNet-5, 2-bit activations: training loss "
        "0.11 / test accuracy 89.9% with clipped ReLU vs 0.26 / 88.1% with the identity STE",
    ),
    "uniform": (
        "ste",
        "[S24]: a cyclical weight estimator (dsq, cosine, ...) trained with SGD is the "
        "identity STE with a rescaled learning rate; LSQ's step gradient assumes the STE",
    ),
}


def default_for(kind: str) -> str:
    """The name of the default estimator of the forward function ``kind`` (see DEFAULTS)."""
    if kind not in DEFAULTS:
        raise unknown("quantizer", kind, DEFAULTS)
    return DEFAULTS[kind][0]


def describe() -> list[dict[str, Any]]:
    """One record per registered estimator: name, formula, parameters, reference,
    serves, and ``default_for``: the quantizers that get it when none is given."""
    rows = []
    for n in names():
        est = get(n)
        rows.append(
            {
                "name": n,
                "formula": est.formula,
                "params": est.params(),
                "reference": est.reference,
                "serves": sorted(est.serves) if est.serves is not None else ["any"],
                "default_for": [k for k, (d, _) in DEFAULTS.items() if d == n],
            }
        )
    return rows


# ---------------------------------------------------------------------------
# The estimators (docs/estimators.md)
# ---------------------------------------------------------------------------


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


class Custom(Estimator):
    """A user-supplied surrogate derivative q̂'(x) = fn(x)."""

    reference = "user"

    def __init__(self, fn: Callable[[Tensor], Tensor], name: str = "custom", formula: str = ""):
        if not callable(fn):
            raise StelabTypeError(f"custom estimator fn must be callable, got {fn!r}")
        self.fn = fn
        self.name = name
        self.formula = formula or getattr(fn, "__name__", "fn") + "(x)"

    def params(self) -> dict[str, Any]:
        return {}

    def derivative(self, x: Tensor, ctx: Context) -> Tensor:
        d = self.fn(x)
        if not isinstance(d, Tensor):
            raise StelabTypeError(
                f"custom estimator {self.name!r} must return a tensor, got {type(d).__name__}"
            )
        return d

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Custom) and other.fn is self.fn and other.name == self.name

    def __hash__(self) -> int:
        return hash((Custom, id(self.fn), self.name))


def custom(fn: Callable[[Tensor], Tensor], name: str = "custom", formula: str = "") -> Estimator:
    """Wrap any function of x as an estimator: q̂'(x) = fn(x).

    ``fn`` must be a pure torch function (it runs in the backward pass, on the
    same device and dtype as x). Register it under a name with :func:`register`
    to use it by name everywhere.
    """
    return Custom(fn, name=name, formula=formula)


@functools.lru_cache(maxsize=16)
def integer_bound(dtype: torch.dtype) -> float:
    """2^p for a float dtype with p significand bits: from there on every value is an
    integer (float16 2^11, bfloat16 2^8, float32 2^24, float64 2^53)."""
    return 2.0 / torch.finfo(dtype).eps


_integer_bound = integer_bound  # the name the dsq body uses


def _bin_coordinate(v: Tensor) -> Tensor:
    """The coordinate ``v = (x - c)/Δ`` of a periodic estimator, clamped to ±2^p.

    Every float beyond 2^p (:func:`_integer_bound`) is an integer, so the position
    in the bin there, ``v - round(v)``, is 0 whether or not v is clamped; the clamp
    only matters where x/Δ overflowed to ±inf for a finite x near the float maximum
    (Δ < 1), where it turns ``inf - inf = NaN`` into that same limit 0. Outside a
    clipped quantizer's range the finite profile is then multiplied by 0, never NaN·0.
    The clamp works in place and hands NaN through.
    """
    b = 2.0 / torch.finfo(v.dtype).eps  # _integer_bound, uncached: torch.compile traces it
    return v.clamp_(-b, b)


def _finite(v: Number) -> bool:
    if isinstance(v, Tensor):
        return True  # tensors only arise for learned/per-channel steps of clipped quantizers
    return math.isfinite(v)


# ---------------------------------------------------------------------------
# Cyclical weight-gradient estimators [S24]
#
# Schoenbauer, Moro, Lew, Howard 2024, "Custom Gradient Estimators are
# Straight-Through Estimators in Disguise", arXiv:2405.05171. Each estimator here
# is a function of the position inside a bin only (period Δ = the quantizer's
# step), positive for the parameters the theorem covers; stelab.disguise maps any
# of them to the equivalent STE (learning-rate factor α and weight map M).
# ---------------------------------------------------------------------------

__all__ += ["CyclicEstimator", "Cosine", "TriangleWave", "SoftStaircase", "Periodic"]


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
