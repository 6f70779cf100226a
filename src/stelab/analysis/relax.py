"""The stochastic relaxation of a deterministic quantized network and its exact gradient.

A deterministic quantized network (any ``nn.Module`` with stelab
:class:`~stelab.quantizers.Quantizer` modules) has a piecewise-constant loss: its
true gradient is 0 almost everywhere and every estimator is "wrong". The reference
used here is the gradient of a smoothed objective: every quantizer is replaced by a
stochastic relaxation with two outcomes per element, and the objective is the
expected loss ``E_s[L(theta, s)]``, which is differentiable in ``theta``:

============  ====================================================  ======================
quantizer     relaxation (per element, independent)                 P(upper outcome)
============  ====================================================  ======================
``sign``      ``sign(x - s Z)``, Z standard logistic ([S20])         ``sigmoid(x / s)``
``heaviside`` ``1{x - s Z > 0}``                                     ``sigmoid(x / s)``
``uniform``   stochastic rounding ``D clamp(floor(x/D + U), lo, hi)``  ``frac(x / D)``
``act``       stochastic rounding ``a clamp(floor(x/a + U), 0, 2^b-1)``  ``frac(x / a)``
``identity``  ``x`` (unchanged)                                       -
============  ====================================================  ======================

(U ~ U[0, 1), s the noise scale, default 1.) Stochastic rounding has mean
``clamp(x, lo, hi)`` inside the range: the relaxed ``act`` is a clipped ReLU in
expectation. ``ternary`` has three outcomes and is not relaxed (an error).

With ``P(s) = prod_i p_i^{s_i} (1 - p_i)^{1 - s_i}`` the gradient is

    grad E[L] = sum_s [ P(s) grad L(theta, s) + L(theta, s) grad P(s) ]      (enumeration)
              = E_s[ grad L + (L - b) grad log P(s) ]                       (Monte Carlo)

:func:`relaxed_gradient` computes the first by enumerating all ``2^K`` joint
outcomes (``K`` relaxed elements in one forward pass of the batch; small nets only)
and the second (REINFORCE with a baseline ``b`` from an independent pilot run, so
each draw is unbiased) with per-parameter standard errors. When the examples do not
interact (no batch norm in training mode) the score term is split per example,
``mean_n (L_n - b_n) grad log P(s_n)``, which has N times less variance.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError, check_int, check_positive
from ..quantizers import Quantizer

__all__ = [
    "RELAXATION",
    "Relaxed",
    "relaxed",
    "relaxed_elements",
    "relaxed_gradient",
    "RelaxedGradient",
    "quantizers_of",
    "parameter_groups",
    "describe_relaxation",
    "examples_interact",
]

#: one line per quantizer kind, stated in reports
RELAXATION = {
    "sign": "sign(x - s Z), Z ~ standard logistic",
    "heaviside": "1{x - s Z > 0}, Z ~ standard logistic",
    "uniform": "stochastic rounding step*clamp(floor(x/step + U), lo, hi), U ~ U[0,1)",
    "act": "stochastic rounding alpha*clamp(floor(x/alpha + U), 0, 2^b - 1), U ~ U[0,1)",
}


def quantizers_of(model: nn.Module) -> list[tuple[str, Quantizer, str]]:
    """Every :class:`Quantizer` in ``model`` as ``(name, quantizer, role)``, role ``"weights"``
    for the ``weight_quantizer`` of a quantized layer, ``"activations"`` otherwise."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, Quantizer):
            role = "weights" if name.rsplit(".", 1)[-1] == "weight_quantizer" else "activations"
            out.append((name, m, role))
    return out


def parameter_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Parameters that require grad, grouped by the module that owns them (the "layers"
    of a report); a learned quantizer step is reported under its layer."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        owner = name.rsplit(".", 1)[0] if "." in name else "(model)"
        for suffix in (".weight_quantizer", ".input_quantizer"):
            if owner.endswith(suffix):
                owner = owner[: -len(suffix)]
        groups.setdefault(owner, []).append((name, p))
    return groups


