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

The package: :mod:`~stelab.quantizers.forwards` (the forward functions and their
registry) and :mod:`~stelab.quantizers.quantizer` (the autograd Function and the
:class:`Quantizer` module).
"""

from __future__ import annotations

from ..halfnormal import halfnormal_alpha  # noqa: F401  (re-exported: stelab.quantizers API)
from .forwards import (  # noqa: F401  (INF, forward_formula: the module's API before the split)
    BUILTIN,
    FORWARDS,
    INF,
    Forward,
    Staircase,
    forward_formula,
    forward_names,
    register_forward,
    unregister_forward,
)
from .quantizer import (  # noqa: F401  (context_with: the module's API before the split)
    QUANTIZER_PARAMS,
    QuantAct,
    Quantizer,
    context_with,
    quantize_tensor,
)

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

# Whole-model pickles (torch.save(model)) name these classes stelab.quantizers.X, the
# built-in kinds by their class names (_Sign, ...): keep them there, as before the split.
for _cls in (Forward, Staircase, Quantizer, QuantAct, *BUILTIN):
    _cls.__module__ = __name__
    globals()[_cls.__name__] = _cls
del _cls
