"""The two-linear-layer model of [Y19]: population loss, true and coarse gradients.

Reference: P. Yin, J. Lyu, S. Zhang, S. Osher, Y. Qi, J. Xin. *Understanding
Straight-Through Estimator in Training Activation Quantized Neural Nets.* ICLR 2019,
arXiv:1903.05662 (Lemmas 1-2, the expected coarse gradients of the identity, ReLU and
clipped-ReLU STEs, the critical points of the population loss). Restated, with
stelab's conventions, in docs/papers/yin2019.md. The clipped-ReLU integrals p, q are
evaluated in closed form (derived here, checked against quadrature of the paper's
integrals; see :func:`clipped_relu_pq`).

Model (plain-text math)::

    Z in R^{m x n}, i.i.d. N(0, 1) entries (rows are "patches")
    sigma(x) = 1{x > 0} (binarized ReLU), applied elementwise
    y(Z; v, w) = v^T sigma(Z w),  teacher y*(Z) = v*^T sigma(Z w*)
    l(v, w; Z) = 1/2 (y(Z; v, w) - y*(Z))^2,  f(v, w) = E_Z[l]
    theta = angle(w, w*),  u = w/|w|,  I = I_m,  J = 1 1^T

Normalisation of w*: the teacher sigma(Z w*) depends on w* only through its
direction, so every function here accepts any nonzero ``w_star`` and works with
``w_star / |w_star|`` (the paper's formulas assume |w*| = 1; normalising makes them
exact for any |w*| > 0). ``w_star = 0`` is an error.

Shapes: ``v``, ``v_star`` have last dimension m; ``w``, ``w_star`` last dimension n;
leading dimensions broadcast (so a batch of K points is ``v: (K, m)``, ``w: (K, n)``).
All results are float64 torch tensors.

Conventions at the non-differentiable points (choice, documented and tested):

- ``w = 0``: f is discontinuous there (sigma(Z 0) = 0 gives f(v, 0) = 1/8 v*^T (I+J) v*,
  which is not the limit of Lemma 1), so ``population_loss`` accepts it but every
  gradient function raises ``ConfigError``.
- ``theta in {0, pi}`` (w parallel to w*): f depends on w only through theta, whose
  gradient has a cone singularity there. ``population_grad`` returns df/dw = 0, the
  minimum-norm element of the (Clarke) generalised gradient; the one-sided derivative
  along a unit direction d is +(v^T v*)/(2 pi |w|) |P_w d| at theta = 0 and
  -(v^T v*)/(2 pi |w|) |P_w d| at theta = pi. A point counts as parallel when
  sin(theta) <= 1e-10 (only ``population_grad`` needs this threshold; the coarse
  gradients are written in forms that are regular at theta in {0, pi}).
"""

from stelab.theory.two_layer.dynamics import (
    CriticalPoint,
    CriticalPoints,
    Trajectory,
    coarse_gradient_descent,
    critical_points,
)
from stelab.theory.two_layer.formulas import (
    clipped_relu_pq,
    coarse_descent_ratio,
    expected_coarse_grad,
    population_grad,
    population_loss,
    xi,
)
from stelab.theory.two_layer.model import LIBRARY_ESTIMATOR, STES, theta, w_at_angle
from stelab.theory.two_layer.sampling import batch_loss, coarse_grad_on_batch, sample_coarse_grad

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
