"""Exact enumeration of SBNs against independent truth: brute force over joint states and
finite differences; the Monte-Carlo reference against the exact gradient; refusals."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats

import stelab.sbn.exact
from stelab.errors import ConfigError
from stelab.sbn import (
    all_states,
    exact_expected_loss,
    exact_gradient,
    logistic_loss,
    mc_reference,
    per_example_loss,
    sbn_conv8,
    sbn_mlp,
)

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def _cdf(noise: str, z: torch.Tensor) -> torch.Tensor:
    """Noise CDFs written out independently of stelab.sbn.noise."""
    if noise == "logistic":
        return 1.0 / (1.0 + torch.exp(-z))
    if noise == "gaussian":
        return 0.5 * (1.0 + torch.erf(z / math.sqrt(2.0)))
    return ((z + 1.0) / 2.0).clamp(0.0, 1.0)


def _net(noise="logistic", hidden=(3, 2), out=1, seed=0, scale=1.0, states="pm1"):
    torch.manual_seed(seed)
    m = sbn_mlp(2, hidden, out, noise=noise, states=states, dtype=D)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * scale)
    return m


def brute_force_loss(model, x, y, loss_fn, noise, states="pm1"):
    """E[loss] summed over every joint hidden state with explicit probabilities; states
    in {-1, +1} or {0, 1} (value 1 with probability F(a) in both)."""
    lo = -1.0 if states == "pm1" else 0.0
    hidden = list(model.hidden)
    widths = [layer.out_features for layer in hidden]
    total = 0.0
    for n in range(x.shape[0]):
        for flat in itertools.product([lo, 1.0], repeat=sum(widths)):
            prob = torch.ones((), dtype=D)
            h = x[n]
            pos = 0
            for layer, w in zip(hidden, widths, strict=True):
                s = torch.tensor(flat[pos : pos + w], dtype=D)
                pos += w
                a = layer.weight @ h + layer.bias
                p_plus = _cdf(noise, a)
                prob = prob * torch.where(s > 0, p_plus, 1.0 - p_plus).prod()
                h = s
            eta = model.output.weight @ h + model.output.bias
            total = total + prob * loss_fn(eta[None], y[n : n + 1])[0]
    return total / x.shape[0]


def _ce(eta, y):
    return F.cross_entropy(eta, y, reduction="none")


@pytest.mark.parametrize("states", ["pm1", "01"])
@pytest.mark.parametrize("noise", ["logistic", "gaussian", "uniform"])
def test_exact_matches_brute_force_value_and_gradient(noise, states):
    m = _net(noise, scale=0.8, states=states)
    x = torch.randn(5, 2, dtype=D)
    t = torch.tensor([1.0, -1.0, 1.0, 1.0, -1.0], dtype=D)
    bf = brute_force_loss(m, x, t, logistic_loss, noise, states)
    bf_grads = torch.autograd.grad(bf, list(m.parameters()))
    ref = exact_gradient(m, x, t, logistic_loss)
    assert torch.allclose(ref.value, bf.detach(), rtol=1e-12, atol=0)
    for (name, g), gb in zip(ref.grads.items(), bf_grads, strict=True):
        assert torch.allclose(g, gb, rtol=1e-10, atol=1e-14), name


@pytest.mark.parametrize("states", ["pm1", "01"])
def test_exact_matches_brute_force_multiclass_three_layers(states):
    m = _net(hidden=(2, 3, 2), out=3, seed=3, states=states)
    x = torch.randn(3, 2, dtype=D)
    y = torch.tensor([0, 2, 1])
    bf = brute_force_loss(m, x, y, _ce, "logistic", states)
    assert torch.allclose(exact_expected_loss(m, x, y, _ce), bf, rtol=1e-12)


def test_exact_gradient_matches_finite_differences():
    m = _net(hidden=(3, 3), seed=1)
    x = torch.randn(6, 2, dtype=D)
    t = torch.tensor([1.0, -1.0] * 3, dtype=D)
    ref = exact_gradient(m, x, t, logistic_loss)
    h = 1e-6
    with torch.no_grad():
        for name, p in m.named_parameters():
            fd = torch.empty_like(p)
            for i in range(p.numel()):
                old = p.view(-1)[i].item()
                p.view(-1)[i] = old + h
                up = exact_expected_loss(m, x, t, logistic_loss)
                p.view(-1)[i] = old - h
                down = exact_expected_loss(m, x, t, logistic_loss)
                p.view(-1)[i] = old
                fd.view(-1)[i] = (up - down) / (2 * h)
            assert torch.allclose(ref.grads[name], fd, rtol=1e-6, atol=1e-9), name


def test_exact_blocks_over_data_give_same_result(monkeypatch):
    m = _net(hidden=(3, 2), seed=2)
    x = torch.randn(7, 2, dtype=D)
    t = torch.ones(7, dtype=D)
    full = exact_expected_loss(m, x, t, logistic_loss)
    # widths (3, 2): the largest table is 8 x 4 = 32 entries, so max_states=32 is allowed
    # and leaves 32 // 2^3 = 4 rows per data block: the 7 rows take blocks of 4 and 3
    blocks = []

    def spy(loss_fn, eta, y):
        blocks.append(eta.shape[0] // 4)  # rows of the block x 2^2 last-layer states
        return per_example_loss(loss_fn, eta, y)

    monkeypatch.setattr(stelab.sbn.exact, "per_example_loss", spy)
    blocked = exact_expected_loss(m, x, t, logistic_loss, max_states=32)
    assert blocks == [4, 3]
    assert torch.allclose(full, blocked, rtol=1e-13)
    assert torch.allclose(full, brute_force_loss(m, x, t, logistic_loss, "logistic"), rtol=1e-12)


def test_state_limit_is_the_largest_table_of_adjacent_layers():
    """Widths (10, 1, 10): the tables are 2^10, 2^10 x 2 and 2 x 2^10 = 2048 entries (the
    first and last layers are never adjacent), so max_states=2048 enumerates and 2047
    refuses; the result equals the one under the default limit."""
    m = _net(hidden=(10, 1, 10), seed=5)
    x, t = torch.randn(3, 2, dtype=D), torch.ones(3, dtype=D)
    at_limit = exact_expected_loss(m, x, t, logistic_loss, max_states=2048)
    assert torch.allclose(at_limit, exact_expected_loss(m, x, t, logistic_loss), rtol=1e-13)
    with pytest.raises(ConfigError, match=r"1024 x 2 transition table .*\(2048 entries"):
        exact_expected_loss(m, x, t, logistic_loss, max_states=2047)


def test_width_cap_is_30():
    from stelab.sbn.exact import check_enumerable

    assert check_enumerable(sbn_mlp(2, (30,), 1), max_states=2**30) == [30]
    with pytest.raises(ConfigError, match="too large"):
        check_enumerable(sbn_mlp(2, (31,), 1), max_states=2**40)


def test_all_states_enumerates_each_state_once():
    s = all_states(4, D)
    assert s.shape == (16, 4)
    assert set(s.abs().flatten().tolist()) == {1.0}
    assert len({tuple(r) for r in s.tolist()}) == 16


def test_exact_refuses_large_network_with_state_count_and_alternative():
    m = sbn_mlp(2, (12, 12), 1)
    x, t = torch.randn(2, 2), torch.ones(2)
    with pytest.raises(ConfigError, match=r"2\^24 = 16777216 joint hidden states") as e:
        exact_expected_loss(m, x, t, logistic_loss)
    assert "mc_reference" in str(e.value) and "4096 x 4096" in str(e.value)
    with pytest.raises(ValueError, match="mc_reference"):
        m.surrogate_loss(x, t, logistic_loss, estimator="exact")


def test_exact_refuses_conv_layers():
    m = sbn_conv8(1, 8, 2, channels=(2, 2), padding=1)
    with pytest.raises(ConfigError, match="exact.*SBNConv2d"):
        exact_expected_loss(m, torch.randn(1, 1, 8, 8), torch.tensor([0]), _ce)
    with pytest.raises(ConfigError, match="estimator 'exact' does not support SBNConv2d"):
        m.surrogate_loss(torch.randn(1, 1, 8, 8), torch.tensor([0]), _ce, estimator="exact")


@pytest.mark.parametrize(
    ("estimator", "states"),
    [("reinforce_loo", "pm1"), ("arm", "pm1"), ("arm_shared", "pm1"), ("arm", "01")],
)
def test_mc_reference_agrees_with_exact(estimator, states):
    """z-test: |mean - exact| / SE below the Bonferroni-corrected t threshold for a
    family-wise false-alarm rate of 1e-3 (per seed) over all 20 coordinates."""
    m = _net(seed=4, states=states)
    x = torch.randn(4, 2, dtype=D)
    t = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=D)
    ref = exact_gradient(m, x, t, logistic_loss)
    mc = mc_reference(m, x, t, logistic_loss, 40_000, 7, estimator=estimator, groups=80)
    assert mc.samples == 40_000 and mc.groups == 80 and mc.estimator == estimator
    crit = stats.t.ppf(1 - 1e-3 / (2 * 21), df=79)
    for name, g in ref.grads.items():
        z = (mc.grads[name] - g) / mc.grads_se[name]
        assert z.abs().max() < crit, (name, z)
    assert abs((mc.value - ref.value) / mc.value_se) < crit
    assert all(p.grad is None for p in m.parameters())


def test_mc_reference_standard_error_is_the_batch_means_formula():
    """se = std(group gradients, ddof 1) / sqrt(groups), recomputed in NumPy from the
    group gradients drawn again with the same generator (one surrogate-loss call of
    samples // groups draws per group)."""
    import numpy as np

    m = _net(seed=6)
    x = torch.randn(3, 2, dtype=D)
    t = torch.tensor([1.0, -1.0, 1.0], dtype=D)
    groups, per = 5, 4
    mc = mc_reference(m, x, t, logistic_loss, groups * per, torch.Generator().manual_seed(8),
                      estimator="reinforce_loo", groups=groups)  # fmt: skip
    g = torch.Generator().manual_seed(8)
    names = [k for k, _ in m.named_parameters()]
    rows = []
    for _ in range(groups):
        loss = m.surrogate_loss(x, t, logistic_loss, "reinforce_loo", per, generator=g)
        rows.append([gr.numpy().copy() for gr in torch.autograd.grad(loss, list(m.parameters()))])
    for i, k in enumerate(names):
        st = np.stack([r[i] for r in rows])
        np.testing.assert_allclose(mc.grads[k].numpy(), st.mean(0), rtol=1e-12, atol=1e-15)
        se = st.std(0, ddof=1) / np.sqrt(groups)
        np.testing.assert_allclose(mc.grads_se[k].numpy(), se, rtol=1e-10, atol=1e-15)


def test_mc_reference_rejects_biased_estimator_and_bad_groups():
    m = _net()
    x, t = torch.randn(2, 2, dtype=D), torch.ones(2, dtype=D)
    with pytest.raises(ConfigError, match="unbiased for every layer.*'psa'"):
        mc_reference(m, x, t, logistic_loss, 100, 0, estimator="psa")
    with pytest.raises(ConfigError, match="groups"):
        mc_reference(m, x, t, logistic_loss, 100, 0, groups=1)
    with pytest.raises(ConfigError, match="draws per group"):
        mc_reference(m, x, t, logistic_loss, 100, 0, estimator="reinforce_loo", groups=100)


_CDF = {
    "logistic": stats.logistic.cdf,
    "gaussian": stats.norm.cdf,
    "uniform": stats.uniform(loc=-1, scale=2).cdf,
}


@pytest.mark.parametrize("noise", sorted(_CDF))
def test_transition_table_is_the_product_of_unit_probabilities(noise):
    """The table built by one matrix product of log-CDFs equals prod_j F(t_j a_j(s)),
    each entry a direct product of n CDF values from scipy (float64); rows sum to 1."""
    from stelab.sbn.exact import _transition
    from stelab.sbn.noise import get_noise

    g = torch.Generator().manual_seed(0)
    scale = 0.5 if noise == "uniform" else 6.0  # large |a|: tiny F(-a)
    a = torch.randn(16, 4, generator=g, dtype=torch.float64) * scale
    t = all_states(4, torch.float64)
    got = _transition(get_noise(noise), a, t)
    want = torch.ones(16, 16, dtype=torch.float64)
    for s in range(16):
        for k in range(16):
            for j in range(4):
                want[s, k] *= float(_CDF[noise](float(t[k, j] * a[s, j])))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-300)
    torch.testing.assert_close(got.sum(1), torch.ones(16, dtype=torch.float64), rtol=1e-13, atol=0)


