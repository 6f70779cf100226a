"""The baseline SBN estimators of [S20] §5, registered by name.

Pathwise (a differentiable stand-in for each sample): ``dst``, ``hard_st``,
``concrete``, ``gumbel_st``, ``tanh_mf``; score function: ``reinforce``,
``reinforce_loo``; and ``arm``. All in +-1 states, all through
:func:`stelab.sbn.surrogate_loss`. PSA is in :mod:`.psa`, exact enumeration
in :mod:`.exact`.

References: [S20] Shekhovtsov, Yanush, Flach, NeurIPS 2020, arXiv:2006.03143;
Williams 1992 (REINFORCE); Kool et al. 2019 (leave-one-out baseline); Yin & Zhou
2019 (ARM); Maddison et al. 2017, Jang et al. 2017 (Concrete / Gumbel).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import check_positive
from .estimators import (
    LossFn,
    SBNEstimator,
    _bcast,
    per_example_loss,
    register,
    replicate,
    sample_path,
)
from .layers import SBN
from .noise import uniform_like

__all__ = [
    "DeepST",
    "HardST",
    "Concrete",
    "GumbelST",
    "TanhMeanField",
    "Reinforce",
    "ReinforceLOO",
    "ARM",
]


# ---------------------------------------------------------------------------
# Pathwise estimators: a differentiable stand-in for each sample
# ---------------------------------------------------------------------------


class _Pathwise(SBNEstimator):
    """Forward one path with ``x^k = act(layer, a^k, U^k)``; the loss gradient is the estimate."""

    def act(self, layer: nn.Module, a: Tensor, u: Tensor) -> Tensor:
        raise NotImplementedError

    def estimate(
        self,
        model: SBN,
        x: Tensor,
        y: Tensor,
        loss_fn: LossFn,
        samples: int,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        h = replicate(x, samples)
        for layer in model.hidden:
            a = layer.preact(h)
            h = self.act(layer, a, uniform_like(a, generator))
        f = per_example_loss(loss_fn, model.output_preact(h), replicate(y, samples)).mean()
        return f, f


@register("dst")
class DeepST(_Pathwise):
    """Deep straight-through ([S20] §3 "DST"): PSA with both finite differences linearised.

        x = sg(sign(a - Z)) + 2 (F(a) - sg(F(a)))      i.e. dx/da := 2 F'(a)

    Biased (the linearisation ``f(flip x_j) - f ~ -2 x_j df/dx_j`` is exact only
    for f linear in x_j); cheapest estimator with useful gradients.
    """

    formula = "x = sg(sample) + 2 (F(a) - sg(F(a)));  dx/da = 2 F'(a)"
    reference = "[S20] Shekhovtsov et al. 2020 §3 (deep ST); Bengio et al. 2013"

    def act(self, layer: nn.Module, a: Tensor, u: Tensor) -> Tensor:
        p = layer.noise.cdf(a)
        return layer.noise.states(a.detach(), u) + 2.0 * (p - p.detach())


@register("hard_st")
class HardST(_Pathwise):
    """Hard straight-through: sample forward, ``hardtanh'(a) = 1{|a| < 1}`` backward.

    x = sg(sign(a - Z)) + hardtanh(a) - sg(hardtanh(a))
    """

    formula = "x = sg(sample) + hardtanh(a) - sg(hardtanh(a));  dx/da := 1{|a| < 1}"
    reference = "Hubara et al. 2016; [S20] appendix (ST variants)"

    def act(self, layer: nn.Module, a: Tensor, u: Tensor) -> Tensor:
        t = F.hardtanh(a)
        return layer.noise.states(a.detach(), u) + (t - t.detach())


class _Relaxed(_Pathwise):
    def __init__(self, tau: float = 1.0) -> None:
        self.tau = check_positive("tau", tau)

    def params(self) -> dict[str, Any]:
        return {"tau": self.tau}

    def relaxed(self, layer: nn.Module, a: Tensor, u: Tensor) -> Tensor:
        z = layer.noise.quantile(u)
        return torch.tanh((a - z) * (0.5 / self.tau))


@register("concrete")
class Concrete(_Relaxed):
    """Concrete / relaxed-Bernoulli estimator ([S20] baselines; Maddison et al., Jang et al. 2017).

        x = tanh((a - Z) / (2 tau)) = 2 sigma((a - Z) / tau) - 1,   Z = F^{-1}(U)

    The relaxed values are passed forward, so it differentiates a *different*
    (relaxed) objective: biased for every tau > 0. The returned value is the
    loss of the hard path ``sign(a - Z)`` with the same noise (an unbiased
    estimate of the expected loss).
    """

    formula = "x = tanh((a - Z) / (2 tau)), Z = F^{-1}(U), relaxed values forward"
    reference = "Maddison et al. 2017; Jang et al. 2017; [S20] §5 baselines"

    def estimate(
        self,
        model: SBN,
        x: Tensor,
        y: Tensor,
        loss_fn: LossFn,
        samples: int,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        h = replicate(x, samples)
        hard = h
        for layer in model.hidden:
            a = layer.preact(h)
            u = uniform_like(a, generator)
            h = self.relaxed(layer, a, u)
            with torch.no_grad():
                hard = layer.noise.states(layer.preact(hard), u)
        yr = replicate(y, samples)
        f = per_example_loss(loss_fn, model.output_preact(h), yr).mean()
        with torch.no_grad():
            value = per_example_loss(loss_fn, model.output_preact(hard), yr).mean()
        return value, f


@register("gumbel_st")
class GumbelST(_Relaxed):
    """Gumbel straight-through: hard sample forward, Concrete relaxation backward.

    x = sg(sign(a - Z)) + r - sg(r),   r = tanh((a - Z) / (2 tau)),   Z = F^{-1}(U)
    """

    formula = "x = sg(sign(a - Z)) + r - sg(r), r = tanh((a - Z) / (2 tau))"
    reference = "Jang et al. 2017 (ST Gumbel-softmax); [S20] §5 baselines"

    def act(self, layer: nn.Module, a: Tensor, u: Tensor) -> Tensor:
        r = self.relaxed(layer, a, u)
        return layer.noise.states(a.detach(), u) + (r - r.detach())


@register("tanh_mf")
class TanhMeanField(SBNEstimator):
    """Deterministic mean field: ``x = E[x | a] = 2F(a) - 1`` (= ``tanh(a/2)`` for logistic).

    Zero variance, biased (it propagates means through a nonlinear network).
    The gradient is that of the deterministic net; the returned value is the
    loss of a sampled hard path (an unbiased estimate of the expected loss).
    """

    formula = "x = 2 F(a) - 1 (= tanh(a / 2) for logistic noise), deterministic"
    reference = "[S20] §5 baselines (tanh mean-field)"

    def estimate(
        self,
        model: SBN,
        x: Tensor,
        y: Tensor,
        loss_fn: LossFn,
        samples: int,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        f = per_example_loss(loss_fn, model(x, mean_field=True), y).mean()
        with torch.no_grad():
            xr, yr = replicate(x, samples), replicate(y, samples)
            value = per_example_loss(loss_fn, model(xr, generator), yr).mean()
        return value, f


# ---------------------------------------------------------------------------
# Score-function and ARM estimators (unbiased for every layer)
# ---------------------------------------------------------------------------


class _Reinforce(SBNEstimator):
    unbiased = True
    loo = False

    def estimate(
        self,
        model: SBN,
        x: Tensor,
        y: Tensor,
        loss_fn: LossFn,
        samples: int,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        h = replicate(x, samples)
        logp = h.new_zeros(h.shape[0])
        for layer in model.hidden:
            a = layer.preact(h)
            h = layer.noise.states(a.detach(), uniform_like(a, generator))
            logp = logp + layer.noise.log_cdf(h * a).flatten(1).sum(1)
        f = per_example_loss(loss_fn, model.output_preact(h), replicate(y, samples))
        adv = f.detach()
        if self.loo:
            fm = adv.view(samples, -1)
            adv = (fm - (fm.sum(0, keepdim=True) - fm) / (samples - 1)).reshape(-1)
        return f.detach().mean(), (f + adv * logp).mean()


@register("reinforce")
class Reinforce(_Reinforce):
    """REINFORCE / score function without baseline ([S20] baselines; Williams 1992).

        surrogate = f(eta) + sg(f(eta)) * sum_k sum_j log P(x^k_j | x^{k-1}),
        log P(x | a) = log F(x a)

    Unbiased for every layer; the output layer gets the pathwise ``grad f``.
    """

    formula = "f + sg(f) * sum log F(x a)"
    reference = "Williams 1992; [S20] §5 baselines"


@register("reinforce_loo")
class ReinforceLOO(_Reinforce):
    """REINFORCE with the leave-one-out baseline over the M samples of each example.

        surrogate_m = f_m + sg(f_m - b_m) * sum log F(x a),   b_m = (sum_{m' != m} f_m') / (M - 1)

    Unbiased (b_m is independent of sample m); needs samples >= 2.
    """

    formula = "f_m + sg(f_m - mean_{m' != m} f_m') * sum log F(x a)"
    reference = "Kool et al. 2019 (REINFORCE leave-one-out); [S20] §5 baselines"
    min_samples = 2
    loo = True


@register("arm")
class ARM(SBNEstimator):
    """Augment-REINFORCE-Merge (Yin & Zhou 2019), applied per layer, in +-1 states.

    One base path ``x^1..x^L`` is sampled. For each hidden layer k, with
    ``phi = logit F(a^k)`` (``= a^k`` for logistic noise) and fresh ``U ~ U(0,1)``:

        x1 = +1 where U > F(-a) (= sigma(-phi)) else -1,   x2 = +1 where U < F(a) else -1,
        f1, f2 = loss of the rest of the net run from x1 and from x2,
        grad_phi = (f1 - f2) (U - 1/2),

    chained to the layer's parameters through ``phi(a^k)`` with ``x^{k-1}`` of the
    base path. The two continuations share their noise (common random numbers).
    The output layer gets ``grad f`` on the base path. Unbiased for every layer;
    costs 2(L - k) extra layer passes for layer k.
    """

    formula = "grad_phi = (f(x1) - f(x2)) (U - 1/2), x1 = 1{U > F(-a)}, x2 = 1{U < F(a)}"
    reference = "Yin & Zhou 2019 (ARM), ICLR; [S20] §5 baselines"
    unbiased = True

    def estimate(
        self,
        model: SBN,
        x: Tensor,
        y: Tensor,
        loss_fn: LossFn,
        samples: int,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        hs, pre = sample_path(model, x, samples, generator)
        yr = replicate(y, samples)
        f = per_example_loss(loss_fn, model.output_preact(hs[-1]), yr)
        rows = f.shape[0]
        sur = f.mean()
        y2 = torch.cat([yr, yr])
        grads = []
        with torch.no_grad():
            for k, layer in enumerate(model.hidden):
                a = pre[k].detach()
                u = uniform_like(a, generator)
                noise = layer.noise
                x1 = (u > noise.cdf(-a)).to(a.dtype) * 2.0 - 1.0
                x2 = (u < noise.cdf(a)).to(a.dtype) * 2.0 - 1.0
                h = torch.cat([x1, x2])
                for up in model.hidden[k + 1 :]:
                    b = up.preact(h)
                    uu = uniform_like(b[:rows], generator)
                    h = up.noise.states(b, torch.cat([uu, uu]))
                f12 = per_example_loss(loss_fn, model.output_preact(h), y2)
                grads.append(_bcast(f12[:rows] - f12[rows:], u) * (u - 0.5))
        for k, layer in enumerate(model.hidden):
            sur = sur + (grads[k] * layer.noise.logit(pre[k])).sum() / rows
        return f.detach().mean(), sur
