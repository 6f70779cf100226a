"""Closed-form theory of straight-through estimators.

- :mod:`stelab.theory.two_layer`: the two-linear-layer model with binarized ReLU
  and Gaussian input of [Y19] (Yin et al., ICLR 2019, arXiv:1903.05662): population
  loss and gradient, expected coarse gradients of the identity / ReLU / clipped-ReLU
  STEs, critical points and population coarse gradient descent.
"""

from stelab.theory.two_layer import (
    LIBRARY_ESTIMATOR,
    STES,
    CriticalPoint,
    CriticalPoints,
    Trajectory,
    batch_loss,
    clipped_relu_pq,
    coarse_descent_ratio,
    coarse_grad_on_batch,
    coarse_gradient_descent,
    critical_points,
    expected_coarse_grad,
    population_grad,
    population_loss,
    sample_coarse_grad,
    theta,
    w_at_angle,
    xi,
)

__all__ = [
    "LIBRARY_ESTIMATOR",
    "STES",
    "CriticalPoint",
    "CriticalPoints",
    "Trajectory",
    "batch_loss",
    "clipped_relu_pq",
    "coarse_descent_ratio",
    "coarse_grad_on_batch",
    "coarse_gradient_descent",
    "critical_points",
    "expected_coarse_grad",
    "population_grad",
    "population_loss",
    "sample_coarse_grad",
    "theta",
    "w_at_angle",
    "xi",
]
