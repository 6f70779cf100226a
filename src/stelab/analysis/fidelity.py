"""Gradient fidelity of SBN estimators: error, cosine, bias, variance and SNR against the truth.

For one layer (weights and bias together, flattened) let ``g`` be the reference
gradient of the expected loss and ``g_1, ..., g_D`` independent one-draw estimates
(each the full-batch estimate with fresh noise per example, [S20] §5). Averaging
consecutive groups of M draws, ``gbar_i = (1/M) sum_{d in group i} g_d``, gives
``G_M = floor(D / M)`` M-sample estimates, and ([S20] Fig. 3 / docs/papers/psa2020.md):

    relative RMSE(M)  = sqrt( (1/G_M) sum_i ||gbar_i - g||^2 ) / ||g||
    cosine(M)         = mean_i <gbar_i, g> / (||gbar_i|| ||g||),  with its 15% and 85% quantiles
    bias              = ||mean_d g_d - g|| / ||g||   (all D draws; "debiased" below)
    variance          = tr Cov(g_1) = E||g_1 - E g_1||^2,  rel_variance = variance / ||g||^2
    SNR               = ||mean_d g_d|| / sqrt(variance)           (one draw; M draws: x sqrt(M))

so that ``RMSE(M)^2 ~ bias^2 + rel_variance / M``. The plain bias estimate is
inflated by noise: for an unbiased estimator ``E||mean - g||^2 = variance / D
(+ sum se_ref^2 for a Monte-Carlo reference)``, the *bias floor*. We report

    bias_raw   = ||mean - g|| / ||g||,
    bias_floor = sqrt(variance / D + sum se_ref^2) / ||g||,
    bias       = sqrt(max(0, ||mean - g||^2 - floor^2)) / ||g||          (debiased)
    bias_z     = (||mean - g||^2 - floor^2) / sd,  sd^2 = 2 tr(Cov^2) / D^2 + 2 sum se_ref^4

(a Gaussian approximation; ``bias_z`` is about N(0, 1) for an unbiased estimator and
large for a biased one; ``tr(Cov^2)`` uses the full covariance for layers with up to
``gram_max`` parameters, its diagonal beyond). A deterministic estimator (``tanh_mf``,
``det:*``) has variance 0, RMSE(M) = bias for every M and ``bias_z = inf`` when its
bias is nonzero against an exact reference.

A coupled estimator (``reinforce_loo``: M samples share a baseline) is run once per
group for each M instead; its variance is ``M_min Var(gbar at M_min)``.

Cost: seconds per draw (``samples=M`` in one call, divided by M), forward-pass
equivalents (:func:`~stelab.analysis.specs.forward_equivalents`) and the
*compute-adjusted* error ``RMSE(M = budget / seconds_per_draw)`` (log-log
interpolation over the M grid): the error each estimator reaches in the same time.

Reference: [S20] Shekhovtsov, Yanush, Flach, NeurIPS 2020, arXiv:2006.03143, §5.
"""

from __future__ import annotations

import math
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, StelabTypeError, check_int
from ..sbn import SBN, exact_gradient, mc_reference
from ..sbn.estimators import LossFn
from ..sbn.exact import DEFAULT_MAX_STATES, check_enumerable
from ..sbn.noise import as_generator
from .draws import DrawEngine, flatten_layers, layer_keys, layer_label, layer_params, time_per_draw
from .specs import EstimatorSpec, forward_equivalents, parse_estimators

__all__ = [
    "PAPER_SAMPLE_SIZES",
    "Reference",
    "LayerFidelity",
    "EstimatorFidelity",
    "FidelityReport",
    "reference_gradient",
    "check_sample_sizes",
    "gradient_fidelity",
    "enumerable",
]

#: M in {1..9, 10..90, 100..900, 1000..9000} (docs/papers/psa2020.md)
PAPER_SAMPLE_SIZES: tuple[int, ...] = tuple(d * 10**e for e in range(4) for d in range(1, 10))

_QUANTILES = (0.15, 0.85)


# --------------------------------------------------------------------------- reference


