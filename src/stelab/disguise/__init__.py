"""Custom weight-gradient estimators are STEs in disguise [S24].

Schoenbauer, Moro, Lew, Howard 2024, "Custom Gradient Estimators are
Straight-Through Estimators in Disguise", arXiv:2405.05171 (docs/papers/disguise2024.md).

Setting: weights quantized with a fixed uniform step Δ, Q(w) = Δ·round(w/Δ)
(optionally clipped), trained with a *cyclical* weight-gradient estimator q̂'(w)
(the same shape on every bin, positive and bounded). The theorem: SGD (with or
without momentum) with q̂', learning rate η and initial latent weights w₀ is, to
first order in η, SGD with the identity STE, learning rate α·η and initial weights
M(w₀), where

    α    = Δ / ∫_bin ds / q̂'(s)                (the harmonic mean of q̂' over a bin)
    M(w) = w_b + α ∫_{w_b}^{w} ds / q̂'(s)       (w_b any change point; M' = α / q̂')

M is increasing, maps each bin onto itself and fixes every change point, so
Q(M(w)) = Q(w): the two networks compute the same function.

Adam: [S24] states that under Adam the plain STE with the same learning rate and
initial weights is the equivalent (Adam's per-coordinate normalisation cancels q̂').
stelab measured this to hold only when the weights move little within Adam's
second-moment window (β₂ = 0.9 at small learning rates), not with the default
β₂ = 0.999; see docs/papers/disguise2024.md.

This module computes α, M and M⁻¹ for any cyclical estimator
(:func:`equivalent_ste`), converts a trained or fresh model and its optimizer to
the STE equivalent (:func:`to_ste`), and renders the text and plot behind
``stelab disguise`` (:func:`disguise_report`).

Submodules: :mod:`~stelab.disguise.equivalence` (α, M, M⁻¹ and their numerics),
:mod:`~stelab.disguise.convert` (:func:`to_ste`), :mod:`~stelab.disguise.report`
(``stelab disguise``).
"""

from .convert import ConversionReport, LayerChange, STEConversion, to_ste
from .derive import DegenerateEstimatorWarning, equivalent_ste, is_cyclical
from .equivalence import Equivalence
from .report import disguise_report

__all__ = [
    "ConversionReport",
    "DegenerateEstimatorWarning",
    "Equivalence",
    "LayerChange",
    "STEConversion",
    "disguise_report",
    "equivalent_ste",
    "is_cyclical",
    "to_ste",
]
