"""Gradient estimators for stochastic binary networks, one registry, one call.

Every estimator answers the same question: an estimate of

    grad_theta  E_Z[ (1/N) sum_n loss_fn(eta_n, y_n) ]

for an :class:`~.layers.SBN`. They all run through :func:`surrogate_loss`
(also :meth:`SBN.surrogate_loss`)::

    loss = model.surrogate_loss(x, y, loss_fn, estimator="psa", samples=M, generator=g)
    loss.backward()     # p.grad = the estimate, averaged over M noise draws per example
    log(loss.item())    # a detached estimate of the expected loss

Each estimator builds a *surrogate* scalar whose autograd gradient is the
estimate; the returned tensor is ``value + (surrogate - sg(surrogate))``, so
its value is the loss estimate and its gradient the surrogate's. Samples are
drawn by replicating the batch ``M`` times (row ``m*N + n`` is sample ``m`` of
example ``n``), one uniform tensor per layer from ``generator``: runs are
reproducible bit for bit on CPU.

The registered estimators ([S20] §2 and appendix), written for states in {-1, +1}; each
works on the signs ``s`` and maps them with the layer's ``to_state`` (``h = s`` or
``h = (s + 1)/2`` for ``states="01"``), so every one of them serves both parametrisations:

==============  =========================================================  =========
name            rule                                                       unbiased
==============  =========================================================  =========
reinforce       f + sg(f) (sum log p(x) - sg(.))                           yes
reinforce_loo   same with a leave-one-out baseline over the M samples      yes
arm             per layer (f(b1) - f(b2)) (U - 1/2), independent           yes
                continuations, path continues along b1 (Yin & Zhou 2019)
arm_shared      arm with the two continuations sharing their noise         yes
dst             x = sg(x) + 2 (F(a) - sg(F(a)))  (deep straight-through)   no
hard_st         x = sg(x) + hardtanh(a) - sg(hardtanh(a))                  no
concrete        x = tanh((a - Z) / (2 tau))  (relaxed values forward)      no
gumbel_st       hard x forward, relaxed tanh((a - Z)/(2 tau)) backward     no
tanh_mf         deterministic x = 2F(a) - 1 (= tanh(a/2) for logistic)     no
psa             path sample-analytic ([S20] §3), in :mod:`.psa`            last layers
exact           enumeration of all hidden states, in :mod:`.exact`         exact
==============  =========================================================  =========

The baselines are in :mod:`.baselines`, PSA in :mod:`.psa`, exact in :mod:`.exact`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError, StelabTypeError
from .base import ESTIMATORS, LossFn, SBNEstimator, get, names, register
from .layers import LAYER_TYPES, SBN
from .noise import uniform_like

__all__ = [
    "SBNEstimator",
    "register",
    "get",
    "names",
    "describe",
    "surrogate_loss",
    "per_example_loss",
    "logistic_loss",
    "replicate",
    "sample_path",
    "bcast",
    "ESTIMATORS",
    "LossFn",
]


# ---------------------------------------------------------------------------
# Helpers shared by the estimators
# ---------------------------------------------------------------------------


def logistic_loss(eta: Tensor, t: Tensor) -> Tensor:
    """Per-example logistic loss ``log(1 + exp(-eta t))`` for targets ``t`` in {-1, +1}.

    ``eta`` of shape (N,) or (N, 1); returns shape (N,). ([S20] §5, toy experiment.)
    """
    return F.softplus(-eta.reshape(eta.shape[0]) * t.reshape(t.shape[0]).to(eta.dtype))


def per_example_loss(loss_fn: LossFn, eta: Tensor, y: Tensor) -> Tensor:
    """``loss_fn(eta, y)`` checked to hold one loss per row, returned with shape (rows,)."""
    f = loss_fn(eta, y)
    rows = eta.shape[0]
    if not isinstance(f, Tensor) or f.numel() != rows or (f.dim() > 0 and f.shape[0] != rows):
        shape = tuple(f.shape) if isinstance(f, Tensor) else type(f).__name__
        raise ConfigError(
            f"loss_fn must return one loss per example (shape ({rows},)), got {shape}; "
            f"use e.g. cross_entropy(..., reduction='none')"
        )
    return f.reshape(rows)


def replicate(t: Tensor, samples: int) -> Tensor:
    """The batch repeated ``samples`` times along dim 0 (row ``m*N + n`` = sample m of n)."""
    return t if samples == 1 else t.repeat((samples,) + (1,) * (t.dim() - 1))


def sample_path(
    model: SBN, x: Tensor, samples: int, generator: torch.Generator | None
) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """One sampled forward path per replicated row: ``(states, preacts, signs)`` with
    ``states[0]`` the replicated input, ``signs[k] = sign(a_k - Z_k)`` in {-1, +1}
    computed from the detached pre-activation ``preacts[k] = a_k`` (kept attached for
    the backward) and ``states[k + 1] = layer_k.to_state(signs[k])``."""
    hs = [replicate(x, samples)]
    pre, signs = [], []
    for layer in model.hidden:
        a = layer.preact(hs[-1])
        pre.append(a)
        signs.append(layer.noise.states(a.detach(), uniform_like(a, generator)))
        hs.append(layer.to_state(signs[-1]))
    return hs, pre, signs


def bcast(v: Tensor, like: Tensor) -> Tensor:
    """A per-row vector shaped (R, 1, 1, ...) to broadcast against ``like``."""
    return v.view(v.shape[0], *([1] * (like.dim() - 1)))


def describe() -> list[dict[str, Any]]:
    """One record per registered estimator: name, formula, params, reference, supports, unbiased."""
    rows = []
    for n in names():
        est = get(n)
        rows.append(
            {
                "name": n,
                "formula": est.formula,
                "params": est.params(),
                "reference": est.reference,
                "supports": [t.__name__ for t in (est.supports or LAYER_TYPES)],
                "unbiased": est.unbiased,
            }
        )
    return rows


def surrogate_loss(
    model: SBN,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    estimator: str | SBNEstimator = "psa",
    samples: int = 1,
    generator: torch.Generator | int | None = None,
    **options: Any,
) -> Tensor:
    """A scalar whose ``backward()`` gives the ``estimator``'s estimate of the gradient of

        L(theta) = E_Z[ (1/N) sum_n loss_fn(eta_n, y_n) ]

    averaged over ``samples`` (M >= 1) independent noise draws per example.
    ``loss_fn(eta, y)`` must return per-example losses (shape (N,)).
    ``generator``: a ``torch.Generator``, an integer seed or None (torch's global
    RNG). ``options`` are the estimator's parameters (e.g. ``tau=0.1``). The
    value is a detached estimate of ``L`` (a sampled-path average; for
    ``exact`` the exact value). Same as :meth:`SBN.surrogate_loss`.
    """
    if not isinstance(model, SBN):
        raise StelabTypeError(f"model must be an SBN, got {type(model).__name__}")
    return model.surrogate_loss(x, y, loss_fn, estimator, samples, generator, **options)
