"""Stochastic binary networks (SBNs) and their gradient estimators ([S20]).

Layers (:class:`SBNLinear`, :class:`SBNConv2d`), the :class:`SBN` container
and the networks of [S20] (:func:`sbn_mlp`, :func:`sbn_conv8`); one call for a
gradient estimate with any registered estimator::

    model = sbn_mlp()                                   # 2 -> 5 -> 5 -> 5 -> 1
    loss = model.surrogate_loss(x, t, logistic_loss, estimator="psa", samples=4, generator=0)
    loss.backward()

and reference gradients: :func:`exact_gradient` (enumeration) and
:func:`mc_reference` (unbiased Monte Carlo with standard errors).

Reference: Shekhovtsov, Yanush, Flach. Path Sample-Analytic Gradient Estimators
for Stochastic Binary Networks. NeurIPS 2020, arXiv:2006.03143.
"""

from . import baselines  # noqa: F401  (registers the baseline estimators)
from .estimators import SBNEstimator, describe, logistic_loss, per_example_loss, surrogate_loss
from .estimators import get as get_estimator
from .estimators import names as estimator_names
from .estimators import register as register_estimator
from .exact import (
    Exact,
    ExactReference,
    MCReference,
    all_states,
    exact_expected_loss,
    exact_gradient,
    mc_reference,
)
from .kernels import flip_rows, ratio_conv2d, ratio_linear
from .layers import SBN, SBNConv2d, SBNLinear, data_init, sbn_conv8, sbn_mlp
from .noise import Noise, as_generator, get_noise, noise_names
from .psa import PSA

__all__ = [
    "SBN",
    "SBNLinear",
    "SBNConv2d",
    "sbn_mlp",
    "sbn_conv8",
    "data_init",
    "Noise",
    "get_noise",
    "noise_names",
    "as_generator",
    "SBNEstimator",
    "surrogate_loss",
    "get_estimator",
    "estimator_names",
    "register_estimator",
    "describe",
    "logistic_loss",
    "per_example_loss",
    "PSA",
    "flip_rows",
    "ratio_linear",
    "ratio_conv2d",
    "Exact",
    "ExactReference",
    "MCReference",
    "all_states",
    "exact_expected_loss",
    "exact_gradient",
    "mc_reference",
]