class Relaxed:
    """The state of a relaxation while it is active: outcome source and log-probabilities.

    ``mode``: ``"sample"`` (draw outcomes with ``generator``), ``"enumerate"`` (take them
    from :attr:`bits`, a flat 0/1 tensor over all relaxed elements in call order),
    ``"count"`` (record the element count only, outputs sampled).
    """

    def __init__(self, scale: float, generator: torch.Generator | None) -> None:
        self.scale = scale
        self.generator = generator
        self.mode = "sample"
        self.bits: Tensor | None = None
        self.offset = 0
        self.count = 0
        self.logp_rows: list[Tensor] = []  # per example (activations): (N,)
        self.logp_shared: list[Tensor] = []  # whole tensor (weights): scalar
        self.prob: list[Tensor] = []  # enumeration: P of the chosen outcomes, per call

    def reset(self) -> None:
        self.offset = 0
        self.count = 0
        self.logp_rows.clear()
        self.logp_shared.clear()
        self.prob.clear()

    def apply(self, q: Quantizer, x: Tensor, per_row: bool) -> Tensor:
        kind = q.kind
        if kind == "identity":
            return x
        if kind in ("sign", "heaviside"):
            p = torch.sigmoid(x / self.scale)
            lo_v = -1.0 if kind == "sign" else 0.0
            lower = torch.full_like(x, lo_v)
            upper = torch.ones_like(x)
        elif kind in ("uniform", "act"):
            step = q.step
            v = x / step
            fl = torch.floor(v).detach()
            p = v - fl
            lo, hi = q.fwd.qrange
            if math.isfinite(lo):
                lower = fl.clamp(lo, hi) * step
                upper = (fl + 1).clamp(lo, hi) * step
            else:
                lower, upper = fl * step, (fl + 1) * step
        else:
            raise ConfigError(
                f"quantizer {kind!r} has no stochastic relaxation (relaxed kinds: "
                f"{', '.join(RELAXATION)}); the bias reference needs one"
            )
        n = x.numel()
        self.count += n
        if self.mode == "enumerate":
            assert self.bits is not None
            b = self.bits[self.offset : self.offset + n].view(x.shape).to(x.dtype)
            self.offset += n
            self.prob.append(torch.where(b > 0, p, 1 - p).prod())
        else:
            u = torch.rand(x.shape, generator=self.generator, dtype=x.dtype, device=x.device)
            b = (u < p.detach()).to(x.dtype)
            lp = torch.where(b > 0, p, 1 - p).clamp_min(1e-300).log()
            if per_row and x.dim() > 0:
                self.logp_rows.append(lp.reshape(x.shape[0], -1).sum(1))
            else:
                self.logp_shared.append(lp.sum())
        return torch.where(b > 0, upper, lower)


@contextlib.contextmanager
def relaxed(
    model: nn.Module, scale: float = 1.0, generator: torch.Generator | None = None
) -> Iterator[Relaxed]:
    """Within the block every quantizer of ``model`` computes its stochastic relaxation
    (module docstring); yields the :class:`Relaxed` state. The model is restored after."""
    state = Relaxed(check_positive("noise scale", scale), generator)
    patched = []
    for _, q, role in quantizers_of(model):
        per_row = role == "activations"

        def fwd(x: Tensor, q: Quantizer = q, per_row: bool = per_row) -> Tensor:
            return state.apply(q, x, per_row)

        q.forward = fwd  # type: ignore[method-assign]
        patched.append(q)
    try:
        yield state
    finally:
        for q in patched:
            del q.forward


LossFn = Callable[[Tensor, Tensor], Tensor]


def _per_example(loss_fn: LossFn, out: Tensor, y: Tensor) -> Tensor:
    v = loss_fn(out, y)
    if v.dim() != 1 or v.shape[0] != out.shape[0]:
        raise ConfigError(
            f"loss_fn must return one loss per example (shape ({out.shape[0]},)), got shape "
            f"{tuple(v.shape)}; use reduction='none'"
        )
    return v