@dataclass
class Reference:
    """The reference gradient per layer key (flattened weight, bias) and how it was made.

    ``kind`` is ``"exact"`` (enumeration, ``se`` None) or ``"mc"`` (``estimator``
    averaged over ``samples`` draws, ``se`` its per-parameter standard errors).
    """

    kind: str
    value: float
    grads: dict[str, Tensor]
    se: dict[str, Tensor] | None = None
    samples: int | None = None
    estimator: str | None = None
    seconds: float = 0.0
    floors: dict[str, float] | None = None  # set when rebuilt from a dict (no tensors)

    def noise_floor(self, key: str) -> float:
        """``sqrt(sum se^2) / ||g||`` of layer ``key``: errors below it are not resolved."""
        if self.floors is not None:
            return self.floors.get(key, 0.0)
        if self.se is None:
            return 0.0
        g = float(self.grads[key].norm())
        return float(self.se[key].norm()) / g if g > 0 else math.inf


def enumerable(model: SBN, max_states: int = DEFAULT_MAX_STATES) -> tuple[bool, str]:
    """``(True, "")`` if :func:`stelab.sbn.exact_gradient` can enumerate ``model``, else
    ``(False, why)`` with the message naming the state count."""
    try:
        check_enumerable(model, max_states)
    except ConfigError as e:
        return False, str(e)
    return True, ""


