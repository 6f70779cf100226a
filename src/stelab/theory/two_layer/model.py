"""Inputs and geometry of the two-layer model: STE names, input checks, the angle theta.

The model and its conventions are described in :mod:`stelab.theory.two_layer`.
:func:`prepare` and :func:`geometry` are the shared front end of every formula in
the package (validation, float64, broadcasting, normalising w*; then |w|, u, theta).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from stelab.errors import ConfigError, StelabTypeError, check_positive, unknown

__all__ = ["LIBRARY_ESTIMATOR", "STES", "theta", "w_at_angle"]

#: The straight-through estimators of [Y19], by the names used here.
STES: tuple[str, ...] = ("identity", "relu", "clipped_relu")

#: The one place that maps these STE names to ``stelab.quantizers`` estimator names
#: (backward multiplier for the heaviside forward: identity 1, relu 1{x>0},
#: clipped_relu 1{0<x<1}).
LIBRARY_ESTIMATOR: dict[str, str] = {
    "identity": "ste",
    "relu": "relu",
    "clipped_relu": "clipped_relu",
}

ArrayLike = torch.Tensor | Sequence[float] | Any

_SIN_TOL = 1e-10  # sin(theta) at or below this counts as theta in {0, pi}


# --------------------------------------------------------------------------- inputs


def as_f64(name: str, x: ArrayLike) -> torch.Tensor:
    """``x`` as a float64 tensor (at least 1-D, nonzero last dimension, finite entries);
    the errors name ``name``."""
    if isinstance(x, (str, bytes)) or x is None:
        raise StelabTypeError(f"{name} must be a real vector (tensor, array or list), got {x!r}")
    try:
        t = torch.as_tensor(x, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise StelabTypeError(
            f"{name} must be a real vector (tensor, array or list), got {type(x).__name__}"
        ) from exc
    if t.ndim == 0:
        raise ConfigError(f"{name} must be a vector (at least 1 dimension), got a scalar {x!r}")
    if t.shape[-1] == 0:
        raise ConfigError(f"{name} must have a nonzero last dimension, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ConfigError(f"{name} must be finite, got non-finite entries (shape {tuple(t.shape)})")
    return t


def check_ste(ste: Any) -> str:
    """``ste`` if it is one of :data:`STES`, else an error listing them."""
    if not isinstance(ste, str):
        raise StelabTypeError(f"ste must be a string, one of {', '.join(STES)}; got {ste!r}")
    if ste not in STES:
        raise unknown("ste", ste, STES)
    return ste


def prepare(
    v: ArrayLike, w: ArrayLike, v_star: ArrayLike, w_star: ArrayLike, *, allow_zero_w: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate, convert to float64, broadcast leading dims, normalise w*."""
    v, w = as_f64("v", v), as_f64("w", w)
    vs, ws = as_f64("v_star", v_star), as_f64("w_star", w_star)
    if v.shape[-1] != vs.shape[-1]:
        raise ConfigError(
            f"v has shape {tuple(v.shape)} and v_star has shape {tuple(vs.shape)}: "
            f"their last dimensions (m) must agree"
        )
    if w.shape[-1] != ws.shape[-1]:
        raise ConfigError(
            f"w has shape {tuple(w.shape)} and w_star has shape {tuple(ws.shape)}: "
            f"their last dimensions (n) must agree"
        )
    try:
        lead = torch.broadcast_shapes(v.shape[:-1], w.shape[:-1], vs.shape[:-1], ws.shape[:-1])
    except RuntimeError as exc:
        raise ConfigError(
            "leading (batch) dimensions do not broadcast: "
            f"v {tuple(v.shape)}, w {tuple(w.shape)}, v_star {tuple(vs.shape)}, "
            f"w_star {tuple(ws.shape)}"
        ) from exc
    wsn = ws.norm(dim=-1, keepdim=True)
    if bool((wsn == 0).any()):
        raise ConfigError("w_star must be nonzero (only its direction matters), got a zero vector")
    ws = ws / wsn
    if not allow_zero_w and bool((w.norm(dim=-1) == 0).any()):
        raise ConfigError(
            "w must be nonzero: the population loss is discontinuous at w = 0 and the "
            "(coarse) gradients are undefined there"
        )
    m, n = v.shape[-1], w.shape[-1]
    return (
        v.expand(*lead, m),
        w.expand(*lead, n),
        vs.expand(*lead, m),
        ws.expand(*lead, n),
    )


# --------------------------------------------------------------------------- geometry


