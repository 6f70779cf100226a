"""Streaming statistics of gradient draws: group means per M, moments, bias and its noise floor.

The formulas are in :mod:`stelab.analysis.fidelity`; :func:`bias_stats` is shared with
:mod:`stelab.analysis.deterministic`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .draws import layer_label
from .fidelity_report import LayerFidelity

__all__ = ["GroupMeans", "Moments", "bias_stats", "layer_result"]

_QUANTILES = (0.15, 0.85)


class GroupMeans:
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


class Moments:
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
    key: str, streams: dict[int, GroupMeans], sizes: list[int], ref: Tensor
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


def layer_result(
    key: str,
    streams: dict[int, GroupMeans],
    sizes: list[int],
    ref: Tensor,
    mom: Moments,
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
