"""Tests of stelab.theory.two_layer against independent truth.

Truth sources: Monte Carlo with >= 10^6 samples of an independent plain-torch
implementation of the model (tolerance 5 standard errors per coordinate; a false alarm
has probability about 5.7e-7 per coordinate, ~1e-4 for the whole file, and the seeds are
fixed so a run is deterministic), central finite differences of the closed-form loss,
scipy quadrature of [Y19]'s integrals for p and q, and the closed forms of the inner
products and of |E g_id| at the spurious minimizer ([Y19], docs/papers/yin2019.md).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from stelab.errors import ConfigError, StelabTypeError
from stelab.theory import two_layer as tl

F64 = torch.float64
SQ2PI = math.sqrt(2 * math.pi)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _point(seed: int, m: int, n: int, w_norm: float, angle: float):
    g = _gen(seed)
    vs = torch.randn(m, generator=g, dtype=F64)
    ws = torch.randn(n, generator=g, dtype=F64)
    v = torch.randn(m, generator=g, dtype=F64)
    w = tl.w_at_angle(ws, angle, norm=w_norm, generator=g)
    return v, w, vs, ws


# --------------------------------------------------------------------------- Monte Carlo truth


def _mc(v, w, vs, ws, n_samples: int, seed: int, chunk: int = 200_000):
    """Independent MC: mean and standard error of l, dl/dv and g_mu for the three STEs."""
    g = _gen(seed)
    m, n = v.shape[0], w.shape[0]
    names = ["loss", "gv", "identity", "relu", "clipped_relu"]
    s1 = {k: 0.0 for k in names}
    s2 = {k: 0.0 for k in names}
    done = 0
    while done < n_samples:
        b = min(chunk, n_samples - done)
        z = torch.randn(b, m, n, generator=g, dtype=F64)
        pre = z @ w
        act = (pre > 0).to(F64)
        r = (act * v).sum(-1) - ((z @ ws > 0).to(F64) * vs).sum(-1)
        vals = {"loss": 0.5 * r**2, "gv": act * r[:, None]}
        mus = {
            "identity": torch.ones_like(pre),
            "relu": (pre > 0).to(F64),
            "clipped_relu": ((pre > 0) & (pre < 1)).to(F64),
        }
        for k, mu in mus.items():
            vals[k] = ((mu * v).unsqueeze(-1) * z).sum(1) * r[:, None]
        for k in names:
            s1[k] = s1[k] + vals[k].sum(0)
            s2[k] = s2[k] + (vals[k] ** 2).sum(0)
        done += b
    out = {}
    for k in names:
        mean = s1[k] / n_samples
        var = s2[k] / n_samples - mean**2
        out[k] = (mean, (var.clamp_min(0) / n_samples).sqrt())
    return out


@pytest.fixture(scope="module", params=[(0.6, 1.0), (2.5, 2.4)], ids=["w0.6-th1.0", "w2.5-th2.4"])
def mc_case(request):
    w_norm, angle = request.param
    v, w, vs, ws = _point(11, 3, 4, w_norm, angle)
    ws = 3.0 * ws  # not unit norm on purpose: only the direction of w* matters
    return (v, w, vs, ws), _mc(v, w, vs, ws, 1_000_000, seed=12)


def _within(est, mean, se, k=5.0):
    est = torch.as_tensor(est, dtype=F64)
    dev = (est - mean).abs()
    assert bool((dev <= k * se + 1e-12).all()), f"dev {dev} > {k} SE {se}"


def test_lemma1_loss_vs_monte_carlo(mc_case):
    (v, w, vs, ws), mc = mc_case
    _within(tl.population_loss(v, w, vs, ws), *mc["loss"])


@pytest.mark.parametrize("ste", tl.STES)
def test_expected_coarse_grad_vs_monte_carlo(mc_case, ste):
    (v, w, vs, ws), mc = mc_case
    gv, gw = tl.expected_coarse_grad(v, w, vs, ws, ste)
    _within(gw, *mc[ste])
    _within(gv, *mc["gv"])  # E[dl/dv] = df/dv, no STE involved
    # the coarse gradient is not the zero true gradient: it is clearly nonzero here
    assert float(gw.norm()) > 10 * float(mc[ste][1].max())


def test_loss_at_w_zero_vs_monte_carlo():
    g = _gen(3)
    vs, ws = torch.randn(3, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    v = torch.randn(3, generator=g, dtype=F64)
    z = torch.randn(1_000_000, 3, 4, generator=g, dtype=F64)
    ell = 0.5 * (((z @ ws > 0).to(F64) * vs).sum(-1)) ** 2  # sigma(Z 0) = 0
    f = tl.population_loss(v, torch.zeros(4), vs, ws)
    _within(f, ell.mean(), ell.std() / 1000.0)
    assert float(f) == pytest.approx(float(vs @ vs + vs.sum() ** 2) / 8, rel=1e-14)


# --------------------------------------------------------------------------- true gradient


def test_population_grad_vs_finite_differences():
    g = _gen(5)
    m, n, k = 4, 6, 5
    vs, ws = torch.randn(m, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)
    v = torch.randn(k, m, generator=g, dtype=F64)
    w = torch.randn(k, n, generator=g, dtype=F64) * torch.tensor([0.3, 1, 2, 5, 0.7])[:, None]
    gv, gw = tl.population_grad(v, w, vs, ws)
    h = 1e-6
    for i in range(m):
        e = torch.zeros(m, dtype=F64)
        e[i] = h
        fd = (tl.population_loss(v + e, w, vs, ws) - tl.population_loss(v - e, w, vs, ws)) / (2 * h)
        torch.testing.assert_close(gv[:, i], fd, rtol=1e-6, atol=1e-8)
    for i in range(n):
        e = torch.zeros(n, dtype=F64)
        e[i] = h
        fd = (tl.population_loss(v, w + e, vs, ws) - tl.population_loss(v, w - e, vs, ws)) / (2 * h)
        torch.testing.assert_close(gw[:, i], fd, rtol=1e-6, atol=1e-8)


def test_population_grad_at_parallel_w_is_zero_by_convention():
    v, _, vs, ws = _point(2, 3, 5, 1.0, 0.5)
    for sign in (1.0, -1.0):  # theta = 0 and theta = pi
        gv, gw = tl.population_grad(v, sign * 2.0 * ws, vs, ws)
        assert float(gw.abs().max()) == 0.0
        th = 0.0 if sign > 0 else math.pi
        ref = 0.25 * (v + v.sum()) - 0.25 * ((1 - 2 * th / math.pi) * vs + vs.sum())
        torch.testing.assert_close(gv, ref)


def test_population_grad_rejects_w_zero():
    v, _, vs, ws = _point(2, 3, 5, 1.0, 0.5)
    with pytest.raises(ConfigError, match="w must be nonzero"):
        tl.population_grad(v, torch.zeros(5), vs, ws)
    with pytest.raises(ConfigError, match="w must be nonzero"):
        tl.expected_coarse_grad(v, torch.zeros(5), vs, ws, "relu")


# ---------------------------------------------------------------- p, q and inner products


def test_pq_closed_form_vs_quadrature():
    th = torch.tensor(
        [0.0, 1e-4, 0.2, 0.9, math.pi / 2, 2.0, 2.9, math.pi - 1e-4, math.pi], dtype=F64
    )
    for wn in (0.05, 0.4, 1.0, 3.0, 50.0):
        p, q = tl.clipped_relu_pq(th, wn)
        pq_, qq_ = tl.clipped_relu_pq(th, wn, method="quadrature")
        torch.testing.assert_close(p, pq_, rtol=0, atol=1e-12)
        torch.testing.assert_close(q, qq_, rtol=0, atol=1e-12)
        p0 = (1 - math.exp(-0.5 / wn**2)) / SQ2PI
        assert float(p[0]) == pytest.approx(p0, rel=1e-9, abs=1e-15)
        assert float(p[-1]) == 0.0 and float(q[0]) == 0.0 and abs(float(q[-1])) < 1e-15


def test_xi_closed_form_vs_quadrature():
    from scipy import integrate

    for x in (0.0, 0.3, 1.0, 2.5, 8.0):
        ref = integrate.quad(lambda r: r * r * math.exp(-r * r / 2), 0, x)[0]
        assert float(tl.xi(x)) == pytest.approx(ref, abs=1e-13)
    assert float(tl.xi(math.inf)) == pytest.approx(math.sqrt(math.pi / 2))


def test_inner_products_match_closed_forms():
    g = _gen(8)
    m, n, k = 4, 7, 12
    vs, ws = torch.randn(m, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)
    v = torch.randn(k, m, generator=g, dtype=F64)
    norms = torch.logspace(-1, 1, k, dtype=F64)
    angles = torch.linspace(0.05, math.pi - 0.05, k, dtype=F64)
    w = torch.stack(
        [
            tl.w_at_angle(ws, float(a), norm=float(r), generator=g)
            for a, r in zip(angles, norms, strict=True)
        ]
    )
    _, df_dw = tl.population_grad(v, w, vs, ws)
    vv2 = (v @ vs) ** 2
    th = tl.theta(w, ws)
    torch.testing.assert_close(th, angles, rtol=0, atol=1e-12)
    _, q_quad = tl.clipped_relu_pq(th, norms, method="quadrature")
    expected = {
        "relu": torch.sin(th) / (2 * (2 * math.pi) ** 1.5 * norms) * vv2,
        "clipped_relu": q_quad / (2 * math.pi * norms) * vv2,
    }
    for ste, ref in expected.items():
        _, gw = tl.expected_coarse_grad(v, w, vs, ws, ste)
        inner = (gw * df_dw).sum(-1)
        torch.testing.assert_close(inner, ref, rtol=1e-10, atol=1e-14)
        assert bool((inner >= 0).all())
    # identity: computed directly from E g_id = (|v|^2 u - (v^T v*) w*)/sqrt(2 pi)
    wsu = ws / ws.norm()
    u = w / w.norm(dim=-1, keepdim=True)
    eg = ((v * v).sum(-1, keepdim=True) * u - (v @ vs)[:, None] * wsu) / SQ2PI
    _, gw = tl.expected_coarse_grad(v, w, vs, ws, "identity")
    torch.testing.assert_close(gw, eg)
    perp = wsu - (u @ wsu)[:, None] * u
    direct = (
        eg * (-(v @ vs) / (2 * math.pi * norms))[:, None] * perp / perp.norm(dim=-1, keepdim=True)
    ).sum(-1)
    torch.testing.assert_close((gw * df_dw).sum(-1), direct, rtol=1e-10, atol=1e-14)


def test_expected_coarse_grad_matches_spec_formulas_as_written():
    """The paper's e-form formulas, with p, q from quadrature (precise where MC is only ~1%)."""
    g = _gen(9)
    m, n = 4, 6
    vs, ws = torch.randn(m, generator=g, dtype=F64), torch.randn(n, generator=g, dtype=F64)
    wsu = ws / ws.norm()
    for angle, norm in ((0.3, 0.5), (1.2, 1.0), (2.0, 2.0), (2.9, 4.0)):
        v = torch.randn(m, generator=g, dtype=F64)
        w = tl.w_at_angle(ws, angle, norm=norm, generator=g)
        u = w / w.norm()
        e = (u + wsu) / (u + wsu).norm()
        vv, s1, s1s = float(v @ vs), float(v.sum()), float(vs.sum())
        h = float(v @ v) + s1**2 - s1 * s1s + vv
        relu = h / (2 * SQ2PI) * u - math.cos(angle / 2) * vv / SQ2PI * e
        p0, _ = tl.clipped_relu_pq(0.0, norm, method="quadrature")
        p, q = tl.clipped_relu_pq(angle, norm, method="quadrature")
        p0, p, q = float(p0), float(p), float(q)
        crelu = (
            p0 * h / 2 * u
            - vv / math.sin(angle / 2) * q * e
            - vv * (p - q / math.tan(angle / 2)) * u
        )
        torch.testing.assert_close(tl.expected_coarse_grad(v, w, vs, ws, "relu")[1], relu)
        torch.testing.assert_close(
            tl.expected_coarse_grad(v, w, vs, ws, "clipped_relu")[1], crelu, rtol=1e-9, atol=1e-12
        )


