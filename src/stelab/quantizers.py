"""Quantizers: a forward function paired with a gradient estimator.

A :class:`Quantizer` is an ``nn.Module`` holding one forward function ``q``
(piecewise constant) and one :class:`~stelab.estimators.Estimator` for its
backward pass. Forward functions (docs/estimators.md):

=============  ==========================================================  =========
name           q(x)                                                        levels
=============  ==========================================================  =========
``identity``   x (no quantization; for float baselines)                    -
``sign``       +1 if x >= 0 else -1  (sign(0) = +1, as in Larq)            ±1
``heaviside``  1{x > 0}  (the binarized ReLU of [Y19])                     0, 1
``ternary``    sign(x)·1{|x| > t}                                          -1, 0, 1
``uniform``    Δ·clamp(round(x/Δ), -2^(b-1), 2^(b-1) - 1)  (signed, b bits)  2^b
``act``        α·clamp(ceil(x/α), 0, 2^b - 1)  ([Y19] σ_α, unsigned, b bits) 2^b
=============  ==========================================================  =========

Rounding in ``uniform`` is ``torch.round``: halves go to the even integer
(round(0.5) = 0, round(1.5) = 2). ``rounding="stochastic"`` rounds up with
probability equal to the fractional part (floor(x/Δ + U), U ~ U[0, 1)), an
unbiased forward. ``bits=None`` leaves ``uniform`` unclipped (Δ·round(x/Δ)),
the setting of [S24]. Beyond L = 2^p·Δ (p = 11, 24, 53 significand bits for
float16/32/64) its levels are finer than the floats, and the correctly rounded
Δ·round(x/Δ) is x itself: that is what it returns there, never ±inf (computed
directly, x/Δ overflows near the float maximum when Δ < 1). Below L the result
is bit for bit Δ·round(x/Δ).

Every estimator gives a finite gradient for every finite input in float16,
float32 and float64; the periodic ones (``dsq`` and [S24]'s cyclical
estimators) take the position inside a bin as 0 where x/Δ has no fractional
bits (|x/Δ| >= 2^p), which is also where x/Δ overflows.

``act`` is [Y19]'s ceil-based quantizer: 0 for x <= 0, α·ceil(x/α) on
(0, (2^b - 2)α], (2^b - 1)α beyond. Levels 0, α, ..., (2^b - 1)α; jumps at
0, α, ..., (2^b - 2)α.

A learned step (LSQ, Esser et al. 2020) is available for ``uniform`` and
``act`` with ``learn_step=True``: ∂q/∂Δ = (q(x) - x·1{lo < x < hi})/Δ scaled by
1/sqrt(N·Qp), N the number of elements quantized (per sample for activations).

NaN inputs give NaN outputs (they propagate; nothing raises inside forward or
backward, which keeps both free of host synchronisation).

The forward functions are an open registry (:data:`FORWARDS`): a new quantizer
is one :class:`Forward` (or :class:`Staircase`) subclass decorated with
:func:`register_forward`; its class attributes drive parameter checks, default
estimator, summaries and export (docs/estimators.md, "Adding an estimator or a
quantizer").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import estimators as _est
from .errors import ConfigError, StelabTypeError, check_int, check_positive
from .estimators import Context, Estimator
from .halfnormal import halfnormal_alpha  # noqa: F401  (re-exported: stelab.quantizers API)
from .registry import Registry

__all__ = [
    "FORWARDS",
    "Forward",
    "QUANTIZER_PARAMS",
    "Quantizer",
    "QuantAct",
    "Staircase",
    "forward_names",
    "quantize_tensor",
    "register_forward",
    "unregister_forward",
]

INF = math.inf


# ---------------------------------------------------------------------------
# Forward functions
# ---------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Forward:
    """A piecewise-constant forward function with its fixed parameters.

    ``Forward(kind, bits, threshold, rounding)`` returns an instance of the class
    registered for ``kind`` (see :func:`register_forward`), so calling it runs that
    kind's code directly, with no dispatch on the name. ``bits`` (uniform, act),
    ``threshold`` (ternary) and ``rounding`` (uniform) are fixed at construction;
    the step Δ (α) is passed at call time so that it can be a learned or
    per-channel tensor.

    A registered kind (a subclass) sets the class attributes below and
    implements :meth:`q` and :meth:`context` (and :attr:`qrange` if it has a step).
    """

    kind: str
    bits: int | None = None
    threshold: float = 0.5
    rounding: str = "nearest"

    #: plain-text formula (``stelab estimators``, docs)
    formula: ClassVar[str] = ""
    #: takes a step Δ: ``step`` is required and ``learn_step`` (LSQ) allowed
    has_step: ClassVar[bool] = False
    #: the allowed range of ``bits``; None: ``bits`` is not a parameter
    bits_range: ClassVar[tuple[int, int] | None] = None
    #: ``bits`` must be given (else None is allowed: unclipped)
    bits_required: ClassVar[bool] = False
    #: bits per element at deployment for a kind without ``bits`` (None: stays float);
    #: ``bits`` equal to it is accepted and ignored when ``bits_ok`` (sign=1)
    deployed: ClassVar[int | None] = None
    bits_ok: ClassVar[bool] = False
    #: takes ``threshold``
    takes_threshold: ClassVar[bool] = False
    #: accepts ``rounding="stochastic"``
    stochastic_ok: ClassVar[bool] = False
    #: the default estimator's name and the measurement behind it, for a kind that
    #: :data:`stelab.estimators.DEFAULTS` does not list yet
    default_estimator: ClassVar[str] = "ste"
    default_reason: ClassVar[str] = ""
    #: the ONNX pattern :mod:`stelab.export` writes for this kind: one of "identity",
    #: "sign", "heaviside", "ternary" (custom ops), "uniform", "act" (QDQ); a kind whose
    #: forward equals one of them may reuse it. None: not exportable
    onnx: ClassVar[str | None] = None

    def __new__(cls, kind: str | None = None, *args: Any, **kwargs: Any) -> Forward:
        if cls is Forward and kind is not None:
            cls = FORWARDS.get(kind)
        return object.__new__(cls)

    def __repr__(self) -> str:
        return (
            f"Forward(kind={self.kind!r}, bits={self.bits!r}, threshold={self.threshold!r}, "
            f"rounding={self.rounding!r})"
        )

    def __setstate__(self, state: dict[str, Any]) -> None:
        # unpickling: an object pickled as the base class (before the kinds were
        # classes) becomes its kind's class again
        self.__dict__.update(state)
        if type(self) is Forward:
            object.__setattr__(self, "__class__", FORWARDS.get(self.kind))

    @property
    def qrange(self) -> tuple[float, float]:
        """(lowest, highest) level in units of the step."""
        raise AttributeError(f"{self.kind} has no step")

    @property
    def deployed_bits(self) -> int | None:
        """Bits per element at deployment (None: stays floating point)."""
        return self.bits if self.bits_range is not None else self.deployed

    def __call__(self, x: Tensor, step: Tensor | float | None = None, generator=None) -> Tensor:
        if isinstance(step, Tensor) and step.dtype != x.dtype and (x.dim() == 0 or step.dim()):
            # a 0-d float64 step does not promote a float32 x of dim >= 1, but it does a
            # 0-d x, and a per-channel float64 step any x: compute in x's dtype
            step = step.to(x.dtype)
        return self.q(x, step, generator)

    def q(self, x: Tensor, step: Tensor | float | None, generator=None) -> Tensor:
        """q(x) for this kind (``step`` already in x's dtype)."""
        raise NotImplementedError

    def context(self, step: float | Tensor | None) -> Context:
        """The :class:`Context` an estimator sees for this forward and step."""
        raise NotImplementedError


#: every registered forward function: name -> its :class:`Forward` subclass
FORWARDS: Registry[type[Forward]] = Registry("quantizer", base=Forward)


def register_forward(name: str, *, overwrite: bool = False) -> Any:
    """Class decorator registering a :class:`Forward` subclass as the quantizer ``name``.

    After it, ``Quantizer(name, ...)``, :func:`stelab.quantize` specs, configs and the
    CLI accept ``name``; its default estimator (``default_estimator``) is added to
    :data:`stelab.estimators.DEFAULTS` unless listed there. See docs/estimators.md.
    """
    FORWARDS.check_name(name)

    def deco(cls: type[Forward]) -> type[Forward]:
        FORWARDS.add(name, cls, overwrite=overwrite)
        if overwrite or name not in _est.DEFAULTS:
            _est.DEFAULTS[name] = (cls.default_estimator, cls.default_reason)
        return cls

    return deco


def unregister_forward(name: str) -> bool:
    """Remove the quantizer ``name`` and its default-estimator entry (for tests and
    plugins that clean up); whether it was registered."""
    _est.DEFAULTS.pop(name, None)
    return FORWARDS.unregister(name)


# Written as chains of arithmetic kernels (in place after the first), no boolean
# masks: on CPU a comparison + where() costs 10-50x a ReLU. maximum(y, clamp(x, max=lo))
# hands NaN through (y >= lo everywhere else); torch.sign maps NaN to 0, so it is
# needed for sign/heaviside/ternary.


@register_forward("identity")
class _Identity(Forward):
    formula = "x"
    onnx = "identity"

    def q(self, x, step, generator=None):  # noqa: D102
        return x.clone()

    def context(self, step):  # noqa: D102
        return Context(self.kind, -INF, INF, 1.0, 0.0, -INF, INF)


@register_forward("sign")
class _Sign(Forward):
    formula = "+1 if x >= 0 else -1"
    onnx = "sign"
    deployed, bits_ok = 1, True

    def q(self, x, step, generator=None):  # noqa: D102
        # sign(sign(x) + 1/2) maps 0 to +1
        return torch.maximum(torch.sign(x).add_(0.5).sign_(), x.clamp(max=-1.0))

    def context(self, step):  # noqa: D102
        return Context(self.kind, -1.0, 1.0, 2.0, 0.0, 0.0, 0.0)


@register_forward("heaviside")
class _Heaviside(Forward):
    formula = "1{x > 0}"
    onnx = "heaviside"
    deployed, bits_ok = 1, True

    def q(self, x, step, generator=None):  # noqa: D102
        return torch.maximum(torch.sign(x).clamp_(min=0.0), x.clamp(max=0.0))

    def context(self, step):  # noqa: D102
        return Context(self.kind, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0)


@register_forward("ternary")
class _Ternary(Forward):
    formula = "sign(x) * 1{|x| > t}"
    onnx = "ternary"
    deployed = 2
    takes_threshold = True

    def q(self, x, step, generator=None):  # noqa: D102
        y = torch.sign(F.hardshrink(x, self.threshold))
        return torch.maximum(y, x.clamp(max=-1.0))

    def context(self, step):  # noqa: D102
        t = self.threshold
        return Context(self.kind, -1.0, 1.0, 2 * t, t, -t, t)


class Staircase(Forward):
    """Base of the kinds with a step Δ: levels ``lo..hi`` (:attr:`qrange`, in units of
    Δ), jumps at ``(jump_offset + i)·Δ`` from ``first_jump`` to ``last_jump`` (in units
    of Δ, :meth:`jumps`); :meth:`context` is built from those."""

    has_step = True

    def jumps(self) -> tuple[float, float, float]:
        """(jump_offset, first_jump, last_jump) in units of the step."""
        lo, hi = self.qrange
        return 0.5, lo + 0.5, hi - 0.5

    def context(self, step):  # noqa: D102
        lo, hi = self.qrange
        off, first, last = self.jumps()
        if math.isfinite(lo):
            return Context(
                self.kind, lo * step, hi * step, step, off * step, first * step, last * step
            )
        return Context(self.kind, -INF, INF, step, off * step, -INF, INF)


@register_forward("uniform")
class _Uniform(Staircase):
    formula = "step * clamp(round(x/step), -2^(b-1), 2^(b-1)-1)   (round half to even)"
    onnx = "uniform"
    bits_range = (2, 16)
    stochastic_ok = True

    @property
    def qrange(self) -> tuple[float, float]:  # noqa: D102
        if self.bits is None:
            return (-INF, INF)
        return (-(2.0 ** (self.bits - 1)), 2.0 ** (self.bits - 1) - 1)

    def q(self, x, step, generator=None):  # noqa: D102
        clipped = self.bits is not None
        xc = x if clipped else _clamp_to_grid_range(x, step)
        u = torch.div(xc, step)
        if self.rounding == "stochastic":
            u.add_(torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype))
            u.floor_()
        else:
            u.round_()
        if clipped:
            lo, hi = self.qrange
            return u.clamp_(lo, hi).mul_(step)
        # unclipped: q(xc) plus what the clamp took off (see _clamp_to_grid_range)
        if self.rounding == "stochastic":
            return u.mul_(step).add_(x - xc)
        return u.mul_(step).sub_(xc).add_(x)


