"""The two-linear-layer model of [Y19]: population loss, true and coarse gradients.

Reference: P. Yin, J. Lyu, S. Zhang, S. Osher, Y. Qi, J. Xin. *Understanding
Straight-Through Estimator in Training Activation Quantized Neural Nets.* ICLR 2019,
arXiv:1903.05662 (Lemmas 1-2, the expected coarse gradients of the identity, ReLU and
clipped-ReLU STEs, the critical points of the population loss). Restated, with
stelab's conventions, in docs/papers/yin2019.md. The clipped-ReLU integrals p, q are
evaluated in closed form (derived here, checked against quadrature of the paper's
integrals; see :func:`clipped_relu_pq`).

Model (plain-text math)::

    Z in R^{m x n}, i.i.d. N(0, 1) entries (rows are "patches")
    sigma(x) = 1{x > 0} (binarized ReLU), applied elementwise
    y(Z; v, w) = v^T sigma(Z w),  teacher y*(Z) = v*^T sigma(Z w*)
    l(v, w; Z) = 1/2 (y(Z; v, w) - y*(Z))^2,  f(v, w) = E_Z[l]
    theta = angle(w, w*),  u = w/|w|,  I = I_m,  J = 1 1^T

Normalisation of w*: the teacher sigma(Z w*) depends on w* only through its
direction, so every function here accepts any nonzero ``w_star`` and works with
``w_star / |w_star|`` (the paper's formulas assume |w*| = 1; normalising makes them
exact for any |w*| > 0). ``w_star = 0`` is an error.

Shapes: ``v``, ``v_star`` have last dimension m; ``w``, ``w_star`` last dimension n;
leading dimensions broadcast (so a batch of K points is ``v: (K, m)``, ``w: (K, n)``).
All results are float64 torch tensors.

Conventions at the non-differentiable points (choice, documented and tested):

- ``w = 0``: f is discontinuous there (sigma(Z 0) = 0 gives f(v, 0) = 1/8 v*^T (I+J) v*,
  which is not the limit of Lemma 1), so ``population_loss`` accepts it but every
  gradient function raises ``ConfigError``.
- ``theta in {0, pi}`` (w parallel to w*): f depends on w only through theta, whose
  gradient has a cone singularity there. ``population_grad`` returns df/dw = 0, the
  minimum-norm element of the (Clarke) generalised gradient; the one-sided derivative
  along a unit direction d is +(v^T v*)/(2 pi |w|) |P_w d| at theta = 0 and
  -(v^T v*)/(2 pi |w|) |P_w d| at theta = pi. A point counts as parallel when
  sin(theta) <= 1e-10 (only ``population_grad`` needs this threshold; the coarse
  gradients are written in forms that are regular at theta in {0, pi}).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from stelab.errors import ConfigError, StelabTypeError, check_int, check_positive, unknown

__all__ = [
    "LIBRARY_ESTIMATOR",
    "STES",
    "CriticalPoint",
    "CriticalPoints",
    "Trajectory",
    "batch_loss",
    "clipped_relu_pq",
    "coarse_descent_ratio",
    "coarse_grad_on_batch",
    "coarse_gradient_descent",
    "critical_points",
    "expected_coarse_grad",
    "population_grad",
    "population_loss",
    "sample_coarse_grad",
    "theta",
    "w_at_angle",
    "xi",
]

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

_SQRT_2PI = math.sqrt(2.0 * math.pi)
_SIN_TOL = 1e-10  # sin(theta) at or below this counts as theta in {0, pi}
_CHUNK_ELEMS = 1 << 22  # Z entries per chunk in sample_coarse_grad (32 MiB in float64)


# --------------------------------------------------------------------------- inputs


def _as_f64(name: str, x: ArrayLike) -> torch.Tensor:
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


def _check_ste(ste: Any) -> str:
    if not isinstance(ste, str):
        raise StelabTypeError(f"ste must be a string, one of {', '.join(STES)}; got {ste!r}")
    if ste not in STES:
        raise unknown("ste", ste, STES)
    return ste


def _prep(
    v: ArrayLike, w: ArrayLike, v_star: ArrayLike, w_star: ArrayLike, *, allow_zero_w: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate, convert to float64, broadcast leading dims, normalise w*."""
    v, w = _as_f64("v", v), _as_f64("w", w)
    vs, ws = _as_f64("v_star", v_star), _as_f64("w_star", w_star)
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
class _Geo:
    w_norm: torch.Tensor  # |w|            (...)
    u: torch.Tensor  # w/|w|                 (..., n)
    cos: torch.Tensor  # cos theta          (...)
    sin: torch.Tensor  # sin theta          (...)
    theta: torch.Tensor  # theta in [0, pi] (...)
    u_perp: torch.Tensor  # P_w w*/|P_w w*|, 0 when parallel (..., n)
    perp: torch.Tensor  # P_w w* (|P_w w*| = sin theta)   (..., n)