# --------------------------------------------------------------------------- critical points


@pytest.mark.parametrize("m", [2, 3, 6])
def test_identity_norm_at_spurious_minimizer(m):
    g = _gen(20 + m)
    for _ in range(3):
        vs, ws = torch.randn(m, generator=g, dtype=F64), torch.randn(9, generator=g, dtype=F64)
        cp = tl.critical_points(vs)
        w = tl.w_at_angle(ws, math.pi, norm=1.7)
        _, gw = tl.expected_coarse_grad(cp.spurious_min.v, w, vs, ws, "identity")
        ref = 2 * (m - 1) / (SQ2PI * (m + 1) ** 2) * float(vs.sum()) ** 2
        assert float(gw.norm()) == pytest.approx(ref, rel=1e-12)
        assert ref > 0
        for ste in ("relu", "clipped_relu"):
            _, gw = tl.expected_coarse_grad(cp.spurious_min.v, w, vs, ws, ste)
            assert float(gw.norm()) < 1e-14


def _teacher_with_saddle(seed: int, m: int = 5):
    g = _gen(seed)
    while True:
        vs = torch.randn(m, generator=g, dtype=F64)
        if float(vs.sum()) ** 2 < (m + 1) / 2 * float(vs @ vs) and abs(float(vs.sum())) > 0.3:
            return vs, torch.randn(8, generator=g, dtype=F64)


