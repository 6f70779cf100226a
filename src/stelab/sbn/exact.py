"""Reference gradients for SBNs: exact enumeration and an unbiased Monte-Carlo reference.

Exact: for a fully-connected SBN with hidden widths n_1..n_L the expected loss

    L = (1/N) sum_n E[f(eta(x^L), y_n)],

is computed by a forward recursion over the 2^{n_k} states of each layer
(exact, a Markov chain over layers):

    p_1[n, s]  = prod_j F(s_j a^1_j(x^0_n))                      (N x 2^{n_1})
    T_k[s, t]  = prod_j F(t_j a^k_j(s)),  a^k(s) = W^k h(s) + b^k  (2^{n_{k-1}} x 2^{n_k})
    p_k        = p_{k-1} T_k
    L          = (1/N) sum_n sum_s p_L[n, s] f(V h(s) + c, y_n)

over sign vectors ``s, t`` in {-1, +1}^n, with ``h(s)`` the emitting layer's states
(``h = s``, or ``h = (s + 1)/2`` for ``states="01"``; ``P(s_j = +1) = F(a_j)`` either way)

so the cost is ``N 2^{n_1} + sum_k 2^{n_{k-1}+n_k} + N 2^{n_L}`` terms instead of
``N 2^{n_1+...+n_L}`` (2-5-5-5-1 on 200 points: ~15k terms vs 6.5M). The
gradient is autograd through this exact expression ([S20] §5 uses exact
enumeration as the ground truth of the gradient-accuracy experiment).

Monte Carlo: :func:`mc_reference` averages an unbiased estimator (REINFORCE,
REINFORCE-LOO or ARM) over many draws and reports per-parameter standard errors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, StelabTypeError, check_int
from .estimators import (
    LossFn,
    SBNEstimator,
    get,
    names,
    per_example_loss,
    register,
    surrogate_loss,
)
from .layers import SBN, SBNLinear

__all__ = [
    "ExactReference",
    "MCReference",
    "Exact",
    "all_states",
    "exact_expected_loss",
    "exact_gradient",
    "mc_reference",
    "DEFAULT_MAX_STATES",
]

#: the largest table (entries) the layer recursion may build: 2^{n_{k-1}} x 2^{n_k}
DEFAULT_MAX_STATES = 2**22


def all_states(n: int, dtype: torch.dtype | None = None, device: Any = None) -> Tensor:
    """All 2^n states in {-1, +1}^n, shape (2^n, n); row s has bit j of s at column j."""
    n = check_int("n", n, 0, 30)
    s = torch.arange(2**n, device=device)
    bits = (s[:, None] >> torch.arange(n, device=device)) & 1
    return bits.to(dtype or torch.get_default_dtype()) * 2.0 - 1.0


def _transition(noise: Any, a: Tensor, states: Tensor) -> Tensor:
    """T[s, t] = prod_j F(t_j a_j(s)) for pre-activations ``a`` (S, n) and sign states (T, n).

    t_j is ±1, so log T[s, t] = sum_j b_j(t) log F(a_j(s)) + (1 - b_j(t)) log F(-a_j(s)),
    b = (t + 1)/2: two (S, n) @ (n, T) products of the log-CDF tables of ``a``, with no
    (S, T, n) intermediate (which outgrows the cache past ~2^27 entries and costs n
    exp/log evaluations per table entry). Each entry sums log-probabilities of one sign
    only: the one-product form sum_j log F(-a_j) + b_j (log F(a_j) - log F(-a_j)) adds
    and subtracts terms down to log(tiny) = -708 (uniform noise) and lost ~1e-13
    relative accuracy to cancellation.
    """
    lp, lm = noise.log_cdf(a), noise.log_cdf(-a)
    b = (states + 1) / 2
    return torch.addmm(lm @ (1 - b).T, lp, b.T).exp_()


def check_enumerable(model: SBN, max_states: int) -> list[int]:
    if not isinstance(model, SBN):
        raise StelabTypeError(f"model must be an SBN, got {type(model).__name__}")
    for i, layer in enumerate(model.hidden):
        if not isinstance(layer, SBNLinear):
            raise ConfigError(
                f"exact enumeration does not support {type(layer).__name__} layers "
                f"(hidden layer {i}); it supports: SBNLinear. Use "
                f"stelab.sbn.mc_reference(...) for a Monte-Carlo reference instead"
            )
    widths = [layer.out_features for layer in model.hidden]
    sizes = [2**w for w in widths]
    tables = [sizes[0]] + [sizes[k - 1] * sizes[k] for k in range(1, len(sizes))]
    worst = max(range(len(tables)), key=tables.__getitem__)
    if max(widths) > 30 or tables[worst] > max_states:
        what = (
            f"{sizes[worst]} states of hidden layer {worst}"
            if worst == 0
            else f"a {sizes[worst - 1]} x {sizes[worst]} transition table between hidden "
            f"layers {worst - 1} and {worst}"
        )
        raise ConfigError(
            f"SBN too large for exact enumeration: hidden widths {widths} give "
            f"2^{sum(widths)} = {2 ** sum(widths)} joint hidden states, and the layer-wise "
            f"recursion needs {what} ({tables[worst]} entries, limit max_states={max_states}). "
            f"Use stelab.sbn.mc_reference(model, x, y, loss_fn, samples=..., generator=...) "
            f"for an unbiased Monte-Carlo reference instead"
        )
    return widths


def exact_expected_loss(
    model: SBN,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    *,
    max_states: int = DEFAULT_MAX_STATES,
) -> Tensor:
    """The exact expected loss ``(1/N) sum_n E_Z[loss_fn(eta_n, y_n)]``, differentiable.

    Layer-wise recursion ``p_k = p_{k-1} T_k`` over all hidden states (see the
    module docstring). Fully-connected SBNs only; refuses (ConfigError naming
    the state count and :func:`mc_reference`) when a table exceeds ``max_states``.
    Data are processed in blocks so ``N 2^{n_k}`` also stays below ``max_states``.
    """
    widths = check_enumerable(model, check_int("max_states", max_states, 1, 2**40))
    dt, dev = model.output.weight.dtype, model.output.weight.device
    states = [all_states(w, dt, dev) for w in widths]
    # data-independent transition tables T_k (k >= 2): T[s, t] = prod_j F(t_j a_j(s))
    tables = []
    for k in range(1, len(widths)):
        layer = model.hidden[k]
        a = layer.preact(model.hidden[k - 1].to_state(states[k - 1]))  # (S_prev, n_k)
        tables.append(_transition(layer.noise, a, states[k]))
    eta = model.output_preact(model.hidden[-1].to_state(states[-1]))  # (S_L, O)
    n = x.shape[0]
    block = max(1, max_states // max(2 ** max(widths), 1))
    total = eta.new_zeros(())
    for n0 in range(0, n, block):
        xb, yb = x[n0 : n0 + block], y[n0 : n0 + block]
        first = model.hidden[0]
        a = first.preact(xb)  # (B, n_1)
        p = _transition(first.noise, a, states[0])
        for t in tables:
            p = p @ t
        s_l = eta.shape[0]
        rows = xb.shape[0]
        f = per_example_loss(loss_fn, eta.repeat(rows, 1), yb.repeat_interleave(s_l, dim=0)).view(
            rows, s_l
        )
        total = total + (p * f).sum()
    return total / n


@dataclass
class ExactReference:
    """Exact expected loss and its gradient per parameter name (``model.named_parameters()``)."""

    value: Tensor
    grads: dict[str, Tensor]


@dataclass
class MCReference:
    """Monte-Carlo reference: means and standard errors of an unbiased estimator.

    ``grads[name]`` is the mean over ``samples`` draws, ``grads_se[name]`` its
    standard error (from ``groups`` independent group means); same for ``value``.
    """

    value: Tensor
    value_se: Tensor
    grads: dict[str, Tensor]
    grads_se: dict[str, Tensor]
    samples: int
    groups: int
    estimator: str


def exact_gradient(
    model: SBN, x: Tensor, y: Tensor, loss_fn: LossFn, *, max_states: int = DEFAULT_MAX_STATES
) -> ExactReference:
    """Exact expected loss and its exact gradient (autograd through the enumeration).

    Does not touch ``.grad``. See :func:`exact_expected_loss`.
    """
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    value = exact_expected_loss(model, x, y, loss_fn, max_states=max_states)
    grads = torch.autograd.grad(value, [p for _, p in named], allow_unused=True)
    out = {
        k: (g if g is not None else torch.zeros_like(p))
        for (k, p), g in zip(named, grads, strict=True)
    }
    return ExactReference(value.detach(), out)


def mc_reference(
    model: SBN,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    samples: int,
    generator: torch.Generator | int | None = None,
    *,
    estimator: str = "reinforce_loo",
    groups: int = 100,
    **options: Any,
) -> MCReference:
    """Unbiased Monte-Carlo reference gradient with per-parameter standard errors.

    ``samples`` noise draws per example are split into ``groups`` equal groups;
    each group is one call of the (unbiased) ``estimator`` with ``samples // groups``
    draws. ``mean = average of the group means``,
    ``se = std(group means) / sqrt(groups)`` (batch-means standard error).
    ``estimator`` must be unbiased for every layer: ``arm``, ``arm_shared``, ``reinforce``,
    ``reinforce_loo`` (default) or ``exact``. Does not touch ``.grad``.
    """
    est = get(estimator, **options)
    if not est.unbiased:
        ok = [n for n in names() if get(n).unbiased]
        raise ConfigError(
            f"mc_reference needs an estimator that is unbiased for every layer "
            f"({', '.join(ok)}), got {estimator!r}"
        )
    samples = check_int("samples", samples, 1, 2**40)
    groups = check_int("groups", groups, 2, 2**31)
    per = samples // groups
    if per < est.min_samples:
        raise ConfigError(
            f"samples={samples} split into groups={groups} leaves {per} draws per group; "
            f"estimator {est.name!r} needs at least {est.min_samples} (raise samples or "
            f"lower groups)"
        )
    from .noise import as_generator

    g = as_generator(generator, x.device)
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    vals, rows = [], []
    for _ in range(groups):
        loss = surrogate_loss(model, x, y, loss_fn, est, per, g)
        gs = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
        pairs = zip(named, gs, strict=True)
        rows.append([gg if gg is not None else torch.zeros_like(p) for (_, p), gg in pairs])
        vals.append(loss.detach())
    v = torch.stack(vals)
    grads, ses = {}, {}
    for i, (k, _) in enumerate(named):
        st = torch.stack([r[i] for r in rows])
        grads[k] = st.mean(0)
        ses[k] = st.std(0) / groups**0.5
    return MCReference(v.mean(), v.std() / groups**0.5, grads, ses, per * groups, groups, est.name)


@register("exact")
class Exact(SBNEstimator):
    """Exact gradient of the expected loss by enumeration (:func:`exact_expected_loss`).

        L = (1/N) sum_n sum_{x^1..x^L} prod_k P(x^k | x^{k-1}) f(V x^L + c, y_n)

    Fully-connected SBNs small enough to enumerate; ``samples`` and the
    generator are ignored. ``max_states`` bounds the recursion's tables.
    """

    formula = "grad of sum over all hidden states of P(states) f(eta(states))"
    reference = "[S20] §5 (ground truth by exhaustive enumeration)"
    supports = (SBNLinear,)
    unbiased = True

    def __init__(self, max_states: int = DEFAULT_MAX_STATES) -> None:
        self.max_states = check_int("max_states", max_states, 1, 2**40)

    def params(self) -> dict[str, Any]:
        return {"max_states": self.max_states}

    def estimate(
        self,
        model: SBN,
        x: Tensor,
        y: Tensor,
        loss_fn: LossFn,
        samples: int,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        v = exact_expected_loss(model, x, y, loss_fn, max_states=self.max_states)
        return v, v
