"""SBN states in {0, 1} ([S20]'s parametrisation) against the same net in {-1, +1}.

With ``h = (s + 1)/2`` a {0, 1} net with weights ``(W^k, b^k)`` computes the same
pre-activations as the {-1, +1} net with

    W'^1 = W^1, b'^1 = b^1,   W'^k = W^k / 2, b'^k = b^k + W^k 1 / 2  (k >= 2, and the output),

since ``W h + b = (W/2) s + b + W 1/2``. Same pre-activations and the same uniforms give
the same signs, so any estimator that works on the signs (one code path for both
parametrisations) must satisfy the chain rule draw by draw:

    dL/dW^k = (dL/dW'^k + dL/db'^k 1^T) / 2,   dL/db^k = dL/db'^k   (k >= 2),

and be equal for the first layer. Checked here for every registered estimator to 1e-10
(floating-point agreement), and for the exact gradient (independent truth by brute
force is in test_sbn_exact.py).
"""

from __future__ import annotations

import pytest
import torch

from stelab.errors import ConfigError
from stelab.sbn import SBNLinear, estimator_names, exact_gradient, logistic_loss, sbn_mlp

D = torch.float64

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(seed=0, hidden=(3, 4, 2), scale=1.2):
    """A {0, 1} net and the {-1, +1} net with the same pre-activations."""
    torch.manual_seed(seed)
    m01 = sbn_mlp(2, hidden, 1, states="01", dtype=D)
    with torch.no_grad():
        for p in m01.parameters():
            p.copy_(torch.randn_like(p) * scale)
    mpm = sbn_mlp(2, hidden, 1, states="pm1", dtype=D)
    layers01 = [*m01.hidden, m01.output]
    layerspm = [*mpm.hidden, mpm.output]
    with torch.no_grad():
        for k, (a, b) in enumerate(zip(layers01, layerspm, strict=True)):
            if k == 0:
                b.weight.copy_(a.weight)
                b.bias.copy_(a.bias)
            else:
                b.weight.copy_(a.weight / 2)
                b.bias.copy_(a.bias + a.weight.sum(1) / 2)
    x = torch.randn(5, 2, dtype=D)
    t = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0], dtype=D)
    return m01, mpm, x, t


def _mapped_back(mpm, grads_pm):
    """The chain rule from (W', b') to (W, b), layer by layer."""
    out = []
    mods = [*mpm.hidden, mpm.output]
    it = iter(grads_pm)
    for k, _ in enumerate(mods):
        gw, gb = next(it), next(it)
        out += [gw, gb] if k == 0 else [(gw + gb[:, None]) / 2, gb]
    return out


@pytest.mark.parametrize("estimator", estimator_names())
def test_every_estimator_obeys_the_reparametrisation_chain_rule(estimator):
    m01, mpm, x, t = _pair()
    samples = 1 if estimator != "reinforce_loo" else 3
    l01 = m01.surrogate_loss(x, t, logistic_loss, estimator, samples=samples, generator=5)
    lpm = mpm.surrogate_loss(x, t, logistic_loss, estimator, samples=samples, generator=5)
    torch.testing.assert_close(l01.detach(), lpm.detach(), rtol=1e-12, atol=1e-14)
    g01 = torch.autograd.grad(l01, list(m01.parameters()))
    gpm = _mapped_back(mpm, torch.autograd.grad(lpm, list(mpm.parameters())))
    assert any(g.abs().sum() > 0 for g in g01)
    for a, b in zip(g01, gpm, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_exact_value_and_gradient_obey_the_reparametrisation():
    m01, mpm, x, t = _pair(seed=1)
    e01 = exact_gradient(m01, x, t, logistic_loss)
    epm = exact_gradient(mpm, x, t, logistic_loss)
    torch.testing.assert_close(e01.value, epm.value, rtol=1e-13, atol=0)
    for a, b in zip(e01.grads.values(), _mapped_back(mpm, epm.grads.values()), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-14)


def test_01_states_are_zero_one_with_probability_F():
    """P(h = 1) = sigma(a): the sample mean of 20000 draws within 5 standard errors."""
    layer = SBNLinear(1, 1, states="01", dtype=D)
    with torch.no_grad():
        layer.weight.fill_(0.7)
        layer.bias.fill_(-0.2)
    h = layer(torch.ones(20000, 1, dtype=D), generator=0)
    assert set(h.unique().tolist()) == {0.0, 1.0}
    p = torch.sigmoid(torch.tensor(0.5, dtype=D))
    se = (p * (1 - p) / h.numel()).sqrt()
    assert abs(h.mean() - p) < 5 * se
    assert "states=01" in repr(layer)


def test_mean_field_forward_is_F_for_01_states():
    m01, _, x, _ = _pair(seed=2, hidden=(3,))
    a = m01.hidden[0].preact(x)
    want = m01.output(torch.sigmoid(a))
    torch.testing.assert_close(m01(x, mean_field=True), want, rtol=1e-14, atol=0)


@pytest.mark.parametrize("bad", ["pm", "0/1", 1, None])
def test_bad_states_value_names_parameter_and_choices(bad):
    with pytest.raises(ConfigError, match=r"states must be one of 'pm1', '01'.*got"):
        sbn_mlp(2, (3,), 1, states=bad)
