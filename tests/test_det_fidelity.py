"""Gradient fidelity of deterministic quantized nets: the relaxed reference and the descent test.

Truths used: closed forms of the relaxed expected loss (a loss linear in the output
makes E[L] a function of the quantizers' means: tanh(a/2) for sign with logistic
noise, the clamped identity for stochastic rounding), exact enumeration against the
Monte-Carlo reference (z-test), direct recomputation of the loss after a step, the
first-order Taylor expansion of a float model, and a planted wrong estimator.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import stelab
from stelab.analysis.deterministic import (
    descent_test,
    deterministic_fidelity,
    parse_det_estimators,
)
from stelab.analysis.relax import relaxed_elements, relaxed_gradient
from stelab.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

D = torch.float64


def _linear_loss(out, y):  # L_n = -t_n * out_n: E[L] is linear in the quantizers' means
    return -(out[:, 0] * y)


class SignNet(nn.Module):
    """x -> Linear(2, 3) -> sign -> Linear(3, 1)."""

    def __init__(self, act: nn.Module, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.l1 = nn.Linear(2, 3).to(D)
        self.l2 = nn.Linear(3, 1).to(D)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=D))
        self.act = act

    def forward(self, x):
        return self.l2(self.act(self.l1(x)))


def _data(n=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g, dtype=D)
    y = torch.tensor([1.0, -1.0, 0.5][:n], dtype=D)
    return x, y


def _closed_form_grads(net, mean_fn, x, y):
    """grad of -mean_n y_n (V mean_fn(a_n) + c): E[L] for a loss linear in the output."""
    params = dict(net.named_parameters())
    a = net.l1(x)
    f = (-(net.l2(mean_fn(a))[:, 0] * y)).mean()
    gs = torch.autograd.grad(f, list(params.values()))
    return dict(zip(params, gs, strict=True))


def test_exact_enumeration_matches_closed_form_for_logistic_sign():
    net = SignNet(stelab.QuantAct("sign", "ste"))
    x, y = _data()
    ref = relaxed_gradient(net, x, y, _linear_loss, "exact")
    assert ref.kind == "exact" and ref.states == 2**9  # 3 examples x 3 units
    truth = _closed_form_grads(net, lambda a: torch.tanh(a / 2), x, y)
    for k, g in truth.items():
        torch.testing.assert_close(ref.grads[k], g, rtol=1e-10, atol=1e-12)


def test_exact_enumeration_matches_closed_form_for_stochastic_rounding_and_noise_scale():
    # act, 2 bits, alpha 0.4: E[stochastic rounding] = clamp(a, 0, 3 * 0.4)
    net = SignNet(stelab.QuantAct("act", "ste", bits=2, alpha=0.4))
    x, y = _data()
    ref = relaxed_gradient(net, x, y, _linear_loss, "exact")
    truth = _closed_form_grads(net, lambda a: a.clamp(0, 1.2), x, y)
    for k, g in truth.items():
        torch.testing.assert_close(ref.grads[k], g, rtol=1e-10, atol=1e-12)
    # heaviside with noise scale s: E = sigmoid(a / s)
    net = SignNet(stelab.QuantAct("heaviside", "ste"), seed=3)
    ref = relaxed_gradient(net, x, y, _linear_loss, "exact", scale=0.5)
    truth = _closed_form_grads(net, lambda a: torch.sigmoid(a / 0.5), x, y)
    for k, g in truth.items():
        torch.testing.assert_close(ref.grads[k], g, rtol=1e-10, atol=1e-12)


class TinyQNet(nn.Module):
    """Uniform 2-bit weights (stochastically rounded too) and sign activations, CE loss."""

    def __init__(self, bn: bool = False):
        super().__init__()
        torch.manual_seed(0)
        wq = stelab.Quantizer("uniform", "ste", bits=2, step=0.4)
        self.l1 = stelab.QuantLinear(2, 2, weight_quantizer=wq).to(D)
        self.bn = nn.BatchNorm1d(2, affine=False).to(D) if bn else nn.Identity()
        self.act = stelab.QuantAct("sign", "ste")
        self.l2 = nn.Linear(2, 3).to(D)

    def forward(self, x):
        return self.l2(self.act(self.bn(self.l1(x))))


@pytest.mark.parametrize("bn", [False, True], ids=["factorized", "joint(batchnorm)"])
def test_mc_reference_agrees_with_exact_enumeration_z_test(bn):
    net = TinyQNet(bn)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 2, generator=g, dtype=D)
    y = torch.tensor([0, 2, 1])

    def ce(out, t):
        return nn.functional.cross_entropy(out, t, reduction="none")

    assert relaxed_elements(net, x) == 4 + 6  # 4 weights + 3 examples x 2 units
    exact = relaxed_gradient(net, x, y, ce, "exact")
    mc = relaxed_gradient(net, x, y, ce, "mc", samples=6000, generator=1)
    assert exact.kind == "exact" and mc.kind == "mc" and mc.factorized is (not bn)
    diff = torch.cat([(mc.grads[k] - exact.grads[k]).flatten() for k in exact.grads])
    se = torch.cat([mc.se[k].flatten() for k in exact.grads])
    live = se > 1e-9  # with batch norm the first bias has gradient 0 (round-off only)
    z = diff[live] / se[live]
    # unbiased MC: z ~ N(0, 1) per coordinate (tolerance: |z| < 4.5 for each of the
    # 13+ live coordinates, mean z^2 within [0.3, 2.5])
    assert z.numel() >= 13
    assert float(z.abs().max()) < 4.5, z
    assert 0.3 < float((z * z).mean()) < 2.5, z
    # and the reference is informative: its standard errors are small vs the gradient
    rel = sum(float(mc.se[k].norm() ** 2) for k in mc.se) ** 0.5
    assert rel < 0.35 * sum(float(v.norm() ** 2) for v in exact.grads.values()) ** 0.5


def test_exact_reference_refuses_a_net_too_large_to_enumerate():
    net = TinyQNet()
    x = torch.randn(40, 2, dtype=D)
    with pytest.raises(ConfigError, match=r"2\^84 outcomes .*reference='mc'"):
        relaxed_gradient(net, x, torch.zeros(40, dtype=torch.long), None, "exact")


def test_ternary_has_no_relaxation_clear_error():
    net = SignNet(stelab.QuantAct("ternary", "ste"))
    x, y = _data()
    with pytest.raises(ConfigError, match="'ternary' has no stochastic relaxation"):
        relaxed_gradient(net, x, y, _linear_loss, "exact")


# --------------------------------------------------------------------------- descent test


def _mlp(seed=0, act="act"):
    torch.manual_seed(seed)
    q = (
        stelab.QuantAct("act", "ste", bits=2, alpha=0.5)
        if act == "act"
        else stelab.QuantAct("identity", "ste")
    )
    return nn.Sequential(nn.Linear(6, 16), q, nn.Linear(16, 4)).to(D)


def _cls_data(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g, dtype=D)
    w = torch.randn(6, 4, generator=g, dtype=D)
    return x, (x @ w).argmax(1)


def test_descent_test_equals_direct_recomputation():
    net = _mlp()
    x, y = _cls_data()
    etas = [0.01, 0.3]
    res = descent_test(net, x, y, "clipped_relu", etas=etas, batches=1, batch_size=32)
    curve = res["clipped_relu"]["all"]
    # recompute independently: same batches (same generator), gradient by hand
    perm = torch.randperm(400, generator=torch.Generator().manual_seed(0))
    it, ih = perm[:32], perm[32:64]
    ref = _mlp()
    for m in ref.modules():
        if isinstance(m, stelab.Quantizer):
            m.estimator = stelab.estimator("clipped_relu")
    ce = nn.functional.cross_entropy
    loss = ce(ref(x[it]), y[it])
    grads = torch.autograd.grad(loss, list(ref.parameters()))
    for k, eta in enumerate(etas):
        stepped = _mlp()
        with torch.no_grad():
            for p, g in zip(stepped.parameters(), grads, strict=True):
                p -= eta * g
            d_tr = float(ce(stepped(x[it]), y[it]) - ce(ref(x[it]), y[it]))
            d_he = float(ce(stepped(x[ih]), y[ih]) - ce(ref(x[ih]), y[ih]))
        assert curve.d_train[k] == pytest.approx(d_tr, rel=1e-9, abs=1e-12)
        assert curve.d_held[k] == pytest.approx(d_he, rel=1e-9, abs=1e-12)
        assert curve.p_train[k] == float(d_tr < 0)
    # the caller's model is untouched (weights and estimator)
    torch.testing.assert_close(list(net.parameters())[0], list(_mlp().parameters())[0])
    assert net[1].estimator.name == "ste"


def test_descent_of_a_float_model_is_first_order_taylor():
    # identity "quantizer": the loss is smooth, dL = -eta ||g||^2 + O(eta^2)
    net = _mlp(act="identity")
    x, y = _cls_data()
    eta = 1e-5
    res = descent_test(net, x, y, "ste", etas=[eta], batches=5, batch_size=32)["ste"]["all"]
    # grad_norm is the mean ||g|| over the batches; with a small eta each dL ~ -eta ||g_b||^2
    assert res.p_train == [1.0]
    assert res.d_train[0] < 0
    assert -res.d_train[0] / eta == pytest.approx(res.grad_norm**2, rel=0.3)


def test_planted_wrong_estimator_comes_out_worse():
    # 'flipped' back-propagates -1 through the activations: the hidden layer's gradient
    # points uphill; the descent test must rank it below the STE
    from stelab import estimators

    stelab.register_estimator("flipped_test", overwrite=True)(lambda x: -torch.ones_like(x))
    try:
        net = _mlp()
        x, y = _cls_data()
        res = descent_test(
            net, x, y, "ste,flipped_test", etas=[0.03, 0.1], batches=30, batch_size=32,
            per_layer=True,
        )  # fmt: skip
    finally:
        estimators.REGISTRY.unregister("flipped_test")
    ste, bad = res["ste"]["0"], res["flipped_test"]["0"]  # a step on the first layer only
    for k in range(2):
        assert ste.p_train[k] >= 0.7 and bad.p_train[k] <= 0.3
        gap = bad.d_train[k] - ste.d_train[k]
        assert gap > 4 * math.hypot(bad.d_train_se[k], ste.d_train_se[k])
    # the output layer does not see the activation estimator: identical curves
    assert res["ste"]["2"].d_train == res["flipped_test"]["2"].d_train


def test_deterministic_fidelity_report_and_bias_against_exact_reference():
    net = SignNet(stelab.QuantAct("sign", "ste"))
    x, y = _data()
    x = x.repeat(50, 1)
    y = y.repeat(50)
    rep = deterministic_fidelity(
        net,
        x,
        y,
        "ste,logistic",
        loss_fn=_linear_loss,
        etas=[0.01, 0.1],
        batches=3,
        batch_size=3,
        reference="exact",
    )
    # with a linear loss the relaxed gradient of the hidden layer is exactly the
    # 'logistic' estimator's (2 sigma'(a) = tanh(a/2)'): bias 0, cosine 1
    lb = rep.bias["logistic(scale=1.0)"]["l1"]
    assert lb.bias_raw < 1e-10 and lb.cosine == pytest.approx(1.0, abs=1e-12)
    assert rep.bias["ste"]["l1"].bias_raw > 0.1
    text = rep.bias_table()
    assert "exact enumeration of 512 outcomes" in text and "sign(x - s Z)" in text
    assert "held-out" in rep.descent_table()
    d = rep.to_dict()
    assert d["kind"] == "deterministic" and set(d["descent"]) == {"ste", "logistic(scale=1.0)"}


def test_bad_inputs_name_the_parameter():
    net = _mlp()
    x, y = _cls_data(40)
    with pytest.raises(ConfigError, match="unknown estimator 'clipped_rel'.*did you mean"):
        parse_det_estimators("ste,clipped_rel")
    with pytest.raises(ConfigError, match="listed twice"):
        parse_det_estimators("ste,ste")
    with pytest.raises(ConfigError, match="2 x batch size 64 > 40 examples"):
        descent_test(net, x, y, "ste", batches=1, batch_size=64)
    with pytest.raises(ConfigError, match="eta must be a finite number > 0"):
        descent_test(net, x, y, "ste", etas=[0.1, -1], batches=1, batch_size=8)
    with pytest.raises(ConfigError, match="layer '1': estimator 'approx_sign' cannot serve"):
        descent_test(net, x, y, "approx_sign", batches=1, batch_size=8)
    with pytest.raises(ConfigError, match="has no stelab quantizer"):
        descent_test(nn.Linear(6, 4).to(D), x, y, "ste", batches=1, batch_size=8)
    with pytest.raises(ConfigError, match="where must be"):
        descent_test(net, x, y, "ste", where="both", batches=1, batch_size=8)


def test_gradcheck_dispatches_on_the_model():
    from stelab import analysis, sbn
    from stelab.analysis import DeterministicReport, FidelityReport

    torch.manual_seed(0)
    x = torch.randn(6, 2, dtype=D)
    y = (x[:, 0] > 0).to(D) * 2 - 1
    rep = analysis.gradcheck(
        sbn.sbn_mlp(2, (3,), 1, dtype=D), x, y, "det:ste", draws=4, sample_sizes=[1, 2],
        timing=False,
    )  # fmt: skip
    assert isinstance(rep, FidelityReport) and rep.reference.kind == "exact"
    net = _mlp()
    xc, yc = _cls_data(80)
    rep = analysis.gradcheck(net, xc, yc, "ste", etas=[0.1], batches=2, batch_size=8,
                             reference_samples=10)  # fmt: skip
    assert isinstance(rep, DeterministicReport) and rep.estimators == ["ste"]
