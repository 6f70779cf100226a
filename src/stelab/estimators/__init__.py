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

The package: :mod:`~stelab.estimators.base` (the protocol, the registry,
:data:`DEFAULTS`), :mod:`~stelab.estimators.masks` (the indicator STEs),
:mod:`~stelab.estimators.smooth` (smooth surrogates, DSQ, EWGS) and
:mod:`~stelab.estimators.cyclical` ([S24]'s cyclical estimators). Importing it
registers every built-in estimator.
"""

from __future__ import annotations

from .base import (  # noqa: F401  (the module's API before the split)
    DEFAULTS,
    REGISTRY,
    Context,
    Custom,
    Estimator,
    Number,
    custom,
    default_for,
    describe,
    get,
    integer_bound,
    names,
    register,
)
from .cyclical import Cosine, CyclicEstimator, Periodic, SoftStaircase, TriangleWave
from .masks import Clipped, ClippedReLU, Identity, ReLU
from .smooth import DSQ, EWGS, ApproxSign, Logistic, SwishSign

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
    "CyclicEstimator",
    "Cosine",
    "TriangleWave",
    "SoftStaircase",
    "Periodic",
]

# Whole-model pickles (torch.save(model)) name these classes by module: keep naming
# them stelab.estimators.X, as before the package was split, whatever file holds them.
for _cls in (Context, Estimator, Custom, Identity, Clipped, ReLU, ClippedReLU, ApproxSign,
             SwishSign, Logistic, DSQ, EWGS, CyclicEstimator, Cosine, TriangleWave,
             SoftStaircase, Periodic):  # fmt: skip
    _cls.__module__ = __name__
del _cls
