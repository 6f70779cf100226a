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

import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, StelabTypeError, check_int, construct, unknown
from .layers import SBN, SBNConv2d, SBNLinear
from .noise import as_generator, uniform_like

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
]

LossFn = Callable[[Tensor, Tensor], Tensor]


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


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """A per-row vector shaped (R, 1, 1, ...) to broadcast against ``like``."""
    return v.view(v.shape[0], *([1] * (like.dim() - 1)))


# ---------------------------------------------------------------------------
# Base class and registry
# ---------------------------------------------------------------------------


class SBNEstimator:
    """Base class of SBN gradient estimators.

    Subclasses set ``name`` (by :func:`register`), ``formula`` (plain-text
    math), ``reference``, ``supports`` (hidden layer types), ``min_samples``
    and ``unbiased`` (for every layer), validate their parameters in
    ``__init__`` and implement :meth:`estimate`.
    """

    name: ClassVar[str] = "sbn_estimator"
    formula: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    supports: ClassVar[tuple[type[nn.Module], ...]] = (SBNLinear, SBNConv2d)
    min_samples: ClassVar[int] = 1
    unbiased: ClassVar[bool] = False

    def estimate(
        self,
        model: SBN,
        x: Tensor,
        y: Tensor,
        loss_fn: LossFn,
        samples: int,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        """``(value, surrogate)``: loss estimate and a scalar whose gradient is the estimate.

        ``x``, ``y`` are the un-replicated batch; ``samples`` >= ``min_samples``.
        """
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """Constructor parameters (for repr and summaries)."""
        return {}

    def check(self, model: SBN, samples: int) -> None:
        """Raise ConfigError for a layer type or a ``samples`` this estimator can't handle."""
        for i, layer in enumerate(model.hidden):
            if not isinstance(layer, self.supports):
                ok = ", ".join(t.__name__ for t in self.supports)
                raise ConfigError(
                    f"estimator {self.name!r} does not support {type(layer).__name__} layers "
                    f"(hidden layer {i}); it supports: {ok}"
                )
        if samples < self.min_samples:
            raise ConfigError(
                f"estimator {self.name!r} needs samples >= {self.min_samples}, "
                f"got samples={samples}"
            )

    def __repr__(self) -> str:
        p = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{self.name}({p})" if p else self.name

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.params() == other.params()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.params().items()))))


_REGISTRY: dict[str, type[SBNEstimator]] = {}
#: estimators resolved by (name, sorted params): a name costs one dict look-up after its
#: first use, like a prebuilt object (estimators hold only their constructor parameters)
_RESOLVED: dict[Any, SBNEstimator] = {}
_RESOLVED_MAX = 256


def register(name: str, *, overwrite: bool = False) -> Callable[[type], type]:
    """Class decorator registering an :class:`SBNEstimator` subclass under ``name``."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ConfigError(f"SBN estimator name must be a Python identifier, got {name!r}")

    def deco(cls: type) -> type:
        if not (inspect.isclass(cls) and issubclass(cls, SBNEstimator)):
            raise StelabTypeError(
                f"register({name!r}) expects an SBNEstimator subclass, got {cls!r}"
            )
        if name in _REGISTRY and not overwrite:
            raise ConfigError(
                f"SBN estimator {name!r} is already registered; pass overwrite=True to replace it"
            )
        cls.name = name
        _REGISTRY[name] = cls
        _RESOLVED.clear()
        return cls

    return deco


def names() -> list[str]:
    """Names of every registered SBN estimator."""
    return sorted(_REGISTRY)


def get(estimator: str | SBNEstimator, **params: Any) -> SBNEstimator:
    """An SBN estimator by name with its parameters (e.g. ``get("concrete", tau=0.1)``).

    Names are resolved once: the instance built for a (name, parameters) pair is
    cached and returned again (estimators are immutable), so passing a name costs
    the same as passing a prebuilt object. Unhashable parameters are not cached.
    """
    if isinstance(estimator, SBNEstimator):
        if params:
            raise ConfigError(f"parameters {sorted(params)} given with an estimator instance")
        return estimator
    if not isinstance(estimator, str):
        raise StelabTypeError(
            f"estimator must be a name or an SBNEstimator, got {type(estimator).__name__}"
        )
    key: Any = estimator
    try:
        if params:
            # the type is part of the key: True == 1 and 1 == 1.0 must not share an instance
            items = sorted((k, type(v).__qualname__, v) for k, v in params.items())
            key = (estimator, *items)
        hit = _RESOLVED.get(key)
    except TypeError:  # unhashable parameter values
        key, hit = None, None
    if hit is not None:
        return hit
    if estimator not in _REGISTRY:
        raise unknown("SBN estimator", estimator, _REGISTRY)
    est = construct("SBN estimator", estimator, _REGISTRY[estimator], params)
    if key is not None and len(_RESOLVED) < _RESOLVED_MAX:
        _RESOLVED[key] = est
    return est


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
                "supports": [t.__name__ for t in est.supports],
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
    ``exact`` the exact value).
    """
    if not isinstance(model, SBN):
        raise StelabTypeError(f"model must be an SBN, got {type(model).__name__}")
    est = get(estimator, **options)
    samples = check_int("samples", samples, 1, 2**31 - 1)
    est.check(model, samples)
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise StelabTypeError("x and y must be tensors")
    if x.shape[0] != y.shape[0]:
        raise ConfigError(
            f"x and y must have the same batch size, got {x.shape[0]} and {y.shape[0]}"
        )
    g = as_generator(generator, x.device)
    value, sur = est.estimate(model, x, y, loss_fn, samples, g)
    return value.detach() + (sur - sur.detach())