def test_critical_points_are_critical():
    vs, ws = _teacher_with_saddle(1)
    cp = tl.critical_points(vs)
    assert cp.spurious_is_local_min and cp.saddle is not None
    assert 0 < cp.saddle.theta < math.pi
    assert cp.global_min.loss == pytest.approx(0.0, abs=1e-15)
    for pt, zero_coarse in (
        (cp.global_min, tl.STES),
        (cp.spurious_min, ("relu", "clipped_relu")),
        (cp.saddle, ("relu", "clipped_relu")),
    ):
        for norm in (0.5, 2.0):
            w = tl.w_at_angle(ws, pt.theta, norm=norm, generator=_gen(2))
            gv, gw = tl.population_grad(pt.v, w, vs, ws)
            assert float(gv.abs().max()) < 1e-14, pt.kind
            assert float(gw.abs().max()) < 1e-14, pt.kind
            assert float(tl.population_loss(pt.v, w, vs, ws)) == pytest.approx(pt.loss, abs=1e-14)
            for ste in tl.STES:
                cgv, cgw = tl.expected_coarse_grad(pt.v, w, vs, ws, ste)
                assert float(cgv.abs().max()) < 1e-14
                if ste in zero_coarse:
                    assert float(cgw.abs().max()) < 1e-13, (pt.kind, ste)
                else:  # identity does not vanish at the spurious point or the saddle
                    assert float(cgw.norm()) > 1e-3, (pt.kind, ste)


def test_spurious_minimizer_is_a_local_minimum_and_saddle_is_not():
    vs, ws = _teacher_with_saddle(4)
    cp = tl.critical_points(vs)
    g = _gen(5)
    m = vs.shape[0]
    for _ in range(200):  # random nearby points never do better than the spurious value
        dv = 1e-3 * torch.randn(m, generator=g, dtype=F64)
        w = tl.w_at_angle(ws, math.pi - 1e-3 * float(torch.rand(1, generator=g)), generator=g)
        assert float(tl.population_loss(cp.spurious_min.v + dv, w, vs, ws)) >= cp.spurious_min.loss
    # at the saddle: along v the loss goes up, along theta (with v re-optimised) it goes down
    sd = cp.saddle
    w_s = tl.w_at_angle(ws, sd.theta, generator=g)
    up = tl.population_loss(sd.v + 1e-3 * torch.randn(m, generator=g, dtype=F64), w_s, vs, ws)
    assert float(up) > sd.loss
    eye, jm = torch.eye(m, dtype=F64), torch.ones(m, m, dtype=F64)
    th = sd.theta - 1e-2
    v_opt = torch.linalg.solve(eye + jm, ((1 - 2 * th / math.pi) * eye + jm) @ vs)
    down = tl.population_loss(v_opt, tl.w_at_angle(ws, th, generator=g), vs, ws)
    assert float(down) < sd.loss


def test_no_saddle_when_condition_fails():
    vs = torch.tensor([1.0, 1.0, 1.0, 1.0], dtype=F64)  # (1^T v*)^2 = 16 >= (m+1)/2 |v*|^2 = 10
    cp = tl.critical_points(vs)
    assert cp.saddle is None and not cp.spurious_is_local_min
    torch.testing.assert_close(
        cp.spurious_min.v, (2 * torch.ones(4, 4) / 5 - torch.eye(4)).to(F64) @ vs
    )


# --------------------------------------------------------------------------- sampling


def test_batch_loss_and_coarse_grad_take_sigma_of_zero_as_zero():
    """sigma(x) = 1{x > 0}: hidden units whose input row is exactly zero are off, for the
    teacher and the student alike (truth: the definition in plain loops)."""
    v, w, vs, ws = _point(66, 3, 4, 1.0, 0.9)
    z = torch.randn(6, 3, 4, generator=_gen(67), dtype=F64)
    z[0, 1] = 0.0
    z[2] = 0.0
    zl, wsn = z.tolist(), (ws / ws.norm()).tolist()

    def net(vk, wk, zb):
        return sum(
            vk[j] * (sum(a * b for a, b in zip(zb[j], wk, strict=True)) > 0) for j in range(3)
        )

    want = sum(
        0.5 * (net(v.tolist(), w.tolist(), zb) - net(vs.tolist(), wsn, zb)) ** 2 for zb in zl
    )
    want /= len(zl)
    assert float(tl.batch_loss(z, v, w, vs, ws)) == pytest.approx(want, rel=1e-12)
    for ste in ("identity", "relu"):
        loss, _, _ = tl.coarse_grad_on_batch(z, v, w, vs, ws, ste)
        assert float(loss) == pytest.approx(want, rel=1e-12)


def test_theta_over_a_batch_of_teachers():
    """Each row of a 2-D w_star is its own teacher: the angles are the rows' angles, and a
    zero row is refused even when no column is zero."""
    w = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]], dtype=F64)
    ws = torch.tensor([[0.0, 3.0, 0.0], [2.0, 2.0, 0.0]], dtype=F64)
    torch.testing.assert_close(tl.theta(w, ws), torch.tensor([math.pi / 2, 0.0], dtype=F64))
    with pytest.raises(ConfigError, match="w_star must be nonzero"):
        tl.theta(w, torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]], dtype=F64))


