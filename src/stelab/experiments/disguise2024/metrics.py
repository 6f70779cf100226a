"""What the [S24] experiment measures between a custom-estimator model and an STE twin."""

from __future__ import annotations

import math

import torch
from torch import nn

from ...disguise import Equivalence
from .model import weight_layers

__all__ = ["accuracy", "compare", "log_slope"]


@torch.no_grad()
def compare(custom: nn.Module, other: nn.Module, eq: Equivalence) -> dict[str, float]:
    """Flip fraction and latent gaps (units of each layer's Δ) over all quantized weights."""
    flips = n = 0
    gm, gi = [], []
    for a, b in zip(weight_layers(custom), weight_layers(other), strict=True):
        st = a.weight_quantizer.step
        wa, wb = a.weight, b.weight
        flips += int((a.weight_quantizer(wa) != b.weight_quantizer(wb)).sum())
        n += wa.numel()
        gm.append(((eq.M(wa, step=st) - wb).abs() / st).flatten())
        gi.append(((wa - wb).abs() / st).flatten())
    gm_t, gi_t = torch.cat(gm), torch.cat(gi)
    return {
        "flips": flips / n,
        "gap_M_mean": float(gm_t.mean()),
        "gap_M_max": float(gm_t.max()),
        "gap_id_mean": float(gi_t.mean()),
        "gap_id_max": float(gi_t.max()),
    }


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """The fraction of rows of ``x`` that ``model`` classifies as ``y``."""
    return float((model(x).argmax(1) == y).double().mean())


def log_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x (y floored at 1e-300)."""
    lx = [math.log(x) for x in xs]
    ly = [math.log(max(y, 1e-300)) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    den = sum((a - mx) ** 2 for a in lx)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / den
