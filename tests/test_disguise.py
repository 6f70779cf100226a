"""stelab.disguise against closed forms, finite differences and the [S24] theorem.

Truths used (derived independently of the code, docs/papers/disguise2024.md):

* cosine q̂' = 1 + a·cos(2πw/Δ):  α = sqrt(1 - a²) and, from
  ∫ dθ/(1 + a cos θ) = 2/sqrt(1-a²)·atan(sqrt((1-a)/(1+a))·tan(θ/2)),
  M(w) = nΔ + (Δ/π)·atan(β·tan(π r)),  β = sqrt((1-a)/(1+a)), n = round(w/Δ), r = w/Δ - n;
* DSQ q̂' = A·sech²(kρ), A = (k/2)/tanh(k/2), ρ the offset from the nearest jump (units
  of Δ): ∫ dρ/q̂' = (ρ/2 + sinh(2kρ)/(4k))/A, so α = k·s/(1 + sinh(k)/k) (the paper's formula
  with its dimensionful k = ours/Δ) and M(w) = Δ(n - 1/2 + α(ρ/2 + sinh(2kρ)/(4k))/A)
  for r <= 0 (ρ = r + 1/2), mirrored for r > 0;
* triangle q̂' = m + 4(1-m)|r|: α = 2(1 - m)/ln((2 - m)/m);
* M' = α/q̂' (central finite differences);
* the theorem itself on a toy regression: the latent gap of (iii) is O(η).
"""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from torch import nn

from stelab.disguise import (
    DegenerateEstimatorWarning,
    disguise_report,
    equivalent_ste,
    is_cyclical,
    to_ste,
)
from stelab.errors import ConfigError, StelabTypeError
from stelab.estimators import get
from stelab.estimators import register as stelab_register
from stelab.nn import QuantConv2d, QuantLinear
from stelab.quantizers import Forward, Quantizer

pytestmark = pytest.mark.usefixtures("one_thread")

F64 = torch.float64


def cosine_M(w: torch.Tensor, step: float, a: float) -> torch.Tensor:
    beta = math.sqrt((1 - a) / (1 + a))
    n = torch.round(w / step)
    r = w / step - n
    return n * step + step / math.pi * torch.atan(beta * torch.tan(math.pi * r))


def dsq_alpha(k: float) -> float:
    return k / math.tanh(k / 2) / (1 + math.sinh(k) / k)


def dsq_M(w: torch.Tensor, step: float, k: float) -> torch.Tensor:
    A = (k / 2) / math.tanh(k / 2)
    alpha = dsq_alpha(k)
    n = torch.round(w / step)
    r = w / step - n

    def phi_left(r):  # r <= 0
        rho = r + 0.5
        return alpha * (rho / 2 + torch.sinh(2 * k * rho) / (4 * k)) / A

    phi = torch.where(r <= 0, phi_left(-r.abs()), 1 - phi_left(-r.abs()))
    return step * (n - 0.5 + phi)


def dense_grid(step: float, bins: int, dtype: torch.dtype) -> torch.Tensor:
    """A dense grid over ±bins plus every change point and its float neighbours."""
    base = torch.linspace(-bins * step, bins * step, 20001, dtype=F64)
    edges = (torch.arange(-bins, bins, dtype=F64) + 0.5) * step
    pts = torch.cat([base, edges]).to(dtype)
    e = edges.to(dtype)
    inf = torch.tensor(math.inf, dtype=dtype)
    pts = torch.cat([pts, e, torch.nextafter(e, inf), torch.nextafter(e, -inf)])
    return pts.sort().values


# --- α against closed forms


@pytest.mark.parametrize("a", [0.0, 0.3, 0.5, 0.9, -0.6, 0.99])
def test_cosine_alpha(a):
    eq = equivalent_ste("cosine", 0.1, params={"a": a})
    assert eq.alpha == pytest.approx(math.sqrt(1 - a * a), abs=1e-8)


@pytest.mark.parametrize("k", [0.5, 3.0, 8.0])
def test_dsq_alpha_spec_formula(k):
    step = 0.1
    k_spec = k / step  # the paper's dimensionful k: our k is kΔ
    s = 1 / math.tanh(k_spec * step / 2)
    want = step * s * k_spec / (1 + math.sinh(k_spec * step) / (k_spec * step))
    assert equivalent_ste("dsq", step, params={"k": k}).alpha == pytest.approx(want, abs=1e-8)
    if k == 3.0:
        assert want == pytest.approx(0.7638, abs=5e-5)


@pytest.mark.parametrize("m", [0.1, 0.5, 1.0, 1.7])
def test_triangle_alpha(m):
    want = 1.0 if m == 1.0 else 2 * (1 - m) / math.log((2 - m) / m)
    eq = equivalent_ste("triangle_wave", 0.3, params={"m": m})
    assert eq.alpha == pytest.approx(want, abs=1e-8)


def test_soft_staircase_alpha_is_dsq_at_half_sharpness():
    eq = equivalent_ste("soft_staircase", 0.2, params={"k": 6.0})
    assert eq.alpha == pytest.approx(dsq_alpha(3.0), abs=1e-8)


def test_alpha_does_not_depend_on_step_and_estimator_forms_agree():
    a = 0.4
    f = lambda w: 1 + a * torch.cos(2 * math.pi * w / 0.07)  # noqa: E731
    by_fn = equivalent_ste(f, 0.07)
    by_obj = equivalent_ste(get("cosine", a=a), 3.0)
    by_name = equivalent_ste("cosine", 1e-4, params={"a": a})
    for eq in (by_fn, by_obj, by_name):
        assert eq.alpha == pytest.approx(math.sqrt(1 - a * a), abs=1e-8)


# --- M against closed forms and its properties


@pytest.mark.parametrize("a", [0.5, 0.9, -0.5])
def test_cosine_M_closed_form(a):
    step = 0.1
    eq = equivalent_ste("cosine", step, params={"a": a})
    w = dense_grid(step, 7, F64)
    torch.testing.assert_close(eq.M(w), cosine_M(w, step, a), rtol=0, atol=1e-8 * step)


@pytest.mark.parametrize("k", [1.0, 3.0, 6.0])
def test_dsq_M_closed_form(k):
    step = 0.05
    eq = equivalent_ste("dsq", step, params={"k": k})
    w = dense_grid(step, 5, F64)
    torch.testing.assert_close(eq.M(w), dsq_M(w, step, k), rtol=0, atol=1e-8 * step)