def test_sample_coarse_grad_is_the_coarse_gradient_of_the_batch():
    """With the same Z, the library's autograd result equals the formula for g_mu."""
    v, w, vs, ws = _point(30, 3, 5, 0.8, 1.1)
    for ste in tl.STES:
        z = torch.randn(64, 3, 5, generator=_gen(31), dtype=F64)
        loss, gv, gw = tl.coarse_grad_on_batch(z, v, w, vs, ws, ste)
        pre = z @ w
        r = ((pre > 0).to(F64) * v).sum(-1) - ((z @ ws > 0).to(F64) * vs).sum(-1)
        mu = {
            "identity": torch.ones_like(pre),
            "relu": (pre > 0).to(F64),
            "clipped_relu": ((pre > 0) & (pre < 1)).to(F64),
        }[ste]
        ref_gw = (((mu * v).unsqueeze(-1) * z).sum(1) * r[:, None]).mean(0)
        torch.testing.assert_close(gw, ref_gw)
        torch.testing.assert_close(gv, ((pre > 0).to(F64) * r[:, None]).mean(0))
        torch.testing.assert_close(loss, 0.5 * (r**2).mean())
        torch.testing.assert_close(tl.batch_loss(z, v, w, vs, ws), loss)
        # same generator state -> sample_coarse_grad draws this very batch
        sv, sw = tl.sample_coarse_grad(v, w, vs, ws, ste, 64, generator=_gen(31))
        torch.testing.assert_close(sw, gw)
        torch.testing.assert_close(sv, gv)


@pytest.mark.parametrize("ste", tl.STES)
def test_sample_coarse_grad_mean_matches_expected(ste):
    v, w, vs, ws = _point(40, 3, 4, 1.3, 1.9)
    g = _gen(41)
    draws = torch.stack(
        [torch.cat(tl.sample_coarse_grad(v, w, vs, ws, ste, 5000, generator=g)) for _ in range(200)]
    )
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])
    ev, ew = tl.expected_coarse_grad(v, w, vs, ws, ste)
    _within(torch.cat([ev, ew]), mean, se)


def test_sample_coarse_grad_chunks_large_batches(monkeypatch):
    v, w, vs, ws = _point(50, 3, 4, 1.0, 1.0)
    one = tl.sample_coarse_grad(v, w, vs, ws, "relu", 1000, generator=_gen(1))
    monkeypatch.setattr(tl.sampling, "CHUNK_ELEMS", 12 * 128)  # 128 samples per chunk
    many = tl.sample_coarse_grad(v, w, vs, ws, "relu", 1000, generator=_gen(1))
    for a, b in zip(one, many, strict=True):
        torch.testing.assert_close(a, b)


# --------------------------------------------------------------------------- descent


def test_coarse_gradient_descent_monotone_and_converges():
    vs, ws = _teacher_with_saddle(6)
    g = _gen(7)
    k = 4
    v0 = torch.randn(k, 5, generator=g, dtype=F64).abs() * vs.sign()  # v0^T v* > 0
    w0 = torch.stack([tl.w_at_angle(ws, 1.2, norm=2.0, generator=g) for _ in range(k)])
    for ste in ("relu", "clipped_relu"):
        tr = tl.coarse_gradient_descent(v0, w0, vs, ws, ste, 0.1, 1000, record_every=10)
        assert tr.loss.shape == (101, k)
        assert float(tr.max_increase.max()) <= 1e-13
        finite = tr.cosine[torch.isfinite(tr.cosine)]
        assert float(finite.min()) >= -1e-8
        assert float(tr.theta[-1].max()) < 1e-6 and float(tr.loss[-1].max()) < 1e-8
        torch.testing.assert_close(tr.v, vs.expand(k, 5), rtol=0, atol=1e-6)


def test_relu_can_collapse_w_but_clipped_relu_does_not():
    """Large h at the start drives |w| to ~0 under ReLU (for any lr): f jumps at w = 0."""
    vs = torch.tensor([1.0, -0.5, 0.8, 0.3, -1.2], dtype=F64)
    ws = torch.randn(8, generator=_gen(6), dtype=F64)
    v0 = -3.0 * torch.ones(5, dtype=F64)
    w0 = tl.w_at_angle(ws, 0.5, norm=3.0, generator=_gen(7))
    for lr in (0.1, 0.02):
        steps = int(30 / lr)
        relu = tl.coarse_gradient_descent(v0, w0, vs, ws, "relu", lr, steps, record_every=100)
        assert float(relu.min_w_norm) < 0.01 and float(relu.max_increase) > 1e-2
        crelu = tl.coarse_gradient_descent(v0, w0, vs, ws, "clipped_relu", lr, steps)
        assert float(crelu.min_w_norm) > 1.0 and float(crelu.max_increase) <= 0.0
        # max_increase and min_w_norm cover every step, the record only a subsample
        torch.testing.assert_close(crelu.max_increase, crelu.loss.diff(dim=0).max(0).values)
        torch.testing.assert_close(crelu.min_w_norm, crelu.w_norm.min(0).values)
    assert float(crelu.theta[-1]) < 1e-4


def test_coarse_gradient_descent_matches_manual_loop_and_is_vectorised():
    v, w, vs, ws = _point(60, 3, 4, 1.5, 2.0)
    for ste in tl.STES:
        tr = tl.coarse_gradient_descent(v, w, vs, ws, ste, 0.05, 7, record_every=3)
        assert tr.step.tolist() == [0, 3, 6, 7]
        vm, wm = v.clone(), w.clone()
        for _ in range(7):
            gv, gw = tl.expected_coarse_grad(vm, wm, vs, ws, ste)
            vm, wm = vm - 0.05 * gv, wm - 0.05 * gw
        torch.testing.assert_close(tr.v, vm)
        torch.testing.assert_close(tr.w, wm)
        assert float(tr.loss[-1]) == pytest.approx(float(tl.population_loss(vm, wm, vs, ws)))
        batch = tl.coarse_gradient_descent(
            torch.stack([v, v]), torch.stack([w, 2 * w]), vs, ws, ste, 0.05, 7
        )
        torch.testing.assert_close(batch.v[0], tr.v)


# --------------------------------------------------------------------------- conventions, inputs


def test_w_star_scale_does_not_matter():
    v, w, vs, ws = _point(70, 3, 4, 0.9, 1.4)
    for ste in tl.STES:
        a = tl.expected_coarse_grad(v, w, vs, ws, ste)
        b = tl.expected_coarse_grad(v, w, vs, 7.5 * ws, ste)
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y)
    torch.testing.assert_close(
        tl.population_loss(v, w, vs, ws), tl.population_loss(v, w, vs, 0.1 * ws)
    )


