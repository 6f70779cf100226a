"""Gradient fidelity: how close is an estimator's gradient to the true one?

For a stochastic binary network (:mod:`stelab.sbn`), data and a list of estimators,
:func:`gradient_fidelity` draws many one-sample estimates (vectorised: thousands of
draws per call), averages them in groups of M and reports per layer (weights and bias
together) the relative RMSE ``sqrt(mean ||g_M - g||^2 / ||g||^2)``, the cosine
similarity (mean and 15-85% band), the bias ``||E g_1 - g|| / ||g||`` with its noise
floor and z-score, the variance and SNR, and the cost (seconds per draw, forward-pass
equivalents, error at an equal time budget); ``g`` is the exact gradient by
enumeration when the net is small enough, else a Monte-Carlo reference with its
standard errors ([S20] §5, docs/papers/psa2020.md)::

    from stelab import sbn, analysis
    rep = analysis.gradient_fidelity(model, x, y, sbn.logistic_loss,
                                     "psa,dst,arm,reinforce,det:ste", draws=2000)
    print(rep.table("hidden.0"))
    analysis.plots.plot_rmse(rep, "rmse.png")

Estimator specs (:func:`parse_estimator`) name SBN estimators (``psa``,
``concrete:tau=0.1``) and deterministic sign networks with a quantizer STE
(``det:ste``, ``det:clipped``): "how biased is my STE?" as a number.

Modules: :mod:`.specs` (specs, :class:`SignSTE`, costs), :mod:`.draws` (per-draw
gradients), :mod:`.fidelity` (metrics, reference, report), :mod:`.plots` (figures).
``stelab gradcheck`` is the command-line front end.
"""

from .draws import (
    DrawEngine,
    flatten_layers,
    layer_keys,
    layer_label,
    layer_params,
    time_per_draw,
)
from .fidelity import (
    PAPER_SAMPLE_SIZES,
    EstimatorFidelity,
    FidelityReport,
    LayerFidelity,
    Reference,
    check_sample_sizes,
    enumerable,
    gradient_fidelity,
    reference_gradient,
)
from .specs import (
    PAPER_ESTIMATORS,
    EstimatorSpec,
    SignSTE,
    forward_equivalents,
    is_coupled,
    is_deterministic,
    parse_estimator,
    parse_estimators,
)

__all__ = [
    "gradient_fidelity",
    "reference_gradient",
    "check_sample_sizes",
    "enumerable",
    "FidelityReport",
    "EstimatorFidelity",
    "LayerFidelity",
    "Reference",
    "PAPER_SAMPLE_SIZES",
    "PAPER_ESTIMATORS",
    "EstimatorSpec",
    "SignSTE",
    "parse_estimator",
    "parse_estimators",
    "forward_equivalents",
    "is_coupled",
    "is_deterministic",
    "DrawEngine",
    "time_per_draw",
    "flatten_layers",
    "layer_keys",
    "layer_label",
    "layer_params",
]
