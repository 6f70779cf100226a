"""The baseline SBN estimators of [S20] §5, registered by name.

Pathwise (a differentiable stand-in for each sample): ``dst``, ``hard_st``,
``concrete``, ``gumbel_st``, ``tanh_mf``; score function: ``reinforce``,
``reinforce_loo``; and ``arm``, ``arm_shared``. All written for signs in {-1, +1} and
mapped to the layer's states by ``layer.to_state`` ({-1, +1} or {0, 1}), all through
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
    bcast,
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
    "ARMShared",
]


# ---------------------------------------------------------------------------
# Pathwise estimators: a differentiable stand-in for each sample
# ---------------------------------------------------------------------------


class _Pathwise(SBNEstimator):
    """Forward one path with ``x^k = to_state(act(layer, a^k, U^k))``; the loss gradient is
    the estimate. ``act`` returns a (relaxed or straight-through) sign in [-1, 1]."""

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
            h = layer.to_state(self.act(layer, a, uniform_like(a, generator)))
        f = per_example_loss(loss_fn, model.output_preact(h), replicate(y, samples)).mean()
        return f, f


@register("dst")
class DeepST(_Pathwise):
    """Deep straight-through ([S20] §3 "DST"): PSA with both finite differences linearised.

        x = sg(sign(a - Z)) + 2 (F(a) - sg(F(a)))      i.e. dx/da := 2 F'(a)

    (with states in {0, 1}, ``h = (x + 1)/2``: ``dh/da := F'(a)``, the derivative of E[h]).

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

    (states in {0, 1}: ``h = (x + 1)/2``, so ``dh/da := 1{|a| < 1} / 2``.)
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

    (states in {0, 1}: ``h = (x + 1)/2 = sigma((a - Z) / tau)``, the usual binary Concrete.)

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
            h = layer.to_state(self.relaxed(layer, a, u))
            with torch.no_grad():
                hard = layer.to_state(layer.noise.states(layer.preact(hard), u))
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
    """Deterministic mean field: ``x = E[x | a] = 2F(a) - 1`` (= ``tanh(a/2)`` for logistic;
    ``h = E[h | a] = F(a)`` for states in {0, 1}).

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
            s = layer.noise.states(a.detach(), uniform_like(a, generator))
            logp = logp + layer.noise.log_cdf(s * a).flatten(1).sum(1)
            h = layer.to_state(s)
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
        log P(x | a) = log F(x a)   (x the sign in {-1, +1}, whatever the states)

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


def _arm_phi_grads(
    model: SBN,
    hc: Tensor,
    k: int,
    u: Tensor,
    yr: Tensor,
    loss_fn: LossFn,
    generator: torch.Generator | None,
    shared: bool,
) -> Tensor:
    """ARM's ``(f(x1) - f(x2)) (U - 1/2)`` for hidden layer k; ``hc`` = the states of x1 on
    top of those of x2 (2R rows). Each layer above draws one ``U(0, 1)`` tensor of R rows
    per continuation (``shared``: one, used by both)."""
    rows = u.shape[0]
    for up in model.hidden[k + 1 :]:
        b = up.preact(hc)
        u1 = uniform_like(b[:rows], generator)
        u2 = u1 if shared else uniform_like(b[:rows], generator)
        hc = up.to_state(up.noise.states(b, torch.cat([u1, u2])))
    f12 = per_example_loss(loss_fn, model.output_preact(hc), torch.cat([yr, yr]))
    return bcast(f12[:rows] - f12[rows:], u) * (u - 0.5)


def _arm_pair(noise: Any, a: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """ARM's antithetic signs ``x1 = +1 iff U > F(-a)``, ``x2 = +1 iff U < F(a)``."""
    x1 = (u > noise.cdf(-a)).to(a.dtype) * 2.0 - 1.0
    x2 = (u < noise.cdf(a)).to(a.dtype) * 2.0 - 1.0
    return x1, x2


@register("arm")
class ARM(SBNEstimator):
    """Augment-REINFORCE-Merge (Yin & Zhou 2019) applied per layer, as in [S20]'s comparison.

    Layer by layer, k = 1..L, with ``phi = logit F(a^k)`` (``= a^k`` for logistic noise)
    and a fresh ``U ~ U(0, 1)`` per unit:

        x1 = +1 where U > F(-a) else -1,     x2 = +1 where U < F(a) else -1,
        f1, f2 = loss of the rest of the net run from x1 and from x2, each continuation
                 with its own independent noise in the layers above,
        grad_phi = (f1 - f2) (U - 1/2),

    chained to the layer's parameters through ``phi(a^k)``; the sampled path then
    continues along ``x^k = x1`` (itself a sample of ``P(x^k | x^{k-1})``), which feeds
    ``a^{k+1}``. The output layer gets ``grad f`` at the end of that path. Signs are mapped
    to the layer's states by ``to_state``. Unbiased for every layer; costs 2(L - k)
    extra layer passes for layer k. Randomness per layer k: ``U`` (shaped like ``a^k``),
    then for each layer above one tensor for the x1 continuation and one for x2.
    """

    formula = (
        "grad_phi = (f(x1) - f(x2)) (U - 1/2), x1 = 1{U > F(-a)}, x2 = 1{U < F(a)}, "
        "independent continuations, path continues along x1"
    )
    reference = "Yin & Zhou 2019 (ARM), ICLR, applied layer-wise as in [S20] §5 baselines"
    unbiased = True
    shared = False

    def estimate(
        self,
        model: SBN,
        x: Tensor,
        y: Tensor,
        loss_fn: LossFn,
        samples: int,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        yr = replicate(y, samples)
        h = replicate(x, samples)
        rows = h.shape[0]
        sur = h.new_zeros(())
        for k, layer in enumerate(model.hidden):
            a = layer.preact(h)
            with torch.no_grad():
                ad = a.detach()
                u = uniform_like(ad, generator)
                x1, x2 = _arm_pair(layer.noise, ad, u)
                h = layer.to_state(x1)
                hc = torch.cat([h, layer.to_state(x2)])
                g = _arm_phi_grads(model, hc, k, u, yr, loss_fn, generator, self.shared)
            sur = sur + (g * layer.noise.logit(a)).sum() / rows
        f = per_example_loss(loss_fn, model.output_preact(h), yr)
        return f.detach().mean(), sur + f.mean()


@register("arm_shared")
class ARMShared(ARM):
    """ARM with common random numbers: the two continuations share their noise.

    As :class:`ARM` (``grad_phi = (f(x1) - f(x2)) (U - 1/2)`` per hidden layer), except
    that (i) the continuations from ``x1`` and ``x2`` use the *same* ``U(0, 1)`` draw in
    every layer above (common random numbers, so ``f(x1) - f(x2)`` only sees the
    difference the flip makes), and (ii) the base path ``x^1..x^L`` that feeds the
    pre-activations and the output gradient is sampled first, independently of the
    ARM uniforms. Each continuation is still a sample of ``P(. | x1)`` resp.
    ``P(. | x2)``, so the estimator stays unbiased; the coupling lowers the variance of
    the deeper layers (by 0.2-0.7x on the [S20] toy net). Not the estimator of the
    paper's comparison: a variance-reduced variant. Randomness: one tensor per layer
    for the base path, then per layer k: ``U``, and one tensor per layer above.
    """

    formula = (
        "grad_phi = (f(x1) - f(x2)) (U - 1/2), x1 = 1{U > F(-a)}, x2 = 1{U < F(a)}, "
        "continuations share their noise"
    )
    reference = "Yin & Zhou 2019 (ARM) with common random numbers across the two continuations"
    shared = True

    def estimate(
        self,
        model: SBN,
        x: Tensor,
        y: Tensor,
        loss_fn: LossFn,
        samples: int,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        hs, pre, _ = sample_path(model, x, samples, generator)
        yr = replicate(y, samples)
        f = per_example_loss(loss_fn, model.output_preact(hs[-1]), yr)
        rows = f.shape[0]
        sur = f.mean()
        grads = []
        with torch.no_grad():
            for k, layer in enumerate(model.hidden):
                a = pre[k].detach()
                u = uniform_like(a, generator)
                x1, x2 = _arm_pair(layer.noise, a, u)
                hc = torch.cat([layer.to_state(x1), layer.to_state(x2)])
                grads.append(_arm_phi_grads(model, hc, k, u, yr, loss_fn, generator, True))
        for k, layer in enumerate(model.hidden):
            sur = sur + (grads[k] * layer.noise.logit(pre[k])).sum() / rows
        return f.detach().mean(), sur