@pytest.mark.parametrize("bad", [0, 2**40 + 1])
def test_mc_reference_and_exact_name_their_ranges(bad):
    """samples and max_states are integers in [1, 2^40]: the error names the parameter,
    the value and the range (checked before any work, so the largest allowed value is
    only constructed, for Exact)."""
    m = sbn_mlp(2, (3,), 1)
    x, t = torch.zeros(4, 2, dtype=D), torch.ones(4, 1, dtype=D)
    with pytest.raises(
        ConfigError, match=rf"samples must be an integer in \[1, {2**40}\], got {bad}$"
    ):
        # groups=1 is refused too, after samples: a wrongly accepted sample count then
        # fails on groups instead of starting 2^40 draws
        mc_reference(m.to(D), x, t, logistic_loss, bad, 0, groups=1)
    with pytest.raises(
        ConfigError, match=rf"max_states must be an integer in \[1, {2**40}\], got {bad}$"
    ):
        stelab.sbn.exact.Exact(max_states=bad)
    assert stelab.sbn.exact.Exact(max_states=2**40).max_states == 2**40
    for fn in (exact_expected_loss, exact_gradient):
        with pytest.raises(ConfigError, match=rf"max_states must be an integer in \[1, {2**40}\]"):
            fn(m.to(D), x, t, logistic_loss, max_states=bad)