def _geometry(w: torch.Tensor, ws: torch.Tensor) -> _Geo:
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
    return _Geo(wn, u, c, s, th, u_perp, perp)


def theta(w: ArrayLike, w_star: ArrayLike) -> torch.Tensor:
    """The angle theta(w, w*) = arccos(w^T w* / (|w| |w*|)) in [0, pi].

    Computed as atan2(|P_w w*|, u^T w*) (accurate near 0 and pi). Leading dimensions
    broadcast; w = 0 or w* = 0 raise ``ConfigError``.
    """
    w_t, ws_t = _as_f64("w", w), _as_f64("w_star", w_star)
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
    return _geometry(w_t, ws_t / wsn).theta


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
    ws = _as_f64("w_star", w_star)
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
        d = _as_f64("direction", direction)
        if d.shape != ws.shape:
            raise ConfigError(
                f"direction has shape {tuple(d.shape)}, w_star has shape {tuple(ws.shape)}: "
                f"they must agree"
            )
    d = d - (d @ ws) * ws
    dn = d.norm()
    if dn <= 1e-12:
        if math.sin(angle) == 0.0:
            d = torch.zeros_like(ws)
        else:
            raise ConfigError(
                "direction must not be parallel to w_star (and n must be >= 2) "
                f"for an angle in (0, pi), got angle {angle!r}, n = {ws.shape[0]}"
            )
    else:
        d = d / dn
    return norm * (math.cos(angle) * ws + math.sin(angle) * d)


# --------------------------------------------------------------------------- special functions


def xi(x: ArrayLike) -> torch.Tensor:
    """xi(x) = int_0^x r^2 exp(-r^2/2) dr = sqrt(pi/2) erf(x/sqrt 2) - x exp(-x^2/2).

    Closed form of the radial integral in [Y19]'s p and q; xi(+inf) = sqrt(pi/2).
    Defined here for x >= 0 (and +inf).
    """
    t = torch.as_tensor(x, dtype=torch.float64)
    big = t > 40.0  # x exp(-x^2/2) < 1e-300 there; avoids inf * 0
    tt = torch.where(big, torch.zeros_like(t), t)
    val = math.sqrt(math.pi / 2) * torch.special.erf(tt / math.sqrt(2)) - tt * torch.exp(
        -tt * tt / 2
    )
    return torch.where(big, torch.full_like(t, math.sqrt(math.pi / 2)), val)


