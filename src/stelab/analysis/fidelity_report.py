"""The results of :func:`~stelab.analysis.fidelity.gradient_fidelity` and their tables:
the reference gradient, per estimator and layer the error, cosine, bias, variance and
SNR (formulas in :mod:`stelab.analysis.fidelity`), the cost, and the JSON round trip
(:meth:`FidelityReport.to_dict` / :meth:`FidelityReport.from_dict`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import Tensor

from ..errors import ConfigError
from .draws import layer_label

__all__ = ["Reference", "LayerFidelity", "EstimatorFidelity", "FidelityReport"]


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


@dataclass
class LayerFidelity:
    """The metrics of one estimator on one layer (see :mod:`stelab.analysis.fidelity`)."""

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