@dataclass
class Geometry:
    """|w|, u = w/|w| and the angle of w to the unit w* (see :func:`geometry`)."""

    w_norm: torch.Tensor  # |w|            (...)
    u: torch.Tensor  # w/|w|                 (..., n)
    cos: torch.Tensor  # cos theta          (...)
    sin: torch.Tensor  # sin theta          (...)
    theta: torch.Tensor  # theta in [0, pi] (...)
    u_perp: torch.Tensor  # P_w w*/|P_w w*|, 0 when parallel (..., n)
    perp: torch.Tensor  # P_w w* (|P_w w*| = sin theta)   (..., n)


def geometry(w: torch.Tensor, ws: torch.Tensor) -> Geometry:
    """The :class:`Geometry` of ``w`` against the unit vector ``ws`` (no validation)."""
    wn = w.norm(dim=-1)
    safe = torch.where(wn > 0, wn, torch.ones_like(wn))
    u = w / safe.unsqueeze(-1)
    c = (u * ws).sum(-1)
    perp = ws - c.unsqueeze(-1) * u
    perp = perp - (perp * u).sum(-1, keepdim=True) * u  # second Gram-Schmidt pass
    s = perp.norm(dim=-1)
    th = torch.atan2(s, c)
    par = s <= _SIN_TOL
    u_perp = torch.where(
        par.unsqueeze(-1), torch.zeros_like(perp), perp / torch.where(par, 1.0, s).unsqueeze(-1)
    )
    return Geometry(wn, u, c, s, th, u_perp, perp)


def theta(w: ArrayLike, w_star: ArrayLike) -> torch.Tensor:
    """The angle theta(w, w*) = arccos(w^T w* / (|w| |w*|)) in [0, pi].

    Computed as atan2(|P_w w*|, u^T w*) (accurate near 0 and pi). Leading dimensions
    broadcast; w = 0 or w* = 0 raise ``ConfigError``.
    """
    w_t, ws_t = as_f64("w", w), as_f64("w_star", w_star)
    if w_t.shape[-1] != ws_t.shape[-1]:
        raise ConfigError(
            f"w has shape {tuple(w_t.shape)} and w_star has shape {tuple(ws_t.shape)}: "
            f"their last dimensions (n) must agree"
        )
    if bool((w_t.norm(dim=-1) == 0).any()):
        raise ConfigError("w must be nonzero: the angle theta(w, w*) is undefined at w = 0")
    wsn = ws_t.norm(dim=-1, keepdim=True)
    if bool((wsn == 0).any()):
        raise ConfigError("w_star must be nonzero, got a zero vector")
    return geometry(w_t, ws_t / wsn).theta


def w_at_angle(
    w_star: ArrayLike,
    angle: float,
    *,
    norm: float = 1.0,
    direction: ArrayLike | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A vector w with theta(w, w*) = ``angle`` and |w| = ``norm``.

    w = norm (cos(angle) w*/|w*| + sin(angle) d), where d is the unit vector along the
    part of ``direction`` orthogonal to w* (a random direction drawn with ``generator``
    when ``direction`` is None). Needs n >= 2 unless angle is 0 or pi.
    """
    ws = as_f64("w_star", w_star)
    if ws.ndim != 1:
        raise ConfigError(f"w_star must be a 1-D vector, got shape {tuple(ws.shape)}")
    angle = float(check_positive("angle", angle, allow_zero=True))
    if angle > math.pi:
        raise ConfigError(f"angle must be in [0, pi], got {angle!r}")
    norm = check_positive("norm", norm)
    wsn = ws.norm()
    if wsn == 0:
        raise ConfigError("w_star must be nonzero, got a zero vector")
    ws = ws / wsn
    if direction is None:
        d = torch.randn(ws.shape[0], generator=generator, dtype=torch.float64)
    else:
        d = as_f64("direction", direction)
        if d.shape != ws.shape:
            raise ConfigError(
                f"direction has shape {tuple(d.shape)}, w_star has shape {tuple(ws.shape)}: "
                f"they must agree"
            )
    d = d - (d @ ws) * ws
    dn = d.norm()
    if dn <= 1e-12:
        if angle in (0.0, math.pi):  # sin(pi) is 1.2e-16, not 0: compare the angle
            d = torch.zeros_like(ws)
        else:
            raise ConfigError(
                "direction must not be parallel to w_star (and n must be >= 2) "
                f"for an angle in (0, pi), got angle {angle!r}, n = {ws.shape[0]}"
            )
    else:
        d = d / dn
    return norm * (math.cos(angle) * ws + math.sin(angle) * d)