def examples_interact(model: nn.Module) -> bool:
    """Whether one example's output depends on the others (batch norm in training mode)."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()
    )


def relaxed_elements(model: nn.Module, x: Tensor) -> int:
    """K: the number of relaxed elements (two outcomes each) in one forward pass on ``x``."""
    return _census(model, x)[0]


def _census(model: nn.Module, x: Tensor) -> tuple[int, bool]:
    """(K, whether some outcomes are shared by all examples: relaxed weight quantizers)."""
    with torch.no_grad(), relaxed(model, 1.0, torch.Generator().manual_seed(0)) as st:
        st.mode = "count"
        model(x)
        return st.count, bool(st.logp_shared)


@dataclass
class RelaxedGradient:
    """The reference: gradient of the relaxed expected loss per parameter name.

    ``kind`` ``"exact"`` (enumeration of ``states`` outcomes, ``se`` None) or ``"mc"``
    (``samples`` REINFORCE draws, ``se`` the per-parameter standard errors).
    """

    kind: str
    value: float
    grads: dict[str, Tensor]
    se: dict[str, Tensor] | None
    samples: int | None
    states: int | None
    factorized: bool
    scale: float


def relaxed_gradient(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    kind: str = "auto",
    *,
    samples: int = 2000,
    scale: float = 1.0,
    generator: torch.Generator | int | None = 0,
    max_states: int = 2**12,
    pilot: int = 16,
    row_budget: int = 2**14,
) -> RelaxedGradient:
    """The gradient of ``E_s[mean_n loss_fn(model_s(x)_n, y_n)]`` of the relaxed network.

    ``kind``: ``"exact"`` (enumerate all ``2^K`` outcomes; a ConfigError naming K when
    ``2^K > max_states``), ``"mc"`` (``samples`` unbiased REINFORCE draws with a pilot
    baseline and standard errors) or ``"auto"`` (exact when enumerable). ``scale``:
    the logistic noise scale of sign/heaviside. Parameters' ``.grad`` are not touched.
    """
    if kind not in ("auto", "exact", "mc"):
        raise ConfigError(f"reference must be 'auto', 'exact' or 'mc', got {kind!r}")
    scale = check_positive("noise scale", scale)
    max_states = check_int("max_states", max_states, 1, 2**24)
    if isinstance(generator, int) or generator is None:
        generator = torch.Generator(device=x.device).manual_seed(
            0 if generator is None else generator
        )
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    k, shared = _census(model, x)
    fits = k < 63 and 2**k <= max_states
    if kind == "exact" and not fits:
        raise ConfigError(
            f"exact enumeration of the relaxed network needs 2^{k} outcomes (K = {k} relaxed "
            f"elements in one forward pass) > max_states = {max_states}; use the Monte-Carlo "
            "reference (reference='mc'), fewer examples or a smaller net"
        )
    interact = examples_interact(model)
    if kind == "exact" or (kind == "auto" and fits):
        return _exact(model, x, y, loss_fn, names, params, k, scale, interact)
    samples = check_int("reference samples", samples, 2, 2**31)
    return _mc(model, x, y, loss_fn, names, params, samples, scale, generator, interact, shared,
               pilot, row_budget)  # fmt: skip


def _exact(model, x, y, loss_fn, names, params, k, scale, interact) -> RelaxedGradient:
    total = [torch.zeros_like(p) for p in params]
    value = 0.0
    with relaxed(model, scale) as st:
        st.mode = "enumerate"
        for bits in itertools.product((0.0, 1.0), repeat=k):
            st.reset()
            st.bits = torch.tensor(bits, dtype=x.dtype, device=x.device)
            out = model(x)
            prob = torch.stack(st.prob).prod() if st.prob else out.new_ones(())
            f = prob * _per_example(loss_fn, out, y).mean()
            gs = torch.autograd.grad(f, params, allow_unused=True)
            for t, g in zip(total, gs, strict=True):
                if g is not None:
                    t += g
            value += float(f.detach())
    return RelaxedGradient(
        "exact", value, dict(zip(names, total, strict=True)), None, None, 2**k, not interact, scale
    )


def _mc(model, x, y, loss_fn, names, params, samples, scale, gen, interact, shared, pilot,
        row_budget):  # fmt: skip
    n = x.shape[0]
    # replicas of the batch per forward pass (at least ~32 passes for the standard errors);
    # one when the examples interact or share outcomes (weights: one draw per pass)
    one = interact or shared
    reps = 1 if one else max(1, min(-(-samples // 32), row_budget // max(n, 1)))
    with relaxed(model, scale, gen) as st, torch.no_grad():
        base = []
        for _ in range(max(1, pilot)):
            st.reset()
            base.append(_per_example(loss_fn, model(x), y))
        b_rows = torch.stack(base).mean(0)  # pilot baseline per example (independent draws)
    s1 = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    s2 = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    units, done, value = 0, 0, 0.0
    with relaxed(model, scale, gen) as st:
        while done < samples:
            r = min(reps, samples - done)
            xr = x.repeat(r, *([1] * (x.dim() - 1))) if r > 1 else x
            yr = y.repeat(r, *([1] * (y.dim() - 1))) if r > 1 else y
            st.reset()
            lrows = _per_example(loss_fn, model(xr), yr)
            brows = b_rows.repeat(r)
            adv = (lrows - brows).detach()
            lp_shared = torch.stack(st.logp_shared).sum() if st.logp_shared else lrows.new_zeros(())
            lp_rows = torch.stack(st.logp_rows).sum(0) if st.logp_rows else lrows.new_zeros(())
            if interact:  # joint score: (L - b) grad log P(all outcomes)
                surr = lrows.mean() + adv.mean() * (lp_shared + lp_rows.sum())
            else:  # per-example score for activations, joint for shared (weight) outcomes
                surr = lrows.mean() + (adv * lp_rows).mean() + adv.mean() * lp_shared
            gs = torch.autograd.grad(surr, params, allow_unused=True)
            for a, c, g in zip(s1, s2, gs, strict=True):
                if g is not None:
                    g = g.double()
                    a += g
                    c += g * g
            value += float(lrows.detach().mean()) * r
            units += 1
            done += r
    grads, ses = {}, {}
    for nm, p, a, c in zip(names, params, s1, s2, strict=True):
        mean = a / units
        var = (c / units - mean * mean).clamp_min(0) * units / max(units - 1, 1)
        grads[nm] = mean.to(p.dtype)
        ses[nm] = (var / units).sqrt().to(p.dtype) if units > 1 else torch.full_like(p, math.inf)
    return RelaxedGradient("mc", value / done, grads, ses, done, None, not interact, scale)


def describe_relaxation(model: nn.Module, scale: float) -> str:
    """One line per quantizer kind present in ``model``: the relaxation used."""
    kinds = sorted({q.kind for _, q, _ in quantizers_of(model)} - {"identity"})
    parts = [f"{k}: {RELAXATION.get(k, 'none')}" for k in kinds]
    s = f" (s = {scale:g})" if any(k in ("sign", "heaviside") for k in kinds) else ""
    return "; ".join(parts) + s