@register_forward("act")
class _Act(Staircase):
    formula = "alpha * clamp(ceil(x/alpha), 0, 2^b - 1)   ([Y19] sigma_alpha)"
    onnx = "act"
    bits_range = (1, 16)
    bits_required = True

    @property
    def qrange(self) -> tuple[float, float]:  # noqa: D102
        return (0.0, 2.0**self.bits - 1)

    def jumps(self) -> tuple[float, float, float]:  # noqa: D102
        # jumps at 0, α, ..., (2^b - 2)α
        return 0.0, 0.0, self.qrange[1] - 1

    def q(self, x, step, generator=None):  # noqa: D102
        lo, hi = self.qrange
        return torch.div(x, step).ceil_().clamp_(lo, hi).mul_(step)


def _clamp_to_grid_range(x: Tensor, step: Tensor | float) -> Tensor:
    """x clamped to ±L, L = 2^p·Δ (p the significand bits of x's dtype, 2^p = 2/eps).

    For the unclipped ``uniform`` quantizer q(x) = Δ·round(x/Δ). Beyond L the
    levels are finer than the floats: the exact Δ·round(x/Δ) lies within Δ/2 <=
    ulp(x)/4 of x, so its correctly rounded value is x itself; computed directly,
    x/Δ overflows to ±inf near the float maximum when Δ < 1 and q(x) = ±inf. So the
    forward evaluates q(x) = x + (Δ·round(xc/Δ) - xc) with xc = clamp(x, -L, L):
    for |x| <= L the difference of two floats within a factor 2 of each other is
    exact (Sterbenz), so this is bit for bit Δ·round(x/Δ); beyond L the bracket is
    Δ·2^p - L = 0 and q(x) = x. (Stochastic rounding uses Δ·floor(xc/Δ + U) +
    (x - xc): exact on the grid up to L, x within two ulps beyond.)
    """
    b = _est.integer_bound(x.dtype)
    if isinstance(step, Tensor):
        # minimum/maximum with a 0-d tensor: ~4x faster than clamp with tensor bounds
        lim = step * b
        xc = torch.minimum(x, lim)
        return torch.maximum(xc, -lim, out=xc)
    return x.clamp(-step * b, step * b)


