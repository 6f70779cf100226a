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
gradients), :mod:`.fidelity` (metrics, reference), :mod:`.fidelity_stats` (streaming
statistics), :mod:`.fidelity_report` (the report, its tables and JSON), :mod:`.plots`
(figures).
``stelab gradcheck`` is the command-line front end.

Deterministic quantized networks (any ``nn.Module`` with stelab quantizers):
:func:`deterministic_fidelity` runs the descent test (does a step along each
estimator's coarse gradient lower the true quantized loss?) and compares each
estimator's gradient with the exact or Monte-Carlo gradient of the network's
stochastic relaxation (:mod:`.relax`); :func:`gradcheck` dispatches on the model::

    rep = analysis.gradcheck(model, x, y, "ste,clipped_relu,dsq,ewgs")
    print(rep.descent_table()); print(rep.bias_table())

Modules: :mod:`.deterministic`, :mod:`.det_report`, :mod:`.relax`, :mod:`.det_plots`,
:mod:`.dispatch`.
"""

from .deterministic import (
    DEFAULT_ETAS,
    DescentCurve,
    DeterministicReport,
    LayerBias,
    descent_test,
    deterministic_fidelity,
    parse_det_estimators,
)
from .dispatch import gradcheck
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
from .relax import RelaxedGradient, relaxed, relaxed_gradient
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
    "gradcheck",
    "deterministic_fidelity",
    "descent_test",
    "parse_det_estimators",
    "relaxed",
    "relaxed_gradient",
    "RelaxedGradient",
    "DeterministicReport",
    "DescentCurve",
    "LayerBias",
    "DEFAULT_ETAS",
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
