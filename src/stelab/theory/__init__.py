"""Closed-form theory of straight-through estimators.

- :mod:`stelab.theory.two_layer`: the two-linear-layer model with binarized ReLU
  and Gaussian input of [Y19] (Yin et al., ICLR 2019, arXiv:1903.05662): population
  loss and gradient, expected coarse gradients of the identity / ReLU / clipped-ReLU
  STEs, critical points and population coarse gradient descent.
"""

from stelab.theory import two_layer
from stelab.theory.two_layer import *  # noqa: F403  (the public names listed in two_layer)

__all__ = list(two_layer.__all__)
