"""Gradient fidelity of a deterministic quantized network: descent test and bias.

For any ``nn.Module`` with stelab quantizers and a list of estimators (each is put on
the model's quantizers in turn, see ``where``), :func:`deterministic_fidelity` measures

**Descent test** ([Y19]'s question "is the coarse gradient a descent direction?",
made general). For batch b with a disjoint held-out batch b', estimator e gives the
coarse gradient ``g_e = grad_e L(theta; b)`` (one backward), and for every step size
eta of a log grid

    dL_train(eta) = L(theta - eta g_e; b)  - L(theta; b)
    dL_held(eta)  = L(theta - eta g_e; b') - L(theta; b')

with ``L`` the true (quantized) loss. Over B batches it reports
``P(dL < 0)`` (standard error ``sqrt(p(1 - p)/B)``) and the mean ``dL`` with its
standard error ``sd/sqrt(B)``, for the step on all parameters ("all") and, with
``per_layer=True``, for a step on one layer's parameters at a time.

**Bias against the smoothed reference.** The reference ``g`` is the gradient of
the expected loss of the stochastic relaxation (:mod:`stelab.analysis.relax`:
logistic noise before sign/heaviside, stochastic rounding for uniform/act), exact
by enumeration or unbiased Monte Carlo with standard errors ``se``. Per layer (its
parameters flattened together) and estimator:

    bias   = sqrt(max(0, ||g_e - g||^2 - sum se^2)) / ||g||     (debiased)
    floor  = sqrt(sum se^2) / ||g||
    bias_z = (||g_e - g||^2 - sum se^2) / sqrt(2 sum se^4)    (about N(0,1) if g_e = E g)
    cosine = <g_e, g> / (||g_e|| ||g||)

Loss evaluations for all eta run in a plain loop of forward passes (``torch.func.vmap``
cannot batch them: the quantizers' autograd Function has no vmap rule); the model
is deep-copied, so the caller's model, its ``.grad`` and its batch-norm statistics
are untouched.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import estimators as _est
from ..errors import ConfigError, StelabTypeError, check_int, check_positive, closest
from ..specs import split_spec
from .det_report import DescentCurve, DeterministicReport, LayerBias
from .fidelity_stats import bias_stats
from .relax import (
    RelaxedGradient,
    describe_relaxation,
    parameter_groups,
    quantizers_of,
    relaxed_gradient,
)

__all__ = [
    "DEFAULT_ETAS",
    "DetEstimator",
    "parse_det_estimators",
    "using_estimator",
    "select_quantizers",
    "descent_test",
    "deterministic_fidelity",
    "DeterministicReport",
    "DescentCurve",
    "LayerBias",
]

#: 10 step sizes 1e-4 ... 1 (log grid): [Y19]'s LeNet-5 rates 0.1, 0.01, 0.001 included
DEFAULT_ETAS: tuple[float, ...] = tuple(10 ** (-4 + 4 * i / 9) for i in range(10))


def cross_entropy(out: Tensor, y: Tensor) -> Tensor:
    """Per-example cross-entropy (the default loss)."""
    return F.cross_entropy(out, y, reduction="none")


# --------------------------------------------------------------------------- estimators


@dataclass(frozen=True)
class DetEstimator:
    """An estimator to put on the quantizers, with its label (``dsq(k=3)``)."""

    label: str
    estimator: _est.Estimator


def parse_det_estimators(specs: str | Sequence[Any]) -> list[DetEstimator]:
    """Estimators from ``"ste,clipped_relu,dsq:k=3"`` or a list of names / Estimators.

    Names are looked up in :mod:`stelab.estimators` (estimators registered by user
    code included); parameter values may be numbers, names or ``MODULE:NAME``.
    """
    items = (
        [s.strip() for s in specs.split(",") if s.strip()]
        if isinstance(specs, str)
        else list(specs)
    )
    if not items:
        raise ConfigError("give at least one estimator, e.g. 'ste,clipped_relu'")
    out = []
    for item in items:
        if isinstance(item, DetEstimator):
            out.append(item)
            continue
        if isinstance(item, _est.Estimator):
            out.append(DetEstimator(repr(item), item))
            continue
        if not isinstance(item, str):
            raise StelabTypeError(
                f"an estimator must be a name or an Estimator, got {type(item).__name__}"
            )
        parts, params = split_spec(item, what="estimator", example="dsq:k=3")
        if len(parts) > 1:
            raise ConfigError(
                f"estimator parameter must be KEY=VALUE, got {parts[1]!r} in {item!r} "
                "(e.g. 'dsq:k=3')"
            )
        name = parts[0]
        if name not in _est.names():
            hint = closest(name, _est.names())
            raise ConfigError(
                f"unknown estimator {name!r}; known: {', '.join(_est.names())}"
                + (f" (did you mean {hint!r}?)" if hint else "")
                + "; register your own with stelab.register_estimator and load it with --import"
            )
        est = _est.get(name, **params)
        out.append(DetEstimator(repr(est), est))
    labels = [e.label for e in out]
    dup = sorted({lab for lab in labels if labels.count(lab) > 1})
    if dup:
        raise ConfigError(f"estimators listed twice: {', '.join(dup)}")
    return out


def select_quantizers(model: nn.Module, where: str = "auto") -> tuple[list[tuple[str, Any]], str]:
    """The quantizers whose estimator is swapped, and the resolved ``where``:
    ``"activations"``, ``"weights"``, ``"all"`` or ``"auto"`` (activations if the model
    has any, else weights)."""
    if where not in ("auto", "activations", "weights", "all"):
        raise ConfigError(f"where must be 'auto', 'activations', 'weights' or 'all', got {where!r}")
    qs = quantizers_of(model)
    if not qs:
        raise ConfigError(
            f"model {type(model).__name__} has no stelab quantizer (Quantizer, QuantAct, "
            "QuantLinear/QuantConv2d with a weight quantizer); convert it with stelab.quantize"
        )
    if where == "auto":
        where = "activations" if any(r == "activations" for _, _, r in qs) else "weights"
    chosen = [(n, q) for n, q, r in qs if where == "all" or r == where]
    if not chosen:
        raise ConfigError(f"model has no {where} quantizers; use where='all' or 'weights'")
    return chosen, where


@contextlib.contextmanager
def using_estimator(quantizers: list[tuple[str, Any]], est: _est.Estimator) -> Iterator[None]:
    """Put ``est`` on every quantizer in the block (an error naming the first layer it
    cannot serve); the previous estimators are restored after."""
    old = [q.estimator for _, q in quantizers]
    for name, q in quantizers:
        try:
            est.check(q.context())
        except ConfigError as e:
            raise ConfigError(f"layer {name!r}: {e}") from None
    try:
        for _, q in quantizers:
            q.estimator = est
        yield
    finally:
        for (_, q), e in zip(quantizers, old, strict=True):
            q.estimator = e


# --------------------------------------------------------------------------- descent test


def _batches(n: int, batches: int, size: int, gen: torch.Generator) -> list[tuple[Tensor, Tensor]]:
    if 2 * size > n:
        raise ConfigError(
            f"the descent test needs a training and a disjoint held-out batch: 2 x batch size "
            f"{size} > {n} examples; give more data or a smaller batch size"
        )
    out = []
    for _ in range(batches):
        perm = torch.randperm(n, generator=gen)
        out.append((perm[:size], perm[size : 2 * size]))
    return out


def _stats(d: Tensor) -> tuple[float, float, float, float]:
    b = d.numel()
    p = float((d < 0).double().mean())
    m = float(d.double().mean())
    sd = float(d.double().std()) if b > 1 else math.nan
    return p, math.sqrt(p * (1 - p) / b), m, sd / math.sqrt(b)


def descent_test(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    estimators: str | Sequence[Any],
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = cross_entropy,
    etas: Sequence[float] = DEFAULT_ETAS,
    batches: int = 20,
    batch_size: int = 64,
    where: str = "auto",
    per_layer: bool = False,
    generator: torch.Generator | int | None = 0,
) -> dict[str, dict[str, DescentCurve]]:
    """The descent test (module docstring): ``{label: {group: DescentCurve}}``, group
    ``"all"`` plus, with ``per_layer``, one per layer (:func:`parameter_groups`).

    ``x, y``: the pool batches are drawn from (each repetition draws a training and a
    disjoint held-out batch of ``batch_size``); ``loss_fn(out, y)`` per example.
    """
    specs = parse_det_estimators(estimators)
    etas = [check_positive("eta", e) for e in etas]
    if not etas:
        raise ConfigError("etas is empty; give at least one step size > 0")
    batches = check_int("batches", batches, 1, 10**6)
    batch_size = check_int("batch_size", batch_size, 1, 10**8)
    net = copy.deepcopy(model)
    qs, _ = select_quantizers(net, where)
    gen = torch.Generator().manual_seed(generator if isinstance(generator, int) else 0)
    if isinstance(generator, torch.Generator):
        gen = generator
    idx = _batches(x.shape[0], batches, batch_size, gen)
    groups = parameter_groups(net)
    params = [p for ps in groups.values() for _, p in ps]
    pid = {id(p): i for i, p in enumerate(params)}
    sets: dict[str, list[int]] = {"all": list(range(len(params)))}
    if per_layer:
        sets.update({g: [pid[id(p)] for _, p in ps] for g, ps in groups.items()})
    ne = len(etas)
    shape = (len(specs), len(sets), ne, batches)
    d_tr = torch.zeros(shape, dtype=torch.float64)
    d_he = torch.zeros(shape, dtype=torch.float64)
    gnorm = torch.zeros(len(specs), len(sets), dtype=torch.float64)
    orig = [p.detach().clone() for p in params]

    def loss(xb: Tensor, yb: Tensor) -> float:
        return float(loss_fn(net(xb), yb).mean())

    for b, (it, ih) in enumerate(idx):
        xb, yb, xh, yh = x[it], y[it], x[ih], y[ih]
        with torch.no_grad():
            base_tr, base_he = loss(xb, yb), loss(xh, yh)
        for e, spec in enumerate(specs):
            with using_estimator(qs, spec.estimator):
                f = loss_fn(net(xb), yb).mean()
                grads = torch.autograd.grad(f, params, allow_unused=True)
            grads = [
                torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)
            ]
            with torch.no_grad():
                for s, members in enumerate(sets.values()):
                    gnorm[e, s] += math.sqrt(sum(float(grads[i].pow(2).sum()) for i in members))
                    for k, eta in enumerate(etas):
                        for i in members:
                            params[i].sub_(grads[i], alpha=eta)
                        d_tr[e, s, k, b] = loss(xb, yb) - base_tr
                        d_he[e, s, k, b] = loss(xh, yh) - base_he
                        for i in members:
                            params[i].copy_(orig[i])
    out: dict[str, dict[str, DescentCurve]] = {}
    for e, spec in enumerate(specs):
        out[spec.label] = {}
        for s, gname in enumerate(sets):
            cols: dict[str, list[float]] = {
                k: [] for k in ("pt", "pts", "dt", "dts", "ph", "phs", "dh", "dhs")
            }
            for k in range(ne):
                for pre, arr in (("t", d_tr), ("h", d_he)):
                    p, pse, m, mse = _stats(arr[e, s, k])
                    cols["p" + pre].append(p)
                    cols["p" + pre + "s"].append(pse)
                    cols["d" + pre].append(m)
                    cols["d" + pre + "s"].append(mse)
            out[spec.label][gname] = DescentCurve(
                spec.label, gname, list(etas), batches,
                cols["pt"], cols["pts"], cols["dt"], cols["dts"],
                cols["ph"], cols["phs"], cols["dh"], cols["dhs"],
                float(gnorm[e, s]) / batches,
            )  # fmt: skip
    return out


# --------------------------------------------------------------------------- bias


def _flat(grads: dict[str, Tensor], names: list[str]) -> Tensor:
    return torch.cat([grads[n].detach().reshape(-1).double() for n in names])


def estimator_gradients(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    specs: list[DetEstimator],
    qs: list[tuple[str, Any]],
    loss_fn: Callable[[Tensor, Tensor], Tensor],
) -> dict[str, dict[str, Tensor]]:
    """``{label: {param name: coarse gradient}}`` of ``mean_n loss`` on (x, y)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    out = {}
    for spec in specs:
        with using_estimator(qs, spec.estimator):
            f = loss_fn(model(x), y).mean()
            gs = torch.autograd.grad(f, params, allow_unused=True)
        out[spec.label] = {
            n: torch.zeros_like(p) if g is None else g
            for n, p, g in zip(names, params, gs, strict=True)
        }
    return out


