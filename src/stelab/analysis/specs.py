"""Which estimators a fidelity analysis compares: names, labels, costs, and sign+STE nets.

An *estimator spec* is a string (what the CLI and configs take) or an object:

=========================  ================================================================
spec                       meaning
=========================  ================================================================
``psa``                    a registered SBN estimator (:func:`stelab.sbn.estimator_names`)
``concrete:tau=0.1``       ... with parameters (``name:key=value:key=value``)
``det:ste``                the deterministic sign network with a quantizer STE
                           (:mod:`stelab.estimators`) as an estimator of the SBN gradient
``det:swish_sign:beta=5``  ... with the STE's parameters
``sample:clipped``         sampled states ``sign(a - Z)`` forward, the STE backward
=========================  ================================================================

:class:`SignSTE` is what ``det:`` and ``sample:`` build: it answers "how biased is
my STE?" by treating the sign+STE network (same weights, no injected noise) as an
estimator of the gradient of the noise-injected network's expected loss ([S20] §2).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, StelabTypeError, closest
from ..sbn import SBN, SBNConv2d, SBNEstimator, SBNLinear, estimator_names, get_estimator
from ..sbn.estimators import LossFn, per_example_loss, replicate
from ..sbn.noise import uniform_like
from ..specs import split_spec

__all__ = [
    "EstimatorSpec",
    "SignSTE",
    "parse_estimator",
    "parse_estimators",
    "is_deterministic",
    "is_coupled",
    "forward_equivalents",
    "PAPER_ESTIMATORS",
]

#: the estimators of the [S20] gradient-accuracy figure (docs/papers/psa2020.md), as specs
PAPER_ESTIMATORS: tuple[str, ...] = (
    "psa",
    "dst",
    "hard_st",
    "arm",
    "reinforce",
    "reinforce_loo",
    "concrete:tau=0.1",
    "concrete:tau=1",
    "gumbel_st:tau=1",
    "tanh_mf",
)

_MODES = ("det", "sample")


class SignSTE(SBNEstimator):
    """A sign network trained with a quantizer STE, seen as an estimator of the SBN gradient.

    With ``forward="sign"`` (spec ``det:NAME``) the network is deterministic:

        x^k = sign(a^k)  (sign(0) = +1),   dx^k/da^k := q'(a^k)   (the STE's surrogate)

    and the estimate is the gradient of ``mean_n f(eta_n)`` computed that way at the
    SBN's weights: one number per parameter, zero variance, and a bias
    ``E_Z-gradient - estimate`` that says how far the STE is from the gradient of
    the expected loss of the noise-injected network ``x^k = sign(a^k - Z^k)``.

    With ``forward="sample"`` (spec ``sample:NAME``) the states are sampled,
    ``x^k = sign(a^k - Z^k)``, and the backward uses ``q'(a^k)`` at the noiseless
    pre-activation (the convention of ``hard_st`` and ``dst``): ``sample:logistic``
    is ``dst`` (``q' = 2 sigma'(a)``) and ``sample:clipped`` is ``hard_st`` up to the
    measure-zero points ``|a| = 1``. The loss value returned is that of a sampled
    hard path (an unbiased estimate of the expected loss), as for ``tanh_mf``.

    Args:
        estimator: a quantizer estimator name (``stelab.estimators.names()``) that
            serves ``sign``: ``ste``, ``clipped``, ``approx_sign``, ``swish_sign``,
            ``logistic``, ...
        forward: ``"sign"`` (deterministic) or ``"sample"``.
        **params: the estimator's parameters (e.g. ``beta=5`` for ``swish_sign``).

    Closed form (used in the tests): one hidden layer and a loss linear in ``eta``
    (``f = -t eta``) give ``E[f] = f(V tanh(a/2) + c)``, whose hidden-layer gradient
    ``-t V_j 2 sigma'(a_j) x^0`` equals ``det:logistic``'s exactly (``2 sigma' = tanh(a/2)'``).
    """

    name = "sign_ste"
    formula = "x = sign(a) (or sign(a - Z)) forward, dx/da := q'(a) backward"
    reference = "Bengio et al. 2013 (STE); [S20] §2 (SBN objective)"
    supports = (SBNLinear, SBNConv2d)
    unbiased = False

    def __init__(self, estimator: str = "ste", forward: str = "sign", **params: Any) -> None:
        from ..quantizers import Quantizer

        if forward not in ("sign", "sample"):
            raise ConfigError(f"forward must be 'sign' or 'sample', got {forward!r}")
        self.forward = forward
        self.quantizer = Quantizer("sign", estimator, **params)
        self.ste = self.quantizer.estimator
        self.ste_params = dict(params)

    @property
    def deterministic(self) -> bool:
        """True for ``forward="sign"``: every draw gives the same gradient."""
        return self.forward == "sign"

    def params(self) -> dict[str, Any]:
        return {"estimator": self.ste.name, "forward": self.forward, **self.ste_params}

    def __repr__(self) -> str:
        extra = "".join(f":{k}={v}" for k, v in self.ste_params.items())
        return f"{'det' if self.deterministic else 'sample'}:{self.ste.name}{extra}"

    def estimate(
        self,
        model: SBN,
        x: Tensor,
        y: Tensor,
        loss_fn: LossFn,
        samples: int,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        q = self.quantizer
        if self.deterministic:
            h = x
            for layer in model.hidden:
                h = layer.to_state(q(layer.preact(h)))
            f = per_example_loss(loss_fn, model.output_preact(h), y).mean()
            with torch.no_grad():
                xr, yr = replicate(x, samples), replicate(y, samples)
                value = per_example_loss(loss_fn, model(xr, generator), yr).mean()
            return value, f
        h = replicate(x, samples)
        for layer in model.hidden:
            a = layer.preact(h)
            s = layer.noise.states(a.detach(), uniform_like(a, generator))
            t = q(a)
            h = layer.to_state(s + (t - t.detach()))
        f = per_example_loss(loss_fn, model.output_preact(h), replicate(y, samples)).mean()
        return f.detach(), f


@dataclass(frozen=True)
class EstimatorSpec:
    """An estimator to analyse and the label it is shown with (``concrete(tau=0.1)``)."""

    label: str
    estimator: SBNEstimator

    @property
    def name(self) -> str:
        """The registry name (``sign_ste`` for :class:`SignSTE`)."""
        return self.estimator.name


def _label(name: str, params: dict[str, Any]) -> str:
    return f"{name}({', '.join(f'{k}={v}' for k, v in params.items())})" if params else name


def _nondefault(est: SBNEstimator) -> dict[str, Any]:
    try:
        sig = inspect.signature(type(est))
    except (TypeError, ValueError):
        return est.params()
    out = {}
    for k, v in est.params().items():
        p = sig.parameters.get(k)
        if p is None or p.default is inspect.Parameter.empty or p.default != v:
            out[k] = v
    return out


def _known_specs() -> list[str]:
    from .. import estimators as qest

    return [*estimator_names(), *(f"det:{n}" for n in qest.names())]


def parse_estimator(spec: str | SBNEstimator | EstimatorSpec) -> EstimatorSpec:
    """An :class:`EstimatorSpec` from a spec string (see the module docstring) or an object.

    Raises ConfigError for an unknown name (with the closest match) or bad parameters.
    """
    if isinstance(spec, EstimatorSpec):
        return spec
    if isinstance(spec, SBNEstimator):
        return EstimatorSpec(
            repr(spec) if isinstance(spec, SignSTE) else _label(spec.name, _nondefault(spec)), spec
        )
    if not isinstance(spec, str):
        raise StelabTypeError(
            f"an estimator must be a spec string (e.g. 'psa', 'concrete:tau=0.1', 'det:ste') "
            f"or an SBNEstimator, got {type(spec).__name__}"
        )
    parts, params = split_spec(spec, what="estimator", example="concrete:tau=0.1")
    mode = None
    if len(parts) > 1 and parts[0] in _MODES:
        mode = parts.pop(0)
    if not parts[0]:
        raise ConfigError(f"empty estimator spec {spec!r}; e.g. 'psa' or 'det:ste'")
    if len(parts) > 1:
        raise ConfigError(
            f"estimator parameter must be KEY=VALUE, got {parts[1]!r} in {spec!r} "
            "(e.g. 'concrete:tau=0.1')"
        )
    name = parts[0]
    if mode is not None:
        from .. import estimators as qest

        if name not in qest.names():
            hint = closest(name, qest.names())
            raise ConfigError(
                f"unknown STE {name!r} in {spec!r}; known: {', '.join(qest.names())}"
                + (f" (did you mean '{mode}:{hint}'?)" if hint else "")
            )
        est = SignSTE(name, "sign" if mode == "det" else "sample", **params)
        return EstimatorSpec(repr(est), est)
    if name not in estimator_names():
        hint = closest(name, _known_specs())
        raise ConfigError(
            f"unknown SBN estimator {name!r}; known: {', '.join(estimator_names())}, or "
            f"det:STE / sample:STE for a sign network with a quantizer STE"
            + (f" (did you mean {hint!r}?)" if hint else "")
        )
    return EstimatorSpec(_label(name, params), get_estimator(name, **params))


def parse_estimators(
    specs: str | SBNEstimator | EstimatorSpec | list[Any] | tuple[Any, ...],
) -> list[EstimatorSpec]:
    """A list of specs from a comma-separated string or a sequence; labels must be distinct."""
    if isinstance(specs, str):
        items: list[Any] = [s for s in (t.strip() for t in specs.split(",")) if s]
    elif isinstance(specs, (list, tuple)):
        items = list(specs)
    else:
        items = [specs]
    if not items:
        raise ConfigError("give at least one estimator, e.g. 'psa,dst,arm,reinforce'")
    out = [parse_estimator(s) for s in items]
    labels = [s.label for s in out]
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise ConfigError(f"estimators listed twice: {', '.join(dup)}")
    return out


def is_deterministic(est: SBNEstimator) -> bool:
    """Whether every draw of ``est`` gives the same gradient (``tanh_mf``, ``exact``, ``det:``)."""
    if isinstance(est, SignSTE):
        return est.deterministic
    return est.name in ("tanh_mf", "exact")


def is_coupled(est: SBNEstimator) -> bool:
    """Whether ``est`` with M samples is *not* an average of M independent one-sample
    estimates (it needs ``min_samples > 1``, e.g. ``reinforce_loo``'s shared baseline)."""
    return est.min_samples > 1


def forward_equivalents(est: SBNEstimator, model: SBN) -> float | None:
    """Cost of one draw in forward-pass equivalents (layer evaluations / (L + 1)).

    A forward pass evaluates the L hidden layers and the output layer (L + 1 layer
    evaluations); every estimator then has one backward pass, not counted. Counts:

    * ``reinforce``, ``reinforce_loo``, ``dst``, ``hard_st``, ``gumbel_st``, ``sample:*``: 1;
    * ``concrete``: 2 (the relaxed pass for the gradient, a hard pass for the loss value);
    * ``tanh_mf``, ``det:*``: 2 (deterministic pass + a sampled pass for the value);
    * ``arm``, ``arm_shared``: 1 + L (for hidden layer k, two continuations through the
      L - k + 1 layers above: 2 sum_k (L - k + 1) = L (L + 1) layer evaluations);
    * ``psa``: 1 + L / (L + 1): the forward, one ratio pass per hidden layer below
      the top (L - 1 passes, each with the multiply-accumulate count of a
      data-gradient pass and one F evaluation per term) and the J single-flip
      output evaluations (O(O) each, together about one output-layer evaluation);
    * ``exact`` and unknown estimators: None (not a per-draw cost).
    """
    n_layers = len(model.hidden)
    name = est.name
    if name in ("reinforce", "reinforce_loo", "dst", "hard_st", "gumbel_st"):
        return 1.0
    if isinstance(est, SignSTE):
        return 2.0 if est.deterministic else 1.0
    if name in ("concrete", "tanh_mf"):
        return 2.0
    if name in ("arm", "arm_shared"):
        return 1.0 + n_layers
    if name == "psa":
        return 1.0 + n_layers / (n_layers + 1)
    return None
