"""The forward functions: :class:`Forward`, its registry :data:`FORWARDS`
(:func:`register_forward`) and the built-in kinds (see :mod:`stelab.quantizers`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import estimators as _est
from ..estimators import Context
from ..registry import Registry

INF = math.inf


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


#: the built-in kinds (:mod:`stelab.quantizers` also names them, for whole-model pickles)
BUILTIN = (_Identity, _Sign, _Heaviside, _Ternary, _Uniform, _Act)
