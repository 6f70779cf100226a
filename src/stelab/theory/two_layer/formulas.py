"""Closed forms of the two-layer model: population loss and gradient, expected coarse gradients.

[Y19] Lemmas 1-2 and section 3, with the special functions they need (xi and the
clipped-ReLU integrals p, q, evaluated in closed form). The model and its conventions
are described in :mod:`stelab.theory.two_layer`.
"""

from __future__ import annotations

import math
import warnings

import torch

from stelab.errors import ConfigError, unknown
from stelab.theory.two_layer.model import ArrayLike, Geometry, check_ste, geometry, prepare

__all__ = [
    "clipped_relu_pq",
    "coarse_descent_ratio",
    "expected_coarse_grad",
    "population_grad",
    "population_loss",
    "xi",
]

_SQRT_2PI = math.sqrt(2.0 * math.pi)


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


def loss_from_angle(v: torch.Tensor, vs: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
    """f of [Y19] Lemma 1 from v, v* and theta (prepared tensors, w != 0)."""
    sv, svs = v.sum(-1), vs.sum(-1)
    vv = (v * vs).sum(-1)
    return 0.125 * (
        (v * v).sum(-1)
        + sv * sv
        - 2.0 * ((1.0 - 2.0 * th / math.pi) * vv + sv * svs)
        + (vs * vs).sum(-1)
        + svs * svs
    )


def grad_v_from_angle(v: torch.Tensor, vs: torch.Tensor, th: torch.Tensor) -> torch.Tensor:
    """df/dv of [Y19] Lemma 2 from v, v* and theta."""
    return 0.25 * (v + v.sum(-1, keepdim=True)) - 0.25 * (
        (1.0 - 2.0 * th / math.pi).unsqueeze(-1) * vs + vs.sum(-1, keepdim=True)
    )


def grad_w_from_geometry(v: torch.Tensor, vs: torch.Tensor, g: Geometry) -> torch.Tensor:
    """df/dw of [Y19] Lemma 2 (0 where w is parallel to w*)."""
    vv = (v * vs).sum(-1)
    return (-vv / (2.0 * math.pi * g.w_norm)).unsqueeze(-1) * g.u_perp


def coarse_w_from_geometry(
    v: torch.Tensor, vs: torch.Tensor, ws: torch.Tensor, g: Geometry, ste: str
) -> torch.Tensor:
    """E[g_mu], the w-part of the expected coarse gradient of ``ste``
    (see :func:`expected_coarse_grad`)."""
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
    v_t, w_t, vs, ws = prepare(v, w, v_star, w_star, allow_zero_w=True)
    g = geometry(w_t, ws)
    f = loss_from_angle(v_t, vs, g.theta)
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
    v_t, w_t, vs, ws = prepare(v, w, v_star, w_star)
    g = geometry(w_t, ws)
    return grad_v_from_angle(v_t, vs, g.theta), grad_w_from_geometry(v_t, vs, g)


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
    ste = check_ste(ste)
    v_t, w_t, vs, ws = prepare(v, w, v_star, w_star)
    g = geometry(w_t, ws)
    return grad_v_from_angle(v_t, vs, g.theta), coarse_w_from_geometry(v_t, vs, ws, g, ste)


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
    ste = check_ste(ste)
    v_t, w_t, vs, ws = prepare(v, w, v_star, w_star)
    g = geometry(w_t, ws)
    gv = grad_v_from_angle(v_t, vs, g.theta)
    gw_true = grad_w_from_geometry(v_t, vs, g)
    gw = coarse_w_from_geometry(v_t, vs, ws, g, ste)
    num = (gw * gw).sum(-1)
    den = (gv * gv).sum(-1) + (gw * gw_true).sum(-1)
    return torch.where(den == 0, torch.full_like(num, math.inf), num / den)