def forward_names() -> list[str]:
    """Names of the forward functions (every registered quantizer kind)."""
    return FORWARDS.names()


def forward_formula(kind: str) -> str:
    return FORWARDS.get(kind).formula


# ---------------------------------------------------------------------------
# The autograd family: one Function for every (forward, estimator) pair
# ---------------------------------------------------------------------------


class _Quantize(torch.autograd.Function):
    """y = fwd(x); backward g_x = est.grad_input(x, y, g); LSQ gradient for a learned step.

    One Function serves every (forward, estimator) pair. ``qctx`` is the
    estimator's context with plain-float levels when the step is a fixed scalar
    (the fast path: fused ATen backward kernels take Python scalars); it is None
    for learned or per-channel steps, and then built from the step tensor in
    backward.
    """

    @staticmethod
    def forward(x, step, fwd, est, qctx, lsq_scale, generator):  # noqa: D102
        return fwd(x, step, generator)

    @staticmethod
    def setup_context(ctx, inputs, output):  # noqa: D102
        x, step, fwd, est, qctx, lsq_scale, _ = inputs
        learn = lsq_scale is not None
        ctx.fwd, ctx.est, ctx.qctx, ctx.lsq_scale, ctx.learn = fwd, est, qctx, lsq_scale, learn
        ctx.step_const = None if isinstance(step, Tensor) else step
        ctx.save_for_backward(
            x if (est.needs_input or learn) else None,
            output if (est.needs_output or learn) else None,
            step if isinstance(step, Tensor) and (learn or qctx is None) else None,
        )

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        x, y, step = ctx.saved_tensors
        qctx = ctx.qctx
        if qctx is None:
            qctx = ctx.fwd.context(ctx.step_const if step is None else step.detach())
        gx = ctx.est.grad_input(x, y, g, qctx) if ctx.needs_input_grad[0] else None
        gstep = None
        if ctx.learn and ctx.needs_input_grad[1]:
            inside = ((x > qctx.lo) & (x < qctx.hi)).to(x.dtype)
            gs = g * (y - x * inside) / step
            gstep = (gs.sum_to_size(step.shape) * ctx.lsq_scale).to(step.dtype)
        return gx, gstep, None, None, None, None, None


