"""stelab's ``arm`` against an independent implementation of the ARM estimator of [S20]'s
comparison (Yin & Zhou 2019 applied layer-wise), and ``arm_shared`` against both.

The reference below is written from the formulas, not from stelab's code: per hidden
layer k (logistic noise, so ``phi = a``) draw ``U``, set ``b1 = 1{U > sigma(-a)}``,
``b2 = 1{U < sigma(a)}`` (as signs), run the rest of the net from ``b1`` and from ``b2``
with *independent* fresh noise each, ``d loss / d a = (f(b1) - f(b2)) (U - 1/2)``, and
continue the sampled path along ``b1``; the output layer gets the gradient of the
logistic loss at the end of the path, written out by hand.

Tests (``G`` independent one-sample draws of the full-batch gradient from each):

* mean: two-sample z-test per coordinate, ``z = (mean_1 - mean_2) / sqrt(se_1^2 + se_2^2)``;
* variance per layer: ``T = mean_i ||g_i - g_bar||^2`` (trace of the covariance of one
  draw), compared by ``z = (T_1 - T_2) / sqrt(se_1^2 + se_2^2)`` with
  ``se = std_i(||g_i - g_bar||^2) / sqrt(G)``;

each passes when every ``|z|`` is below the Bonferroni-corrected normal threshold for a
family-wise false-alarm rate ``ALPHA = 1e-3`` (fixed seeds: deterministic). The same
variance test must reject ``arm_shared`` (power): its coupled continuations lower the
variance of the layers below the last.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

from stelab.analysis import DrawEngine, layer_keys
from stelab.sbn import get_estimator, logistic_loss, sbn_mlp

D = torch.float64
ALPHA = 1e-3
G = 20000

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(states, seed=0):
    torch.manual_seed(seed)
    m = sbn_mlp(2, (3, 3, 2), 1, states=states, dtype=D)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 1.5)
    x = torch.randn(4, 2, dtype=D)
    t = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=D)
    return m, x, t


def reference_arm(m, x, t, copies, gen, states):
    """``copies`` independent one-sample ARM estimates of the full-batch gradient, from the
    formulas: per layer (weights then bias flattened) a (copies, P) tensor."""
    c0, c1 = (0.0, 1.0) if states == "pm1" else (0.5, 0.5)
    wb = [(lay.weight.detach(), lay.bias.detach()) for lay in m.hidden]
    v, c = m.output.weight.detach()[0], m.output.bias.detach()[0]
    n = x.shape[0]

    def state(sign):
        return c0 + c1 * sign

    def loss(h, tt):
        return torch.log1p(torch.exp(-(h @ v + c) * tt))

    def continuation(h, k, tt):
        for w, b in wb[k + 1 :]:
            a = h @ w.T + b
            u = torch.rand(a.shape, generator=gen, dtype=D)
            h = state((u < torch.sigmoid(a)).to(D) * 2 - 1)
        return loss(h, tt)

    def per_copy(ga, h):
        # gradient of copy c = (1/N) sum over its N rows of ga_r h_r^T (weights), ga_r (bias)
        gw = torch.einsum("cnj,cni->cji", ga.view(copies, n, -1), h.view(copies, n, -1))
        gb = ga.view(copies, n, -1).sum(1)
        return torch.cat([gw.flatten(1), gb], 1) / n

    h, tt = x.repeat(copies, 1), t.repeat(copies)
    out = []
    for k, (w, b) in enumerate(wb):
        a = h @ w.T + b
        u = torch.rand(a.shape, generator=gen, dtype=D)
        b1 = (u > torch.sigmoid(-a)).to(D) * 2 - 1
        b2 = (u < torch.sigmoid(a)).to(D) * 2 - 1
        f1 = continuation(state(b1), k, tt)
        f2 = continuation(state(b2), k, tt)
        out.append(per_copy((f1 - f2)[:, None] * (u - 0.5), h))
        h = state(b1)
    eta = h @ v + c
    ge = -tt * torch.sigmoid(-eta * tt)  # d/d eta of log(1 + exp(-eta t))
    out.append(per_copy(ge[:, None], h))
    return out


def _per_layer(grads):
    """Flattened gradient per layer (weights and bias together)."""
    pairs = zip(grads[0::2], grads[1::2], strict=True)
    return [torch.cat([w.flatten(), b.flatten()]) for w, b in pairs]


def _stelab_draws(m, x, t, estimator, seed):
    """G one-sample estimates from stelab, per layer, by the per-draw engine of
    stelab.analysis (itself checked against one call per draw in test_analysis.py)."""
    gen = torch.Generator().manual_seed(seed)
    eng = DrawEngine(m, x, t, logistic_loss, get_estimator(estimator), gen)
    chunks = list(eng.draws(G))
    assert eng.engine == "vectorised"
    return [torch.cat([ch[k] for ch in chunks]) for k in layer_keys(m)]


def _reference_draws(m, x, t, seed, states):
    return reference_arm(m, x, t, G, torch.Generator().manual_seed(seed), states)


def _mean_z(a, b):
    se = (a.var(0) / a.shape[0] + b.var(0) / b.shape[0]).sqrt()
    return (a.mean(0) - b.mean(0)) / se


def _trace_var(a):
    q = (a - a.mean(0)).pow(2).sum(1)
    return q.mean(), q.std() / q.numel() ** 0.5


def _var_z(a, b):
    (ta, sa), (tb, sb) = _trace_var(a), _trace_var(b)
    return float((ta - tb) / (sa**2 + sb**2).sqrt())


def _crit(n):
    return stats.norm.ppf(1 - ALPHA / (2 * n))


@pytest.mark.parametrize("states", ["pm1", "01"])
def test_arm_matches_independent_two_continuation_arm_in_mean_and_variance(states):
    m, x, t = _problem(states)
    mine = _stelab_draws(m, x, t, "arm", seed=1)
    ref = _reference_draws(m, x, t, seed=2, states=states)
    z_mean = torch.cat([_mean_z(a, b) for a, b in zip(mine, ref, strict=True)])
    z_var = [_var_z(a, b) for a, b in zip(mine, ref, strict=True)]
    assert z_mean.abs().max() < _crit(z_mean.numel()), z_mean
    assert max(map(abs, z_var)) < _crit(len(z_var)), z_var


def test_arm_and_reference_agree_exactly_when_the_loss_ignores_the_states():
    """With the output weights zeroed every continuation has the same loss: the hidden
    ARM terms vanish exactly and the output bias gradient is noise-free, in both."""
    m, x, t = _problem("pm1")
    with torch.no_grad():
        m.output.weight.zero_()
    ref = reference_arm(m, x, t, 1, torch.Generator().manual_seed(0), "pm1")
    loss = m.surrogate_loss(x, t, logistic_loss, "arm", generator=0)
    mine = _per_layer(torch.autograd.grad(loss, list(m.parameters())))
    assert all(g.abs().max() == 0 for g in [*ref[:-1], *mine[:-1]])
    torch.testing.assert_close(mine[-1][-1], ref[-1][0, -1], rtol=1e-12, atol=1e-15)
    assert mine[-1][-1].abs() > 0


def test_arm_shared_has_the_same_mean_but_lower_variance_below_the_last_layer():
    """``arm_shared`` couples the two continuations (common random numbers): same mean,
    a smaller variance in the layers with continuations through noisy layers above (the
    first two of three), the same in the last hidden layer and the output. The variance
    test that accepts ``arm`` rejects ``arm_shared`` there."""
    m, x, t = _problem("pm1")
    shared = _stelab_draws(m, x, t, "arm_shared", seed=3)
    ref = _reference_draws(m, x, t, seed=4, states="pm1")
    z_mean = torch.cat([_mean_z(a, b) for a, b in zip(shared, ref, strict=True)])
    assert z_mean.abs().max() < _crit(z_mean.numel()), z_mean
    z_var = [_var_z(a, b) for a, b in zip(shared, ref, strict=True)]
    crit = _crit(len(z_var))
    assert z_var[0] < -crit and z_var[1] < -crit, z_var
    assert abs(z_var[2]) < crit and abs(z_var[3]) < crit, z_var
    ratio = [float(_trace_var(a)[0] / _trace_var(b)[0]) for a, b in zip(shared, ref, strict=True)]
    assert ratio[0] < 0.9 and ratio[1] < 0.9, ratio


def test_paper_arm_and_shared_arm_are_different_estimators_on_the_same_draws():
    """Same generator seed, different noise coupling: the estimates differ."""
    m, x, t = _problem("pm1")
    params = list(m.parameters())
    ga = torch.autograd.grad(m.surrogate_loss(x, t, logistic_loss, "arm", generator=0), params)
    gb = torch.autograd.grad(
        m.surrogate_loss(x, t, logistic_loss, "arm_shared", generator=0), params
    )
    assert not all(torch.equal(a, b) for a, b in zip(ga, gb, strict=True))


def test_logistic_loss_gradient_in_the_reference_is_right():
    """The reference's hand-written output gradient against autograd."""
    eta = torch.randn(6, dtype=D, requires_grad=True)
    t = torch.tensor([1.0, -1.0] * 3, dtype=D)
    (g,) = torch.autograd.grad(F.softplus(-eta * t).sum(), eta)
    torch.testing.assert_close(g, -t * torch.sigmoid(-eta * t))
