"""Critical points of the population loss and population coarse gradient descent ([Y19] section 3).

The model and its conventions are described in :mod:`stelab.theory.two_layer`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stelab.errors import ConfigError, check_int, check_positive
from stelab.theory.two_layer.formulas import (
    coarse_w_from_geometry,
    grad_v_from_angle,
    grad_w_from_geometry,
    loss_from_angle,
)
from stelab.theory.two_layer.model import ArrayLike, as_f64, check_ste, geometry, prepare

__all__ = [
    "CriticalPoint",
    "CriticalPoints",
    "Trajectory",
    "coarse_gradient_descent",
    "critical_points",
]


# --------------------------------------------------------------------------- critical points


@dataclass(frozen=True)
class CriticalPoint:
    """A critical point of f: any w with theta(w, w*) = ``theta`` and this ``v``."""

    kind: str  # "global_min" | "spurious_min" | "saddle"
    theta: float
    v: torch.Tensor
    loss: float


@dataclass(frozen=True)
class CriticalPoints:
    """The critical points of the population loss for a given v* ([Y19] section 3).

    ``spurious_is_local_min`` is True when v^T v* < 0 at the spurious point, i.e.
    (1^T v*)^2 < (m+1)/2 |v*|^2: only then does f increase as theta leaves pi (df/dtheta
    = v^T v*/(2 pi)). The same condition gives the saddle points (``saddle`` is None
    otherwise).
    """

    global_min: CriticalPoint
    spurious_min: CriticalPoint
    saddle: CriticalPoint | None
    spurious_is_local_min: bool


def critical_points(v_star: ArrayLike) -> CriticalPoints:
    """Global minimizer, spurious minimizer and saddle points of f for teacher ``v_star``.

    With s = (1^T v*)^2, N = |v*|^2, D = (m+1) N - s::

        global minimizers:   theta = 0,  v = v*,                      f = 0
        spurious minimizers: theta = pi, v = (I+J)^{-1} (J - I) v*
        saddles (if s < (m+1)/2 N):
                             theta = (pi/2) (m+1) N / D,
                             v = (I+J)^{-1} (-(s/D) I + J) v*

    (I+J)^{-1} = I - J/(m+1). The losses come from Lemma 1 (they do not depend on |w|).
    """
    vs = as_f64("v_star", v_star)
    if vs.ndim != 1:
        raise ConfigError(f"v_star must be a 1-D vector, got shape {tuple(vs.shape)}")
    m = vs.shape[0]
    ones = torch.ones(m, dtype=torch.float64)
    eye = torch.eye(m, dtype=torch.float64)
    jmat = torch.outer(ones, ones)
    inv = eye - jmat / (m + 1)
    s = float(vs.sum()) ** 2
    nrm = float(vs @ vs)
    if nrm == 0:
        what = "a zero vector" if not bool(vs.any()) else f"|v_star|^2 = {nrm} (underflow)"
        raise ConfigError(f"v_star must be nonzero with |v_star|^2 > 0, got {what}")

    def pt(kind: str, th: float, v: torch.Tensor) -> CriticalPoint:
        return CriticalPoint(
            kind, th, v, float(loss_from_angle(v, vs, torch.tensor(th, dtype=torch.float64)))
        )

    glob = pt("global_min", 0.0, vs.clone())
    spur_v = inv @ (jmat - eye) @ vs
    spur = pt("spurious_min", math.pi, spur_v)
    saddle = None
    if s < (m + 1) / 2 * nrm:
        d = (m + 1) * nrm - s
        sad_v = inv @ (-(s / d) * eye + jmat) @ vs
        saddle = pt("saddle", math.pi / 2 * (m + 1) * nrm / d, sad_v)
    return CriticalPoints(glob, spur, saddle, bool(spur_v @ vs < 0))


# --------------------------------------------------------------------------- descent


@dataclass
class Trajectory:
    """Population coarse gradient descent trajectory (recorded every ``record_every`` steps).

    Per-record tensors have shape (K, *batch) with K the number of records (the
    initial point included): ``loss`` f, ``theta``, ``w_norm`` |w|, ``inner``
    <E g_mu, df/dw>, ``cosine`` cos(E g_mu, df/dw) (NaN where df/dw = 0) and
    ``coarse_norm`` |E g_mu|. ``v``, ``w`` are the final iterates. Over *every* step
    (not only the recorded ones), shape (*batch): ``max_increase`` the largest one-step
    increase of f (-inf when steps = 0) and ``min_w_norm`` the smallest |w|.
    """

    ste: str
    lr: float
    step: torch.Tensor
    loss: torch.Tensor
    theta: torch.Tensor
    w_norm: torch.Tensor
    inner: torch.Tensor
    cosine: torch.Tensor
    coarse_norm: torch.Tensor
    v: torch.Tensor
    w: torch.Tensor
    max_increase: torch.Tensor
    min_w_norm: torch.Tensor


def coarse_gradient_descent(
    v0: ArrayLike,
    w0: ArrayLike,
    v_star: ArrayLike,
    w_star: ArrayLike,
    ste: str,
    lr: float,
    steps: int,
    *,
    record_every: int = 1,
) -> Trajectory:
    """Population coarse gradient descent ([Y19] Algorithm 1 with exact expectations)::

        v <- v - lr E[dl/dv] = v - lr df/dv
        w <- w - lr E[g_mu]

    Vectorised over leading dimensions of ``v0``/``w0`` (several initialisations run
    together). Records f, theta, |w|, <E g_mu, df/dw> and the cosine between E g_mu
    and df/dw before each recorded step and after the last one. Raises
    ``ConfigError`` if an iterate reaches w = 0 exactly.

    Note: the identity and ReLU expected coarse gradients do not shrink with |w| (they
    depend on w only through u = w/|w|), while df/dw ~ 1/|w|. From initialisations with
    large h = |v|^2 + (1^T v)^2 - (1^T v)(1^T v*) + v^T v*, |w| can be driven to ~0 before
    v adapts; the iterate then crosses w = 0, theta flips and f jumps up, whatever the
    learning rate (``min_w_norm`` and ``max_increase`` expose this).
    """
    ste = check_ste(ste)
    lr = check_positive("lr", lr)
    steps = check_int("steps", steps, 0, 10**9)
    record_every = check_int("record_every", record_every, 1, 10**9)
    v, w, vs, ws = prepare(v0, w0, v_star, w_star)
    v, w = v.clone(), w.clone()
    recs: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("step", "loss", "theta", "w_norm", "inner", "cosine", "coarse_norm")
    }
    max_inc: torch.Tensor | None = None
    min_wn: torch.Tensor | None = None
    prev: torch.Tensor | None = None
    for t in range(steps + 1):
        g = geometry(w, ws)
        if bool((g.w_norm == 0).any()):
            raise ConfigError(f"coarse gradient descent reached w = 0 at step {t}")
        f = loss_from_angle(v, vs, g.theta)
        if prev is None:
            max_inc, min_wn = torch.full_like(f, -math.inf), g.w_norm.clone()
        else:
            max_inc = torch.maximum(max_inc, f - prev)
            min_wn = torch.minimum(min_wn, g.w_norm)
        prev = f
        gv = grad_v_from_angle(v, vs, g.theta)
        gw = coarse_w_from_geometry(v, vs, ws, g, ste)
        if t % record_every == 0 or t == steps:
            gt = grad_w_from_geometry(v, vs, g)
            inner = (gw * gt).sum(-1)
            cn, tn = gw.norm(dim=-1), gt.norm(dim=-1)
            den = cn * tn
            recs["step"].append(torch.tensor(t))
            recs["loss"].append(f)
            recs["theta"].append(g.theta)
            recs["w_norm"].append(g.w_norm)
            recs["inner"].append(inner)
            recs["cosine"].append(
                torch.where(den > 0, inner / den, math.nan)  # den = 0: undefined
            )
            recs["coarse_norm"].append(cn)
        if t == steps:
            break
        v = v - lr * gv
        w = w - lr * gw
    st = {k: torch.stack(x) for k, x in recs.items()}
    return Trajectory(ste=ste, lr=lr, v=v, w=w, max_increase=max_inc, min_w_norm=min_wn, **st)