def reference_gradient(
    model: SBN,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    kind: str = "auto",
    *,
    samples: int | None = None,
    generator: torch.Generator | int | None = None,
    estimator: str = "reinforce_loo",
    max_states: int = DEFAULT_MAX_STATES,
) -> Reference:
    """The reference gradient ``g`` of ``E_Z[mean_n loss_fn(eta_n, y_n)]`` per layer.

    ``kind``: ``"exact"`` (enumeration; a ConfigError naming the state count and the
    Monte-Carlo alternative if the net is too large), ``"mc"``
    (:func:`stelab.sbn.mc_reference` with ``estimator`` and ``samples`` draws per
    example, default 20,000) or ``"auto"`` (exact when enumerable, else mc).
    """
    if kind not in ("auto", "exact", "mc"):
        raise ConfigError(f"reference must be 'auto', 'exact' or 'mc', got {kind!r}")
    layers = layer_params(model)
    t0 = time.perf_counter()
    if kind == "auto":
        kind = "exact" if enumerable(model, max_states)[0] else "mc"
    if kind == "exact":
        ok, why = enumerable(model, max_states)
        if not ok:
            raise ConfigError(why)
        ref = exact_gradient(model, x, y, loss_fn, max_states=max_states)
        return Reference(
            "exact",
            float(ref.value),
            flatten_layers(ref.grads, layers),
            seconds=time.perf_counter() - t0,
        )
    n = 20_000 if samples is None else check_int("reference samples", samples, 2, 2**40)
    groups = min(100, n // 2)
    mc = mc_reference(model, x, y, loss_fn, n, generator, estimator=estimator, groups=groups)
    return Reference(
        "mc",
        float(mc.value),
        flatten_layers(mc.grads, layers),
        flatten_layers(mc.grads_se, layers),
        mc.samples,
        mc.estimator,
        time.perf_counter() - t0,
    )


# --------------------------------------------------------------------------- results


@dataclass
class LayerFidelity:
    """The metrics of one estimator on one layer (see the module docstring)."""

    layer: str
    label: str
    params: int
    ref_norm: float
    sample_sizes: list[int]
    groups: list[int]
    rmse: list[float]
    rmse_se: list[float]
    cos_mean: list[float]
    cos_lo: list[float]
    cos_hi: list[float]
    bias: float
    bias_raw: float
    bias_floor: float
    bias_z: float
    variance: float
    rel_variance: float
    snr: float

    def at(self, m: int) -> int:
        """Index of sample size ``m`` in :attr:`sample_sizes` (ValueError if absent)."""
        try:
            return self.sample_sizes.index(int(m))
        except ValueError:
            raise ConfigError(
                f"sample size M={m} was not evaluated; evaluated: {self.sample_sizes}"
            ) from None


@dataclass
class EstimatorFidelity:
    """One estimator's metrics per layer plus its cost."""

    label: str
    name: str
    kind: str  # "stochastic", "deterministic" or "coupled"
    engine: str
    draws: int
    seconds_per_draw: float | None
    forward_equivalents: float | None
    wall_seconds: float
    layers: dict[str, LayerFidelity] = field(default_factory=dict)
    note: str = ""


@dataclass
class FidelityReport:
    """Everything :func:`gradient_fidelity` measured; ``to_dict()`` is JSON-ready."""

    layers: list[str]
    reference: Reference
    estimators: dict[str, EstimatorFidelity]
    draws: int
    sample_sizes: list[int]
    examples: int

    def layer_labels(self) -> dict[str, str]:
        """``{"hidden.0": "layer 1", ..., "output": "output"}``."""
        return {k: layer_label(k) for k in self.layers}

    def rmse(self, label: str, layer: str, m: int) -> float:
        """Relative RMSE of estimator ``label`` on ``layer`` with M = ``m`` samples."""
        lf = self.estimators[label].layers[layer]
        return lf.rmse[lf.at(m)]

    def error_at_budget(self, label: str, layer: str, seconds: float) -> float:
        """Compute-adjusted error: RMSE at ``M = seconds / seconds_per_draw`` (log-log
        interpolation over the evaluated M; NaN outside their range)."""
        ef = self.estimators[label]
        lf = ef.layers[layer]
        if ef.kind == "deterministic":
            return (
                lf.rmse[0] if ef.seconds_per_draw and seconds >= ef.seconds_per_draw else math.nan
            )
        if not ef.seconds_per_draw:
            return math.nan
        return _loglog(lf.sample_sizes, lf.rmse, seconds / ef.seconds_per_draw)

    def to_dict(self) -> dict[str, Any]:
        ref = self.reference
        return {
            "layers": {k: layer_label(k) for k in self.layers},
            "draws": self.draws,
            "sample_sizes": self.sample_sizes,
            "examples": self.examples,
            "reference": {
                "kind": ref.kind,
                "value": ref.value,
                "samples": ref.samples,
                "estimator": ref.estimator,
                "seconds": ref.seconds,
                "norm": {k: float(v.norm()) for k, v in ref.grads.items()},
                "noise_floor": {k: ref.noise_floor(k) for k in self.layers},
            },
            "estimators": {lab: asdict(ef) for lab, ef in self.estimators.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FidelityReport:
        """Rebuild a report from :meth:`to_dict` output (e.g. a results.json) for tables and
        plots; the reference's tensors are not stored, only its norms and noise floors."""
        r = d["reference"]
        floors = {k: (v if v is not None else math.inf) for k, v in r["noise_floor"].items()}
        ref = Reference(
            r["kind"],
            r["value"],
            {},
            None,
            r.get("samples"),
            r.get("estimator"),
            r.get("seconds", 0.0),
            floors,
        )
        ests = {}
        for lab, e in d["estimators"].items():
            layers = {}
            for k, lf in e["layers"].items():
                lf = {kk: (math.nan if vv is None else vv) for kk, vv in lf.items()}
                for kk in ("rmse", "rmse_se", "cos_mean", "cos_lo", "cos_hi"):
                    lf[kk] = [
                        math.nan if v is None else v for v in d["estimators"][lab]["layers"][k][kk]
                    ]
                if e["kind"] == "deterministic":  # JSON has no inf: restore it
                    if math.isnan(lf["snr"]):
                        lf["snr"] = math.inf
                    if math.isnan(lf["bias_z"]) and lf["bias"] > 0:
                        lf["bias_z"] = math.inf
                layers[k] = LayerFidelity(**lf)
            ests[lab] = EstimatorFidelity(**{**e, "layers": layers})
        return cls(list(d["layers"]), ref, ests, d["draws"], list(d["sample_sizes"]), d["examples"])

    def table(self, layer: str, sizes: Sequence[int] = (1, 10, 100, 1000)) -> str:
        """A plain-text table of every estimator on ``layer``."""
        ms = [m for m in sizes if m in self.sample_sizes]
        head = (
            ["estimator"]
            + [f"RMSE@{m}" for m in ms]
            + ["cos@1", "bias", "floor", "bias z", "rel.var", "SNR", "us/draw", "fwd-eq"]
        )
        rows = []
        for lab, ef in self.estimators.items():
            lf = ef.layers[layer]
            row = [lab]
            for m in ms:
                row.append(_num(lf.rmse[lf.at(m)]))
            row.append(_num(lf.cos_mean[0]))
            row += [
                _num(lf.bias),
                _num(lf.bias_floor),
                _z(lf.bias_z),
                _num(lf.rel_variance),
                _num(lf.snr),
            ]
            row.append("-" if ef.seconds_per_draw is None else f"{ef.seconds_per_draw * 1e6:.0f}")
            fe = ef.forward_equivalents
            row.append("-" if fe is None else f"{fe:.2f}")
            rows.append(row)
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
        ref = self.reference
        floor = ref.noise_floor(layer)
        n_params = next(iter(self.estimators.values())).layers[layer].params
        title = f"{layer_label(layer)} ({n_params} parameters), reference: {ref.kind}" + (
            f" ({ref.estimator}, {ref.samples} samples, noise floor {floor:.3g})"
            if ref.kind == "mc"
            else " enumeration"
        )
        lines = [title, fmt.format(*head), fmt.format(*["-" * w for w in widths])]
        lines += [fmt.format(*r) for r in rows]
        return "\n".join(lines)


def _num(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if math.isinf(v):
        return "inf"
    return f"{v:.3g}"


def _z(v: float) -> str:
    if math.isinf(v):
        return "exact" if v > 0 else "-inf"
    return "-" if math.isnan(v) else f"{v:.1f}"


def _loglog(xs: Sequence[int], ys: Sequence[float], x: float) -> float:
    pts = [(a, b) for a, b in zip(xs, ys, strict=True) if b > 0 and math.isfinite(b)]
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return math.nan
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= x <= x1:
            if x1 == x0:
                return y0
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
    return pts[-1][1]


# --------------------------------------------------------------------------- accumulators


class _Stream:
    """Streaming group means of consecutive draws for one M: squared errors and cosines."""

    def __init__(self, m: int, ref: Tensor) -> None:
        self.m, self.ref = m, ref
        self.carry = torch.zeros_like(ref)
        self.carried = 0
        self.err: list[Tensor] = []
        self.cos: list[Tensor] = []

    def finish(self, means: Tensor) -> None:
        d = means - self.ref
        self.err.append((d * d).sum(1))
        rn = self.ref.norm()
        mn = means.norm(dim=1)
        den = mn * rn
        c = torch.where(den > 0, (means @ self.ref) / den.clamp_min(1e-300), torch.zeros_like(mn))
        self.cos.append(c)

    def add(self, x: Tensor) -> None:
        m, i, k = self.m, 0, x.shape[0]
        if self.carried:
            take = min(m - self.carried, k)
            self.carry += x[:take].sum(0)
            self.carried += take
            i = take
            if self.carried == m:
                self.finish((self.carry / m)[None])
                self.carry.zero_()
                self.carried = 0
        full = (k - i) // m
        if full:
            self.finish(x[i : i + full * m].view(full, m, -1).mean(1))
            i += full * m
        if i < k:
            self.carry += x[i:].sum(0)
            self.carried += k - i


class _Moments:
    """Mean, per-coordinate variance and (small layers) covariance of streamed rows."""

    def __init__(self, p: int, gram_max: int, dtype: torch.dtype, device: Any) -> None:
        self.n = 0
        self.x0: Tensor | None = None
        self.s1 = torch.zeros(p, dtype=dtype, device=device)
        self.s2 = torch.zeros(p, dtype=dtype, device=device)
        self.gram = torch.zeros(p, p, dtype=dtype, device=device) if p <= gram_max else None

    def add(self, x: Tensor) -> None:
        if self.x0 is None:
            self.x0 = x[0].clone()
        d = x - self.x0
        self.n += x.shape[0]
        self.s1 += d.sum(0)
        self.s2 += (d * d).sum(0)
        if self.gram is not None:
            self.gram += d.t() @ d

    def mean(self) -> Tensor:
        assert self.x0 is not None
        return self.x0 + self.s1 / self.n

    def trace_cov(self) -> float:
        if self.n < 2:
            return math.nan
        return float(((self.s2 - self.s1 * self.s1 / self.n) / (self.n - 1)).clamp_min(0).sum())

    def trace_cov2(self) -> float:
        if self.n < 2:
            return math.nan
        if self.gram is not None:
            cov = (self.gram - torch.outer(self.s1, self.s1) / self.n) / (self.n - 1)
            return float((cov * cov).sum())
        var = ((self.s2 - self.s1 * self.s1 / self.n) / (self.n - 1)).clamp_min(0)
        return float((var * var).sum())


def bias_stats(
    mean: Tensor, ref: Tensor, tr: float, tr2: float, n_units: int, ref_se: Tensor | None
) -> tuple[float, float, float, float]:
    """(bias, bias_raw, bias_floor, bias_z) for a mean of ``n_units`` rows."""
    rn = float(ref.norm())
    b2 = float(((mean - ref) ** 2).sum())
    se2 = se4 = 0.0
    if ref_se is not None:
        s = ref_se.to(mean.dtype) ** 2
        se2, se4 = float(s.sum()), float((s * s).sum())
    floor2 = (tr / n_units if math.isfinite(tr) else 0.0) + se2
    var = (2 * tr2 / n_units**2 if math.isfinite(tr2) else 0.0) + 2 * se4
    if var > 0:
        z = (b2 - floor2) / math.sqrt(var)
    else:
        z = math.inf if b2 > 1e-24 * max(rn * rn, 1e-300) else 0.0
    if rn == 0:
        return math.nan, math.nan, math.nan, z
    return (
        math.sqrt(max(0.0, b2 - floor2)) / rn,
        math.sqrt(b2) / rn,
        math.sqrt(floor2) / rn,
        z,
    )


def _summarise(
    key: str, streams: dict[int, _Stream], sizes: list[int], ref: Tensor
) -> dict[str, list[Any]]:
    rn = float(ref.norm())
    out: dict[str, list[Any]] = {
        k: [] for k in ("groups", "rmse", "rmse_se", "cos_mean", "cos_lo", "cos_hi")
    }
    for m in sizes:
        st = streams.get(m)
        if st is None or not st.err:
            for k in out:
                out[k].append(0 if k == "groups" else math.nan)
            continue
        e = torch.cat(st.err).double()
        c = torch.cat(st.cos).double()
        g = e.numel()
        mse = float(e.mean())
        out["groups"].append(g)
        out["rmse"].append(math.sqrt(mse) / rn if rn > 0 else math.nan)
        se = float(e.std()) / math.sqrt(g) if g > 1 else math.nan
        out["rmse_se"].append(se / (2 * math.sqrt(mse)) / rn if mse > 0 and rn > 0 else math.nan)
        out["cos_mean"].append(float(c.mean()))
        q = torch.quantile(c, torch.tensor(_QUANTILES, dtype=c.dtype))
        out["cos_lo"].append(float(q[0]))
        out["cos_hi"].append(float(q[1]))
    return out


# --------------------------------------------------------------------------- entry point


def check_sample_sizes(sample_sizes: Sequence[int] | None, draws: int) -> list[int]:
    """The sorted distinct sample sizes M (default: :data:`PAPER_SAMPLE_SIZES` up to
    ``draws``); a ConfigError for M < 1 or M > draws."""
    if sample_sizes is None:
        return [m for m in PAPER_SAMPLE_SIZES if m <= draws]
    if isinstance(sample_sizes, (int, str)) or not hasattr(sample_sizes, "__iter__"):
        raise ConfigError(f"sample_sizes must be a list of integers >= 1, got {sample_sizes!r}")
    out = set()
    for m in sample_sizes:
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ConfigError(f"sample size M must be an integer >= 1, got {m!r}")
        if m > draws:
            raise ConfigError(
                f"sample size M={m} exceeds draws={draws}: averaging groups of M draws needs "
                f"at least M draws; raise draws or drop M={m}"
            )
        out.add(int(m))
    if not out:
        raise ConfigError("sample_sizes is empty; give at least one M >= 1")
    return sorted(out)


def _subseed(base: int, label: str) -> int:
    return (base * 1_000_003 + zlib.crc32(label.encode())) % (2**63)


def gradient_fidelity(
    model: SBN,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    estimators: Sequence[Any] | str = ("psa", "dst", "arm", "reinforce"),
    *,
    draws: int = 2000,
    sample_sizes: Sequence[int] | None = None,
    reference: str | Reference = "auto",
    reference_samples: int | None = None,
    generator: torch.Generator | int | None = 0,
    coupled_draws: int | None = None,
    timing: bool = True,
    timing_samples: int = 64,
    gram_max: int = 2048,
    row_budget: int | None = None,
    progress: bool | Callable[[str], Any] = False,
) -> FidelityReport:
    """Measure how well each estimator approximates the gradient of the expected loss.

    Args:
        model: an :class:`~stelab.sbn.SBN` (its ``.grad`` is not touched).
        x, y, loss_fn: the data and a per-example loss ``loss_fn(eta, y) -> (N,)``;
            the objective is ``E_Z[mean_n loss_fn(eta_n, y_n)]``.
        estimators: specs (``"psa"``, ``"concrete:tau=0.1"``, ``"det:ste"``, ...; see
            :mod:`stelab.analysis.specs`) as a list or a comma-separated string.
        draws: D, one-draw estimates per estimator (each a full-batch estimate).
        sample_sizes: the M grid (default: :data:`PAPER_SAMPLE_SIZES` up to ``draws``).
        reference: ``"auto"``, ``"exact"``, ``"mc"`` or a :class:`Reference`.
        reference_samples: draws of the Monte-Carlo reference (default 20,000).
        generator: seed or generator; each estimator gets its own stream (derived from
            the seed and its label), so adding an estimator does not change the others.
        coupled_draws: cap on the draws spent per M on a coupled estimator
            (``reinforce_loo``, run once per group and M): ``groups(M) =
            min(D, coupled_draws) // M``, and M with fewer than 2 groups is skipped
            (default: D, the full protocol).
        timing: measure seconds per draw (``timing_samples`` samples per call).
        gram_max: layers with at most this many parameters use the full covariance
            in ``bias_z``.
        row_budget: rows (copies x samples x examples) per batched call.
        progress: True for a tqdm bar, or a callable receiving one line per estimator.

    Returns:
        A :class:`FidelityReport`.
    """
    if not isinstance(model, SBN):
        raise StelabTypeError(f"model must be an SBN, got {type(model).__name__}")
    draws = check_int("draws", draws, 1, 2**31)
    sizes = check_sample_sizes(sample_sizes, draws)
    specs: list[EstimatorSpec] = parse_estimators(
        estimators if isinstance(estimators, str) else list(estimators)
    )
    for s in specs:
        s.estimator.check(model, s.estimator.min_samples)
    if coupled_draws is not None:
        coupled_draws = check_int("coupled_draws", coupled_draws, 1, 2**31)
    gram_max = check_int("gram_max", gram_max, 0, 2**16)
    g0 = as_generator(generator, x.device)
    base = (
        int(torch.randint(0, 2**62, (), generator=g0))
        if g0 is not None
        else int(torch.randint(0, 2**62, ()))
    )
    keys = layer_keys(model)
    ref = (
        reference
        if isinstance(reference, Reference)
        else reference_gradient(
            model,
            x,
            y,
            loss_fn,
            reference,
            samples=reference_samples,
            generator=torch.Generator(device=x.device).manual_seed(_subseed(base, "reference")),
        )
    )
    layers = layer_params(model)
    bar = None
    if progress is True:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(specs), desc="gradient fidelity", leave=False)
    results: dict[str, EstimatorFidelity] = {}
    try:
        for spec in specs:
            t0 = time.perf_counter()
            gen = torch.Generator(device=x.device).manual_seed(_subseed(base, spec.label))
            kw = {} if row_budget is None else {"row_budget": row_budget}
            eng = DrawEngine(model, x, y, loss_fn, spec.estimator, gen, **kw)
            ef = _run_one(spec, eng, ref, keys, layers, draws, sizes, coupled_draws, gram_max)
            if timing:
                ef.seconds_per_draw = time_per_draw(
                    model, x, y, loss_fn, spec.estimator, samples=timing_samples, generator=gen
                )
            ef.forward_equivalents = forward_equivalents(spec.estimator, model)
            ef.wall_seconds = time.perf_counter() - t0
            results[spec.label] = ef
            if bar is not None:
                bar.update(1)
            elif callable(progress):
                progress(f"{spec.label}: {ef.engine}, {ef.wall_seconds:.1f} s")
    finally:
        if bar is not None:
            bar.close()
    return FidelityReport(keys, ref, results, draws, sizes, int(x.shape[0]))


def _run_one(
    spec: EstimatorSpec,
    eng: DrawEngine,
    ref: Reference,
    keys: list[str],
    layers: dict[str, Any],
    draws: int,
    sizes: list[int],
    coupled_draws: int | None,
    gram_max: int,
) -> EstimatorFidelity:
    est = spec.estimator
    refs = {k: ref.grads[k] for k in keys}
    ses = ref.se
    out = EstimatorFidelity(spec.label, est.name, "stochastic", eng.engine, draws, None, None, 0.0)
    if eng.deterministic:
        out.kind = "deterministic"
        const = eng.constant()
        for k in keys:
            g, r = const[k].double(), refs[k].double()
            rn = float(r.norm())
            err = float((g - r).norm()) / rn if rn > 0 else math.nan
            den = float(g.norm()) * rn
            cos = float(g @ r) / den if den > 0 else 0.0
            bias, raw, floor, z = bias_stats(g, r, 0.0, 0.0, 1, None if ses is None else ses[k])
            n = len(sizes)
            out.layers[k] = LayerFidelity(
                k,
                layer_label(k),
                g.numel(),
                rn,
                list(sizes),
                [draws // m for m in sizes],
                [err] * n,
                [0.0] * n,
                [cos] * n,
                [cos] * n,
                [cos] * n,
                bias,
                raw,
                floor,
                z,
                0.0,
                0.0,
                math.inf,
            )
        return out
    dt = torch.float64
    dev = next(iter(refs.values())).device
    refs64 = {k: v.to(dt) for k, v in refs.items()}
    if eng.coupled:
        out.kind = "coupled"
        ms = [m for m in sizes if m >= est.min_samples]
        if not ms:
            raise ConfigError(
                f"estimator {spec.label!r} needs M >= {est.min_samples}; the sample sizes "
                f"{sizes} have none"
            )
        streams = {k: {} for k in keys}
        moments = {k: _Moments(refs[k].numel(), gram_max, dt, dev) for k in keys}
        budget = draws if coupled_draws is None else min(draws, coupled_draws)
        ms = [m for m in ms if budget // m >= 2 or m == ms[0]]
        m0, used = ms[0], 0
        for m in ms:
            n_groups = max(1, budget // m)
            for k in keys:
                streams[k][m] = _Stream(1, refs64[k])
            for chunk in eng.groups(m, n_groups):
                for k in keys:
                    c = chunk[k].to(dt)
                    streams[k][m].add(c)
                    if m == m0:
                        moments[k].add(c)
            used += n_groups * m
        out.draws = used
        for k in keys:  # each streamed row is already a group mean: one "group" per row
            out.layers[k] = _layer_result(
                k, streams[k], sizes, refs64[k], moments[k], m0, None if ses is None else ses[k]
            )
        out.engine = eng.engine
        if eng.fallback_reason:
            out.note = f"loop fallback: {eng.fallback_reason}"
        return out
    streams = {k: {m: _Stream(m, refs64[k]) for m in sizes} for k in keys}
    moments = {k: _Moments(refs[k].numel(), gram_max, dt, dev) for k in keys}
    for chunk in eng.draws(draws):
        for k in keys:
            c = chunk[k].to(dt)
            moments[k].add(c)
            for st in streams[k].values():
                st.add(c)
    for k in keys:
        out.layers[k] = _layer_result(
            k, streams[k], sizes, refs64[k], moments[k], 1, None if ses is None else ses[k]
        )
    out.engine = eng.engine
    if eng.fallback_reason:
        out.note = f"loop fallback: {eng.fallback_reason}"
    return out


def _layer_result(
    key: str,
    streams: dict[int, _Stream],
    sizes: list[int],
    ref: Tensor,
    mom: _Moments,
    unit: int,
    ref_se: Tensor | None,
) -> LayerFidelity:
    """Metrics from the streams; ``mom`` holds rows that each average ``unit`` draws."""
    s = _summarise(key, streams, sizes, ref)
    mean = mom.mean()
    tr_unit = mom.trace_cov()
    tr2_unit = mom.trace_cov2()
    bias, raw, floor, z = bias_stats(mean, ref, tr_unit, tr2_unit, mom.n, ref_se)
    variance = tr_unit * unit
    rn = float(ref.norm())
    snr = float(mean.norm()) / math.sqrt(variance) if variance > 0 else math.inf
    return LayerFidelity(
        key,
        layer_label(key),
        ref.numel(),
        rn,
        list(sizes),
        s["groups"],
        s["rmse"],
        s["rmse_se"],
        s["cos_mean"],
        s["cos_lo"],
        s["cos_hi"],
        bias,
        raw,
        floor,
        z,
        variance,
        variance / rn**2 if rn > 0 else math.nan,
        snr,
    )
