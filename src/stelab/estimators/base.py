"""The estimator protocol and its registry: :class:`Context`, :class:`Estimator`,
:func:`register` / :func:`get` / :func:`names`, the per-quantizer :data:`DEFAULTS`,
:func:`custom`, and the numeric helpers the built-in estimators share.

Imports none of the built-in estimators (they register themselves on import of
:mod:`stelab.estimators`).
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

from ..errors import ConfigError, StelabTypeError, unknown
from ..registry import Registry

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


def indicator(mask: Tensor, like: Tensor) -> Tensor:
    return mask.to(like.dtype)


@functools.lru_cache(maxsize=256)
def next_float(v: float, toward: float, dtype: torch.dtype) -> float:
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


def bin_coordinate(v: Tensor) -> Tensor:
    """The coordinate ``v = (x - c)/Δ`` of a periodic estimator, clamped to ±2^p.

    Every float beyond 2^p (:func:`integer_bound`) is an integer, so the position
    in the bin there, ``v - round(v)``, is 0 whether or not v is clamped; the clamp
    only matters where x/Δ overflowed to ±inf for a finite x near the float maximum
    (Δ < 1), where it turns ``inf - inf = NaN`` into that same limit 0. Outside a
    clipped quantizer's range the finite profile is then multiplied by 0, never NaN·0.
    The clamp works in place and hands NaN through.
    """
    b = 2.0 / torch.finfo(v.dtype).eps  # integer_bound, uncached: torch.compile traces it
    return v.clamp_(-b, b)


def finite(v: Number) -> bool:
    if isinstance(v, Tensor):
        return True  # tensors only arise for learned/per-channel steps of clipped quantizers
    return math.isfinite(v)
