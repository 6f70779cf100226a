"""Convert a model trained with a cyclical estimator, and its optimizer, to the STE [S24]."""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import ConfigError, StelabTypeError
from ..quantizers import Quantizer
from .derive import equivalent_ste, is_cyclical
from .equivalence import Equivalence

__all__ = ["ConversionReport", "LayerChange", "STEConversion", "to_ste"]

#: estimators that already are the STE (nothing to convert)
_STE_NAMES = ("ste", "clipped")


@dataclass(frozen=True)
class LayerChange:
    """What :func:`to_ste` did to one layer's weight quantizer."""

    name: str
    estimator: str
    alpha: float
    step: str
    bits: int | None
    new_estimator: str
    weights_mapped: bool
    max_shift: float  # max |M(w) - w| / Δ over this layer's weights (0 if not mapped)
    lr_factor: float


@dataclass
class ConversionReport:
    """Per-layer α and what was changed, plus notes (printable)."""

    layers: list[LayerChange] = field(default_factory=list)
    unchanged: list[tuple[str, str]] = field(default_factory=list)
    optimizer: str = "none given"
    notes: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = ["[S24] conversion to the equivalent STE"]
        head = f"{'layer':<24} {'estimator':<22} {'alpha':>9} {'step':>10} {'-> estimator':<13}"
        head += f" {'lr x':>8} {'M(w) max shift':>15}"
        lines += [head, "-" * len(head)]
        for c in self.layers:
            shift = f"{c.max_shift:.4f} step" if c.weights_mapped else "not mapped"
            lines.append(
                f"{c.name:<24} {c.estimator:<22} {c.alpha:>9.6f} {c.step:>10} "
                f"{c.new_estimator:<13} {c.lr_factor:>8.4f} {shift:>15}"
            )
        if not self.layers:
            lines.append("(no layer with a cyclical weight estimator)")
        for name, why in self.unchanged:
            lines.append(f"unchanged: {name}: {why}")
        lines.append(f"optimizer: {self.optimizer}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


@dataclass
class STEConversion:
    """The result of :func:`to_ste`; unpacks as ``model, optimizer, report``."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None
    report: ConversionReport

    def __iter__(self) -> Iterator[Any]:
        return iter((self.model, self.optimizer, self.report))


def _weight_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, m in model.named_modules():
        q = getattr(m, "weight_quantizer", None)
        if isinstance(q, Quantizer) and isinstance(getattr(m, "weight", None), nn.Parameter):
            yield name or "(model)", m


def _opt_kind(optimizer: torch.optim.Optimizer | None) -> str | None:
    if optimizer is None:
        return None
    if isinstance(optimizer, torch.optim.SGD):
        return "sgd"
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return "adam"
    if isinstance(optimizer, torch.optim.Optimizer):
        raise ConfigError(
            f"to_ste knows the [S24] equivalence for SGD (with or without momentum) and "
            f"Adam/AdamW, got {type(optimizer).__name__}; pass optimizer=None to convert "
            "the model only"
        )
    raise StelabTypeError(
        f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}"
    )


def to_ste(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    map_weights: bool | None = None,
    allow_degenerate: bool = False,
    strict: bool = True,
) -> STEConversion:
    """Convert a model trained with cyclical weight estimators to its STE equivalent [S24].

    Returns ``(model, optimizer, report)`` (an :class:`STEConversion`):

    * ``model``: a deep copy in which every weight quantizer (``weight_quantizer`` of
      :class:`~stelab.nn.QuantLinear` / :class:`~stelab.nn.QuantConv2d`) whose forward is
      ``uniform`` with a fixed step and whose estimator is cyclical (see
      :func:`is_cyclical`) uses ``ste`` (``clipped`` for a clipped quantizer) instead,
      and whose latent weight is mapped w -> M(w). The quantized weights, hence the
      network function, are unchanged: Q(M(w)) == Q(w).
    * ``optimizer``: for ``torch.optim.SGD`` (momentum, dampening and Nesterov kept) a
      new SGD over the new model with each converted weight's learning rate
      multiplied by its layer's α (param groups split per α; other parameters keep
      their rate), momentum buffers divided by q̂'(w) (the first-order conversion).
      For Adam/AdamW: the same hyperparameters, weights *not* mapped ([S24] states
      that Adam needs neither M nor α), moment estimates divided by q̂' and q̂'² so the
      next update is the same. stelab measured that equivalence to hold only when the
      weights move little within Adam's second-moment window (β₂ = 0.9 at small
      learning rates), not at β₂ = 0.999 (docs/papers/disguise2024.md). None when no
      optimizer is given.
    * ``report``: a :class:`ConversionReport` with per-layer α and what changed.

    ``map_weights``: None (default) maps unless the optimizer is Adam/AdamW. Learned
    steps (LSQ), cyclical estimators on other forwards than ``uniform`` and every
    estimator on a non-uniform weight quantizer (outside [S24]'s setting) are left
    unchanged and listed in ``report.unchanged``.

    A ``uniform`` weight quantizer whose estimator is neither an STE (``ste``,
    ``clipped``) nor cyclical (``Estimator.cyclical``, e.g. a
    :class:`~stelab.estimators.CyclicEstimator` subclass, registered or not) cannot be
    mapped: a ConfigError naming the layer and the estimator (``strict=False`` lists it
    in ``report.unchanged`` instead). Register a periodic surrogate as a
    ``CyclicEstimator`` subclass, or use ``periodic`` with ``func=``, to have it mapped.
    """
    if not isinstance(model, nn.Module):
        raise StelabTypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    kind = _opt_kind(optimizer)
    if map_weights is None:
        map_weights = kind != "adam"
    report = ConversionReport()
    new_model = copy.deepcopy(model)
    old_params = dict(model.named_parameters())
    new_params = dict(new_model.named_parameters())
    old_mods = dict(model.named_modules())

    cache: dict[tuple[Any, ...], Equivalence] = {}
    alpha_of: dict[int, float] = {}  # id(new weight) -> α
    gdiv: dict[int, Tensor] = {}  # id(new weight) -> q̂'(w_old), for optimizer state
    for name, mod in _weight_layers(new_model):
        q: Quantizer = mod.weight_quantizer
        est = q.estimator
        if q.kind != "uniform":
            if est.name not in _STE_NAMES:
                report.unchanged.append(
                    (name, f"{est!r} on forward {q.kind!r}: [S24] maps 'uniform' quantizers")
                )
            continue
        if not is_cyclical(est):
            if est.name in _STE_NAMES:
                continue
            why = (
                f"estimator {est!r} is not cyclical (a function of w/step mod 1), so it has "
                "no STE equivalent"
            )
            if strict:
                raise ConfigError(
                    f"to_ste cannot convert layer {name!r}: {why}; register a periodic "
                    "surrogate as a stelab.estimators.CyclicEstimator subclass (or use "
                    "'periodic' with func=...), or pass strict=False to leave the layer as is"
                )
            report.unchanged.append((name, why))
            continue
        if q.learn_step:
            report.unchanged.append((name, "learned step (LSQ): [S24] assumes a fixed step"))
            continue
        bits = q.fwd.bits
        step_t = q.step.detach()
        if step_t.numel() == 1:
            step_f = float(step_t.item())
            step_s = f"{step_f:.4g}"
        else:
            step_f = float(step_t.flatten()[0].item())
            step_s = "per-channel"
        key = (est, step_f if step_t.numel() == 1 else "scale-free", bits)
        if key not in cache:
            cache[key] = equivalent_ste(est, step_f, bits=bits, allow_degenerate=allow_degenerate)
        eq = cache[key]
        old_w = old_mods[name if name != "(model)" else ""].weight.detach()
        with torch.no_grad():
            gd = est.derivative(old_w, q.context())
            gdiv[id(mod.weight)] = gd
            shift = 0.0
            if map_weights:
                new_w = eq.M(old_w, step=step_t)
                shift = float(((new_w - old_w) / step_t).abs().max()) if old_w.numel() else 0.0
                mod.weight.copy_(new_w)
        mod.weight_quantizer = q.with_estimator(eq.ste)
        alpha_of[id(mod.weight)] = eq.alpha if kind == "sgd" or kind is None else 1.0
        report.layers.append(
            LayerChange(
                name=name,
                estimator=repr(est),
                alpha=eq.alpha,
                step=step_s,
                bits=bits,
                new_estimator=eq.ste,
                weights_mapped=map_weights,
                max_shift=shift,
                lr_factor=eq.alpha if kind == "sgd" else 1.0,
            )
        )
        for n in eq.notes:
            if n not in report.notes:
                report.notes.append(n)
        if bits is not None and "clipped" not in " ".join(report.notes):
            report.notes.append(
                "clipped quantizers get the 'clipped' STE (1 inside [lo, hi], 0 outside), "
                "since the cyclical estimators are 0 outside the range too"
            )

    new_opt = None
    if optimizer is None:
        report.optimizer = "none given"
        if report.layers and map_weights:
            report.notes.append(
                "no optimizer given: weights mapped through M (the SGD equivalence); "
                "train with SGD at lr × α per layer (α above); for Adam use map_weights=False"
            )
    else:
        new_opt = _convert_optimizer(
            optimizer, kind, old_params, new_params, alpha_of, gdiv, report
        )
    return STEConversion(new_model, new_opt, report)


def _convert_optimizer(
    opt: torch.optim.Optimizer,
    kind: str | None,
    old_params: dict[str, nn.Parameter],
    new_params: dict[str, nn.Parameter],
    alpha_of: dict[int, float],
    gdiv: dict[int, Tensor],
    report: ConversionReport,
) -> torch.optim.Optimizer:
    to_new = {id(p): new_params[n] for n, p in old_params.items()}
    groups = []
    for g in opt.param_groups:
        by_alpha: dict[float, list[nn.Parameter]] = {}
        for p in g["params"]:
            if id(p) not in to_new:
                raise ConfigError(
                    f"the optimizer holds a parameter of shape {tuple(p.shape)} that is not "
                    "in the model; to_ste can only convert an optimizer of this model"
                )
            pn = to_new[id(p)]
            by_alpha.setdefault(alpha_of.get(id(pn), 1.0), []).append(pn)
        for a, ps in by_alpha.items():
            ng = {k: v for k, v in g.items() if k != "params"}
            if kind == "sgd" and a != 1.0:
                ng["lr"] = g["lr"] * a
                if "initial_lr" in ng:
                    ng["initial_lr"] = ng["initial_lr"] * a
            ng["params"] = ps
            groups.append(ng)
    sig = inspect.signature(type(opt).__init__).parameters
    defaults = {k: v for k, v in opt.defaults.items() if k in sig}
    new_opt = type(opt)(groups, **defaults)
    # carry the state over, divided by q̂'(w) where a weight was converted
    for p_old, st in opt.state.items():
        pn = to_new.get(id(p_old))
        if pn is None:
            continue
        d = gdiv.get(id(pn))
        new_st = {}
        for k, v in st.items():
            if isinstance(v, Tensor):
                v = v.detach().clone()
                if d is not None and v.shape == d.shape and k != "step":
                    # second moments scale with q̂'²: divide twice (d² underflows
                    # for d < 1e-154); where q̂' = 0 (degenerate) the state is kept
                    v1 = v / d
                    if k in ("exp_avg_sq", "max_exp_avg_sq"):
                        v1 = v1 / d
                    v = torch.where(d > 0, v1, v)
            new_st[k] = v
        new_opt.state[pn] = new_st
    n_groups = len(groups)
    if not alpha_of:  # nothing converted: say so instead of claiming a scaled lr
        report.optimizer = (
            f"{type(opt).__name__}: unchanged (no layer was converted; same lr, same state)"
        )
        return new_opt
    if kind == "sgd":
        mom = any(g.get("momentum", 0) for g in opt.param_groups)
        report.optimizer = (
            f"SGD{' + momentum' if mom else ''}: converted weights' lr × α "
            f"({n_groups} param groups)"
            + ("; momentum buffers divided by q̂'(w)" if opt.state else "")
        )
        if any(g.get("weight_decay", 0) for g in opt.param_groups):
            report.notes.append(
                "weight_decay > 0: the decay term is not scaled by q̂', so the [S24] "
                "equivalence holds only approximately"
            )
    else:
        report.optimizer = (
            f"{type(opt).__name__}: unchanged (same lr and betas; weights not mapped): "
            "[S24]: Adam's normalisation cancels q̂'"
            + ("; moments divided by q̂' and q̂'²" if opt.state else "")
        )
        report.notes.append(
            f"{type(opt).__name__}: the equivalence needs eps << sqrt(v) and weights that "
            "move much less than a step over Adam's averaging window ~1/(1 - beta2) steps; "
            "stelab measured it to hold at beta2 = 0.9, not at 0.999 "
            "(docs/papers/disguise2024.md)"
        )
    return new_opt