def _pq_closed(th: torch.Tensor, w_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Closed forms of p(theta, w), q(theta, w) (derived here, see clipped_relu_pq)."""
    a = 1.0 / w_norm
    c, s = torch.cos(th), torch.sin(th)
    s = torch.where(th >= math.pi, torch.zeros_like(s), s.clamp_min(0.0))
    # erf(a / (sqrt2 s)) -> 1 and Phi(a cot theta) -> 1{theta < pi/2} as s -> 0
    e = torch.special.erf(a / (math.sqrt(2) * s))
    big_phi = torch.special.ndtr(a * c / s)
    phi_a = torch.exp(-a * a / 2) / _SQRT_2PI
    p = 1.0 / (2 * _SQRT_2PI) - phi_a * big_phi + c / (2 * _SQRT_2PI) * e
    q = s / (2 * _SQRT_2PI) * e
    p = torch.where(th >= math.pi, torch.zeros_like(p), p)
    return p, q


def _pq_quadrature(th: torch.Tensor, w_norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np
    from scipy import integrate, special

    def xi_np(x: float) -> float:
        if x > 40.0:
            return math.sqrt(math.pi / 2)
        return math.sqrt(math.pi / 2) * float(special.erf(x / math.sqrt(2))) - x * math.exp(
            -x * x / 2
        )

    th_b, wn_b = torch.broadcast_tensors(th, w_norm)
    th_np, wn_np = th_b.detach().numpy().ravel(), wn_b.detach().numpy().ravel()
    p_out, q_out = np.zeros_like(th_np), np.zeros_like(th_np)
    for i, (t, r) in enumerate(zip(th_np, wn_np, strict=True)):
        lo, hi = -math.pi / 2 + t, math.pi / 2
        if hi <= lo:
            continue

        def rad(phi: float, r: float = r) -> float:
            c = math.cos(phi)
            return xi_np(1.0 / (c * r)) if c > 0 else math.sqrt(math.pi / 2)

        kw = {"epsabs": 1e-14, "epsrel": 1e-12, "limit": 500}
        with warnings.catch_warnings():  # roundoff warnings at the 1e-14 level
            warnings.simplefilter("ignore", integrate.IntegrationWarning)
            p_out[i] = integrate.quad(lambda ph: math.cos(ph) * rad(ph), lo, hi, **kw)[0]
            q_out[i] = integrate.quad(lambda ph: math.sin(ph) * rad(ph), lo, hi, **kw)[0]
    shape = th_b.shape
    p = torch.from_numpy(p_out / (2 * math.pi)).reshape(shape)
    q = torch.from_numpy(q_out / (2 * math.pi)).reshape(shape)
    return p, q


def clipped_relu_pq(
    angle: ArrayLike, w_norm: ArrayLike, *, method: str = "closed"
) -> tuple[torch.Tensor, torch.Tensor]:
    """[Y19]'s p(theta, w) and q(theta, w) for the clipped-ReLU expected coarse gradient.

    Definition (docs/papers/yin2019.md)::

        p(theta, w) = 1/(2 pi) int_{-pi/2+theta}^{pi/2} cos(phi) xi(sec(phi)/|w|) dphi
        q(theta, w) = 1/(2 pi) int_{-pi/2+theta}^{pi/2} sin(phi) xi(sec(phi)/|w|) dphi

    They are E[x 1{0 < x < a} 1{x cos t + y sin t > 0}] and the same with y, for
    (x, y) ~ N(0, I_2), a = 1/|w|. Integrating in Cartesian coordinates gives
    (derived for stelab; checked against the quadrature in the tests)::

        q = sin(theta)/(2 sqrt(2 pi)) erf(a / (sqrt2 sin theta))
        p = 1/(2 sqrt(2 pi)) - phi(a) Phi(a cot theta)
            + cos(theta)/(2 sqrt(2 pi)) erf(a / (sqrt2 sin theta))

    with phi, Phi the standard normal pdf and cdf; p(0, w) = (1 - exp(-a^2/2))/sqrt(2 pi)
    and p(pi, w) = q(0, w) = q(pi, w) = 0.

    Args:
        angle: theta in [0, pi] (tensor or number; broadcasts with ``w_norm``).
        w_norm: |w| > 0.
        method: ``"closed"`` (default, vectorised, exact to rounding) or
            ``"quadrature"`` (scipy.integrate.quad of the definition above, element by
            element; for verification).
    """
    th = torch.as_tensor(angle, dtype=torch.float64)
    wn = torch.as_tensor(w_norm, dtype=torch.float64)
    if not bool(((th >= 0) & (th <= math.pi + 1e-6)).all()):
        raise ConfigError(f"angle must lie in [0, pi], got values in [{th.min()}, {th.max()}]")
    th = th.clamp(max=math.pi)  # float32 pi rounds up
    if not bool(((wn > 0) & torch.isfinite(wn)).all()):
        raise ConfigError("w_norm must be finite and > 0")
    if method == "closed":
        return _pq_closed(*torch.broadcast_tensors(th, wn))
    if method == "quadrature":
        return _pq_quadrature(th, wn)
    raise unknown("method", method, ("closed", "quadrature"))


# --------------------------------------------------------------------------- core formulas


def _loss(v: torch.Tensor, vs: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
    sv, svs = v.sum(-1), vs.sum(-1)
    vv = (v * vs).sum(-1)
    return 0.125 * (
        (v * v).sum(-1)
        + sv * sv
        - 2.0 * ((1.0 - 2.0 * th / math.pi) * vv + sv * svs)
        + (vs * vs).sum(-1)
        + svs * svs
    )


def _grad_v(v: torch.Tensor, vs: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
    return 0.25 * (v + v.sum(-1, keepdim=True)) - 0.25 * (
        (1.0 - 2.0 * th / math.pi).unsqueeze(-1) * vs + vs.sum(-1, keepdim=True)
    )


def _grad_w(v: torch.Tensor, vs: torch.Tensor, g: _Geo) -> torch.Tensor:
    vv = (v * vs).sum(-1)
    return (-vv / (2.0 * math.pi * g.w_norm)).unsqueeze(-1) * g.u_perp


def _coarse_w(
    v: torch.Tensor, vs: torch.Tensor, ws: torch.Tensor, g: _Geo, ste: str
) -> torch.Tensor:
    vv = (v * vs).sum(-1, keepdim=True)
    nv2 = (v * v).sum(-1, keepdim=True)
    if ste == "identity":
        return (nv2 * g.u - vv * ws) / _SQRT_2PI
    sv, svs = v.sum(-1, keepdim=True), vs.sum(-1, keepdim=True)
    h = nv2 + sv * sv - sv * svs + vv
    if ste == "relu":
        # cos(theta/2) e = (u + w*)/2, so the e-term is regular at theta = pi
        return (h * g.u - vv * (g.u + ws)) / (2.0 * _SQRT_2PI)
    # clipped_relu: q u_perp = erf(a/(sqrt2 sin theta))/(2 sqrt(2 pi)) P_w w*, regular at
    # theta in {0, pi} (no division by sin theta)
    a = 1.0 / g.w_norm
    p0 = (-torch.expm1(-a * a / 2) / _SQRT_2PI).unsqueeze(-1)
    p, _ = _pq_closed(g.theta, g.w_norm)
    q_over_sin = torch.special.erf(a / (math.sqrt(2) * g.sin)) / (2 * _SQRT_2PI)
    return p0 * h / 2 * g.u - vv * (p.unsqueeze(-1) * g.u + q_over_sin.unsqueeze(-1) * g.perp)


# --------------------------------------------------------------------------- public API


def population_loss(
    v: ArrayLike, w: ArrayLike, v_star: ArrayLike, w_star: ArrayLike
) -> torch.Tensor:
    """Population loss f(v, w) = E_Z[1/2 (v^T sigma(Z w) - v*^T sigma(Z w*))^2] ([Y19] Lemma 1).

    For w != 0::

        f = 1/8 [ v^T (I+J) v - 2 v^T ((1 - 2 theta/pi) I + J) v* + v*^T (I+J) v* ]

    and f(v, 0) = 1/8 v*^T (I+J) v* (sigma(Z 0) = 0). Leading dimensions broadcast;
    returns a tensor of the broadcast batch shape.
    """
    v_t, w_t, vs, ws = _prep(v, w, v_star, w_star, allow_zero_w=True)
    g = _geometry(w_t, ws)
    f = _loss(v_t, vs, g.theta)
    svs = vs.sum(-1)
    f0 = 0.125 * ((vs * vs).sum(-1) + svs * svs)
    return torch.where(g.w_norm == 0, f0, f)


def population_grad(
    v: ArrayLike, w: ArrayLike, v_star: ArrayLike, w_star: ArrayLike
) -> tuple[torch.Tensor, torch.Tensor]:
    """True gradient (df/dv, df/dw) of the population loss ([Y19] Lemma 2).

    For w != 0 and theta in (0, pi)::

        df/dv = 1/4 (I+J) v - 1/4 ((1 - 2 theta/pi) I + J) v*
        df/dw = -(v^T v*)/(2 pi |w|) * P_w w* / |P_w w*|,   P_w = I_n - w w^T/|w|^2

    At theta in {0, pi} (sin theta <= 1e-10) df/dw is returned as 0 (minimum-norm
    element of the generalised gradient; f has a cone singularity in w there).
    ``w = 0`` raises ``ConfigError`` (f is discontinuous there).
    """
    v_t, w_t, vs, ws = _prep(v, w, v_star, w_star)
    g = _geometry(w_t, ws)
    return _grad_v(v_t, vs, g.theta), _grad_w(v_t, vs, g)


def expected_coarse_grad(
    v: ArrayLike, w: ArrayLike, v_star: ArrayLike, w_star: ArrayLike, ste: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Expected coarse gradient (E[dl/dv], E[g_mu]) of the STE ``ste`` ([Y19] section 3).

    The coarse w-gradient replaces sigma' by the STE derivative mu'::

        g_mu = Z^T (mu'(Z w) .* v) (v^T sigma(Z w) - y*(Z))

    identity mu' = 1, relu mu' = 1{x>0}, clipped_relu mu' = 1{0<x<1}. With
    h = |v|^2 + (1^T v)^2 - (1^T v)(1^T v*) + v^T v*, e = (u + w*)/|u + w*|::

        identity:      E g = (|v|^2 u - (v^T v*) w*) / sqrt(2 pi)
        relu:          E g = h/(2 sqrt(2 pi)) u - cos(theta/2) (v^T v*)/sqrt(2 pi) e
        clipped_relu:  E g = p(0,w) h/2 u - (v^T v*) csc(theta/2) q(theta,w) e
                              - (v^T v*) (p(theta,w) - cot(theta/2) q(theta,w)) u
                           = p(0,w) h/2 u - (v^T v*) (p(theta,w) u + q(theta,w) u_perp)

    with u_perp = P_w w*/|P_w w*| (the second form, used here, is regular at theta in
    {0, pi}); p, q from :func:`clipped_relu_pq` (closed form). The v-part needs no
    STE: E[dl/dv] = df/dv (Lemma 2). Leading dimensions broadcast; w = 0 raises.
    """
    ste = _check_ste(ste)
    v_t, w_t, vs, ws = _prep(v, w, v_star, w_star)
    g = _geometry(w_t, ws)
    return _grad_v(v_t, vs, g.theta), _coarse_w(v_t, vs, ws, g, ste)


def coarse_descent_ratio(
    v: ArrayLike, w: ArrayLike, v_star: ArrayLike, w_star: ArrayLike, ste: str
) -> torch.Tensor:
    """The ratio |E g_mu|^2 / (|df/dv|^2 + <E g_mu, df/dw>) of [Y19] claim (b).

    Numerator: squared norm of the w-part of the expected coarse gradient (as in
    docs/papers/yin2019.md);
    denominator: the inner product of the full expected coarse gradient (v- and
    w-parts) with the true gradient. For the identity STE it tends to infinity at the
    spurious minimizer with 1^T v* != 0, m > 1: a fixed step size eventually stops
    being a descent step there. Returns +inf where the denominator is 0.
    """
    ste = _check_ste(ste)
    v_t, w_t, vs, ws = _prep(v, w, v_star, w_star)
    g = _geometry(w_t, ws)
    gv = _grad_v(v_t, vs, g.theta)
    gw_true = _grad_w(v_t, vs, g)
    gw = _coarse_w(v_t, vs, ws, g, ste)
    num = (gw * gw).sum(-1)
    den = (gv * gv).sum(-1) + (gw * gw_true).sum(-1)
    return torch.where(den == 0, torch.full_like(num, math.inf), num / den)


# --------------------------------------------------------------------------- sampling


def _quantizer(ste: str) -> Any:
    from stelab.quantizers import Quantizer

    return Quantizer("heaviside", estimator=LIBRARY_ESTIMATOR[ste])


def _sample_z(batch: int, m: int, n: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(batch, m, n, generator=generator, dtype=torch.float64)


def batch_loss(
    z: torch.Tensor, v: ArrayLike, w: ArrayLike, v_star: ArrayLike, w_star: ArrayLike
) -> torch.Tensor:
    """Empirical loss (1/B) sum_b 1/2 (v^T sigma(Z_b w) - v*^T sigma(Z_b w*))^2 on a batch.

    ``z`` has shape (B, m, n). ``v`` (..., m) and ``w`` (..., n) may carry leading
    dimensions (e.g. a grid of step sizes); returns a tensor of that shape.
    """
    v_t, w_t, vs, ws = _prep(v, w, v_star, w_star, allow_zero_w=True)
    m, n = v_t.shape[-1], w_t.shape[-1]
    z = _check_z(z, m, n)
    lead = v_t.shape[:-1]
    vk, wk = v_t.reshape(-1, m), w_t.reshape(-1, n)  # (K, m), (K, n)
    zf = z.reshape(-1, n)  # (B m, n)
    pre = (zf @ wk.T).reshape(z.shape[0], m, -1)  # (B, m, K)
    out = ((pre > 0).to(z.dtype) * vk.T.unsqueeze(0)).sum(1).T  # (K, B)
    if bool((ws == ws.reshape(-1, n)[:1]).all()) and bool((vs == vs.reshape(-1, m)[:1]).all()):
        tgt = ((zf @ ws.reshape(-1, n)[0]).reshape(z.shape[0], m) > 0).to(z.dtype)
        tgt = (tgt @ vs.reshape(-1, m)[0]).unsqueeze(0)  # (1, B): one teacher for all
    else:
        pre_s = (zf @ ws.reshape(-1, n).T).reshape(z.shape[0], m, -1)
        tgt = ((pre_s > 0).to(z.dtype) * vs.reshape(-1, m).T.unsqueeze(0)).sum(1).T
    return (0.5 * ((out - tgt) ** 2).mean(-1)).reshape(lead)


def _check_z(z: Any, m: int, n: int) -> torch.Tensor:
    if not isinstance(z, torch.Tensor):
        raise StelabTypeError(
            f"z must be a torch.Tensor of shape (B, m, n), got {type(z).__name__}"
        )
    if z.ndim != 3 or z.shape[1] != m or z.shape[2] != n or z.shape[0] < 1:
        raise ConfigError(f"z must have shape (B >= 1, m={m}, n={n}), got {tuple(z.shape)}")
    return z.to(torch.float64)


def coarse_grad_on_batch(
    z: torch.Tensor, v: ArrayLike, w: ArrayLike, v_star: ArrayLike, w_star: ArrayLike, ste: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dl/dv, g_mu) averaged over the given batch ``z`` of shape (B, m, n).

    Computed with autograd through ``stelab.quantizers.Quantizer("heaviside",
    estimator=...)``: forward sigma(x) = 1{x > 0}, backward the STE derivative. The
    teacher output uses the plain forward. v, w, v_star, w_star must be 1-D.
    """
    ste = _check_ste(ste)
    v_t, w_t, vs, ws = _prep(v, w, v_star, w_star)
    if v_t.ndim != 1 or w_t.ndim != 1:
        raise ConfigError(
            f"v, w, v_star, w_star must be 1-D here, got v {tuple(v_t.shape)}, w {tuple(w_t.shape)}"
        )
    z = _check_z(z, v_t.shape[0], w_t.shape[0])
    act = _quantizer(ste)
    return _autograd_chunk(act, z, v_t, w_t, vs, ws, z.shape[0])


def _autograd_chunk(
    act: Any,
    z: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    vs: torch.Tensor,
    ws: torch.Tensor,
    total: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    v_ = v.detach().clone().requires_grad_(True)
    w_ = w.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = (act(z @ w_) * v_).sum(-1)
        with torch.no_grad():
            tgt = ((z @ ws > 0).to(z.dtype) * vs).sum(-1)
        loss = 0.5 * ((out - tgt) ** 2).sum() / total
        gv, gw = torch.autograd.grad(loss, (v_, w_))
    return loss.detach(), gv, gw


def sample_coarse_grad(
    v: ArrayLike,
    w: ArrayLike,
    v_star: ArrayLike,
    w_star: ArrayLike,
    ste: str,
    batch: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mini-batch coarse gradient (mean over ``batch`` samples of dl/dv and of g_mu).

    Draws Z_1..Z_B i.i.d. with N(0, 1) entries (shape (B, m, n), float64, from
    ``generator``) and backpropagates l = 1/(2B) sum_b (v^T sigma(Z_b w) - y*(Z_b))^2
    through the library quantizer ``Quantizer("heaviside", estimator=E)`` with E the
    library name of ``ste`` (identity -> "ste", relu -> "relu", clipped_relu ->
    "clipped_relu"). An unbiased estimate of :func:`expected_coarse_grad`. Sampling is
    done in chunks of at most ~4M entries of Z to bound memory. v, w, v_star, w_star
    must be 1-D.
    """
    ste = _check_ste(ste)
    batch = check_int("batch", batch, 1, 2**62)
    v_t, w_t, vs, ws = _prep(v, w, v_star, w_star)
    if v_t.ndim != 1 or w_t.ndim != 1:
        raise ConfigError(
            f"v, w, v_star, w_star must be 1-D here, got v {tuple(v_t.shape)}, w {tuple(w_t.shape)}"
        )
    m, n = v_t.shape[0], w_t.shape[0]
    act = _quantizer(ste)
    chunk = max(1, _CHUNK_ELEMS // (m * n))
    gv = torch.zeros(m, dtype=torch.float64)
    gw = torch.zeros(n, dtype=torch.float64)
    done = 0
    while done < batch:
        b = min(chunk, batch - done)
        z = _sample_z(b, m, n, generator)
        _, cv, cw = _autograd_chunk(act, z, v_t, w_t, vs, ws, batch)
        gv += cv
        gw += cw
        done += b
    return gv, gw


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
    vs = _as_f64("v_star", v_star)
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
        raise ConfigError("v_star must be nonzero, got a zero vector")

    def pt(kind: str, th: float, v: torch.Tensor) -> CriticalPoint:
        return CriticalPoint(
            kind, th, v, float(_loss(v, vs, torch.tensor(th, dtype=torch.float64)))
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
    ste = _check_ste(ste)
    lr = check_positive("lr", lr)
    steps = check_int("steps", steps, 0, 10**9)
    record_every = check_int("record_every", record_every, 1, 10**9)
    v, w, vs, ws = _prep(v0, w0, v_star, w_star)
    v, w = v.clone(), w.clone()
    recs: dict[str, list[torch.Tensor]] = {
        k: [] for k in ("step", "loss", "theta", "w_norm", "inner", "cosine", "coarse_norm")
    }
    max_inc: torch.Tensor | None = None
    min_wn: torch.Tensor | None = None
    prev: torch.Tensor | None = None
    for t in range(steps + 1):
        g = _geometry(w, ws)
        if bool((g.w_norm == 0).any()):
            raise ConfigError(f"coarse gradient descent reached w = 0 at step {t}")
        f = _loss(v, vs, g.theta)
        if prev is None:
            max_inc, min_wn = torch.full_like(f, -math.inf), g.w_norm.clone()
        else:
            max_inc = torch.maximum(max_inc, f - prev)
            min_wn = torch.minimum(min_wn, g.w_norm)
        prev = f
        gv = _grad_v(v, vs, g.theta)
        gw = _coarse_w(v, vs, ws, g, ste)
        if t % record_every == 0 or t == steps:
            gt = _grad_w(v, vs, g)
            inner = (gw * gt).sum(-1)
            cn, tn = gw.norm(dim=-1), gt.norm(dim=-1)
            den = cn * tn
            recs["step"].append(torch.tensor(t))
            recs["loss"].append(f)
            recs["theta"].append(g.theta)
            recs["w_norm"].append(g.w_norm)
            recs["inner"].append(inner)
            recs["cosine"].append(
                torch.where(den > 0, inner / torch.where(den > 0, den, 1.0), math.nan)
            )
            recs["coarse_norm"].append(cn)
        if t == steps:
            break
        v = v - lr * gv
        w = w - lr * gw
    st = {k: torch.stack(x) for k, x in recs.items()}
    return Trajectory(ste=ste, lr=lr, v=v, w=w, max_increase=max_inc, min_w_norm=min_wn, **st)
