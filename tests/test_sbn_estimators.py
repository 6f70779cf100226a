"""SBN gradient estimators against the exact gradient (enumeration), by z-tests.

Protocol: ``G`` groups of ``K`` noise draws per example; each group is one
``surrogate_loss(..., samples=K)`` call; the mean over groups is compared with the
exact gradient coordinate-wise, ``z = (mean - exact) / SE`` with
``SE = std(group means) / sqrt(G)``. A test of unbiasedness passes when every
``|z|`` is below the Bonferroni-corrected Student-t threshold for a family-wise
false-alarm rate of ``ALPHA = 1e-3`` over the tested coordinates (the seeds are
fixed, so each test is deterministic; over random seeds it would fail with
probability <= 1e-3). Bias tests assert the opposite with a wide margin
(``max |z| > 10``), which shows the z-test has the power to detect a bias.
"""

from __future__ import annotations

import pytest
import torch
from scipy import stats

from stelab.errors import ConfigError
from stelab.sbn import (
    SBN,
    SBNEstimator,
    describe,
    estimator_names,
    exact_gradient,
    get_estimator,
    logistic_loss,
    sbn_conv8,
    sbn_mlp,
)

D = torch.float64
ALPHA = 1e-3
ALL = [
    "arm",
    "arm_shared",
    "concrete",
    "dst",
    "exact",
    "gumbel_st",
    "hard_st",
    "psa",
    "reinforce",
    "reinforce_loo",
    "tanh_mf",
]


pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(noise="logistic", hidden=(3, 2), seed=0, scale=1.0, n=4, states="pm1"):
    torch.manual_seed(seed)
    m = sbn_mlp(2, hidden, 1, noise=noise, states=states, dtype=D)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * scale)
    x = torch.randn(n, 2, dtype=D)
    t = torch.tensor([1.0, -1.0] * (n // 2), dtype=D)
    return m, x, t


def _flat(grads) -> torch.Tensor:
    return torch.cat([g.flatten() for g in grads])


def _draws(m, x, t, estimator, groups, per, seed, **opt):
    g = torch.Generator().manual_seed(seed)
    params = list(m.parameters())
    rows, vals = [], []
    for _ in range(groups):
        loss = m.surrogate_loss(x, t, logistic_loss, estimator, samples=per, generator=g, **opt)
        rows.append(_flat(torch.autograd.grad(loss, params)))
        vals.append(loss.detach())
    st, v = torch.stack(rows), torch.stack(vals)
    return st.mean(0), st.std(0) / groups**0.5, v.mean(), v.std() / groups**0.5


def _layer_slices(m):
    """Coordinate ranges of the flattened gradient per layer (weights and bias together)."""
    out, pos = [], 0
    for layer in [*m.hidden, m.output]:
        k = sum(p.numel() for p in layer.parameters())
        out.append(slice(pos, pos + k))
        pos += k
    return out


def _z(mean, se, exact):
    """z-scores; a coordinate without variance (se = 0) must match to 1e-12."""
    diff = mean - exact
    exact_ok = torch.where(diff.abs() <= 1e-12, 0.0, torch.inf).to(diff.dtype)
    return torch.where(se > 0, diff / se.clamp_min(1e-300), exact_ok)


def _crit(ncoords, groups):
    return stats.t.ppf(1 - ALPHA / (2 * ncoords), df=groups - 1)


UNBIASED_ALL_LAYERS = [
    ("reinforce", {}),
    ("reinforce_loo", {}),
    ("arm", {}),
    ("arm_shared", {}),
]


@pytest.mark.parametrize("states", ["pm1", "01"])
@pytest.mark.parametrize("noise", ["logistic", "gaussian"])
@pytest.mark.parametrize(("estimator", "opt"), UNBIASED_ALL_LAYERS)
def test_unbiased_for_every_layer(estimator, opt, noise, states):
    """Mean of many draws = exact gradient for every layer, states in {-1, +1} and in
    {0, 1} (false-alarm rate <= 1e-3)."""
    m, x, t = _problem(noise, hidden=(3, 2), seed=1, states=states)
    exact = _flat(exact_gradient(m, x, t, logistic_loss).grads.values())
    groups = 60
    mean, se, v, vse = _draws(m, x, t, estimator, groups, 600, seed=11, **opt)
    z = _z(mean, se, exact)
    assert z.abs().max() < _crit(z.numel() + 1, groups), z
    ref = exact_gradient(m, x, t, logistic_loss).value
    assert abs((v - ref) / vse) < _crit(z.numel() + 1, groups)


@pytest.mark.parametrize("states", ["pm1", "01"])
@pytest.mark.parametrize("noise", ["logistic", "gaussian", "uniform"])
@pytest.mark.parametrize("output", ["local", "sample"])
def test_psa_unbiased_for_last_hidden_and_output_layer(noise, output, states):
    """PSA ([S20] §3) is unbiased for the last hidden layer and the output layer (the
    deeper layer is linearised, so it is not tested), states in {-1, +1} and {0, 1};
    false-alarm rate <= 1e-3."""
    scale = 0.5 if noise == "uniform" else 1.5
    m, x, t = _problem(noise, hidden=(3, 3), seed=2, scale=scale, states=states)
    exact = _flat(exact_gradient(m, x, t, logistic_loss).grads.values())
    groups = 60
    mean, se, _, _ = _draws(m, x, t, "psa", groups, 400, seed=5, output=output)
    sl = _layer_slices(m)
    idx = torch.cat([torch.arange(s.start, s.stop) for s in sl[-2:]])
    z = _z(mean[idx], se[idx], exact[idx])
    assert z.abs().max() < _crit(idx.numel(), groups), z
    if noise == "logistic":
        # the same test has the power to see PSA's bias in the deeper layer ([S20] §3)
        first = _z(mean[sl[0]], se[sl[0]], exact[sl[0]])
        assert first.abs().max() > 10, first


def test_psa_local_output_rule_has_lower_variance_than_sample_rule():
    """[S20] §3 step 4: the local-expectation output gradient is Rao-Blackwellised (same
    draws for both rules, so the comparison is paired; the true SE ratio here is ~0.75)."""
    m, x, t = _problem(hidden=(3, 3), seed=2, scale=1.5)
    sl = _layer_slices(m)[-1]
    _, se_local, _, _ = _draws(m, x, t, "psa", 80, 50, seed=1, output="local")
    _, se_sample, _, _ = _draws(m, x, t, "psa", 80, 50, seed=1, output="sample")
    assert (se_local[sl] < se_sample[sl]).all()


@pytest.mark.parametrize("states", ["pm1", "01"])
@pytest.mark.parametrize(
    ("estimator", "opt"),
    [("dst", {}), ("hard_st", {}), ("concrete", {"tau": 1.0}), ("gumbel_st", {"tau": 1.0})],
)
def test_biased_estimators_are_detectably_biased(estimator, opt, states):
    """DST linearises f(flip) - f and F(a - 2Wx) - F(a); hard ST uses hardtanh' instead of
    F'; Concrete differentiates a relaxed objective. With large weights all are far from
    the exact gradient: the z-test of the other tests rejects them by a wide margin
    (documented bias, not hidden), in both state parametrisations."""
    m, x, t = _problem(hidden=(3, 2), seed=3, scale=3.0, states=states)
    exact = _flat(exact_gradient(m, x, t, logistic_loss).grads.values())
    mean, se, _, _ = _draws(m, x, t, estimator, 40, 400, seed=2, **opt)
    z = _z(mean, se.clamp_min(1e-12), exact)
    assert z.abs().max() > 10, z
    rel = (mean - exact).norm() / exact.norm()
    assert rel > 0.05, rel


@pytest.mark.parametrize("states", ["pm1", "01"])
def test_dst_is_unbiased_when_loss_is_linear_and_one_hidden_layer(states):
    """With one hidden layer and f linear in x^L the DST finite-difference linearisation
    is exact, so DST = PSA (same draws) and both are unbiased."""
    m, x, t = _problem(hidden=(3,), seed=4, scale=2.0, states=states)

    def linear_loss(eta, y):
        return eta[:, 0] * y

    g1 = torch.Generator().manual_seed(3)
    g2 = torch.Generator().manual_seed(3)
    params = list(m.parameters())
    a = m.surrogate_loss(x, t, linear_loss, "dst", samples=7, generator=g1)
    b = m.surrogate_loss(x, t, linear_loss, "psa", samples=7, generator=g2, output="sample")
    for ga, gb in zip(torch.autograd.grad(a, params), torch.autograd.grad(b, params), strict=True):
        assert torch.allclose(ga, gb, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("states", ["pm1", "01"])
@pytest.mark.parametrize("noise", ["logistic", "gaussian", "uniform"])
def test_tanh_mean_field_exact_for_linear_loss_one_hidden_layer(noise, states):
    """E[f] = f(E[eta]) when f is linear and eta = V x + c, E[x] = 2F(a) - 1 (E[h] = F(a)
    for states in {0, 1}): mean field is then the exact gradient (checks the mean formula
    for each noise and both parametrisations)."""
    m, x, t = _problem(noise, hidden=(4,), seed=5, scale=0.7, states=states)

    def linear_loss(eta, y):
        return eta[:, 0] * y

    exact = exact_gradient(m, x, t, linear_loss)
    loss = m.surrogate_loss(x, t, linear_loss, "tanh_mf", generator=0)
    grads = torch.autograd.grad(loss, list(m.parameters()))
    for g, e in zip(grads, exact.grads.values(), strict=True):
        assert torch.allclose(g, e, rtol=1e-12, atol=1e-15)


def test_exact_estimator_equals_exact_gradient():
    m, x, t = _problem(seed=6)
    loss = m.surrogate_loss(x, t, logistic_loss, "exact")
    ref = exact_gradient(m, x, t, logistic_loss)
    assert torch.allclose(loss.detach(), ref.value)
    grads = torch.autograd.grad(loss, list(m.parameters()))
    for g, e in zip(grads, ref.grads.values(), strict=True):
        assert torch.allclose(g, e)


def test_concrete_small_tau_value_and_forward_approach_hard_path():
    """tanh((a - Z)/(2 tau)) -> sign(a - Z) as tau -> 0, so the relaxed loss -> hard loss."""
    m, x, t = _problem(seed=7)
    a = m.surrogate_loss(x, t, logistic_loss, "concrete", samples=3, generator=4, tau=1e-6)
    b = m.surrogate_loss(x, t, logistic_loss, "gumbel_st", samples=3, generator=4, tau=1e-6)
    c = m.surrogate_loss(x, t, logistic_loss, "dst", samples=3, generator=4)
    assert torch.allclose(a.detach(), c.detach()) and torch.allclose(b.detach(), c.detach())


@pytest.mark.parametrize("estimator", ALL)
def test_same_generator_same_gradient_bit_for_bit(estimator):
    m, x, t = _problem(hidden=(3, 3), seed=8)
    params = list(m.parameters())

    def run(seed):
        loss = m.surrogate_loss(x, t, logistic_loss, estimator, samples=3, generator=seed)
        return _flat(torch.autograd.grad(loss, params)), loss.detach()

    (g1, v1), (g2, v2), (g3, _) = run(123), run(123), run(124)
    assert torch.equal(g1, g2) and torch.equal(v1, v2)
    if estimator not in ("exact", "tanh_mf"):
        assert not torch.equal(g1, g3)


@pytest.mark.parametrize("estimator", [e for e in ALL if e != "exact"])
def test_conv_net_reproducible_with_generator(estimator):
    """Every sampling estimator runs on the 8-conv SBN (small variant) and gives the same
    gradient for the same generator seed, bit for bit."""
    m = sbn_conv8(2, 8, 3, channels=(3, 4), padding=1)
    x, y = torch.randn(2, 2, 8, 8), torch.tensor([0, 2])

    def ce(eta, yy):
        return torch.nn.functional.cross_entropy(eta, yy, reduction="none")

    def run():
        g = torch.Generator().manual_seed(9)
        loss = m.surrogate_loss(x, y, ce, estimator, samples=2, generator=g)
        return _flat(torch.autograd.grad(loss, list(m.parameters())))

    first = run()
    assert torch.equal(first, run())
    assert torch.isfinite(first).all() and first.abs().sum() > 0


def test_registry_lists_every_estimator_and_describes_it():
    assert estimator_names() == ALL
    rows = describe()
    assert [r["name"] for r in rows] == ALL
    assert all(r["formula"] and r["reference"] for r in rows)
    unbiased = {r["name"] for r in rows if r["unbiased"]}
    assert unbiased == {"arm", "arm_shared", "exact", "reinforce", "reinforce_loo"}
    est = get_estimator("concrete", tau=0.1)
    assert isinstance(est, SBNEstimator) and est.tau == 0.1 and repr(est) == "concrete(tau=0.1)"
    assert get_estimator(est) is est


def test_unknown_estimator_lists_names_and_closest_match():
    m, x, t = _problem()
    with pytest.raises(ValueError, match="unknown SBN estimator 'pas'") as e:
        m.surrogate_loss(x, t, logistic_loss, estimator="pas")
    msg = str(e.value)
    assert "did you mean 'psa'" in msg
    assert all(n in msg for n in ALL)


@pytest.mark.parametrize("samples", [0, -3])
def test_samples_below_one_is_a_value_error_naming_samples(samples):
    m, x, t = _problem()
    with pytest.raises(ValueError, match=rf"samples must be an integer in \[1, .*got {samples}"):
        m.surrogate_loss(x, t, logistic_loss, estimator="psa", samples=samples)


def test_reinforce_loo_needs_two_samples():
    m, x, t = _problem()
    with pytest.raises(ConfigError, match="'reinforce_loo' needs samples >= 2, got samples=1"):
        m.surrogate_loss(x, t, logistic_loss, estimator="reinforce_loo", samples=1)


def test_bad_estimator_parameters():
    with pytest.raises(ConfigError, match="tau must be a finite number > 0, got 0"):
        get_estimator("concrete", tau=0)
    with pytest.raises(ConfigError, match="unexpected parameters.*allowed: tau"):
        get_estimator("gumbel_st", temperature=1.0)
    with pytest.raises(ConfigError, match="output must be one of 'local', 'sample'"):
        get_estimator("psa", output="exact")
    with pytest.raises(ConfigError, match="chunk_elements"):
        get_estimator("psa", chunk_elements=0)


def test_loss_fn_must_be_per_example():
    m, x, t = _problem()

    def mean_loss(eta, y):
        return logistic_loss(eta, y).mean()

    with pytest.raises(ConfigError, match=r"one loss per example.*reduction='none'"):
        m.surrogate_loss(x, t, mean_loss, estimator="dst")


def test_unsupported_layer_type_is_refused():
    with pytest.raises(TypeError, match="hidden layer 0 must be SBNLinear or SBNConv2d"):
        SBN(torch.nn.Linear(2, 3), output=torch.nn.Linear(3, 1))

    class LinearOnly(SBNEstimator):
        supports = (type(sbn_mlp().hidden[0]),)

    m = sbn_conv8(1, 8, 2, channels=(2, 2), padding=1)
    with pytest.raises(ConfigError, match="does not support SBNConv2d layers.*supports: SBNLinear"):
        LinearOnly().check(m, 1)


def test_estimators_are_equal_when_type_and_parameters_are():
    """Equality (and the hash that goes with it) needs the same class and the same
    parameters: two estimators without parameters are not equal across classes."""
    from stelab.sbn.baselines import ARM, Concrete, Reinforce

    assert Concrete(tau=0.1) == Concrete(tau=0.1)
    assert hash(Concrete(tau=0.1)) == hash(Concrete(tau=0.1))
    assert Concrete(tau=0.1) != Concrete(tau=1.0)  # same class, other parameters
    assert ARM() == ARM() and ARM() != Reinforce()  # other class, same (no) parameters
    assert Concrete(tau=0.1) != "concrete(tau=0.1)"


def test_names_are_resolved_once():
    """A name is looked up, not rebuilt, on every call after the first (the per-call cost of
    a name equals that of a prebuilt object); different parameters give different objects,
    and a bool is never taken for the integer it equals."""
    assert get_estimator("dst") is get_estimator("dst")
    a, b = get_estimator("concrete", tau=0.1), get_estimator("concrete", tau=0.1)
    assert a is b and a.tau == 0.1
    assert get_estimator("concrete", tau=1).tau == 1.0
    assert get_estimator("concrete", tau=0.5) is not a
    assert get_estimator("psa", chunk_elements=1).chunk_elements == 1
    with pytest.raises((TypeError, ValueError), match="chunk_elements"):
        get_estimator("psa", chunk_elements=True)
    with pytest.raises(ConfigError, match="unexpected parameters"):
        get_estimator("dst", tau=1.0)
    with pytest.raises(ConfigError, match="unexpected parameters"):
        get_estimator("dst", tau=[1.0])  # unhashable: not cached, still checked


def test_base_estimator_leaves_estimate_to_subclasses():
    m, x, t = _problem()
    with pytest.raises(NotImplementedError):
        SBNEstimator().estimate(m, x, t, logistic_loss, 1, None)


def test_estimator_lookup_refuses_parameters_with_an_instance_and_non_names():
    est = get_estimator("concrete", tau=0.3)
    assert get_estimator(est) is est
    with pytest.raises(ConfigError, match=r"parameters \['tau'\] given with an estimator instance"):
        get_estimator(est, tau=0.3)
    with pytest.raises(TypeError, match="estimator must be a name or an SBNEstimator, got int"):
        get_estimator(3)
    with pytest.raises(TypeError, match="or an SBNEstimator, got list"):
        get_estimator(["psa"])


def test_surrogate_loss_function_needs_an_sbn_and_gives_the_expected_loss():
    """The module-level surrogate_loss refuses a non-SBN by its type; on an SBN with one
    hidden layer of two units its ``exact`` value is the expected loss summed by hand over
    the four states (P(s) = prod_j sigma(s_j a_j), f = log(1 + exp(-eta t)))."""
    import itertools

    from stelab.sbn import surrogate_loss

    with pytest.raises(TypeError, match="model must be an SBN, got Linear"):
        surrogate_loss(torch.nn.Linear(2, 1), torch.zeros(2, 2), torch.ones(2), logistic_loss)
    m, x, t = _problem(hidden=(2,))
    w, b = m.hidden[0].weight.detach(), m.hidden[0].bias.detach()
    v, c = m.output.weight.detach()[0], m.output.bias.detach()[0]
    want = 0.0
    for n in range(x.shape[0]):
        a = x[n] @ w.T + b
        for s in itertools.product([-1.0, 1.0], repeat=2):
            st = torch.tensor(s, dtype=D)
            p = torch.prod(1 / (1 + torch.exp(-st * a)))
            want += float(p * torch.log1p(torch.exp(-(st @ v + c) * t[n])))
    want /= x.shape[0]
    got = surrogate_loss(m, x, t, logistic_loss, "exact")
    assert float(got.detach()) == pytest.approx(want, rel=1e-12)
