"""Every SBN estimator, one fixed noise draw, against its formula written out in NumPy.

The unbiasedness tests (z-tests against the exact gradient) cannot see a wrong constant
that keeps an estimator unbiased: a leave-one-out baseline divided by M instead of
M - 1, an ARM centring ``U - c`` with c != 1/2 near the symmetric point, a flipped
sign inside a zero-mean control variate. Here the uniforms the library draws are
recorded (``uniform_like`` wrapped where it is looked up: :mod:`stelab.sbn.estimators`,
``.baselines``, ``.layers``), and a reference written from the docstring formulas
([S20] §2-3 and appendix; Williams 1992; Kool et al. 2019; Yin & Zhou 2019) consumes
them in the documented order and computes the estimate of one draw; the library's
gradient must equal it to ~1e-12 in float64. The reference also checks that every
recorded draw was used and had the documented shape, so a changed draw order fails too.

Net: 2 -> 3 -> 3 -> 2 -> 1 (so ARM's continuations cross two layers), 3 examples, M = 2
draws each (rows ``m*N + n``; also M = 3 for REINFORCE-LOO), logistic loss
``f = log(1 + exp(-eta t))``, logistic and Gaussian noise (and uniform noise for the
pathwise rules and PSA), both state parametrisations ``h = c0 + c1 s``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import special

import stelab.sbn.baselines as sbn_baselines
import stelab.sbn.estimators as sbn_estimators
import stelab.sbn.layers as sbn_layers
from stelab.sbn import logistic_loss, sbn_mlp
from stelab.sbn.noise import uniform_like

D = torch.float64
N = 3  # examples; the draws per example are Problem(samples=...)
TOL = dict(rtol=1e-11, atol=1e-13)

pytestmark = pytest.mark.usefixtures("one_thread")


# --- the noise: F, F', F^{-1}, written independently of stelab.sbn.noise ------------------


def _F(noise, a):
    if noise == "uniform":  # on [-1, 1]
        return np.clip((a + 1.0) / 2.0, 0.0, 1.0)
    return 1.0 / (1.0 + np.exp(-a)) if noise == "logistic" else special.ndtr(a)


def _pdf(noise, a):
    if noise == "uniform":
        return np.where(np.abs(a) < 1.0, 0.5, 0.0)
    if noise == "logistic":
        s = 1.0 / (1.0 + np.exp(-a))
        return s * (1.0 - s)
    return np.exp(-0.5 * a * a) / np.sqrt(2.0 * np.pi)


def _quantile(noise, u):
    if noise == "uniform":
        return 2.0 * u - 1.0
    return np.log(u / (1.0 - u)) if noise == "logistic" else special.ndtri(u)


def _f(eta, t):
    """Logistic loss per row; ``eta`` (R,), ``t`` (R,)."""
    return np.logaddexp(0.0, -eta * t)


def _fprime(eta, t):
    return -t / (1.0 + np.exp(eta * t))


class Problem:
    def __init__(self, noise, states, seed=0, samples=2):
        torch.manual_seed(seed)
        self.model = sbn_mlp(2, (3, 3, 2), 1, noise=noise, states=states, dtype=D)
        with torch.no_grad():
            for p in self.model.parameters():
                p.copy_(torch.randn_like(p) * 1.3)
        self.x = torch.randn(N, 2, dtype=D)
        self.t = torch.tensor([1.0, -1.0, 1.0], dtype=D)
        self.noise = noise
        self.c0, self.c1 = (0.0, 1.0) if states == "pm1" else (0.5, 0.5)
        self.W = [lay.weight.detach().numpy().copy() for lay in self.model.hidden]
        self.b = [lay.bias.detach().numpy().copy() for lay in self.model.hidden]
        self.V = self.model.output.weight.detach().numpy()[0].copy()
        self.c = float(self.model.output.bias.detach()[0])
        # replicated batch: row m*N + n is draw m of example n
        self.M, self.R = samples, samples * N
        self.X = np.tile(self.x.numpy(), (samples, 1))
        self.T = np.tile(self.t.numpy(), samples)

    def state(self, s):
        return self.c0 + self.c1 * s

    def sign(self, a, u):
        return np.where(u < _F(self.noise, a), 1.0, -1.0)

    def eta(self, h):
        return h @ self.V + self.c

    def output_grads(self, h, weight):
        """Gradient of ``sum_r weight_r f(eta_r)`` w.r.t. (V, c) along states ``h``."""
        g = weight * _fprime(self.eta(h), self.T)
        return g @ h, g.sum()


class Draws:
    """The recorded uniforms, consumed in order with their shape checked."""

    def __init__(self, recorded):
        self.recorded = recorded
        self.i = 0

    def next(self, shape):
        u = self.recorded[self.i]
        assert u.shape == shape, f"draw {self.i}: shape {u.shape}, documented {shape}"
        self.i += 1
        return u

    def all_used(self):
        assert self.i == len(self.recorded), f"{len(self.recorded) - self.i} draws unused"


@pytest.fixture
def recorded(monkeypatch):
    draws = []

    def rec(a, generator):
        u = uniform_like(a, generator)
        draws.append(u.detach().numpy().copy())
        return u

    for mod in (sbn_estimators, sbn_baselines, sbn_layers):
        monkeypatch.setattr(mod, "uniform_like", rec)
    return draws


def _library(pb, name, **opt):
    loss = pb.model.surrogate_loss(
        pb.x, pb.t, logistic_loss, name, samples=pb.M, generator=11, **opt
    )
    grads = torch.autograd.grad(loss, list(pb.model.parameters()))
    return float(loss.detach()), [g.numpy() for g in grads]


def _compare(got, want):
    value, grads = got
    want_value, want_grads = want
    assert value == pytest.approx(want_value, rel=1e-12)
    assert len(grads) == len(want_grads)
    for g, w in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, np.reshape(w, g.shape), **TOL)


def _pack(pb, dW, db, dV, dc):
    out = []
    for k in range(len(pb.W)):
        out += [dW[k], db[k]]
    return out + [dV[None], np.array([dc])]


# --- references ------------------------------------------------------------------------


def ref_pathwise(pb, draws, name, tau=1.0):
    """One path with ``x = act(a, U)`` forward and ``dx/da`` backward, by hand:
    dst: sign forward, 2F'(a);  hard_st: sign, 1{|a| < 1};  gumbel_st: sign,
    (1 - r^2)/(2 tau) with r = tanh((a - Z)/(2 tau));  concrete: r forward and backward,
    value = loss of the hard path with the same U;  tanh_mf: 2F(a) - 1 forward, 2F'(a)
    backward over the un-replicated batch, value = loss of a sampled path (one draw per
    layer, drawn after the mean-field pass)."""
    rows = N if name == "tanh_mf" else pb.R
    h = pb.X[:rows]
    hs, slopes, us = [h], [], []
    for W, b in zip(pb.W, pb.b, strict=True):
        a = h @ W.T + b
        if name == "tanh_mf":
            x, slope = 2.0 * _F(pb.noise, a) - 1.0, 2.0 * _pdf(pb.noise, a)
        else:
            u = draws.next(a.shape)
            us.append(u)
            r = np.tanh((a - _quantile(pb.noise, u)) / (2.0 * tau))
            x = r if name == "concrete" else pb.sign(a, u)
            if name == "dst":
                slope = 2.0 * _pdf(pb.noise, a)
            elif name == "hard_st":
                slope = (np.abs(a) < 1.0).astype(float)
            else:  # gumbel_st, concrete: d tanh((a - Z)/(2 tau)) / da
                slope = (1.0 - r * r) / (2.0 * tau)
        h = pb.state(x)
        hs.append(h)
        slopes.append(slope)
    t = pb.T[:rows]
    g_eta = _fprime(pb.eta(h), t) / rows
    dV, dc = g_eta @ h, g_eta.sum()
    dh = np.outer(g_eta, pb.V)
    dW, db = [None] * len(pb.W), [None] * len(pb.W)
    for k in range(len(pb.W) - 1, -1, -1):
        da = dh * pb.c1 * slopes[k]
        dW[k], db[k] = da.T @ hs[k], da.sum(0)
        dh = da @ pb.W[k]
    # the value: the loss of a hard path
    if name in ("dst", "hard_st", "gumbel_st"):
        value = _f(pb.eta(h), pb.T).mean()
    else:
        hh = pb.X
        for k, (W, b) in enumerate(zip(pb.W, pb.b, strict=True)):
            a = hh @ W.T + b
            u = us[k] if name == "concrete" else draws.next(a.shape)
            hh = pb.state(pb.sign(a, u))
        value = _f(pb.eta(hh), pb.T).mean()
    draws.all_used()
    return value, _pack(pb, dW, db, dV, dc)


def ref_reinforce(pb, draws, loo):
    """surrogate = mean_r [f_r + sg(f_r - b_r) sum_k sum_j log F(s_j a_j)];
    b_r = 0, or (leave-one-out) b_{mN+n} = sum_{m' != m} f_{m'N+n} / (M - 1)."""
    h, hs, scores = pb.X, [pb.X], []
    for W, b in zip(pb.W, pb.b, strict=True):
        a = h @ W.T + b
        s = pb.sign(a, draws.next(a.shape))
        # d/da log F(s a) = s F'(a) / F(s a)   (F' symmetric)
        scores.append(s * _pdf(pb.noise, a) / _F(pb.noise, s * a))
        h = pb.state(s)
        hs.append(h)
    draws.all_used()
    f = _f(pb.eta(h), pb.T)
    adv = f.copy()
    if loo:
        for m in range(pb.M):
            for n in range(N):
                others = [f[mm * N + n] for mm in range(pb.M) if mm != m]
                adv[m * N + n] = f[m * N + n] - sum(others) / (pb.M - 1)
    dW = [(adv[:, None] * sc).T @ hs[k] / pb.R for k, sc in enumerate(scores)]
    db = [(adv[:, None] * sc).sum(0) / pb.R for sc in scores]
    dV, dc = pb.output_grads(h, np.full(pb.R, 1.0 / pb.R))
    return f.mean(), _pack(pb, dW, db, dV, dc)


def _dphi(pb, a):
    """d/da of phi(a) = log F(a) - log F(-a)."""
    p = _pdf(pb.noise, a)
    return p / _F(pb.noise, a) + p / _F(pb.noise, -a)


def _continue(pb, h, k, u):
    """Run the layers above k from states ``h`` with the uniforms ``u`` (one per layer)."""
    for j, uj in zip(range(k + 1, len(pb.W)), u, strict=True):
        h = pb.state(pb.sign(h @ pb.W[j].T + pb.b[j], uj))
    return _f(pb.eta(h), pb.T)


def _arm_layer(pb, draws, k, a, shared):
    """(f(x1) - f(x2)) (U - 1/2) dphi/da for layer k, x1 = 1{U > F(-a)}, x2 = 1{U < F(a)}:
    draws U, then per layer above one uniform for x1's continuation and one for x2's
    (``shared``: one for both). Returns (the sign x1, d surrogate / d a)."""
    U = draws.next(a.shape)
    x1 = np.where(U > _F(pb.noise, -a), 1.0, -1.0)
    x2 = np.where(U < _F(pb.noise, a), 1.0, -1.0)
    u1, u2 = [], []
    for j in range(k + 1, len(pb.W)):
        u1.append(draws.next((pb.R, pb.W[j].shape[0])))
        u2.append(u1[-1] if shared else draws.next((pb.R, pb.W[j].shape[0])))
    f1, f2 = _continue(pb, pb.state(x1), k, u1), _continue(pb, pb.state(x2), k, u2)
    return x1, (f1 - f2)[:, None] * (U - 0.5) * _dphi(pb, a)


def ref_arm(pb, draws):
    """ARM per layer along the path x^k = x1 (independent continuations)."""
    h, dW, db = pb.X, [], []
    for k, (W, b) in enumerate(zip(pb.W, pb.b, strict=True)):
        a = h @ W.T + b
        x1, ga = _arm_layer(pb, draws, k, a, shared=False)
        dW.append(ga.T @ h / pb.R)
        db.append(ga.sum(0) / pb.R)
        h = pb.state(x1)
    draws.all_used()
    dV, dc = pb.output_grads(h, np.full(pb.R, 1.0 / pb.R))
    return _f(pb.eta(h), pb.T).mean(), _pack(pb, dW, db, dV, dc)


def ref_arm_shared(pb, draws):
    """ARM with shared continuation noise; the base path (one draw per layer) first."""
    h, hs, pre = pb.X, [pb.X], []
    for W, b in zip(pb.W, pb.b, strict=True):
        a = h @ W.T + b
        h = pb.state(pb.sign(a, draws.next(a.shape)))
        pre.append(a)
        hs.append(h)
    dW, db = [], []
    for k, a in enumerate(pre):
        _, ga = _arm_layer(pb, draws, k, a, shared=True)
        dW.append(ga.T @ hs[k] / pb.R)
        db.append(ga.sum(0) / pb.R)
    draws.all_used()
    dV, dc = pb.output_grads(h, np.full(pb.R, 1.0 / pb.R))
    return _f(pb.eta(h), pb.T).mean(), _pack(pb, dW, db, dV, dc)


def ref_psa(pb, draws, output):
    """PSA ([S20] §3), row by row with loops:
    d^L_j = f(eta - 2 c1 V_j s_j) - f(eta);  e^k_j = -s^k_j d^k_j;  ga^k_j = e^k_j F'(a^k_j);
    d^{k-1}_i = sum_j e^k_j [F(a^k_j - 2 c1 W^k_ji s^{k-1}_i) - F(a^k_j)];
    output "local": grad of mean_j [pi_j f(eta) + (1 - pi_j) f(eta_(j))], pi_j = F(s_j a_j);
    "sample": grad f(eta)."""
    h, hs, ss, pre = pb.X, [pb.X], [], []
    for W, b in zip(pb.W, pb.b, strict=True):
        a = h @ W.T + b
        s = pb.sign(a, draws.next(a.shape))
        h = pb.state(s)
        pre.append(a)
        ss.append(s)
        hs.append(h)
    draws.all_used()
    L = len(pb.W)
    dW = [np.zeros_like(W) for W in pb.W]
    db = [np.zeros_like(b) for b in pb.b]
    dV, dc = np.zeros_like(pb.V), 0.0
    J = pb.V.shape[0]
    for r in range(pb.R):
        t = pb.T[r]
        eta = pb.eta(hs[L][r])
        d = np.zeros(J)
        for j in range(J):
            eta_j = eta - 2.0 * pb.c1 * pb.V[j] * ss[L - 1][r, j]
            d[j] = _f(eta_j, t) - _f(eta, t)
            if output == "local":
                pi = _F(pb.noise, ss[L - 1][r, j] * pre[L - 1][r, j])
                g0, gj = _fprime(eta, t), _fprime(eta_j, t)
                for i in range(J):
                    dflip = hs[L][r, i] - (2.0 * pb.c1 * ss[L - 1][r, j] if i == j else 0.0)
                    dV[i] += (pi * g0 * hs[L][r, i] + (1.0 - pi) * gj * dflip) / (J * pb.R)
                dc += (pi * g0 + (1.0 - pi) * gj) / (J * pb.R)
        if output == "sample":
            dV += _fprime(eta, t) * hs[L][r] / pb.R
            dc += _fprime(eta, t) / pb.R
        for k in range(L - 1, -1, -1):
            a, s = pre[k][r], ss[k][r]
            e = -s * d
            ga = e * _pdf(pb.noise, a)
            dW[k] += np.outer(ga, hs[k][r]) / pb.R
            db[k] += ga / pb.R
            if k > 0:
                below = ss[k - 1][r]
                d = np.zeros(len(below))
                for i in range(len(below)):
                    for j in range(len(a)):
                        shifted = a[j] - 2.0 * pb.c1 * pb.W[k][j, i] * below[i]
                        d[i] += e[j] * (_F(pb.noise, shifted) - _F(pb.noise, a[j]))
    value = _f(pb.eta(hs[L]), pb.T).mean()
    return value, _pack(pb, dW, db, dV, dc)


# --- tests -----------------------------------------------------------------------------

CASES = [(n, s) for n in ("logistic", "gaussian") for s in ("pm1", "01")]
# uniform noise has P(s) = 0 states (log F = -inf), so only for the pathwise rules and PSA
WITH_UNIFORM = CASES + [("uniform", "pm1"), ("uniform", "01")]


@pytest.mark.parametrize("noise,states", WITH_UNIFORM)
@pytest.mark.parametrize(
    "name,opt",
    [
        ("dst", {}),
        ("hard_st", {}),
        ("gumbel_st", {"tau": 0.7}),
        ("concrete", {"tau": 0.7}),
        ("tanh_mf", {}),
    ],
)
def test_pathwise_estimators_equal_their_formula_on_one_draw(recorded, noise, states, name, opt):
    pb = Problem(noise, states)
    got = _library(pb, name, **opt)
    _compare(got, ref_pathwise(pb, Draws(recorded), name, **opt))


@pytest.mark.parametrize("noise,states", CASES)
@pytest.mark.parametrize("name", ["reinforce", "reinforce_loo"])
def test_score_function_estimators_equal_their_formula_on_one_draw(recorded, noise, states, name):
    pb = Problem(noise, states)
    got = _library(pb, name)
    _compare(got, ref_reinforce(pb, Draws(recorded), loo=name == "reinforce_loo"))


def test_reinforce_loo_with_three_samples_uses_the_m_minus_1_divisor(recorded):
    """M = 3: each baseline is the mean of the 2 other samples (divisor M - 1 = 2)."""
    pb = Problem("logistic", "pm1", seed=4, samples=3)
    _compare(_library(pb, "reinforce_loo"), ref_reinforce(pb, Draws(recorded), loo=True))


@pytest.mark.parametrize("noise,states", CASES)
def test_arm_equals_its_formula_on_one_draw(recorded, noise, states):
    pb = Problem(noise, states)
    _compare(_library(pb, "arm"), ref_arm(pb, Draws(recorded)))


@pytest.mark.parametrize("noise,states", CASES)
def test_arm_shared_equals_its_formula_on_one_draw(recorded, noise, states):
    pb = Problem(noise, states)
    _compare(_library(pb, "arm_shared"), ref_arm_shared(pb, Draws(recorded)))


@pytest.mark.parametrize("noise,states", WITH_UNIFORM)
@pytest.mark.parametrize("output", ["local", "sample"])
def test_psa_equals_its_formula_on_one_draw(recorded, noise, states, output):
    pb = Problem(noise, states)
    got = _library(pb, "psa", output=output, kernel="eager")
    _compare(got, ref_psa(pb, Draws(recorded), output))


def test_the_recorder_sees_every_draw(recorded):
    """The wrapper is where the draws happen: with it in place a seeded call records one
    tensor per hidden layer (the path estimators' documented randomness)."""
    pb = Problem("logistic", "pm1")
    _library(pb, "dst")
    assert [u.shape for u in recorded] == [(pb.R, 3), (pb.R, 3), (pb.R, 2)]
    assert all(((u > 0) & (u < 1)).all() for u in recorded)


def test_noise_density_and_cdf_at_the_uniform_kinks():
    """F' and F of uniform noise at and next to its kinks |a| = 1 (the draws above rarely
    land there): 1/2 strictly inside, 0 from |a| = 1 on."""
    from stelab.sbn.noise import get_noise

    a = torch.tensor([-1.5, -1.0, -0.999, -0.98, 0.0, 0.98, 0.999, 1.0, 1.5], dtype=D)
    noise = get_noise("uniform")
    np.testing.assert_array_equal(noise.pdf(a).numpy(), _pdf("uniform", a.numpy()))
    np.testing.assert_allclose(noise.cdf(a).numpy(), _F("uniform", a.numpy()), rtol=0, atol=0)


def test_samples_default_to_one_draw(recorded):
    """Both entry points (the function and the SBN method) draw once per example."""
    pb = Problem("logistic", "pm1")
    sbn_estimators.surrogate_loss(pb.model, pb.x, pb.t, logistic_loss, "psa", generator=3)
    pb.model.surrogate_loss(pb.x, pb.t, logistic_loss, "psa", generator=3)
    assert [u.shape for u in recorded] == [(N, 3), (N, 3), (N, 2)] * 2


def test_the_base_noise_and_pathwise_rule_leave_their_formulas_to_subclasses():
    """Noise declares F, F', F^{-1} and _Pathwise the relaxed sign: a subclass that
    leaves one out fails loudly instead of drawing from a default."""
    from stelab.sbn.noise import Noise

    a = torch.zeros(2, dtype=D)
    for method in (Noise().cdf, Noise().pdf, Noise().quantile):
        with pytest.raises(NotImplementedError):
            method(a)
    with pytest.raises(NotImplementedError):
        sbn_baselines._Pathwise().act(torch.nn.Identity(), a, a)


def test_get_noise_takes_a_noise_as_is_and_refuses_other_types():
    from stelab.errors import StelabTypeError
    from stelab.sbn.noise import Gaussian, get_noise

    g = Gaussian()
    assert get_noise(g) is g
    assert repr(get_noise("uniform")) == "uniform" and type(get_noise("gaussian")) is Gaussian
    msg = r"noise must be a name \(gaussian, logistic, uniform\) or a Noise, got int"
    with pytest.raises(StelabTypeError, match=msg):
        get_noise(3)