def test_mc_reference_uses_100_groups_by_default():
    m = sbn_mlp(2, (3,), 1).to(D)
    x, t = torch.zeros(4, 2, dtype=D), torch.ones(4, 1, dtype=D)
    assert mc_reference(m, x, t, logistic_loss, 400, 0).groups == 100


@pytest.mark.parametrize(
    ("groups", "ok"), [(1, False), (2, True), (2**31, True), (2**31 + 1, False)]
)
def test_mc_reference_groups_range(groups, ok):
    """groups: an integer in [2, 2^31] (batch means need two groups); checked before
    sampling, so the largest allowed value fails only later, on too few draws per group."""
    m = sbn_mlp(2, (3,), 1).to(D)
    x, t = torch.zeros(4, 2, dtype=D), torch.ones(4, 1, dtype=D)
    if ok and groups == 2:
        assert mc_reference(m, x, t, logistic_loss, 40, 0, groups=2).groups == 2
        return
    with pytest.raises(ConfigError) as e:
        mc_reference(m, x, t, logistic_loss, 40, 0, groups=groups)
    if ok:  # accepted as a count, refused for its draws per group
        assert "groups must be" not in str(e.value)
    else:
        assert f"groups must be an integer in [2, {2**31}], got {groups}" in str(e.value)


def test_exact_needs_an_sbn_and_names_what_it_got():
    x, t = torch.randn(2, 2, dtype=D), torch.ones(2, dtype=D)
    with pytest.raises(TypeError, match="model must be an SBN, got Linear"):
        exact_expected_loss(torch.nn.Linear(2, 1), x, t, logistic_loss)
    with pytest.raises(TypeError, match="model must be an SBN, got Sequential"):
        exact_gradient(torch.nn.Sequential(), x, t, logistic_loss)
    # an SBN of one hidden unit passes the check: sigma(a) f(v + c) + sigma(-a) f(-v + c)
    torch.manual_seed(3)
    m = sbn_mlp(2, (1,), 1, dtype=D)
    with torch.no_grad():
        a = (x @ m.hidden[0].weight.T + m.hidden[0].bias)[:, 0]
        v, c = float(m.output.weight[0, 0]), float(m.output.bias[0])
        want = (torch.sigmoid(a) * F.softplus(-(v + c) * t)).mean()
        want += (torch.sigmoid(-a) * F.softplus(-(-v + c) * t)).mean()
        got = exact_expected_loss(m, x, t, logistic_loss)
    assert float(got) == pytest.approx(float(want), rel=1e-12)