def quantize_tensor(
    x: Tensor,
    fwd: Forward,
    estimator: Estimator,
    step: Tensor | float | None = None,
    *,
    lsq_scale: float | None = None,
    generator: torch.Generator | None = None,
    context: Context | None = None,
) -> Tensor:
    """Functional form: ``fwd(x)`` forward, ``estimator`` backward.

    ``lsq_scale`` (with a tensor ``step`` that requires grad) enables LSQ's step
    gradient scaled by that factor. ``context``: the estimator's context if the
    caller has it (built from ``step`` otherwise).
    """
    if context is None and not isinstance(step, Tensor):
        context = fwd.context(step)
    return _Quantize.apply(x, step, fwd, estimator, context, lsq_scale, generator)


# ---------------------------------------------------------------------------
# The module
# ---------------------------------------------------------------------------

QUANTIZER_PARAMS = (
    "bits",
    "step",
    "alpha",
    "threshold",
    "rounding",
    "learn_step",
    "per_sample",
    "generator",
)


def _as_step(step: Any, name: str = "step") -> Tensor:
    if isinstance(step, Tensor):
        if not step.is_floating_point():
            raise StelabTypeError(f"{name} must be a floating-point tensor, got dtype {step.dtype}")
        bad = ~torch.isfinite(step) | (step <= 0)
        if bool(bad.any()):
            raise ConfigError(f"{name} must be finite and > 0 everywhere, got {step.flatten()[:4]}")
        return step.detach().clone()
    # float64 keeps a step like 0.1 exact to double precision; a 0-d tensor does not
    # promote the input's dtype, so float32 inputs stay float32
    return torch.tensor(check_positive(name, step), dtype=torch.float64)