def bias_table(
    model: nn.Module, est_grads: dict[str, dict[str, Tensor]], ref: RelaxedGradient
) -> dict[str, dict[str, LayerBias]]:
    """``{label: {layer: LayerBias}}`` (module docstring formulas)."""
    out: dict[str, dict[str, LayerBias]] = {}
    groups = parameter_groups(model)
    for label, grads in est_grads.items():
        out[label] = {}
        for layer, ps in groups.items():
            names = [n for n, _ in ps]
            g, r = _flat(grads, names), _flat(ref.grads, names)
            se = None if ref.se is None else _flat(ref.se, names)
            bias, raw, floor, z = bias_stats(g, r, 0.0, 0.0, 1, se)
            den = float(g.norm()) * float(r.norm())
            cos = float(g @ r) / den if den > 0 else math.nan
            out[label][layer] = LayerBias(
                layer, label, g.numel(), float(r.norm()), float(g.norm()), bias, raw, floor, z, cos
            )
    return out


def deterministic_fidelity(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    estimators: str | Sequence[Any] = "ste,clipped_relu",
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = cross_entropy,
    etas: Sequence[float] = DEFAULT_ETAS,
    batches: int = 20,
    batch_size: int = 64,
    where: str = "auto",
    per_layer: bool = False,
    reference: str = "auto",
    reference_samples: int = 2000,
    noise_scale: float = 1.0,
    bias_examples: int | None = None,
    generator: int = 0,
) -> DeterministicReport:
    """Descent test and bias against the relaxed reference (module docstring).

    The bias uses the first ``bias_examples`` examples of ``x`` (default
    ``batch_size``); ``reference`` is ``"auto"`` (exact when enumerable), ``"exact"``
    or ``"mc"`` with ``reference_samples`` draws; ``noise_scale`` is the logistic noise
    scale of relaxed sign/heaviside quantizers.
    """
    if not isinstance(model, nn.Module):
        raise StelabTypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    specs = parse_det_estimators(estimators)
    net = copy.deepcopy(model)
    qs, where = select_quantizers(net, where)
    for spec in specs:  # fail before any work on an estimator that cannot serve a layer
        with using_estimator(qs, spec.estimator):
            pass
    t0 = time.perf_counter()
    descent = descent_test(
        net, x, y, specs, loss_fn=loss_fn, etas=etas, batches=batches, batch_size=batch_size,
        where=where, per_layer=per_layer, generator=generator,
    )  # fmt: skip
    t1 = time.perf_counter()
    nb = (
        batch_size if bias_examples is None else check_int("bias_examples", bias_examples, 1, 10**8)
    )
    xb, yb = x[:nb], y[:nb]
    ref = relaxed_gradient(
        net, xb, yb, loss_fn, reference, samples=reference_samples, scale=noise_scale,
        generator=generator,
    )  # fmt: skip
    t2 = time.perf_counter()
    grads = estimator_gradients(net, xb, yb, specs, qs, loss_fn)
    bias = bias_table(net, grads, ref)
    ref_d = {
        "kind": ref.kind,
        "value": ref.value,
        "samples": ref.samples,
        "states": ref.states,
        "examples": int(xb.shape[0]),
        "factorized": ref.factorized,
        "noise_scale": ref.scale,
    }
    return DeterministicReport(
        [s.label for s in specs],
        where,
        list(parameter_groups(net)),
        descent,
        bias,
        ref_d,
        describe_relaxation(net, noise_scale),
        {"descent": t1 - t0, "reference": t2 - t1, "bias": time.perf_counter() - t2},
    )