def test_vectorised_equals_pointwise():
    g = _gen(80)
    vs, ws = torch.randn(3, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    v, w = (
        torch.randn(2, 5, 3, generator=g, dtype=F64),
        torch.randn(2, 5, 4, generator=g, dtype=F64),
    )
    for ste in tl.STES:
        gv, gw = tl.expected_coarse_grad(v, w, vs, ws, ste)
        assert gv.shape == (2, 5, 3) and gw.shape == (2, 5, 4)
        pv, pw = tl.expected_coarse_grad(v[1, 3], w[1, 3], vs, ws, ste)
        torch.testing.assert_close(gw[1, 3], pw)
        torch.testing.assert_close(gv[1, 3], pv)
    assert tl.population_loss(v, w, vs, ws).shape == (2, 5)


def test_theta_accurate_near_parallel():
    ws = torch.tensor([1.0, 0.0, 0.0], dtype=F64)
    for eps in (1e-12, 1e-8, 1e-3):
        w = torch.tensor([math.cos(eps), math.sin(eps), 0.0], dtype=F64)
        assert float(tl.theta(w, ws)) == pytest.approx(eps, rel=1e-6)
        assert float(tl.theta(-w, ws)) == pytest.approx(math.pi - eps, rel=1e-12)


def test_bad_inputs():
    v, w, vs, ws = _point(90, 3, 4, 1.0, 1.0)
    with pytest.raises(ConfigError, match=r"v has shape \(4,\) and v_star has shape \(3,\)"):
        tl.population_loss(torch.zeros(4), w, vs, ws)
    with pytest.raises(ConfigError, match=r"w has shape \(5,\) and w_star has shape \(4,\)"):
        tl.population_grad(v, torch.ones(5), vs, ws)
    with pytest.raises(ConfigError, match="do not broadcast"):
        tl.population_loss(torch.zeros(2, 3), torch.ones(3, 4), vs, ws)
    with pytest.raises(ConfigError, match="did you mean 'relu'"):
        tl.expected_coarse_grad(v, w, vs, ws, "reul")
    with pytest.raises(ConfigError, match="clipped_relu, identity, relu"):
        tl.expected_coarse_grad(v, w, vs, ws, "sigmoid")
    with pytest.raises(StelabTypeError, match="ste must be a string"):
        tl.expected_coarse_grad(v, w, vs, ws, 3)
    with pytest.raises(ConfigError, match="w_star must be nonzero"):
        tl.population_loss(v, w, vs, torch.zeros(4))
    with pytest.raises(ConfigError, match="batch must be an integer"):
        tl.sample_coarse_grad(v, w, vs, ws, "relu", 0)
    with pytest.raises(ConfigError, match="lr must be"):
        tl.coarse_gradient_descent(v, w, vs, ws, "relu", -0.1, 10)
    with pytest.raises(ConfigError, match="steps must be"):
        tl.coarse_gradient_descent(v, w, vs, ws, "relu", 0.1, -1)
    with pytest.raises(ConfigError, match="v must be finite"):
        tl.population_loss(torch.tensor([1.0, math.nan, 0.0]), w, vs, ws)
    with pytest.raises(StelabTypeError, match="v must be a real vector"):
        tl.population_loss("abc", w, vs, ws)
    with pytest.raises(ConfigError, match="v_star must be a vector"):
        tl.population_loss(v, w, 1.0, ws)
    with pytest.raises(ConfigError, match=r"z must have shape \(B >= 1, m=3, n=4\)"):
        tl.coarse_grad_on_batch(torch.zeros(2, 4, 3), v, w, vs, ws, "relu")
    empty = r"z must have shape \(B >= 1, m=3, n=4\), got \(0, 3, 4\)"  # no mean of 0 rows
    with pytest.raises(ConfigError, match=empty):
        tl.coarse_grad_on_batch(torch.zeros(0, 3, 4), v, w, vs, ws, "relu")
    with pytest.raises(ConfigError, match=empty):
        tl.batch_loss(torch.zeros(0, 3, 4), v, w, vs, ws)
    with pytest.raises(ConfigError, match="angle must be in"):
        tl.w_at_angle(ws, 4.0)
    with pytest.raises(ConfigError, match="angle must lie in"):
        tl.clipped_relu_pq(-0.1, 1.0)
    with pytest.raises(ConfigError, match="w_norm must be"):
        tl.clipped_relu_pq(0.5, 0.0)
    with pytest.raises(ConfigError, match="unknown method"):
        tl.clipped_relu_pq(0.5, 1.0, method="simpson")
    with pytest.raises(ConfigError, match="1-D"):
        tl.sample_coarse_grad(torch.zeros(2, 3), w, vs, ws, "relu", 4)


def test_ste_names_map_to_library_estimators():
    from stelab import estimators

    assert set(tl.LIBRARY_ESTIMATOR) == set(tl.STES)
    for name in tl.LIBRARY_ESTIMATOR.values():
        assert name in estimators.names()


# --------------------------------------------------------------------------- descent ratio


@pytest.mark.parametrize("ste", tl.STES)
def test_coarse_descent_ratio_vs_monte_carlo(mc_case, ste):
    """R = |E g_mu|^2 / (|df/dv|^2 + <E g_mu, df/dw>) from independent pieces: E g_mu and
    df/dv = E[dl/dv] by Monte Carlo (1e6 draws), df/dw by central differences of the
    population loss (itself checked against Monte Carlo above). Tolerance: 5 standard
    errors of R, propagated to first order with absolute values (a bound that ignores
    the sign of correlations), plus the O(SE^2) bias of |mean|^2."""
    (v, w, vs, ws), mc = mc_case
    a, se_a = mc[ste]
    b, se_b = mc["gv"]
    h = 1e-6
    c = torch.zeros_like(w)
    for i in range(w.shape[0]):
        e = torch.zeros_like(w)
        e[i] = h
        c[i] = (tl.population_loss(v, w + e, vs, ws) - tl.population_loss(v, w - e, vs, ws)) / (
            2 * h
        )
    num, den = (a * a).sum(), (b * b).sum() + (a * c).sum()
    want = num / den
    d_a = (2 * a * den - num * c) / den**2
    d_b = -2 * b * num / den**2
    se = (d_a.abs() * se_a).sum() + (d_b.abs() * se_b).sum()
    bias = (se_a**2).sum() / den.abs()
    got = tl.coarse_descent_ratio(v, w, vs, ws, ste)
    assert abs(float(got) - float(want)) <= 5 * float(se) + float(bias), (got, want, se)
    assert float(se) < 0.05 * abs(float(want))  # the check has teeth


@pytest.mark.parametrize("ste", tl.STES)
def test_coarse_descent_ratio_is_the_documented_ratio_of_the_checked_gradients(ste):
    """Exactly (1e-12) the ratio of the pieces that are checked against Monte Carlo and
    finite differences above: a Monte-Carlo test alone cannot see a few-% change of a
    term (its SE is ~1 %); batched over a grid of points."""
    g = _gen(9)
    vs, ws = torch.randn(3, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    v = torch.randn(6, 3, generator=g, dtype=F64)
    w = torch.randn(6, 4, generator=g, dtype=F64) * torch.tensor([0.3, 1, 2, 5, 0.7, 1.5])[:, None]
    gv, gw = tl.expected_coarse_grad(v, w, vs, ws, ste)
    _, gw_true = tl.population_grad(v, w, vs, ws)
    want = (gw * gw).sum(-1) / ((gv * gv).sum(-1) + (gw * gw_true).sum(-1))
    torch.testing.assert_close(tl.coarse_descent_ratio(v, w, vs, ws, ste), want, rtol=1e-12, atol=0)


def test_coarse_descent_ratio_is_inf_where_the_denominator_vanishes():
    """At the global minimum (v, w) = (v*, w*) both gradients vanish: 0/0 -> +inf."""
    g = _gen(8)
    vs, ws = torch.randn(3, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    for ste in tl.STES:
        assert float(tl.coarse_descent_ratio(vs, ws, vs, ws, ste)) == math.inf
    r = tl.coarse_descent_ratio(torch.stack([vs, vs + 1]), ws, vs, ws, "identity")
    assert r[0] == math.inf and math.isfinite(float(r[1]))


def test_trajectory_records_equal_the_gradients_at_the_recorded_iterates():
    """Every recorded quantity recomputed at the iterate of its step (a manual loop):
    f, theta, |w|, <E g_mu, df/dw>, |E g_mu| and their cosine."""
    v, w, vs, ws = _point(61, 3, 4, 1.2, 1.9)
    for ste in tl.STES:
        tr = tl.coarse_gradient_descent(v, w, vs, ws, ste, 0.07, 5, record_every=2)
        vm, wm, rec = v.clone(), w.clone(), {}
        for t in range(6):
            gv, gw = tl.expected_coarse_grad(vm, wm, vs, ws, ste)
            _, gt = tl.population_grad(vm, wm, vs, ws)
            rec[t] = (vm, wm, gw, gt)
            vm, wm = vm - 0.07 * gv, wm - 0.07 * gw
        for i, t in enumerate(tr.step.tolist()):
            vm, wm, gw, gt = rec[t]
            assert float(tr.loss[i]) == pytest.approx(float(tl.population_loss(vm, wm, vs, ws)))
            assert float(tr.theta[i]) == pytest.approx(float(tl.theta(wm, ws)), rel=1e-12)
            assert float(tr.w_norm[i]) == pytest.approx(float(wm.norm()), rel=1e-12)
            inner = float(gw @ gt)
            assert float(tr.inner[i]) == pytest.approx(inner, rel=1e-10)
            assert float(tr.coarse_norm[i]) == pytest.approx(float(gw.norm()), rel=1e-12)
            cos = inner / float(gw.norm() * gt.norm())
            assert float(tr.cosine[i]) == pytest.approx(cos, rel=1e-10)


def test_w_at_angle_turns_towards_the_given_direction():
    ws = torch.tensor([2.0, 0.0, 0.0], dtype=F64)
    d = torch.tensor([0.3, 1.0, 0.0], dtype=F64)
    w = tl.w_at_angle(ws, 0.4, norm=2.5, direction=d)
    want = 2.5 * torch.tensor([math.cos(0.4), math.sin(0.4), 0.0], dtype=F64)
    torch.testing.assert_close(w, want, rtol=0, atol=1e-15)


@pytest.mark.parametrize("shared", [None, "v_star", "w_star"])
def test_batch_loss_with_a_teacher_per_student_against_plain_loops(shared):
    # different teachers along a leading dimension take the per-teacher branch, also when
    # only one of v*, w* differs; the truth is the definition, summed in plain Python
    z = torch.randn(40, 3, 4, generator=_gen(64), dtype=F64)
    pts = [_point(65 + k, 3, 4, 1.0, 0.7 + 0.4 * k) for k in range(3)]
    v, w, vs, ws = (torch.stack([p[i] for p in pts]) for i in range(4))
    if shared == "v_star":
        vs = vs[:1].expand_as(vs).clone()
    elif shared == "w_star":
        ws = ws[:1].expand_as(ws).clone()
    got = tl.batch_loss(z, v, w, vs, ws)
    zl = z.tolist()

    def net(vk, wk, zb):
        return sum(
            vk[j] * (sum(a * b for a, b in zip(zb[j], wk, strict=True)) > 0) for j in range(3)
        )

    for k in range(3):
        vk, wk, vsk, wsk = (t[k].tolist() for t in (v, w, vs, ws))
        want = sum(0.5 * (net(vk, wk, zb) - net(vsk, wsk, zb)) ** 2 for zb in zl) / len(zl)
        assert float(got[k]) == pytest.approx(want, rel=1e-12)
    assert not torch.equal(got, tl.batch_loss(z, v, w, vs[:1], ws[:1]))  # teachers differ


def test_batch_loss_over_a_grid_of_students_equals_one_at_a_time():
    v, w, vs, ws = _point(62, 3, 4, 1.0, 1.1)
    z = torch.randn(50, 3, 4, generator=_gen(63), dtype=F64)
    vg = torch.stack([v, 2 * v, -v]).reshape(3, 1, 3).expand(3, 2, 3)
    wg = torch.stack([w, w + 0.3]).reshape(1, 2, 4).expand(3, 2, 4)
    got = tl.batch_loss(z, vg, wg, vs, ws)
    assert got.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            one = tl.batch_loss(z, vg[i, j], wg[i, j], vs, ws)
            assert float(got[i, j]) == pytest.approx(float(one), rel=1e-13)


def test_coarse_gradient_descent_names_its_steps_range():
    from stelab.errors import ConfigError

    v, w = torch.ones(3, dtype=torch.float64), torch.tensor([1.0, 0.5], dtype=torch.float64)
    with pytest.raises(ConfigError, match=r"steps must be an integer in \[0, 1000000000\], got -1"):
        tl.coarse_gradient_descent(v, w, v, w, "relu", 0.1, -1)


def test_w_at_angle_zero_and_pi_need_no_orthogonal_direction():
    """At theta = 0 and theta = pi, w = ±norm·w*/|w*| exactly, also for n = 1 or a
    direction parallel to w* (there is no orthogonal part to use); strictly between,
    such a direction is refused."""
    one, three = torch.tensor([2.0], dtype=F64), torch.tensor([0.0, 3.0, 4.0], dtype=F64)
    assert tl.w_at_angle(one, 0.0, norm=1.5).tolist() == [1.5]
    assert tl.w_at_angle(one, math.pi, norm=1.5).tolist() == [-1.5]
    assert tl.w_at_angle(three, math.pi, norm=5.0, direction=three).tolist() == [0.0, -3.0, -4.0]
    assert tl.w_at_angle(three, 0.0, norm=5.0, direction=-three).tolist() == [0.0, 3.0, 4.0]
    with pytest.raises(ConfigError, match="must not be parallel"):
        tl.w_at_angle(one, math.pi / 2)
    with pytest.raises(ConfigError, match="must not be parallel"):
        tl.w_at_angle(three, 1.0, direction=three)


def test_sample_coarse_grad_needs_one_student():
    v, w, vs, ws = _point(5, 3, 4, 1.0, 0.5)
    for vv, ww in ((v[None], w), (v, w[None]), (v[None], w[None])):
        with pytest.raises(ConfigError, match="must be 1-D here"):
            tl.sample_coarse_grad(vv, ww, vs, ws, "relu", 10)


def test_a_batch_of_one_teacher_part_broadcasts_against_the_rest():
    """Teachers batched in v* only (w* shared): the leading shape comes from v*, and each
    entry is that teacher's own loss."""
    v, w, vs, ws = _point(7, 3, 4, 1.0, 0.6)
    vs_batch = torch.stack([vs, 2 * vs, -vs])
    got = tl.population_loss(v, w, vs_batch, ws)
    assert got.shape == (3,)
    for k in range(3):
        assert float(got[k]) == pytest.approx(float(tl.population_loss(v, w, vs_batch[k], ws)),
                                              rel=1e-14)  # fmt: skip


@pytest.mark.parametrize("bad", ["abc", b"abc", None])
def test_a_non_numeric_vector_is_named_with_its_value(bad):
    v, w, vs, ws = _point(8, 3, 4, 1.0, 0.6)
    with pytest.raises(
        StelabTypeError, match=f"v must be a real vector .*, got {re.escape(repr(bad))}$"
    ):
        tl.population_loss(bad, w, vs, ws)


def test_batch_loss_over_students_whose_count_differs_from_m():
    """Two students (leading dimension 2) with m = 3 hidden units: the sizes m, n are
    read off the last dimensions, never the leading ones."""
    v, w, vs, ws = _point(9, 3, 4, 1.0, 0.8)
    z = torch.randn(30, 3, 4, generator=_gen(10), dtype=F64)
    vg, wg = torch.stack([v, -v]), torch.stack([w, 2 * w])
    got = tl.batch_loss(z, vg, wg, vs, ws)
    assert got.shape == (2,)
    for k in range(2):
        assert float(got[k]) == pytest.approx(float(tl.batch_loss(z, vg[k], wg[k], vs, ws)),
                                              rel=1e-13)  # fmt: skip


@pytest.mark.parametrize(("a", "saddle"), [(0.2, True), (0.25, True), (0.3, False), (0.5, False)])
def test_saddle_condition_near_its_threshold(a, saddle):
    """m = 2, v* = (1, a): (1^T v*)^2 < (m+1)/2 |v*|^2 holds for a <= 0.25 and fails from
    0.3 on (1.69 vs 1.635). Where it holds, the spurious point is a local minimum
    (v^T v* < 0 there) and the saddle exists and is critical; where it fails, v^T v* is
    small but positive (0.04-0.25) and neither."""
    vs = torch.tensor([1.0, a], dtype=F64)
    ws = torch.tensor([0.6, 0.8], dtype=F64)
    cp = tl.critical_points(vs)
    s, nrm = float(vs.sum()) ** 2, float(vs @ vs)
    assert (s < 1.5 * nrm) is saddle
    assert cp.spurious_is_local_min is saddle
    assert (float(cp.spurious_min.v @ vs) < 0) is saddle
    assert (cp.saddle is not None) is saddle
    if saddle:
        w = tl.w_at_angle(ws, cp.saddle.theta, norm=1.3, direction=torch.tensor([1.0, 0.0]))
        gv, gw = tl.population_grad(cp.saddle.v, w, vs, ws)
        assert float(gv.abs().max()) < 1e-14 and float(gw.abs().max()) < 1e-14


def test_w_at_angle_with_a_unit_and_a_zero_w_star():
    unit = torch.tensor([0.6, 0.8], dtype=F64)
    w = tl.w_at_angle(unit, math.pi / 3, norm=2.0, direction=torch.tensor([1.0, 0.0]))
    assert float(w.norm()) == pytest.approx(2.0, rel=1e-15)
    assert float(tl.theta(w, unit)) == pytest.approx(math.pi / 3, rel=1e-14)
    with pytest.raises(ConfigError, match="w_star must be nonzero"):
        tl.w_at_angle(torch.zeros(2, dtype=F64), 1.0)


def test_critical_points_refuse_a_batch_and_a_zero_teacher():
    with pytest.raises(ConfigError, match=r"v_star must be a 1-D vector, got shape \(2, 3\)"):
        tl.critical_points(torch.ones(2, 3, dtype=F64))
    with pytest.raises(ConfigError, match=r"v_star must be nonzero .*, got a zero vector"):
        tl.critical_points(torch.zeros(3, dtype=F64))
    # a nonzero v* whose |v*|^2 underflows is refused as such, not called zero
    with pytest.raises(ConfigError, match=r"got \|v_star\|\^2 = 0.0 \(underflow\)"):
        tl.critical_points([0.0, 0.0, 1e-300])
    # a unit teacher e_3 (|v*|^2 = 1 exactly) is accepted: by hand, the spurious
    # minimizer (I - J/4)(J - I) e_3 = (1, 1, 0) - (1/2)(1, 1, 1)
    cp = tl.critical_points([0.0, 0.0, 1.0])
    assert cp.global_min.v.tolist() == [0.0, 0.0, 1.0]
    assert torch.allclose(cp.spurious_min.v, torch.tensor([0.5, 0.5, -0.5], dtype=F64), atol=1e-15)


def test_coarse_gradient_descent_stops_where_w_reaches_zero_exactly():
    """n = 1, identity STE: E g_id depends on w only through u = w/|w| = 1, so from
    w0 = lr E g_id with lr = 1/2 (exact products) one step lands on w = 0 exactly; the
    error names that step. One step less, nothing is refused."""
    v, vs, ws = (torch.tensor(x, dtype=F64) for x in ([0.2, 0.7, -0.4], [1.0, -0.5, 0.3], [1.0]))
    _, g_unit = tl.expected_coarse_grad(v, torch.tensor([1.0], dtype=F64), vs, ws, "identity")
    assert float(g_unit) > 0
    w0 = 0.5 * g_unit
    _, g0 = tl.expected_coarse_grad(v, w0, vs, ws, "identity")
    assert torch.equal(w0 - 0.5 * g0, torch.zeros(1, dtype=F64))  # the premise, checked
    tr = tl.coarse_gradient_descent(v, w0, vs, ws, "identity", 0.5, 0)
    assert tr.w.tolist() == w0.tolist() and tr.step.tolist() == [0]
    with pytest.raises(ConfigError, match="coarse gradient descent reached w = 0 at step 1$"):
        tl.coarse_gradient_descent(v, w0, vs, ws, "identity", 0.5, 3)


def test_vectors_name_their_bad_shape_or_content():
    """The input checks of as_f64, theta, w_at_angle and the batch functions: each error
    names the argument, what it got and what is allowed."""
    v, w, vs, ws = _point(12, 3, 4, 1.0, 0.9)
    cases = [
        (
            StelabTypeError,
            r"v must be a real vector \(tensor, array or list\), got list$",
            lambda: tl.population_loss([[1.0], [1.0, 2.0]], w, vs, ws),  # ragged
        ),
        (
            ConfigError,
            r"v must have a nonzero last dimension, got shape \(2, 0\)",
            lambda: tl.population_loss(torch.zeros(2, 0, dtype=F64), w, vs, ws),
        ),
        (
            ConfigError,
            r"w has shape \(3,\) and w_star has shape \(4,\): .*\(n\) must agree",
            lambda: tl.theta(torch.ones(3, dtype=F64), ws),
        ),
        (
            ConfigError,
            r"w must be nonzero: the angle theta\(w, w\*\) is undefined at w = 0",
            lambda: tl.theta(torch.stack([w, torch.zeros(4, dtype=F64)]), ws),
        ),
        (
            ConfigError,
            r"w_star must be a 1-D vector, got shape \(1, 4\)",
            lambda: tl.w_at_angle(ws[None], 1.0),
        ),
        (
            ConfigError,
            r"direction has shape \(3,\), w_star has shape \(4,\): they must agree",
            lambda: tl.w_at_angle(ws, 1.0, direction=torch.ones(3, dtype=F64)),
        ),
        (
            StelabTypeError,
            r"z must be a torch.Tensor of shape \(B, m, n\), got list",
            lambda: tl.batch_loss(torch.zeros(2, 3, 4).tolist(), v, w, vs, ws),
        ),
    ]
    for exc, pattern, call in cases:
        with pytest.raises(exc, match=pattern):
            call()
    z = torch.randn(5, 3, 4, generator=_gen(13), dtype=F64)
    with pytest.raises(ConfigError, match=r"must be 1-D here, got v \(2, 3\), w \(2, 4\)"):
        tl.coarse_grad_on_batch(z, torch.stack([v, v]), w, vs, ws, "relu")
    # where the checks pass: the angle of a batch of one, the batch gradient of 1-D inputs
    assert float(tl.theta(w[None], ws)[0]) == pytest.approx(0.9, rel=1e-12)
    assert float(tl.coarse_grad_on_batch(z, v, w, vs, ws, "relu")[0]) == pytest.approx(
        float(tl.batch_loss(z, v, w, vs, ws)), rel=1e-13
    )


@pytest.mark.parametrize(("t", "parallel"), [(9.85e-11, True), (1.02e-10, False), (1e-3, False)])
def test_geometry_counts_sin_theta_up_to_1e_10_as_parallel(t, parallel):
    """sin θ <= 1e-10 counts as θ ∈ {0, π}: u_perp (P_w w*/|P_w w*|) is then 0, and a unit
    vector above it; pinned on both sides of the threshold, 1.5 % and 2 % away."""
    from stelab.theory.two_layer.model import geometry

    w = torch.tensor([math.cos(t), math.sin(t)], dtype=F64)
    g = geometry(w, torch.tensor([1.0, 0.0], dtype=F64))
    assert float(g.sin) == pytest.approx(math.sin(t), rel=1e-3)
    if parallel:
        assert torch.equal(g.u_perp, torch.zeros(2, dtype=F64))
    else:
        assert float(g.u_perp.norm()) == pytest.approx(1.0, rel=1e-12)
        assert float(g.u_perp @ w) == pytest.approx(0.0, abs=1e-12)  # orthogonal to w


@pytest.mark.parametrize("ste", ["identity", "relu", "clipped_relu"])
def test_cosine_is_undefined_where_a_gradient_vanishes(ste):
    """Started at the global minimum (v, w) = (v*, w*), both the true gradient df/dw and
    the expected coarse gradient vanish ([Y19]: a critical point of both), so the cosine
    between them is recorded as NaN, not as a number; one step away it is defined."""
    vs, ws = [1.0, 0.5, -0.3], [0.6, 0.8]
    tr = tl.coarse_gradient_descent(vs, ws, vs, ws, ste, 0.1, 1)
    assert float(tr.loss[0]) == pytest.approx(0.0, abs=1e-15)
    assert float(tr.inner[0]) == pytest.approx(0.0, abs=1e-15)
    assert math.isnan(float(tr.cosine[0]))
    away = tl.coarse_gradient_descent(vs, [0.8, 0.6], vs, ws, ste, 0.1, 1)
    assert -1.0 <= float(away.cosine[0]) <= 1.0