class Quantizer(nn.Module):
    """A forward function paired with a gradient estimator, as a module.

    Args:
        fn: forward function name: ``identity``, ``sign``, ``heaviside``,
            ``ternary``, ``uniform`` or ``act`` (see the module docstring).
        estimator: an estimator name (``stelab.estimators.names()``), an
            :class:`~stelab.estimators.Estimator`, or a function ``x -> q̂'(x)``.
            None (the default) takes the one stelab's reproductions support for
            ``fn`` (``stelab.estimators.DEFAULTS``, with the measurement behind each):
            ``clipped`` for sign and ternary ([S20]: in a sign network the
            identity STE's gradient is 7-1900x off, the clipped STE's 1-7x),
            ``clipped_relu`` for heaviside and act ([Y19]), ``ste`` for uniform
            ([S24]) and identity.
        bits: bit width for ``uniform`` (2..16, or None for unclipped) and
            ``act`` (1..16).
        step: level spacing Δ for ``uniform`` / resolution α for ``act``: a
            positive number, or a tensor broadcastable to the input (per channel).
            ``alpha`` is accepted as a synonym for ``act``.
        threshold: t for ``ternary`` (default 0.5).
        rounding: ``"nearest"`` (half to even) or ``"stochastic"`` (uniform only).
        learn_step: make the step a parameter trained with LSQ's gradient.
        per_sample: LSQ's N counts elements per sample (activations) rather than
            all elements (weights).
        generator: ``torch.Generator`` used by stochastic rounding.
        **estimator_params: parameters of the estimator, e.g. ``beta=5``.

    Example::

        q = Quantizer("sign", "swish_sign", beta=10)
        a = Quantizer("act", "clipped_relu", bits=2, step=0.5)
    """

    def __init__(
        self,
        fn: str = "sign",
        estimator: str | Estimator | Any = None,
        *,
        bits: int | None = None,
        step: float | Tensor | None = None,
        alpha: float | Tensor | None = None,
        threshold: float = 0.5,
        rounding: str = "nearest",
        learn_step: bool = False,
        per_sample: bool = False,
        generator: torch.Generator | None = None,
        **estimator_params: Any,
    ):
        super().__init__()
        kind = FORWARDS.get(fn)  # unknown: "unknown quantizer ... (did you mean ...)"
        if alpha is not None:
            if fn != "act" or step is not None:
                raise ConfigError(
                    "alpha is the step of the 'act' quantizer; give either step or alpha, "
                    f"got fn={fn!r}, step={step!r}, alpha={alpha!r}"
                )
            step = alpha
        if rounding not in ("nearest", "stochastic"):
            raise ConfigError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
        if rounding == "stochastic" and not kind.stochastic_ok:
            ok = [k for k in FORWARDS.names() if FORWARDS.get(k).stochastic_ok]
            raise ConfigError(
                f"rounding='stochastic' needs fn={' or '.join(map(repr, ok))}, got fn={fn!r}"
            )
        if kind.bits_range is not None:
            if bits is not None:
                bits = check_int("bits", bits, *kind.bits_range)
            elif kind.bits_required:
                lo, hi = kind.bits_range
                raise ConfigError(
                    f"bits is required for the {fn!r} quantizer (an integer in [{lo}, {hi}])"
                )
        elif bits is not None and not (kind.bits_ok and bits == kind.deployed):
            raise ConfigError(f"bits is not a parameter of the {fn!r} quantizer, got bits={bits!r}")
        else:
            bits = None
        if kind.takes_threshold:
            threshold = check_positive("threshold", threshold)
        self.fwd = Forward(fn, bits, float(threshold), rounding)

        if self.fwd.has_step:
            if step is None:
                raise ConfigError(f"step is required for the {fn!r} quantizer (a number > 0)")
            step_t = _as_step(step, "alpha" if alpha is not None else "step")
            if learn_step:
                if bits is None:
                    raise ConfigError("learn_step=True needs a clipped quantizer: set bits")
                self.step = nn.Parameter(step_t)
            else:
                self.register_buffer("step", step_t)
        else:
            if step is not None:
                raise ConfigError(f"step is not a parameter of the {fn!r} quantizer")
            if learn_step:
                ok = " or ".join(repr(k) for k in FORWARDS.names() if FORWARDS.get(k).has_step)
                raise ConfigError(f"learn_step needs fn={ok}, got fn={fn!r}")
            self.step = None
        self.learn_step = bool(learn_step)
        self.per_sample = bool(per_sample)
        self.generator = generator

        #: True when the estimator is ``fn``'s default (``estimator=None``)
        self.default_estimator = estimator is None
        if estimator is None:
            estimator = _est.default_for(fn)
        try:
            self.estimator = _est.get(estimator, **estimator_params)
        except ConfigError as e:
            if estimator_params and "unexpected parameters" in str(e):
                raise ConfigError(
                    f"{e}. Quantizer parameters are: {', '.join(QUANTIZER_PARAMS)}"
                ) from None
            raise
        self.estimator.check(self.fwd.context(1.0 if self.fwd.has_step else None))

    # -- properties used by summaries, conversion and the CLI -------------------

    @property
    def kind(self) -> str:
        """The forward function's name: ``identity``, ``sign``, ``heaviside``,
        ``ternary``, ``uniform`` or ``act``."""
        return self.fwd.kind

    @property
    def bits(self) -> int | None:
        """Bits per element at deployment; None when the output stays floating point."""
        return self.fwd.deployed_bits

    def context(self) -> Context:
        """The :class:`~stelab.estimators.Context` the estimator sees: the lowest and
        highest output level, the step and the positions of the jumps, in the units of
        the input (tensors for a tensor step; ``±inf`` where unclipped)."""
        return self.fwd.context(None if self.step is None else self.step.detach())

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise StelabTypeError(f"quantizer input must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise StelabTypeError(
                f"quantizer input must be a floating-point tensor, got dtype {x.dtype}"
            )
        lsq = None
        if self.learn_step:
            n = math.prod(x.shape[1:]) if (self.per_sample and x.dim() > 1) else x.numel()
            # an empty input has no gradient to scale; max() keeps the scale finite
            lsq = 1.0 / math.sqrt(max(n, 1) * self.fwd.qrange[1])
        return quantize_tensor(
            x,
            self.fwd,
            self.estimator,
            self.step,
            lsq_scale=lsq,
            generator=self.generator,
            context=self._float_context(),
        )

    def _float_context(self) -> Context | None:
        """The estimator's context with plain floats, for a fixed scalar step.

        Cached on the step buffer's identity and version, so the one host read
        (``float(step)``) happens only when the step changes (load_state_dict,
        ``.to()``, an in-place edit), never per call. None (built from the
        tensor in backward) for learned or per-channel steps and under
        ``torch.compile``.
        """
        s = self.step
        if s is None:
            return self.fwd.context(None)
        if self.learn_step or s.numel() != 1 or torch.compiler.is_compiling():
            return None
        key = (s.data_ptr(), s._version, s.dtype, s.device)
        if self.__dict__.get("_ctx_key") != key:
            self.__dict__["_ctx"] = self.fwd.context(float(s))
            self.__dict__["_ctx_key"] = key
        return self.__dict__["_ctx"]

    def extra_repr(self) -> str:
        parts = [repr(self.fwd.kind)]
        if self.fwd.bits is not None:
            parts.append(f"bits={self.fwd.bits}")
        if self.step is not None:
            s = self.step
            parts.append(f"step={s.item():.4g}" if s.numel() == 1 else f"step=<{tuple(s.shape)}>")
            if self.learn_step:
                parts.append("learn_step=True")
        if self.fwd.takes_threshold:
            parts.append(f"threshold={self.fwd.threshold:g}")
        if self.fwd.rounding != "nearest":
            parts.append(f"rounding={self.fwd.rounding!r}")
        parts.append(f"estimator={self.estimator!r}")
        return ", ".join(parts)

    def with_estimator(self, estimator: str | Estimator | None, **params: Any) -> Quantizer:
        """A copy of this quantizer with another estimator (same forward and step;
        None: the forward function's default)."""
        new = Quantizer.__new__(type(self))
        nn.Module.__init__(new)
        new.fwd = self.fwd
        new.learn_step, new.per_sample, new.generator = (
            self.learn_step,
            self.per_sample,
            self.generator,
        )
        if self.step is None:
            new.step = None
        elif self.learn_step:
            new.step = nn.Parameter(self.step.detach().clone())
        else:
            new.register_buffer("step", self.step.detach().clone())
        new.default_estimator = estimator is None
        if estimator is None:
            estimator = _est.default_for(self.fwd.kind)
        new.estimator = _est.get(estimator, **params)
        new.estimator.check(new.context())
        return new


class QuantAct(Quantizer):
    """An activation quantizer as a module (a :class:`Quantizer` whose LSQ
    gradient scale counts elements per sample). Same arguments as Quantizer::

        QuantAct("act", "clipped_relu", bits=2, alpha=0.5)
    """

    def __init__(self, fn: str = "act", estimator: Any = None, **kwargs: Any):
        kwargs.setdefault("per_sample", True)
        super().__init__(fn, estimator, **kwargs)


def context_with(ctx: Context, **changes: Any) -> Context:
    """A copy of ``ctx`` with some fields changed (for custom estimators' tests)."""
    return replace(ctx, **changes)