@pytest.mark.parametrize(
    "name,params",
    [("cosine", {"a": 0.5}), ("dsq", {"k": 3.0}), ("triangle_wave", {"m": 0.3}),
     ("soft_staircase", {"k": 4.0}), ("cosine", {"a": 0.97})],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_M_monotone_fixes_change_points_and_keeps_Q(name, params, dtype):
    step = 0.1  # not a binary fraction: change points are not exact in floating point
    eq = equivalent_ste(name, step, params=params)
    w = dense_grid(step, 9, dtype)
    m = eq.M(w)
    assert m.dtype == dtype and m.shape == w.shape
    # the quantizer's own forward, and the plain formula with the same Python step
    q = Quantizer("uniform", "ste", step=step)
    assert torch.equal(q(eq.M(w, step=q.step)), q(w))
    assert torch.equal(torch.round(m / step), torch.round(w / step))
    assert bool((m[1:] >= m[:-1]).all())  # monotone (non-decreasing on the float grid)
    edges = ((torch.arange(-9, 9, dtype=F64) + 0.5) * step).to(dtype)
    # a float "change point" is off the true one by an ulp, which M stretches by M' <= α/min q̂'
    ulp = torch.finfo(dtype).eps * 4 * (1 + eq.alpha / eq.g_min)
    assert ((eq.M(edges) - edges).abs() <= ulp * edges.abs().clamp_min(step)).all()


def test_Q_exact_at_exact_half_integers_round_half_to_even():
    # step 0.25: w = (n + 1/2)·Δ exactly; torch.round sends them to the even level
    eq = equivalent_ste("cosine", 0.25, params={"a": 0.6})
    w = (torch.arange(-20, 20, dtype=F64) + 0.5) * 0.25
    m = eq.M(w)
    assert torch.equal(torch.round(m / 0.25), torch.round(w / 0.25))
    assert torch.equal(m, w)  # change points are fixed exactly here


@pytest.mark.parametrize("name,params", [("cosine", {"a": 0.5}), ("dsq", {"k": 3.0})])
def test_M_inverse_roundtrip(name, params):
    step = 0.1
    eq = equivalent_ste(name, step, params=params)
    w = dense_grid(step, 6, F64)
    torch.testing.assert_close(eq.M_inv(eq.M(w)), w, rtol=0, atol=1e-12 * step)
    torch.testing.assert_close(eq.M(eq.M_inv(w)), w, rtol=0, atol=1e-12 * step)
    w32 = w.float()
    back = eq.M_inv(eq.M(w32))
    assert back.dtype == torch.float32
    assert ((back - w32).abs() <= 8 * torch.finfo(torch.float32).eps * step * 10).all()
    assert torch.equal(torch.round(eq.M_inv(w32) / step), torch.round(w32 / step))


@pytest.mark.parametrize("name,params", [("cosine", {"a": 0.5}), ("triangle_wave", {"m": 0.4})])
def test_M_prime_is_alpha_over_qhat(name, params):
    step = 0.2
    eq = equivalent_ste(name, step, params=params)
    w = torch.linspace(-0.47, 0.53, 97, dtype=F64)
    w = w[((w / step - torch.round(w / step)).abs() - 0.5).abs() > 1e-3]  # off the kinks
    w = w[(w / step - torch.round(w / step)).abs() > 1e-3]
    h = 1e-6
    fd = (eq.M(w + h) - eq.M(w - h)) / (2 * h)
    ctx = Forward("uniform").context(step)
    want = eq.alpha / eq.estimator.derivative(w, ctx)
    torch.testing.assert_close(fd, want, rtol=1e-6, atol=0)
    torch.testing.assert_close(eq.M_prime(w), want)


def test_M_any_shape_nan_inf_and_per_channel_step():
    eq = equivalent_ste("cosine", 0.1, params={"a": 0.5})
    w = torch.randn(3, 4, 5, dtype=F64)
    assert eq.M(w).shape == (3, 4, 5)
    x = torch.tensor([math.nan, math.inf, -math.inf, 0.03], dtype=F64)
    y = eq.M(x)
    assert math.isnan(y[0]) and y[1] == math.inf and y[2] == -math.inf
    assert y[3] == pytest.approx(float(cosine_M(x[3:], 0.1, 0.5)), abs=1e-12)
    steps = torch.tensor([[0.1], [0.05], [0.2]], dtype=F64)
    v = torch.randn(3, 7, dtype=F64) * 0.3
    per = eq.M(v, step=steps)
    for i, s in enumerate(steps[:, 0].tolist()):
        torch.testing.assert_close(per[i], cosine_M(v[i], s, 0.5), rtol=0, atol=1e-9 * s)
    many = eq.M_many([v[0], v[1]], [0.1, 0.05])
    torch.testing.assert_close(many[1], per[1])


def test_M_many_without_steps_uses_the_equivalences_step():
    eq = equivalent_ste("cosine", 0.1, params={"a": 0.5})
    ws = [torch.linspace(-0.3, 0.3, 7, dtype=F64), torch.tensor([[0.012, -0.27]], dtype=F64)]
    for got, w in zip(eq.M_many(ws), ws, strict=True):
        assert torch.equal(got, eq.M(w))


def test_M_many_across_chunks_dtypes_and_per_channel_steps(monkeypatch):
    # M_many maps tensors together in chunks; a small chunk makes tensors straddle
    # chunk edges. It must equal per-element closed form and the quantizer's bins.
    import stelab.disguise.equivalence as dg

    monkeypatch.setattr(dg, "CHUNK", 37)
    eq = equivalent_ste("cosine", 0.1, params={"a": 0.5}, bits=4)
    g = torch.Generator().manual_seed(0)
    ws = [
        torch.randn(5, 3, 2, 2, generator=g) * 0.4,  # float32, 0-d float64 step buffer
        torch.randn(0),  # empty
        torch.randn(90, generator=g, dtype=F64) * 0.3,  # float64, Python step
        torch.randn(4, 30, generator=g) * 0.3,  # float32, per-channel float64 steps
        torch.randn(11, generator=g) * 2.0,  # float32, mostly outside the clipped range
        torch.randn(3, 25, generator=g, dtype=F64) * 0.3,  # float64, per-channel steps
    ]
    qs = [Quantizer("uniform", "cosine", bits=4, step=0.07, a=0.5)]
    per_channel = torch.tensor([[0.1], [0.05], [0.2], [0.3]], dtype=F64)
    steps = [qs[0].step, None, 0.05, per_channel, 0.1, per_channel[1:]]
    many = eq.M_many(ws, steps)
    assert [m.shape for m in many] == [w.shape for w in ws]
    assert [m.dtype for m in many] == [w.dtype for w in ws]
    for w, st, m in zip(ws, steps, many, strict=True):
        torch.testing.assert_close(m, eq.M(w, st), rtol=0, atol=0)
        st_v = 0.1 if st is None else st
        q = Forward("uniform", 4)  # the quantizer's forward with this step
        assert torch.equal(q(m, st_v), q(w, st_v))
        inside = ((w / st_v) >= -8) & ((w / st_v) <= 7)  # M = w outside [-8Δ, 7Δ]
        assert torch.equal(m[~inside], w[~inside])
        lo = torch.as_tensor(st_v, dtype=F64) * torch.round(w.double() / st_v)
        s64 = torch.as_tensor(st_v, dtype=F64).expand(w.shape)[inside]
        want = cosine_M(w.double()[inside], s64, 0.5)
        # the table's accuracy (1e-10·Δ) plus a few ulps, stretched by M' <= α/min q̂'
        ulps = 4 * torch.finfo(w.dtype).eps * (1 + eq.alpha / eq.g_min)
        tol = 1e-10 * s64 + ulps * (lo[inside].abs() + s64)
        assert ((m.double()[inside] - want).abs() <= tol).all()
    with pytest.raises(ConfigError, match="does not broadcast"):
        eq.M(ws[3], torch.ones(5, dtype=F64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_M_on_cuda_matches_cpu():
    eq = equivalent_ste("dsq", 0.1, params={"k": 3.0})
    w = torch.randn(1000, 7) * 0.5
    torch.testing.assert_close(eq.M(w.cuda()).cpu(), eq.M(w), rtol=0, atol=1e-7)
    torch.testing.assert_close(eq.M_inv(w.cuda()).cpu(), eq.M_inv(w), rtol=0, atol=1e-7)


def test_clipped_quantizer_map():
    step = 0.1
    eq = equivalent_ste("cosine", step, params={"a": 0.5}, bits=4)
    assert eq.ste == "clipped"
    w = dense_grid(step, 12, F64)
    m = eq.M(w)
    q = Quantizer("uniform", "ste", bits=4, step=step)
    assert torch.equal(q(eq.M(w, step=q.step)), q(w))
    outside = (w < -8 * step) | (w > 7 * step)
    assert torch.equal(m[outside], w[outside])
    inside = ~outside
    torch.testing.assert_close(m[inside], cosine_M(w[inside], step, 0.5), rtol=0, atol=1e-9)
    assert bool((m[1:] >= m[:-1]).all())


# --- what the theorem does not cover is reported


def test_vanishing_estimators_raise_naming_where():
    with pytest.raises(ConfigError) as e:
        equivalent_ste("cosine", 0.1, params={"a": 1.0})
    msg = str(e.value)
    assert "cosine(a=1.0)" in msg and "vanishes" in msg and "change points" in msg
    with pytest.raises(ConfigError, match="is negative"):
        equivalent_ste("cosine", 0.1, params={"a": -1.5})
    with pytest.raises(ConfigError, match="vanishes at the bin centres"):
        equivalent_ste("triangle_wave", 0.1, params={"m": 0.0})
    with pytest.raises(ConfigError, match="vanishes at .* of every bin"):  # sech² underflows
        equivalent_ste("dsq", 0.1, params={"k": 2000.0})
    with pytest.raises(ConfigError, match="nearly vanishes"):
        equivalent_ste("dsq", 0.1, params={"k": 100.0})


def test_negative_region_is_named_precisely():
    """cosine(a=2) is negative where cos(2πr) < -1/2, i.e. |r| > 1/3: two intervals
    next to the change points, not the whole bin."""
    with pytest.raises(ConfigError) as e:
        equivalent_ste("cosine", 0.1, params={"a": 2.0})
    msg = str(e.value)
    assert "33% of every bin" in msg
    assert "between w = level -0.5·Δ and level -0.3334·Δ" in msg
    assert "between w = level +0.3334·Δ and level +0.5·Δ" in msg
    assert "level -0.5·Δ and level +0.5·Δ" not in msg


def test_non_cyclical_and_unsupported_estimators_raise():
    with pytest.raises(ConfigError, match="not cyclical"):
        equivalent_ste("clipped", 0.1, params={"c": 0.5})  # clipped STE: 0 beyond |w| > c
    with pytest.raises(ConfigError, match="not cyclical"):
        equivalent_ste(lambda w: 1 + 0.5 * torch.cos(w), 0.1)  # wrong period
    with pytest.raises(ConfigError, match="cannot serve quantizer 'uniform'"):
        equivalent_ste("approx_sign", 0.1)
    with pytest.raises(ConfigError, match="step must be a finite number > 0, got -1"):
        equivalent_ste("cosine", -1)
    with pytest.raises(ConfigError, match="bits must be an integer in"):
        equivalent_ste("cosine", 0.1, bits=1)
    eq = equivalent_ste("cosine", 0.1)
    with pytest.raises(StelabTypeError, match="floating-point"):
        eq.M(torch.arange(3))


def test_allow_degenerate_returns_the_limit_with_a_warning():
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        eq = equivalent_ste("cosine", 0.1, params={"a": 1.0}, allow_degenerate=True)
    assert any(issubclass(r.category, DegenerateEstimatorWarning) for r in rec)
    assert eq.degenerate and eq.alpha == 0.0
    w = dense_grid(0.1, 3, F64)
    m = eq.M(w)
    assert torch.equal(torch.round(m / 0.1), torch.round(w / 0.1))
    assert bool((m[1:] >= m[:-1]).all())
    # the limit of a -> 1: everything inside a bin collapses onto its level
    inner = (w / 0.1 - torch.round(w / 0.1)).abs() < 0.4
    assert ((m - 0.1 * torch.round(w / 0.1))[inner].abs() < 0.05 * 0.1).all()


def test_is_cyclical():
    assert is_cyclical(get("cosine")) and is_cyclical(get("dsq"))
    assert not is_cyclical(get("ste")) and not is_cyclical(get("clipped"))


# --- to_ste


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.conv = QuantConv2d(
            1, 3, 3, weight_quantizer=Quantizer("uniform", "cosine", step=0.05, a=0.5)
        )
        self.fc = QuantLinear(
            12, 5, weight_quantizer=Quantizer("uniform", "dsq", bits=4, step=0.03, k=3.0)
        )
        self.plain = QuantLinear(5, 4, weight_quantizer=Quantizer("uniform", "ste", step=0.1))
        self.binary = QuantLinear(4, 2, weight_quantizer=Quantizer("sign", "approx_sign"))
        self.to(dtype)

    def forward(self, x):
        h = self.conv(x).flatten(1)
        return self.binary(self.plain(self.fc(h)))


def test_to_ste_maps_weights_keeps_function_and_scales_sgd_lr():
    torch.manual_seed(0)
    net = Net(F64)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(8, 1, 4, 4, dtype=F64)
    net(x).square().sum().backward()
    opt.step()  # momentum buffers exist now
    conv, fc, opt2 = None, None, None
    new, opt2, report = to_ste(net, opt)
    conv, fc = new.conv, new.fc
    assert conv.weight_quantizer.estimator.name == "ste"
    assert fc.weight_quantizer.estimator.name == "clipped"  # clipped 4-bit quantizer
    assert new.plain.weight_quantizer.estimator.name == "ste"
    assert new.binary.weight_quantizer.estimator.name == "approx_sign"
    # latent weights through M (closed forms), same quantized weights, same function
    torch.testing.assert_close(conv.weight, cosine_M(net.conv.weight, 0.05, 0.5), atol=1e-9, rtol=0)
    step_fc = float(net.fc.weight_quantizer.step)
    fc_in = (net.fc.weight >= -8 * step_fc) & (net.fc.weight <= 7 * step_fc)
    want = torch.where(fc_in, dsq_M(net.fc.weight, step_fc, 3.0), net.fc.weight)
    torch.testing.assert_close(fc.weight, want, atol=1e-9, rtol=0)
    assert torch.equal(new(x), net(x))
    assert torch.equal(new.conv.bias, net.conv.bias)
    # round trip: M⁻¹ of the mapped weights gives the originals back
    eq = equivalent_ste("cosine", float(net.conv.weight_quantizer.step), params={"a": 0.5})
    back = eq.M_inv(conv.weight, step=net.conv.weight_quantizer.step)
    torch.testing.assert_close(back, net.conv.weight, atol=1e-13, rtol=0)
    # the original is untouched
    assert net.conv.weight_quantizer.estimator.name == "cosine"
    # lr × α per layer, other parameters at lr
    lr_of = {id(p): g["lr"] for g in opt2.param_groups for p in g["params"]}
    assert lr_of[id(conv.weight)] == pytest.approx(0.1 * math.sqrt(0.75), abs=1e-9)
    assert lr_of[id(fc.weight)] == pytest.approx(0.1 * dsq_alpha(3.0), abs=1e-9)
    assert lr_of[id(conv.bias)] == 0.1 and lr_of[id(new.plain.weight)] == 0.1
    assert all(g["momentum"] == 0.9 for g in opt2.param_groups)
    # momentum buffer: first-order conversion buf / q̂'(w)
    qd = 1 + 0.5 * torch.cos(2 * math.pi * net.conv.weight / 0.05)
    buf_old = opt.state[net.conv.weight]["momentum_buffer"]
    torch.testing.assert_close(opt2.state[conv.weight]["momentum_buffer"], buf_old / qd)
    text = str(report)
    assert "conv" in text and "0.866025" in text and "SGD + momentum" in text
    assert [c.name for c in report.layers] == ["conv", "fc"]


def test_to_ste_float32_roundtrip_and_no_optimizer():
    torch.manual_seed(1)
    net = Net(torch.float32)
    new, opt, report = to_ste(net)
    assert opt is None and "no optimizer given" in str(report)
    x = torch.randn(4, 1, 4, 4)
    assert torch.equal(new(x), net(x))
    eq = equivalent_ste("cosine", float(net.conv.weight_quantizer.step), params={"a": 0.5})
    back = eq.M_inv(new.conv.weight, step=net.conv.weight_quantizer.step)
    assert (back - net.conv.weight).abs().max() <= 1e-6 * 0.05


def test_to_ste_adam_changes_nothing_but_the_estimator():
    net = Net(F64)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, eps=1e-9)
    new, opt2, report = to_ste(net, opt)
    assert torch.equal(new.conv.weight, net.conv.weight)  # not mapped
    assert new.conv.weight_quantizer.estimator.name == "ste"
    assert isinstance(opt2, torch.optim.AdamW)
    assert all(g["lr"] == 1e-3 and g["eps"] == 1e-9 for g in opt2.param_groups)
    assert "unchanged" in report.optimizer and all(c.lr_factor == 1.0 for c in report.layers)
    text = str(report).splitlines()  # one row per converted layer, no "none" line
    assert report.layers and all(any(ln.startswith(c.name) for ln in text) for c in report.layers)
    assert "(no layer with a cyclical weight estimator)" not in text


def test_to_ste_rejects_other_optimizers_and_skips_learned_steps():
    net = Net()
    with pytest.raises(ConfigError, match="RMSprop"):
        to_ste(net, torch.optim.RMSprop(net.parameters()))
    m = nn.Sequential(
        QuantLinear(
            3, 2, weight_quantizer=Quantizer("uniform", "cosine", bits=4, step=0.1, learn_step=True)
        )  # fmt: skip
    )
    new, _, report = to_ste(m)
    assert new[0].weight_quantizer.estimator.name == "cosine"
    assert report.unchanged and "learned step" in report.unchanged[0][1]


def test_one_sgd_step_matches_to_second_order():
    # the theorem per step: M(w - η q̂' G) = M(w) - αηG + O(η²)
    torch.manual_seed(2)
    net = Net(F64)
    x = torch.randn(16, 1, 4, 4, dtype=F64)
    gaps = []
    for lr in (1e-4, 5e-5):
        a = Net(F64)
        a.load_state_dict(net.state_dict())
        b, opt_b, _ = to_ste(a, torch.optim.SGD(a.parameters(), lr=lr))
        opt_a = torch.optim.SGD(a.parameters(), lr=lr)
        for model, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            model(x).square().sum().backward()
            opt.step()
        eq = equivalent_ste("cosine", 0.05, params={"a": 0.5})
        step = a.conv.weight_quantizer.step
        gaps.append((eq.M(a.conv.weight.detach(), step=step) - b.conv.weight).abs().max())
    assert 0 < gaps[1] < gaps[0] / 3  # ~ 4: second order


# --- the theorem on a toy regression (fast and exact, float64)


def _toy(est: str, params: dict, eta: float, horizon: float = 0.15, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    d, n, step = 8, 32, 0.05
    X = torch.randn(n, d, dtype=F64, generator=g)
    y = X @ torch.randn(d, dtype=F64, generator=g)
    w0 = 0.3 * torch.randn(d, dtype=F64, generator=g)
    eq = equivalent_ste(est, step, params=params)
    ctx = Forward("uniform").context(step)

    def Q(w):
        return step * torch.round(w / step)

    def G(w):  # ∂L/∂Q at Q(w), L = |XQ - y|²/(2n)
        return X.T @ (X @ Q(w) - y) / n

    w, u, v = w0.clone(), w0.clone(), eq.M(w0)  # custom, (i) plain STE, (iii) STE αη + M(w0)
    for _ in range(round(horizon / eta)):
        w = w - eta * eq.estimator.derivative(w, ctx) * G(w)
        u = u - eta * G(u)
        v = v - eq.alpha * eta * G(v)
    gap = ((eq.M(w) - v).abs() / step).mean().item()
    flips_iii = (Q(w) != Q(v)).double().mean().item()
    flips_i = (Q(w) != Q(u)).double().mean().item()
    return gap, flips_iii, flips_i


@pytest.mark.parametrize("est,params", [("cosine", {"a": 0.5}), ("dsq", {"k": 3.0})])
def test_toy_regression_gap_is_order_eta(est, params):
    gap1, f3a, f1a = _toy(est, params, 5e-4)
    gap2, f3b, f1b = _toy(est, params, 2.5e-4)
    assert gap2 < gap1
    assert 2 * 0.8 <= gap1 / gap2 <= 2 * 1.2  # halving η halves the gap (within 20%)
    assert f3a == 0 and f3b == 0  # (iii): same quantized weights at the end
    assert f1a >= 0.25 and f1b >= 0.25  # (i): plain STE drifts away


# --- the CLI helper


def test_disguise_report_text_and_plot(tmp_path):
    a = 0.5
    text = disguise_report("cosine", 0.1, {"a": a}, plot=tmp_path / "d.png")
    assert f"α = {math.sqrt(1 - a * a):.8g}" in text
    assert "q̂' min       0.5 at the change points" in text
    assert "q̂' max       1.5 at the bin centres" in text
    # max |M(w) - w| / Δ from the closed form, on a fine grid
    r = torch.linspace(-0.5, 0.5, 200001, dtype=F64)
    beta = math.sqrt((1 - a) / (1 + a))
    shift = (torch.atan(beta * torch.tan(math.pi * r)) / math.pi - r).abs().max().item()
    assert f"max |M(w) - w| = {shift:.6f} Δ" in text
    assert equivalent_ste("cosine", 0.1, params={"a": a}).max_shift == pytest.approx(shift, 1e-6)
    png = (tmp_path / "d.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ConfigError, match="vanishes"):
        disguise_report("cosine", 0.1, {"a": 1.0}, plot=None)
    with pytest.raises(ConfigError, match=r"\.png, \.pdf or \.svg"):
        disguise_report("cosine", 0.1, {"a": a}, plot=tmp_path / "d.txt")


@pytest.mark.parametrize(
    "name,params",
    [("cosine", {"a": 0.5}), ("cosine", {"a": 0.97}), ("dsq", {"k": 3.0}),
     ("triangle_wave", {"m": 0.3})],
)  # fmt: skip
def test_inverse_lookup_finds_the_same_panel_as_binary_search(name, params):
    import dataclasses

    eq = equivalent_ste(name, 0.1, params=params)
    t = eq._table
    assert 1 <= t.hops <= 4  # the grid look-up path is the one taken
    g = torch.Generator().manual_seed(1)
    p = torch.cat([torch.rand(20000, generator=g, dtype=F64), t.phi, torch.tensor([0.0, 1.0])])
    fast = eq._phi_inv(p.clone())
    eq._table = dataclasses.replace(t, hops=99)  # force torch.searchsorted
    slow = eq._phi_inv(p.clone())
    assert torch.equal(fast, slow)


# --- to_ste: no silent no-ops


@pytest.fixture()
def user_registry():
    """Estimators registered by a test are removed after it (the registry is global)."""
    from stelab import estimators

    before = set(estimators.names())
    yield
    for name in set(estimators.names()) - before:
        estimators.REGISTRY.unregister(name)


def test_to_ste_refuses_an_estimator_it_cannot_map_and_names_the_layer(user_registry):
    @stelab_register("bump_not_cyclical_test", overwrite=True)
    def bump(w):
        "1 + 0.3 cos(2 pi w / 0.05)"
        return 1 + 0.3 * torch.cos(2 * math.pi * w / 0.05)

    bumpy = Quantizer("uniform", "bump_not_cyclical_test", step=0.05)
    net = nn.Sequential(
        QuantLinear(3, 2, weight_quantizer=Quantizer("uniform", "ste", step=0.05)),
        QuantLinear(2, 2, weight_quantizer=bumpy),
    )
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"layer '1': estimator bump_not_cyclical_test is not"):
        to_ste(net, opt)
    with pytest.raises(
        ConfigError, match=r"layer '0'.*'ewgs\(delta=0.2\)'|layer '0': estimator ewgs"
    ):
        to_ste(
            nn.Sequential(
                QuantLinear(3, 2, weight_quantizer=Quantizer("uniform", "ewgs", step=0.1))
            )
        )
    # strict=False: listed as unchanged, and the optimizer report does not claim lr × α
    new, opt2, report = to_ste(net, opt, strict=False)
    assert new[1].weight_quantizer.estimator.name == "bump_not_cyclical_test"
    assert report.unchanged and report.unchanged[0][0] == "1"
    assert "no layer was converted" in report.optimizer and "lr × α" not in report.optimizer
    text = str(report).splitlines()
    assert "(no layer with a cyclical weight estimator)" in text
    assert any(ln.startswith("unchanged: 1: ") for ln in text)
    assert all(g["lr"] == 0.1 for g in opt2.param_groups)


def test_to_ste_maps_a_registered_cyclical_estimator(user_registry):
    from stelab.estimators import CyclicEstimator, register

    @register("cos_user_test", overwrite=True)
    class CosUser(CyclicEstimator):
        formula = "1 + 0.5 cos(2 pi r)"

        def profile(self, r):
            return 1 + 0.5 * torch.cos(2 * math.pi * r)

    net = nn.Sequential(
        QuantLinear(3, 2, weight_quantizer=Quantizer("uniform", "cos_user_test", step=0.05)),
        QuantLinear(2, 2, weight_quantizer=Quantizer("sign", "approx_sign")),
    )
    new, opt2, report = to_ste(net, torch.optim.SGD(net.parameters(), lr=0.1))
    assert new[0].weight_quantizer.estimator.name == "ste"
    assert report.layers[0].alpha == pytest.approx(math.sqrt(0.75), abs=1e-9)
    lr_of = {id(p): g["lr"] for g in opt2.param_groups for p in g["params"]}
    assert lr_of[id(new[0].weight)] == pytest.approx(0.1 * math.sqrt(0.75), abs=1e-9)
    # the sign layer is outside [S24]: listed, not silently skipped
    assert report.unchanged == [
        ("1", "approx_sign on forward 'sign': [S24] maps 'uniform' quantizers")
    ]


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("bits", [4, None])
def test_M_whole_chunks_with_one_step_equal_the_buffered_path(monkeypatch, dtype, bits):
    """A tensor with one step maps its whole chunks in place of the copy (the step a 0-d
    tensor); the buffered per-weight path (the same step value at every element) must give
    the same bits, at chunk edges, change points, NaN and ±inf alike."""
    import stelab.disguise.equivalence as dg

    monkeypatch.setattr(dg, "CHUNK", 64)
    eq = equivalent_ste("cosine", 0.1, params={"a": 0.5}, bits=bits)
    g = torch.Generator().manual_seed(1)
    special = torch.tensor([0.05, -0.05, 0.75, -0.85, 0.7, 1e30, -math.inf, math.inf, math.nan])
    w = torch.cat([torch.randn(64 * 5 + 7, generator=g) * 0.5, special]).to(dtype)
    for step in (0.1, torch.tensor(0.07, dtype=F64)):
        per_weight = torch.full(w.shape, float(step), dtype=F64).to(dtype)  # the step in w's dtype
        fast, ref = eq.M(w, step), eq.M(w, per_weight)
        bits_of = torch.int32 if dtype == torch.float32 else torch.int64
        assert torch.equal(fast.view(bits_of), ref.view(bits_of))


# --- M / M⁻¹ against their plain formulation, bit for bit
#
# The reference below is the map as first written (one chunk, no buffers, no grouping):
# any faster rewrite of Equivalence._map / _map_chunk (chunking, grouping, pass-saving,
# table layout) must return exactly these bits, for both dtypes and every kind of step.


def _ref_horner(cols, j, u):
    c0, c1, c2, c3 = cols
    a = c3.index_select(0, j)
    b = torch.index_select(c2, 0, j).addcmul_(u, a)
    a = torch.index_select(c1, 0, j, out=a).addcmul_(u, b)
    return torch.index_select(c0, 0, j, out=b).addcmul_(u, a)


def _ref_into_bins(out, n, step, lo, hi, skip):
    def q(v):
        m = (v / step).round_()
        return m if lo is None else m.clamp_(lo, hi)

    bad = q(out) != n
    skip = torch.isnan(n) if skip is None else skip | torch.isnan(n)
    bad &= ~skip
    centre = (n * step).to(out.dtype)
    for _ in range(64):
        if not bool(bad.any()):
            return
        out.copy_(torch.where(bad, torch.nextafter(out, centre), out))
        bad = (q(out) != n) & ~skip
    raise AssertionError("reference could not place M(w) in its bin")


def _ref_map(eq, w, step, inverse):
    """M / M⁻¹ as stelab computed it before the pass-saving rewrite (one chunk)."""
    st = eq.step if step is None else step
    cdt = torch.result_type(w, st)
    wc = w.reshape(-1).to(cdt)
    if isinstance(st, torch.Tensor) and st.dim() > 0:
        stc = st.to(cdt).expand(w.shape).reshape(-1)
    elif isinstance(st, torch.Tensor):
        stc = st.to(cdt)
    else:
        stc = torch.tensor(st, dtype=cdt)
    out = torch.empty(wc.shape, dtype=w.dtype)
    t = eq._table
    lo_, hi_ = eq._lo, eq._hi
    clipped = eq.bits is not None
    s = wc / stc
    n = s.round()
    if clipped:
        n.clamp_(lo_, hi_)
    r = torch.sub(s, n, out=torch.empty(s.shape, dtype=F64))
    r.nan_to_num_(0.0)
    if inverse:
        y = eq._phi_inv(r.add_(0.5))
    else:
        x = r.mul_(t.n).add_(t.n / 2)
        j = x.to(torch.int32).clamp_(0, t.n - 1)
        y = _ref_horner(t.cols_centred, j, x.sub_(j))
    y = y.add_(n).mul_(stc)
    keep = None
    if clipped:
        mid, half = (lo_ + hi_) / 2, (hi_ - lo_) / 2
        keep = s.sub_(mid).abs_() > half
        y = torch.where(keep, wc, y)
    out.copy_(y)
    _ref_into_bins(out, n, stc, lo_ if clipped else None, hi_, keep)
    return out.view(w.shape)


def _edge_weights(step: float, dtype: torch.dtype, g: torch.Generator) -> torch.Tensor:
    """Random weights over ±12 bins plus edge values: change points and their float
    neighbours, levels, ±0, subnormals, huge, ±inf, NaN."""
    st = torch.tensor(step, dtype=dtype)
    body = torch.randn(3000, generator=g, dtype=F64).to(dtype) * 5 * st
    halves = (torch.arange(-12, 12, dtype=F64) + 0.5).to(dtype) * st
    levels = torch.arange(-12, 13, dtype=F64).to(dtype) * st
    fi = torch.finfo(dtype)
    inf = torch.tensor(math.inf, dtype=dtype)
    special = torch.tensor(
        [0.0, -0.0, fi.tiny, -fi.tiny, fi.tiny / 4, fi.max, -fi.max, fi.max / 3, 1e30,
         -1e30, 2.0**40, math.inf, -math.inf, math.nan], dtype=F64,
    ).to(dtype)  # fmt: skip
    return torch.cat([body, halves, torch.nextafter(halves, inf), torch.nextafter(halves, -inf),
                      levels, special])  # fmt: skip


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_M_and_M_inv_bit_for_bit_as_the_plain_formulation(bits, dtype, monkeypatch):
    """M and M⁻¹ return exactly the plain formulation's bits over random tensors with
    edge values (change points and their neighbours, ±0, subnormals, huge, ±inf, NaN),
    with the step as None / Python float / 0-d float64 tensor / per-weight tensor,
    clipped and unclipped, in chunks that are all inside the range and chunks that
    are not."""
    import stelab.disguise.equivalence as dg

    chunk = dg.CHUNK
    g = torch.Generator().manual_seed(1)
    for name, params in [("cosine", {"a": 0.5}), ("dsq", {"k": 3.0}), ("dsq", {"k": 20.0})]:
        eq = equivalent_ste(name, 0.01, params=params, bits=bits)
        for trial in range(6):
            # trials 3-5 in chunks of 257 elements (the general and the chunk path mixed)
            monkeypatch.setattr(dg, "CHUNK", 257 if trial >= 3 else chunk)
            w = _edge_weights(0.01, dtype, g)
            w = w[torch.randperm(w.numel(), generator=g)]
            if trial % 2:  # finite, and (trial 1) inside the clipped range: the fast path
                w = w[torch.isfinite(w) & (w.abs() < (7 if trial == 1 else 1e6) * 0.01)]
            steps = [None, torch.tensor(0.01, dtype=F64), 0.013]
            for st in steps:
                for inverse in (False, True):
                    got = eq.M_inv(w, st) if inverse else eq.M(w, st)
                    want = _ref_map(eq, w, st, inverse)
                    assert got.dtype == want.dtype
                    same = (got == want) | (got.isnan() & want.isnan())
                    assert bool(same.all()), (name, trial, st, inverse, w[~same][:4])
            per = (torch.rand(w.numel(), 1, generator=g, dtype=F64) + 0.5) * 0.01
            wv = w.view(-1, 1)
            assert torch.equal(eq.M(wv, per).isnan(), _ref_map(eq, wv, per, False).isnan())
            a, b = eq.M(wv, per), _ref_map(eq, wv, per, False)
            assert bool(((a == b) | (a.isnan() & b.isnan())).all())


# --- asymmetric estimators on a clipped quantizer; the monotone-table guard


def test_asymmetric_estimator_on_clipped_quantizer_against_numeric_integration():
    """q̂'(w) = 1 + a·sin(2πw/Δ) is cyclical but not symmetric about the bin centre, so
    M moves the centres of the outermost levels (noted). Truth: Φ(r) = α ∫_{-1/2}^r
    dρ/q̂'(Δρ) by scipy quadrature, α = sqrt(1 - a²); M(w) = Δ(n - 1/2 + Φ(r)) on
    [lo·Δ, hi·Δ], the identity outside; Q(M(w)) == Q(w) exactly everywhere, also at the
    change points and in the outermost (clipped) bins."""
    from scipy import integrate

    step, a, bits = 0.1, 0.6, 3  # levels -4Δ .. 3Δ

    def qhat(w):
        return 1 + a * torch.sin(2 * math.pi * w / step)

    eq = equivalent_ste(qhat, step, bits=bits)
    assert not eq.symmetric and any("not symmetric" in n for n in eq.notes)
    assert eq.alpha == pytest.approx(math.sqrt(1 - a * a), rel=1e-10)
    w = dense_grid(step, 6, F64)
    q = Quantizer("uniform", "ste", bits=bits, step=step)
    m = eq.M(w, step=q.step)
    assert torch.equal(q(m), q(w))
    # outside the range, by the quantizer's own w/Δ: the identity (so M jumps back down at
    # the top: M(hi·Δ) = Δ(hi - 1/2 + Φ(0)) > hi·Δ when Φ(0) > 1/2, the noted caveat)
    outside = (w / step < -4) | (w / step > 3)
    assert torch.equal(m[outside], w[outside])
    inside = ~outside
    assert bool((m[inside][1:] >= m[inside][:-1]).all())
    assert float(m[inside].max()) > 3 * step + 0.01
    # M⁻¹ undoes M where M(w) stays within [lo·Δ, hi·Δ] (above it M⁻¹ is the identity)
    back = inside & (m / step <= 3)
    assert int((inside & ~back).sum()) > 100
    torch.testing.assert_close(eq.M_inv(m[back], step=q.step), w[back], rtol=0, atol=1e-12)
    assert torch.equal(q(eq.M_inv(w, step=q.step)), q(w))
    pts = [-3.999 * step, -3.9 * step, -3.5 * step, -0.77 * step, 0.0, 0.31 * step]
    pts += [2.6 * step, 2.95 * step, 2.999 * step]
    alpha = math.sqrt(1 - a * a)
    for x in pts:
        n = max(-4, min(3, round(x / step)))
        r = x / step - n
        phi = alpha * integrate.quad(lambda p: 1 / (1 + a * math.sin(2 * math.pi * p)), -0.5, r,
                                     epsabs=1e-14, epsrel=1e-13)[0]  # fmt: skip
        got = float(eq.M(torch.tensor([x], dtype=F64))[0])
        assert got == pytest.approx(step * (n - 0.5 + phi), abs=1e-12), x


def test_table_guard_keeps_every_panel_monotone():
    """The Hermite table is refined until every panel's cubic is monotone (Fritsch-Carlson
    slopes in [0, 3] secants), not only until the midpoint error is small: with a loose
    tolerance a narrow spike of 1/q̂' would otherwise leave overshooting panels."""
    from stelab.disguise.table import build_table

    def inv_g(r):
        return 1.0 + 400.0 * torch.exp(-(((r - 0.1) / 0.002) ** 2))

    table = build_table(inv_g, 1e6)  # the error check alone would stop at 128 panels
    assert table is not None and table.n > 128
    u = torch.linspace(0, 1, 101, dtype=F64)
    c1, c2, c3 = table.coef[:, 1:2], table.coef[:, 2:3], table.coef[:, 3:4]
    slope = c1 + 2 * c2 * u + 3 * c3 * u * u  # dΦ/du on every panel
    assert bool((slope >= -1e-15).all())
    assert bool((table.phi[1:] >= table.phi[:-1]).all())


def test_to_ste_adam_moments_divided_by_qhat_and_its_square():
    """Adam's first moment is an average of gradients q̂'(w)·G, its second of their
    squares: after conversion (gradients G) they are m/q̂'(w) and v/q̂'(w)²; the step
    count and the parameters that were not converted keep their state as is."""
    torch.manual_seed(2)
    net = Net(F64)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    x = torch.randn(8, 1, 4, 4, dtype=F64)
    for _ in range(2):
        opt.zero_grad()
        net(x).square().sum().backward()
        opt.step()
    new, opt2, _ = to_ste(net, opt)
    qd = 1 + 0.5 * torch.cos(2 * math.pi * net.conv.weight / 0.05)  # cosine, a = 0.5
    old, st = opt.state[net.conv.weight], opt2.state[new.conv.weight]
    torch.testing.assert_close(st["exp_avg"], old["exp_avg"] / qd, rtol=1e-13, atol=0)
    torch.testing.assert_close(st["exp_avg_sq"], old["exp_avg_sq"] / qd**2, rtol=1e-13, atol=0)
    assert torch.equal(st["step"], old["step"])
    for a, b in ((net.plain.weight, new.plain.weight), (net.conv.bias, new.conv.bias)):
        assert torch.equal(opt2.state[b]["exp_avg"], opt.state[a]["exp_avg"])


def test_to_ste_sgd_scales_a_schedulers_initial_lr_too():
    net = Net(F64)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    torch.optim.lr_scheduler.StepLR(opt, step_size=5)  # sets initial_lr = 0.1
    _, opt2, _ = to_ste(net, opt)
    alpha = math.sqrt(0.75)  # cosine, a = 0.5
    ini = {id(p): g["initial_lr"] for g in opt2.param_groups for p in g["params"]}
    lr = {id(p): g["lr"] for g in opt2.param_groups for p in g["params"]}
    new_conv = next(p for g in opt2.param_groups for p in g["params"] if p.shape == (3, 1, 3, 3))
    assert ini[id(new_conv)] == pytest.approx(0.1 * alpha, rel=1e-9)
    assert lr[id(new_conv)] == pytest.approx(0.1 * alpha, rel=1e-9)
    assert sorted(set(ini.values()))[-1] == 0.1  # the unconverted parameters


def test_clipped_cyclicity_check_covers_the_inner_bins():
    """With bits, the estimator must repeat on every bin inside the range, not only next
    to its ends: a bump on bin 2 alone (of -8..7) is refused."""

    def bumped(w):
        base = 1 + 0.5 * torch.cos(2 * math.pi * w / 0.1)
        return base + 0.3 * ((w > 0.15) & (w < 0.25)).to(w.dtype)

    with pytest.raises(ConfigError, match="not cyclical.*on bin 2"):
        equivalent_ste(bumped, 0.1, bits=4)


def test_symmetric_estimator_is_symmetric_and_gets_no_asymmetry_note():
    for bits in (None, 4):
        eq = equivalent_ste("cosine", 0.1, params={"a": 0.5}, bits=bits)
        assert eq.symmetric
        assert not any("not symmetric" in n for n in eq.notes)


def test_to_ste_notes_the_clipped_ste_only_when_a_quantizer_is_clipped():
    m = nn.Sequential(
        QuantLinear(3, 2, weight_quantizer=Quantizer("uniform", "cosine", step=0.1, a=0.5))
    )
    _, _, report = to_ste(m)
    assert report.layers and not any("clipped quantizers" in n for n in report.notes)
    m2 = nn.Sequential(
        QuantLinear(3, 2, weight_quantizer=Quantizer("uniform", "cosine", bits=4, step=0.1, a=0.5))
    )
    _, _, report2 = to_ste(m2)
    assert sum("clipped quantizers" in n for n in report2.notes) == 1


# --- survivors of a mutation sample (docs/testing.md)


@pytest.mark.parametrize(
    "name,params",
    [("cosine", {"a": 0.5}), ("cosine", {"a": -0.9}), ("dsq", {"k": 3.0}), ("dsq", {"k": 10.0})],
)
def test_M_inv_against_bisection_on_M(name, params):
    """M⁻¹ (bracket + Newton on the cubic) against an independent inverse: bisection on
    the monotone M in float64, 80 halvings (bracket width below one ulp). cosine with
    a = -0.9 is flat (many panels per look-up cell) near both ends of the bin; dsq with
    k = 10 is so uneven that the look-up is a binary search."""
    step = 0.1
    eq = equivalent_ste(name, step, params=params)
    g = torch.Generator().manual_seed(3)
    # random points, quarter-bins, and points just inside both ends of bins (where Φ is
    # near 0 or 1: the inverse look-up's first and last cells)
    edge = torch.tensor([1e-12, 1e-9, 1e-6, 1e-4, 1e-3, 1e-2], dtype=F64)
    bins = torch.arange(-3, 4, dtype=F64)[:, None]
    w = torch.cat([torch.rand(400, generator=g, dtype=F64) * 2.4 - 1.2,
                   (torch.arange(-5, 6, dtype=F64) + 0.25) * step,
                   ((bins + 0.5 - edge) * step).flatten(),
                   ((bins - 0.5 + edge) * step).flatten()])  # fmt: skip
    n = torch.round(w / step)
    lo, hi = (n - 0.5) * step, (n + 0.5) * step
    for _ in range(80):
        mid = (lo + hi) / 2
        below = eq.M(mid) < w
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    got = eq.M_inv(w)
    ulp = torch.finfo(F64).eps * w.abs().clamp_min(step)
    # 4 ulp of backward error; forward, times the condition 1/M' = q̂'/α (> 1 where
    # q̂' is large: a flat M, e.g. cosine a = -0.9 near the jumps)
    ctx = Quantizer("uniform", step=step).context()
    cond = (get(name, **params).derivative(hi, ctx) / eq.alpha).clamp_min(1.0)
    err = (got - hi).abs() / (ulp * cond)
    assert (err <= 4).all(), float(err.max())


def test_M_many_a_buffered_element_before_whole_chunks(monkeypatch):
    """A one-element tensor sits in the buffer when a tensor with whole chunks follows:
    the whole-chunk fast path must wait (else the outputs land out of order)."""
    import stelab.disguise.equivalence as dg

    monkeypatch.setattr(dg, "CHUNK", 16)
    eq = equivalent_ste("cosine", 0.1, params={"a": 0.5})
    g = torch.Generator().manual_seed(4)
    ws = [torch.tensor([0.03], dtype=F64), torch.randn(16 * 3 + 5, generator=g, dtype=F64) * 0.3,
          torch.randn(2, generator=g, dtype=F64)]  # fmt: skip
    many = eq.M_many(ws, [0.1, 0.1, 0.1])
    for w, m in zip(ws, many, strict=True):
        assert torch.equal(m, eq.M(w))


@pytest.mark.parametrize(
    ("lo", "hi", "bin_"), [(2.497, 2.4995, 2), (-7.2, -6.8, -7), (5.8, 6.2, 6)]
)
def test_clipped_cyclicity_check_covers_the_whole_bin_and_both_end_bins(lo, hi, bin_):
    """A bump on w / step in (lo, hi) only: within the last 1/256 of bin 2, or on one of
    the bins next to the clipped ends (-7 and 6 of -8..7), is refused with the bin named."""

    def bumped(w):
        base = 1 + 0.5 * torch.cos(2 * math.pi * w / 0.1)
        r = w / 0.1
        return base + 0.3 * ((r > lo) & (r < hi)).to(w.dtype)

    with pytest.raises(ConfigError, match=f"not cyclical.*on bin {bin_}"):
        equivalent_ste(bumped, 0.1, bits=4)


def test_cyclicity_check_covers_the_bin_below_the_centre():
    """An unclipped estimator that differs only on bin -1 (w in [-1.5Δ, -0.5Δ]) is not
    cyclical and is refused (the check visits bin -1, not only bins further out)."""

    def bumped(w):
        base = 1 + 0.5 * torch.cos(2 * math.pi * w / 0.1)
        return base + 0.3 * ((w > -0.14) & (w < -0.06)).to(w.dtype)

    with pytest.raises(ConfigError, match="not cyclical.*on bin -1"):
        equivalent_ste(bumped, 0.1)


def _two_level(w):
    """q̂' = 2 on the inner half of every bin (|r| < 1/4), 1 on the outer half: a jump
    inside the bin. α is the harmonic mean 1 / (1/2 · 1/2 + 1/2 · 1/1) = 4/3."""
    r = w / 0.1 - torch.round(w / 0.1)
    return 1.0 + (r.abs() < 0.25).to(w.dtype)


def test_a_jump_inside_the_bin_needs_a_looser_tol_not_the_degenerate_limit():
    """The Hermite table cannot reach tol=1e-10 across a jump with N_MAX panels: that is
    refused with the panels, the range of q̂' and the way out (a larger tol), not taken
    for a vanishing estimator (α = 4/3 here, not 0); with tol=1e-5 α is the closed form."""
    with pytest.raises(ConfigError) as e:
        equivalent_ste(_two_level, 0.1, allow_degenerate=True)
    msg = str(e.value)
    assert f"with {2**16} panels (q̂' ranges over [1, 2] on a bin" in msg
    assert "a larger tol (below 1e-3)" in msg and "vanish" not in msg
    eq = equivalent_ste(_two_level, 0.1, tol=1e-5)
    assert eq.alpha == pytest.approx(4 / 3, rel=1e-12) and not eq.degenerate


def test_not_cyclical_names_a_point_of_the_offending_bin_and_its_value():
    """The message's w lies on the bin it names, and q̂' there is the value it prints;
    its bin-0 partner is the same position one bin index lower down to bin 0."""

    def bumped(w):
        base = 1 + 0.5 * torch.cos(2 * math.pi * w / 0.1)
        return base + 0.3 * ((w > 0.16) & (w < 0.24)).to(w.dtype)

    with pytest.raises(ConfigError) as e:
        equivalent_ste(bumped, 0.1)
    m = re.search(
        r"q̂'\(([-0-9.e+]+)\) = ([-0-9.e+]+) on bin (-?\d+) but q̂'\(([-0-9.e+]+)\) = "
        r"([-0-9.e+]+) on bin 0",
        str(e.value),
    )
    assert m, str(e.value)
    w_bad, g_bad, b, w0, g0 = (float(v) for v in m.groups())
    assert b == 2 and round(w_bad / 0.1) == 2 and round(w0 / 0.1) == 0
    assert w_bad - 2 * 0.1 == pytest.approx(w0, abs=1e-6)
    assert g_bad == pytest.approx(float(bumped(torch.tensor(w_bad, dtype=torch.float64))), rel=1e-5)
    assert g0 == pytest.approx(float(bumped(torch.tensor(w0, dtype=torch.float64))), rel=1e-5)


@pytest.mark.parametrize("scale", [1e-3, 1e3])
def test_cyclicity_tolerance_is_relative_to_the_size_of_the_estimator(scale):
    """q̂' repeating up to 1e-8 of its size on every bin passes; 1e-5 of its size does
    not, whatever that size is (the tolerance is 1e-6 relative)."""

    def wobbly(rel):
        def g(w):
            base = scale * (1 + 0.5 * torch.cos(2 * math.pi * w / 0.1))
            return base * (1 + rel * torch.sin(w))  # sin(w): differs from bin to bin

        return g

    assert equivalent_ste(wobbly(1e-8), 0.1).alpha == pytest.approx(
        scale * math.sqrt(0.75), rel=1e-6
    )
    with pytest.raises(ConfigError, match="not cyclical"):
        equivalent_ste(wobbly(1e-5), 0.1)


@pytest.mark.parametrize("bits", [1, 17])
def test_equivalent_ste_bits_range(bits):
    with pytest.raises(ConfigError, match=rf"bits must be an integer in \[2, 16\], got {bits}$"):
        equivalent_ste("cosine", 0.1, bits=bits)
    assert equivalent_ste("cosine", 0.1, bits=16).bits == 16


@pytest.mark.parametrize(("size", "noted"), [(1e-7, True), (0.99e-6, True), (1.01e-6, False)])
def test_a_tiny_alpha_is_noted(size, noted):
    """q̂' constant at ``size``: α = size (its harmonic mean), noted below 1e-6 (the STE
    that replaces it then barely moves); a usual estimator gets no note."""
    eq = equivalent_ste(lambda w: torch.full_like(w, size), 0.1)
    assert eq.alpha == pytest.approx(size, rel=1e-12) and not eq.degenerate
    assert any("barely moves" in n for n in eq.notes) is noted
    assert equivalent_ste("cosine", 0.1).notes == []


def test_a_non_finite_estimator_is_refused_naming_where():
    """q̂' infinite at the bin centres (1/|r|): refused, naming the point and the value."""

    def spiky(w):
        r = w / 0.1 - torch.round(w / 0.1)
        return 1.0 / r.abs()

    with pytest.raises(ConfigError, match=r"is not finite at w = 0 \(q̂' = inf\)"):
        equivalent_ste(spiky, 0.1)


def test_to_ste_reports_no_shift_for_weights_it_does_not_map():
    """Under Adam (weights not mapped) every converted layer's max_shift is 0 and the
    report says "not mapped"; under SGD it is the largest |M(w) - w| in steps, > 0."""
    net = Net(F64)
    _, _, adam = to_ste(net, torch.optim.Adam(net.parameters(), lr=1e-3))
    assert adam.layers and all(c.max_shift == 0.0 and not c.weights_mapped for c in adam.layers)
    assert all("not mapped" in ln for ln in str(adam).splitlines() if ln.startswith(("conv", "fc")))
    _, _, sgd = to_ste(net, torch.optim.SGD(net.parameters(), lr=0.1))
    assert all(c.weights_mapped and 0.0 < c.max_shift < 1.0 for c in sgd.layers)


# --- branches no test reached (branch coverage of stelab.disguise)


def test_to_ste_rejects_what_is_not_a_model_or_an_optimizer():
    with pytest.raises(StelabTypeError, match="model must be a torch nn.Module, got str"):
        to_ste("net")
    net = Net()
    with pytest.raises(
        StelabTypeError, match="optimizer must be a torch.optim.Optimizer or None, got str"
    ):
        to_ste(net, "sgd")


def test_to_ste_refuses_an_optimizer_over_parameters_outside_the_model():
    net = Net(F64)
    extra = nn.Parameter(torch.zeros(7, 2, dtype=F64))
    opt = torch.optim.SGD([*net.parameters(), extra], lr=0.1)
    with pytest.raises(
        ConfigError, match=r"a parameter of shape \(7, 2\) that is not in the model"
    ):
        to_ste(net, opt)


def test_to_ste_map_weights_given_overrides_the_optimizer_default():
    """map_weights=False under SGD: the weights stay as they are, the lr is still × α;
    map_weights=True under Adam: the weights go through M (closed form), the lr stays."""
    torch.manual_seed(5)
    net = Net(F64)
    new, opt2, report = to_ste(net, torch.optim.SGD(net.parameters(), lr=0.1), map_weights=False)
    assert torch.equal(new.conv.weight, net.conv.weight)
    assert torch.equal(new.fc.weight, net.fc.weight)
    assert all(not c.weights_mapped and c.max_shift == 0.0 for c in report.layers)
    lr_of = {id(p): g["lr"] for g in opt2.param_groups for p in g["params"]}
    assert lr_of[id(new.conv.weight)] == pytest.approx(0.1 * math.sqrt(0.75), rel=1e-12)
    new, opt2, report = to_ste(net, torch.optim.Adam(net.parameters(), lr=1e-3), map_weights=True)
    torch.testing.assert_close(
        new.conv.weight, cosine_M(net.conv.weight, 0.05, 0.5), atol=1e-9 * 0.05, rtol=0
    )
    assert not torch.equal(new.conv.weight, net.conv.weight)
    assert all(c.weights_mapped and 0.0 < c.max_shift < 1.0 for c in report.layers)
    assert all(g["lr"] == 1e-3 for g in opt2.param_groups)


def test_to_ste_per_channel_steps_cached_equivalences_and_ste_on_other_forwards():
    """A per-channel step (the report says so; each row mapped with its own step), two
    layers with the same estimator and step (one Equivalence for both), a clipped layer
    with that estimator and step (the clipped STE, not the cached unclipped one), and a
    sign layer with its default clipped STE (nothing to convert, not listed)."""
    torch.manual_seed(6)
    steps = torch.tensor([[0.05], [0.1], [0.02], [0.07]], dtype=F64)

    def cos_q(**kw):
        return Quantizer("uniform", "cosine", a=0.5, **kw)

    m = nn.Sequential(
        QuantLinear(3, 4, weight_quantizer=cos_q(step=steps)),
        QuantLinear(4, 4, weight_quantizer=Quantizer("sign")),
        QuantLinear(4, 4, weight_quantizer=cos_q(step=0.1)),
        QuantLinear(4, 4, weight_quantizer=cos_q(step=0.1)),
        QuantLinear(4, 4, weight_quantizer=cos_q(step=0.1, bits=4)),
    ).to(F64)
    new, _, report = to_ste(m)
    assert report.unchanged == []
    assert [c.name for c in report.layers] == ["0", "2", "3", "4"]
    assert [c.step for c in report.layers] == ["per-channel", "0.1", "0.1", "0.1"]
    assert [c.new_estimator for c in report.layers] == ["ste", "ste", "ste", "clipped"]
    assert all(c.alpha == pytest.approx(math.sqrt(0.75), abs=1e-9) for c in report.layers)
    assert new[1].weight_quantizer.estimator.name == "clipped"  # the sign layer's own
    assert new[4].weight_quantizer.estimator.name == "clipped"
    for i, s in enumerate(steps[:, 0].tolist()):
        torch.testing.assert_close(
            new[0].weight[i], cosine_M(m[0].weight[i], s, 0.5), atol=1e-9 * s, rtol=0
        )
    for i in (2, 3, 4):  # |w| < 8Δ here: inside the clipped range too
        assert float(m[i].weight.detach().abs().max()) < 0.7
        torch.testing.assert_close(
            new[i].weight, cosine_M(m[i].weight, 0.1, 0.5), atol=1e-10, rtol=0
        )
    x = torch.randn(5, 3, dtype=F64)
    assert torch.equal(new(x), m(x))


def test_to_ste_carries_each_equivalence_note_once():
    """q̂' = 1 + a·sin(2πw/Δ) on a clipped quantizer is noted as not symmetric
    (equivalent_ste's own note); two such layers with different steps (two
    Equivalences) put it into the report once. α = sqrt(1 - a²) = 0.8 for both."""
    from stelab.estimators import get as get_estimator

    def asym(r):
        return 1 + 0.6 * torch.sin(2 * math.pi * r)

    m = nn.Sequential(
        QuantLinear(3, 2, weight_quantizer=Quantizer("uniform", "periodic", bits=3, step=0.1,
                                                     func=asym)),
        QuantLinear(2, 2, weight_quantizer=Quantizer("uniform", "periodic", bits=3, step=0.05,
                                                     func=asym)),
    )  # fmt: skip
    _, _, report = to_ste(m)
    (note,) = equivalent_ste(get_estimator("periodic", func=asym), 0.1, bits=3).notes
    assert "not symmetric" in note
    assert report.notes.count(note) == 1
    assert [c.alpha for c in report.layers] == pytest.approx([0.8, 0.8], abs=1e-9)


@pytest.mark.parametrize("decay", [0.0, 1e-4])
def test_to_ste_notes_sgd_weight_decay(decay):
    """SGD's weight decay is not scaled by q̂': noted when it is on, not otherwise."""
    net = Net(F64)
    _, opt2, report = to_ste(net, torch.optim.SGD(net.parameters(), lr=0.1, weight_decay=decay))
    noted = [n for n in report.notes if n.startswith("weight_decay > 0")]
    assert len(noted) == (1 if decay else 0)
    assert all(g["weight_decay"] == decay for g in opt2.param_groups)


def test_to_ste_drops_state_of_parameters_outside_the_model_and_keeps_other_entries():
    """State the optimizer holds for a tensor no longer in its groups (nor in the model)
    is not carried over; a non-tensor entry of a converted weight's state is carried as
    is; the momentum buffer is divided by q̂'(w)."""
    torch.manual_seed(7)
    net = Net(F64)
    extra = nn.Parameter(torch.ones(2, dtype=F64))
    opt = torch.optim.SGD([*net.parameters(), extra], lr=0.1, momentum=0.9)
    x = torch.randn(4, 1, 4, 4, dtype=F64)
    (net(x).square().sum() + extra.square().sum()).backward()
    opt.step()
    assert extra in opt.state
    opt.param_groups[0]["params"] = [p for p in opt.param_groups[0]["params"] if p is not extra]
    opt.state[net.conv.weight]["tag"] = "epoch 3"
    new, opt2, _ = to_ste(net, opt)
    new_params = dict(new.named_parameters())
    want = {id(new_params[n]) for n, p in net.named_parameters() if p in opt.state}
    assert {id(p) for p in opt2.state} == want and len(want) == len(opt.state) - 1
    st = opt2.state[new.conv.weight]
    assert st["tag"] == "epoch 3"
    qd = 1 + 0.5 * torch.cos(2 * math.pi * net.conv.weight / 0.05)
    old = opt.state[net.conv.weight]["momentum_buffer"]
    torch.testing.assert_close(st["momentum_buffer"], old / qd, rtol=1e-13, atol=0)


def test_equivalent_ste_rejects_what_is_not_an_estimator():
    with pytest.raises(
        StelabTypeError,
        match="estimator must be a registered name, an Estimator or a function of w, got int",
    ):
        equivalent_ste(3, 0.1)


def test_equivalent_ste_step_as_a_tensor():
    """A one-element step tensor (any shape, requiring grad or not) is the number it
    holds; a tensor of several steps is refused, naming its shape."""
    ref = equivalent_ste("cosine", 0.1, params={"a": 0.5})
    w = dense_grid(0.1, 3, F64)
    for st in (torch.tensor(0.1, dtype=F64), torch.tensor([[0.1]], dtype=F64, requires_grad=True)):
        eq = equivalent_ste("cosine", st, params={"a": 0.5})
        assert type(eq.step) is float and eq.step == 0.1
        assert eq.alpha == ref.alpha
        torch.testing.assert_close(eq.M(w), cosine_M(w, 0.1, 0.5), rtol=0, atol=1e-9 * 0.1)
    with pytest.raises(ConfigError, match=r"step must be one number here \(got a tensor of shape "
                                          r"\(2, 1\)\)"):  # fmt: skip
        equivalent_ste("cosine", torch.tensor([[0.1], [0.2]]), params={"a": 0.5})


@pytest.mark.parametrize("tol", [0, -1e-9, 1e-3, 2e-3, "1e-9", None, True])
def test_equivalent_ste_tol_range(tol):
    with pytest.raises(ConfigError, match=rf"tol must be a number in \(0, 1e-3\), got {tol!r}$"):
        equivalent_ste("cosine", 0.1, tol=tol)


def test_equivalent_ste_tol_just_inside_the_range():
    eq = equivalent_ste("cosine", 0.1, params={"a": 0.5}, tol=9.9e-4)
    assert 0 <= eq.interp_error <= 9.9e-4
    assert eq.alpha == pytest.approx(math.sqrt(0.75), abs=9.9e-4)


def test_an_estimator_returning_a_non_tensor_is_refused():
    from stelab.estimators import Estimator

    class Flat(Estimator):
        name = "flat_float_test"

        def derivative(self, x, ctx):
            return 1.0

    with pytest.raises(
        StelabTypeError, match="estimator flat_float_test returned float, not a tensor"
    ):
        equivalent_ste(Flat(), 0.1)


def test_a_nearly_vanishing_estimator_too_sharp_to_tabulate_is_degenerate():
    """DSQ at k = 35: q̂' = A·sech²(k·ρ) with A = (k/2)/tanh(k/2) ranges from A·sech²(k/2)
    ≈ 4.4e-14 (bin centres) to A = 17.5 (change points): a ratio ~2.5e-15, above the
    1e-20 at which it counts as vanishing outright but too sharp for the table (N_MAX
    panels). That is the degenerate case (α = 0 with allow_degenerate), not a jump."""
    k = 35.0
    A = (k / 2) / math.tanh(k / 2)
    g_min = A / math.cosh(k / 2) ** 2
    assert 1e-20 < g_min / A < 1e-6
    with pytest.raises(ConfigError) as e:
        equivalent_ste("dsq", 0.1, params={"k": k})
    msg = str(e.value)
    assert f"estimator dsq(k={k}) nearly vanishes (min q̂' = {g_min:.3g} at the bin " in msg
    assert f"max {A:.3g}): 1/q̂' is too sharp to integrate to tol=1e-10 with 65536" in msg
    assert msg.endswith("pass allow_degenerate=True for the limit (α = 0)")
    with pytest.warns(DegenerateEstimatorWarning, match="nearly vanishes"):
        eq = equivalent_ste("dsq", 0.1, params={"k": k}, allow_degenerate=True)
    assert eq.degenerate and eq.alpha == 0.0
    assert eq.g_min == pytest.approx(g_min, rel=1e-9) and eq.g_max == pytest.approx(A, rel=1e-12)
    assert any("too sharp" in n for n in eq.notes)
    w = dense_grid(0.1, 2, F64)
    assert torch.equal(torch.round(eq.M(w) / 0.1), torch.round(w / 0.1))


def test_describe_r_names_a_general_position():
    from stelab.disguise.equivalence import describe_r

    assert describe_r(0.25) == "w = level +0.25·Δ"
    assert describe_r(-0.123456) == "w = level -0.1235·Δ"
    # an estimator vanishing at one point inside the bin, r = 1/4: named there
    with pytest.raises(
        ConfigError, match=r"vanishes at w = level \+0.25·Δ \(q̂' = 0 at w = \+0.025"
    ):
        equivalent_ste("periodic", 0.1, params={"func": lambda r: (r - 0.25) ** 2})


@pytest.mark.parametrize(("a", "tol"), [(0.5, 1e-10), (0.9, 1e-10), (0.9, 1e-6)])
def test_panels_and_interp_error_against_the_closed_form(a, tol):
    """interp_error is the table's largest error at its panel midpoints: against the
    closed form Φ(r) = 1/2 + atan(β tan πr)/π at the midpoints of ``panels`` equal
    panels, it is that error (and below tol); at the panel ends Φ is exact."""
    eq = equivalent_ste("cosine", 0.1, params={"a": a}, tol=tol)
    n = eq.panels
    assert isinstance(n, int) and n >= 64 and n & (n - 1) == 0
    beta = math.sqrt((1 - a) / (1 + a))

    def phi(r):
        return 0.5 + torch.atan(beta * torch.tan(math.pi * r)) / math.pi

    mid = (torch.arange(n, dtype=F64) + 0.5) / n - 0.5
    err = float((eq._phi(mid.clone()) - phi(mid)).abs().max())
    assert 0 < eq.interp_error <= tol
    assert eq.interp_error == pytest.approx(err, rel=1e-4, abs=1e-15)
    ends = torch.linspace(-0.5, 0.5, n + 1, dtype=F64)[1:-1]
    assert float((eq._phi(ends.clone()) - phi(ends)).abs().max()) < 1e-3 * err


def test_equivalence_repr():
    assert repr(equivalent_ste("cosine", 0.1, params={"a": 0.5})) == (
        "Equivalence(cosine(a=0.5), step=0.1: alpha=0.866025)"
    )
    assert repr(equivalent_ste("cosine", 0.25, params={"a": 0.5}, bits=4)) == (
        "Equivalence(cosine(a=0.5), step=0.25, bits=4: alpha=0.866025)"
    )
    with pytest.warns(DegenerateEstimatorWarning):
        eq = equivalent_ste("cosine", 0.1, params={"a": 1.0}, allow_degenerate=True)
    assert repr(eq) == "Equivalence(cosine(a=1.0), step=0.1: alpha=0, degenerate)"


def test_tables_on_another_device_are_moved_once_and_cached():
    """Off the CPU the table is copied to the device once (the meta device stands in for
    CUDA here; test_M_on_cuda_matches_cpu runs the real thing where there is a GPU)."""
    eq = equivalent_ste("cosine", 0.1, params={"a": 0.5})
    t = eq._table
    meta = torch.device("meta")
    cols, centred, phi, jinv = got = eq._on(meta)
    assert eq._on(meta) is got  # cached
    assert list(eq._device_tables) == [meta]
    for moved, orig in zip((*cols, *centred, phi, jinv), (*t.cols, *t.cols_centred, t.phi, t.jinv),
                           strict=True):  # fmt: skip
        assert moved.device == meta and moved.shape == orig.shape and moved.dtype == orig.dtype
    assert eq._on(torch.device("cpu"))[2] is t.phi  # the CPU uses the table itself
    assert eq._phi(torch.zeros(5, dtype=F64, device=meta)).device == meta


def test_M_per_channel_step_needs_a_scale_free_estimator():
    """An estimator given as a function of w is tied to its step: one step (a number or
    a one-element tensor) is fine, several are refused."""
    eq = equivalent_ste(lambda w: 1 + 0.5 * torch.cos(2 * math.pi * w / 0.1), 0.1)
    assert not eq.scale_free
    w = torch.tensor([[0.03, -0.12], [0.26, 0.04]], dtype=F64)
    for st in (torch.tensor(0.1, dtype=F64), torch.tensor([[0.1]], dtype=F64)):
        torch.testing.assert_close(eq.M(w, step=st), cosine_M(w, 0.1, 0.5), rtol=0, atol=1e-10)
    msg = r"a per-channel step needs an estimator defined in units of the step; custom is a fun"
    with pytest.raises(ConfigError, match=msg):
        eq.M(w, step=torch.tensor([[0.1], [0.1]], dtype=F64))


def test_M_step_tensor_must_be_floating_point():
    eq = equivalent_ste("cosine", 0.1, params={"a": 0.5})
    w = torch.tensor([0.03, 0.26], dtype=F64)
    with pytest.raises(
        StelabTypeError, match="step must be a floating-point tensor, got torch.int64"
    ):
        eq.M(w, step=torch.tensor(1))
    torch.testing.assert_close(eq.M(w, step=torch.tensor(1.0, dtype=F64)), cosine_M(w, 1.0, 0.5))


def test_M_many_needs_one_step_per_tensor():
    eq = equivalent_ste("cosine", 0.1, params={"a": 0.5})
    ws = [torch.zeros(3, dtype=F64), torch.zeros(2, dtype=F64)]
    with pytest.raises(ConfigError, match="M_many got 2 tensors but 1 steps"):
        eq.M_many(ws, [0.1])
    with pytest.raises(ConfigError, match="M_many got 2 tensors but 3 steps"):
        eq.M_many(ws, [0.1, 0.1, 0.1])


def test_into_bins_nudges_by_ulps_and_gives_up_far_from_the_bin():
    """A value a few ulps past the change point comes back as the largest float of its
    bin; one a whole step away is not nudged for ever (the internal guard raises)."""
    from stelab.disguise.equivalence import _into_bins

    step = torch.tensor(0.1, dtype=F64)
    n = torch.zeros(1, dtype=F64)
    edge = torch.tensor([0.05], dtype=F64)
    while float(torch.round(edge / step)) == 0:  # the first float past the change point
        edge = torch.nextafter(edge, torch.tensor(1.0, dtype=F64))
    out = edge.clone()
    for _ in range(3):
        out = torch.nextafter(out, torch.tensor(1.0, dtype=F64))
    _into_bins(out, n, step, None, math.inf, None)
    assert float(torch.round(out / step)) == 0
    assert torch.equal(torch.nextafter(out, torch.tensor(1.0, dtype=F64)), edge)
    with pytest.raises(AssertionError, match="could not place M"):
        _into_bins(torch.tensor([0.15], dtype=F64), n, step, None, math.inf, None)
