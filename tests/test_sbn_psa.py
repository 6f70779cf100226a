"""PSA ([S20] §3-4): the ratio convolution equals the dense (unfolded) rule, chunking does
not change results, and a one-hidden-layer network where every PSA draw and its
expectation are computed by hand."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from scipy import stats

from stelab.errors import ConfigError
from stelab.sbn import (
    SBN,
    Noise,
    SBNConv2d,
    SBNLinear,
    exact_gradient,
    flip_rows,
    get_noise,
    logistic_loss,
    ratio_conv2d,
    ratio_linear,
    sbn_mlp,
)

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


def dense_matrix(conv: SBNConv2d, in_shape: tuple[int, int, int], weight=None) -> torch.Tensor:
    """The convolution as a dense matrix (C_out*H_out*W_out, C_in*H*W), differentiable in
    ``weight`` (default: the layer's): column i is the bias-free convolution of unit image i."""
    n_in = in_shape[0] * in_shape[1] * in_shape[2]
    basis = torch.eye(n_in, dtype=conv.weight.dtype).view(n_in, *in_shape)
    w = conv.weight if weight is None else weight
    out = torch.nn.functional.conv2d(basis, w, None, conv.stride, conv.padding, conv.dilation)
    return out.flatten(1).t()


def _conv_net_and_dense_twin():
    torch.manual_seed(0)
    convs = [
        SBNConv2d(2, 3, 3, stride=1, padding=1, dtype=D),  # 2x5x5 -> 3x5x5
        SBNConv2d(3, 4, 3, stride=2, padding=1, dtype=D),  # -> 4x3x3
        SBNConv2d(4, 3, 2, dilation=2, dtype=D),  # -> 3x1x1
    ]
    shapes = [(2, 5, 5), (3, 5, 5), (4, 3, 3), (3, 1, 1)]
    top = SBNLinear(3, 4, dtype=D)
    out = torch.nn.Linear(4, 3, dtype=D)
    with torch.no_grad():
        for p in [*(q for c in convs for q in c.parameters()), *top.parameters()]:
            p.copy_(torch.randn_like(p) * 1.2)
    net = SBN(*convs, top, output=out)
    dense = []
    for conv, s_in, s_out in zip(convs, shapes[:-1], shapes[1:], strict=True):
        lin = SBNLinear(s_in[0] * s_in[1] * s_in[2], s_out[0] * s_out[1] * s_out[2], dtype=D)
        with torch.no_grad():
            lin.weight.copy_(dense_matrix(conv, s_in))
            lin.bias.copy_(conv.bias.repeat_interleave(s_out[1] * s_out[2]))
        dense.append(lin)
    twin = SBN(*dense, copy.deepcopy(top), output=copy.deepcopy(out))
    return net, twin, shapes


def _ce(eta, y):
    return torch.nn.functional.cross_entropy(eta, y, reduction="none")


def test_psa_conv_net_equals_psa_on_dense_equivalent():
    """Whole PSA gradient of a conv SBN (stride, padding, dilation, conv->linear) equals the
    linear PSA of the same network written with dense matrices, chained back to the kernel
    by autograd through the dense matrix; same generator, same draws."""
    net, twin, shapes = _conv_net_and_dense_twin()
    x = torch.randn(3, 2, 5, 5, dtype=D)
    y = torch.tensor([0, 2, 1])
    lc = net.surrogate_loss(x, y, _ce, "psa", samples=2, generator=4, chunk_elements=50)
    lc.backward()
    ld = twin.surrogate_loss(x, y, _ce, "psa", samples=2, generator=4)
    ld.backward()
    assert torch.equal(lc.detach(), ld.detach())
    for k, conv in enumerate(net.hidden[:3]):
        lin = twin.hidden[k]
        w = conv.weight.detach().clone().requires_grad_(True)
        (g_w,) = torch.autograd.grad(dense_matrix(conv, shapes[k], w), w, lin.weight.grad)
        assert torch.allclose(conv.weight.grad, g_w, rtol=1e-10, atol=1e-13), k
        g_b = lin.bias.grad.view(conv.out_channels, -1).sum(1)
        assert torch.allclose(conv.bias.grad, g_b, rtol=1e-10, atol=1e-13), k
        assert conv.weight.grad.abs().sum() > 0
    for p, q in zip(
        [*net.hidden[3].parameters(), *net.output.parameters()],
        [*twin.hidden[3].parameters(), *twin.output.parameters()],
        strict=True,
    ):
        assert torch.allclose(p.grad, q.grad, rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize(
    ("stride", "padding", "dilation", "size"),
    [(1, 0, 1, 6), (2, 1, 1, 7), (2, 0, 2, 8), (3, 2, 1, 5)],
)
@pytest.mark.parametrize("scale", [1.0, 0.5])  # states in {-1, +1} and in {0, 1}
def test_ratio_conv_equals_ratio_linear_on_dense_matrix(stride, padding, dilation, size, scale):
    torch.manual_seed(1)
    conv = SBNConv2d(3, 4, 3, stride, padding, dilation, noise="gaussian", dtype=D)
    x = torch.randint(0, 2, (2, 3, size, size), dtype=D) * 2 - 1
    a = conv.preact(x).detach()
    e = torch.randn_like(a)
    lin = SBNLinear(3 * size * size, a[0].numel(), noise="gaussian", dtype=D)
    with torch.no_grad():
        lin.weight.copy_(dense_matrix(conv, (3, size, size)))
    d_conv = ratio_conv2d(conv, a, e, x, chunk_elements=97, scale=scale)
    d_lin = ratio_linear(lin, a.flatten(1), e.flatten(1), x, scale=scale)
    assert d_conv.shape == x.shape
    assert torch.allclose(d_conv, d_lin, rtol=1e-10, atol=1e-12)


def test_ratio_linear_matches_the_formula_written_out():
    """d_i = sum_j e_j [F(a_j - 2 W_ji x_i) - F(a_j)] with F = sigma, in plain loops."""
    torch.manual_seed(2)
    lin = SBNLinear(4, 3, dtype=D)
    x = torch.randint(0, 2, (2, 4), dtype=D) * 2 - 1
    a, e = lin.preact(x).detach(), torch.randn(2, 3, dtype=D)
    w = lin.weight.detach()
    want = torch.zeros(2, 4, dtype=D)
    for r in range(2):
        for i in range(4):
            for j in range(3):
                z = a[r, j] - 2 * w[j, i] * x[r, i]
                want[r, i] += e[r, j] * (torch.sigmoid(z) - torch.sigmoid(a[r, j]))
    for chunk in (1, 5, 2**19):
        assert torch.allclose(ratio_linear(lin, a, e, x, chunk), want, rtol=1e-12, atol=1e-15)


def test_psa_chunking_does_not_change_the_estimate():
    net, _, _ = _conv_net_and_dense_twin()
    x, y = torch.randn(2, 2, 5, 5, dtype=D), torch.tensor([1, 0])
    params = list(net.parameters())
    grads = []
    for chunk in (1, 33, 2**20):
        loss = net.surrogate_loss(x, y, _ce, "psa", samples=3, generator=1, chunk_elements=chunk)
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
    assert torch.allclose(grads[0], grads[2], rtol=1e-12, atol=1e-14)
    assert torch.allclose(grads[1], grads[2], rtol=1e-12, atol=1e-14)


# --- one hidden layer: PSA by hand --------------------------------------------------


def _one_layer():
    torch.manual_seed(3)
    m = sbn_mlp(2, (3,), 1, dtype=D)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 1.5)
    x = torch.randn(2, 2, dtype=D)
    t = torch.tensor([1.0, -1.0], dtype=D)
    return m, x, t


def psa_by_hand(m, x, t, s):
    """PSA for 2 -> J -> 1, logistic noise, logistic loss, states s (N, J), written out:
    ga_nj = s'(a_nj) (f(s_j=+1) - f(s_j=-1));  dW1 = mean_n ga_n x_n^T;  db1 = mean_n ga_n;
    output: grad of mean_n mean_j [pi_nj f(s_n) + (1 - pi_nj) f(flip_j s_n)], pi = sigma(s a),
    with df/deta = -t sigma(-eta t)."""
    w1, b1 = m.hidden[0].weight.detach(), m.hidden[0].bias.detach()
    v, c = m.output.weight.detach()[0], m.output.bias.detach()[0]
    n, j = s.shape
    gw1, gb1 = torch.zeros_like(w1), torch.zeros_like(b1)
    gv, gc = torch.zeros_like(v), torch.zeros((), dtype=D)
    for r in range(n):
        a = w1 @ x[r] + b1

        def f(state, r=r):
            return torch.nn.functional.softplus(-(v @ state + c) * t[r])

        def fprime(state, r=r):
            return -t[r] * torch.sigmoid(-(v @ state + c) * t[r])

        sig = torch.sigmoid(a)
        for k in range(j):
            up, down = s[r].clone(), s[r].clone()
            up[k], down[k] = 1.0, -1.0
            ga = sig[k] * (1 - sig[k]) * (f(up) - f(down))
            gw1[k] += ga * x[r] / n
            gb1[k] += ga / n
            flip = s[r].clone()
            flip[k] = -flip[k]
            pi = torch.sigmoid(s[r, k] * a[k])
            gv += (pi * fprime(s[r]) * s[r] + (1 - pi) * fprime(flip) * flip) / (n * j)
            gc += (pi * fprime(s[r]) + (1 - pi) * fprime(flip)) / (n * j)
    return [gw1, gb1, gv[None], gc[None]]


def test_psa_single_draw_equals_hand_formula():
    """Replaying the documented draw order (one U(0,1) tensor per layer) gives the sampled
    states; the library's single-draw PSA gradient equals the hand formula for them."""
    m, x, t = _one_layer()
    for seed in range(3):
        loss = m.surrogate_loss(x, t, logistic_loss, "psa", generator=seed)
        got = torch.autograd.grad(loss, list(m.parameters()))
        u = torch.rand((2, 3), generator=torch.Generator().manual_seed(seed), dtype=D)
        s = torch.where(u < torch.sigmoid(m.hidden[0].preact(x).detach()), 1.0, -1.0).to(D)
        for g, h in zip(got, psa_by_hand(m, x, t, s), strict=True):
            assert torch.allclose(g, h, rtol=1e-12, atol=1e-15)


def test_psa_expectation_by_hand_equals_exact_gradient():
    """E[PSA] = sum over all 2^3 states per example of P(s) * PSA(s) equals the exact
    gradient for every layer: PSA is unbiased with one hidden layer ([S20] §3)."""
    m, x, t = _one_layer()
    exact = exact_gradient(m, x, t, logistic_loss).grads
    p = torch.sigmoid(m.hidden[0].preact(x).detach())  # (2, 3)
    from stelab.sbn import all_states

    states = all_states(3, D)
    total = [torch.zeros_like(q) for q in m.parameters()]
    for s0 in states:
        for s1 in states:
            s = torch.stack([s0, s1])
            prob = torch.where(s > 0, p, 1 - p).prod()
            for acc, h in zip(total, psa_by_hand(m, x, t, s), strict=True):
                acc += prob * h
    for acc, e in zip(total, exact.values(), strict=True):
        assert torch.allclose(acc, e, rtol=1e-10, atol=1e-14)


def test_psa_many_samples_mean_matches_exact_for_all_layers_one_hidden_layer():
    """z-test over all 13 coordinates, Bonferroni t threshold, false-alarm rate <= 1e-3."""
    m, x, t = _one_layer()
    exact = torch.cat([g.flatten() for g in exact_gradient(m, x, t, logistic_loss).grads.values()])
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(50):
        loss = m.surrogate_loss(x, t, logistic_loss, "psa", samples=400, generator=g)
        grads = torch.autograd.grad(loss, list(m.parameters()))
        rows.append(torch.cat([q.flatten() for q in grads]))
    st = torch.stack(rows)
    z = (st.mean(0) - exact) / (st.std(0) / 50**0.5)
    assert z.abs().max() < stats.t.ppf(1 - 1e-3 / (2 * 13), df=49), z


# --- the flip kernels: generic, exp-free logistic, compiled -------------------------


class _PlainLogistic(Noise):
    """sigma as a generic noise, so flip_rows takes the generic F(a - 2wx) path."""

    def cdf(self, a):
        return torch.sigmoid(a)


def _flip_problem(dtype, scale_a=3.0, scale_w=0.3, rows=7, nj=5, ni=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(rows, nj, generator=g, dtype=dtype) * scale_a
    e = torch.randn(rows, nj, generator=g, dtype=dtype)
    x = torch.randint(0, 2, (rows, ni), generator=g).to(dtype) * 2 - 1
    x[0, :3] = 0.0  # padding entries give 0
    w = torch.randn(nj, ni, generator=g, dtype=dtype) * scale_w
    return a, e, x, w


@pytest.mark.parametrize(("scale_a", "scale_w"), [(1.0, 0.1), (3.0, 1.0), (80.0, 4.0)])
def test_exp_free_logistic_kernel_equals_generic_kernel(scale_a, scale_w):
    """sigma(a - t) = B / (B + P) (shifted exponentials) vs sigma evaluated per term, in
    float64 and float32, including saturated pre-activations (no inf/nan)."""
    for dtype, tol in [(D, 1e-12), (torch.float32, 2e-5)]:
        a, e, x, w = _flip_problem(dtype, scale_a, scale_w)
        want = flip_rows(a.double(), e.double(), x.double(), w.double(), _PlainLogistic(), 13)
        got = flip_rows(a, e, x, w, get_noise("logistic"), 13, kernel="eager")
        assert torch.isfinite(got).all()
        assert torch.allclose(got.double(), want, rtol=tol, atol=tol * max(1.0, e.abs().sum()))
        assert (got[0, :3] == 0).all()


def test_exp_free_logistic_kernel_keeps_relative_accuracy_deep_in_the_tail():
    """float32 pre-activations down to -59.5 (sigma ~ 1e-26, still a normal float32) with
    |2w| <= 0.5: every shifted exponent stays inside the kernel's clamp (+-60), so each
    flip term keeps float32's relative accuracy; the float64 generic kernel is the truth,
    compared per entry relative to the size of its terms (not to 1)."""
    g = torch.Generator().manual_seed(4)
    rows, nj, ni = 4, 5, 6
    a = -50.0 - 9.5 * torch.rand(rows, nj, generator=g, dtype=D)
    e = torch.randn(rows, nj, generator=g, dtype=D)
    x = torch.randint(0, 2, (rows, ni), generator=g).to(D) * 2 - 1
    w = (torch.randn(nj, ni, generator=g, dtype=D) * 0.2).clamp(-0.25, 0.25)
    want = flip_rows(a, e, x, w, _PlainLogistic(), 13)
    f = torch.float32
    got = flip_rows(a.to(f), e.to(f), x.to(f), w.to(f), get_noise("logistic"), 13, kernel="eager")
    terms = (
        torch.sigmoid(a[:, :, None] - 2 * w[None] * x[:, None, :]) - torch.sigmoid(a)[:, :, None]
    )
    size = (e[:, :, None].abs() * terms.abs()).sum(1)
    assert (size > 1e-30).all() and (size < 1e-20).all()  # the tail, in float32's normal range
    assert ((got.double() - want).abs() <= 1e-4 * size).all()


@pytest.mark.slow
def test_compiled_kernel_equals_eager_kernel():
    """The torch.compile fused kernel (used by kernel='auto' on large layers) matches the
    eager one (slow: the first compile takes ~10-20 s). Skipped where torch.compile cannot
    build kernels (the library then warns once and uses the eager kernel)."""
    a, e, x, w = _flip_problem(torch.float32, rows=40, nj=6, ni=20)
    eager = flip_rows(a, e, x, w, get_noise("logistic"), kernel="eager")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        comp = flip_rows(a, e, x, w, get_noise("logistic"), kernel="compiled")
    failed = [c for c in caught if "PSA flip kernel failed" in str(c.message)]
    if failed:
        pytest.skip(f"torch.compile is not usable here: {failed[0].message}")
    assert torch.allclose(comp, eager, rtol=1e-5, atol=1e-5)


def _counting_compile(monkeypatch, builds, calls):
    """torch.compile replaced by a recorder returning the function itself (no compiler)."""
    from stelab.sbn import kernels

    def fake_compile(fn, **kwargs):
        builds.append(kwargs)

        def counted(*args):
            calls.append(args[0].shape[0])
            return fn(*args)

        return counted

    monkeypatch.setattr(kernels, "compiled_kernel", None)
    monkeypatch.setattr(kernels, "compile_broken", False)
    monkeypatch.setattr(torch, "compile", fake_compile)


def test_compiled_kernel_blocks_rows_like_the_eager_kernel(monkeypatch):
    """The compiled path's row blocks, without compiling (torch.compile -> the function
    itself): many blocks of ``step`` rows give the eager kernel's result in float64."""
    from stelab.sbn import kernels

    calls = []
    _counting_compile(monkeypatch, [], calls)
    a, e, x, w = _flip_problem(D, rows=40, nj=6, ni=20)
    got = flip_rows(a, e, x, w, get_noise("logistic"), 13, kernel="compiled")
    want = flip_rows(a, e, x, w, get_noise("logistic"), 13, kernel="eager")
    assert sum(calls) == 40 and len(calls) > 1 and not kernels.compile_broken
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_auto_kernel_compiles_from_AUTO_MIN_TERMS_terms_on(monkeypatch):
    """kernel="auto" takes the compiled kernel for rows x J x I >= AUTO_MIN_TERMS terms
    (counted through a torch.compile that returns the function itself), else eager."""
    from stelab.sbn import kernels

    calls = []

    def no_compile(fn, **kwargs):
        def counted(*args):
            calls.append(1)
            return fn(*args)

        return counted

    monkeypatch.setattr(kernels, "compile_broken", False)
    monkeypatch.setattr(torch, "compile", no_compile)
    a, e, x, w = _flip_problem(D, rows=40, nj=6, ni=20)
    for limit, compiled in [(40 * 6 * 20, True), (40 * 6 * 20 + 1, False)]:
        monkeypatch.setattr(kernels, "compiled_kernel", None)
        monkeypatch.setattr(kernels, "AUTO_MIN_TERMS", limit)
        calls.clear()
        flip_rows(a, e, x, w, get_noise("logistic"), kernel="auto")
        assert bool(calls) is compiled, limit


def test_compile_failure_falls_back_to_eager_with_a_warning(monkeypatch):
    from stelab.sbn import kernels

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler")

    monkeypatch.setattr(kernels, "compiled_kernel", None)
    monkeypatch.setattr(kernels, "compile_broken", False)
    monkeypatch.setattr(torch, "compile", broken)
    a, e, x, w = _flip_problem(torch.float32)
    with pytest.warns(RuntimeWarning, match="torch.compile of the PSA flip kernel failed"):
        got = flip_rows(a, e, x, w, get_noise("logistic"), kernel="compiled")
    assert kernels.compile_broken
    want = flip_rows(a, e, x, w, get_noise("logistic"), kernel="eager")
    assert torch.equal(got, want)


def test_kernel_choice_is_validated():
    a, e, x, w = _flip_problem(D)
    with pytest.raises(ConfigError, match="kernel must be one of 'auto', 'eager', 'compiled'"):
        flip_rows(a, e, x, w, get_noise("logistic"), kernel="fast")
    with pytest.raises(ConfigError, match="kernel must be one of"):
        sbn_mlp().surrogate_loss(torch.randn(2, 2), torch.ones(2), logistic_loss, kernel="gpu")


@pytest.mark.parametrize(
    "nj,width,chunk", [(3, 4, 5), (7, 3, 2), (10, 10, 1000), (5, 1, 1), (2, 8, 15)]
)
def test_flip_blocks_keep_each_temporary_within_the_budget(nj, width, chunk):
    """(rows, j) blocks: rows * j * width <= chunk_elements whenever one j fits
    (width <= chunk); at least one row and one j otherwise; never more j than there are."""
    from stelab.sbn.kernels import _blocks

    rc, jc = _blocks(nj, width, chunk)
    assert 1 <= jc <= nj and rc >= 1
    if width <= chunk:
        assert rc * jc * width <= chunk
    else:
        assert (rc, jc) == (1, 1)


def test_noise_kinds_are_equal_and_hash_by_kind():
    """A noise is a value: two of one kind are equal and hash alike (usable as dict
    keys and in sets), two kinds are not equal."""
    kinds = ("logistic", "gaussian", "uniform")
    assert len({get_noise(k) for k in kinds + kinds}) == 3
    for k in kinds:
        assert get_noise(k) == get_noise(k) and hash(get_noise(k)) == hash(get_noise(k))
    assert get_noise("logistic") != get_noise("gaussian")


def test_ratio_dispatches_by_layer_with_the_same_defaults():
    """ratio() is ratio_linear / ratio_conv2d chosen by layer type, with their defaults
    (no scaling of the flip differences)."""
    from stelab.sbn.kernels import ratio

    torch.manual_seed(5)
    lin = SBNLinear(4, 3, dtype=D)
    x = torch.randint(0, 2, (2, 4), dtype=D) * 2 - 1
    a, e = lin.preact(x).detach(), torch.randn(2, 3, dtype=D)
    assert torch.equal(ratio(lin, a, e, x), ratio_linear(lin, a, e, x))
    conv = SBNConv2d(2, 3, 3, 1, 1, 1, dtype=D)
    xc = torch.randint(0, 2, (2, 2, 5, 5), dtype=D) * 2 - 1
    ac = conv.preact(xc).detach()
    ec = torch.randn_like(ac)
    assert torch.equal(ratio(conv, ac, ec, xc), ratio_conv2d(conv, ac, ec, xc))


def test_kernel_and_chunk_options_are_checked_where_they_enter():
    torch.manual_seed(6)
    lin = SBNLinear(4, 3, dtype=D)
    x = torch.randint(0, 2, (2, 4), dtype=D) * 2 - 1
    a, e = lin.preact(x).detach(), torch.randn(2, 3, dtype=D)
    with pytest.raises(
        ConfigError, match="kernel must be one of 'auto', 'eager', 'compiled', got 'fast'"
    ):
        ratio_linear(lin, a, e, x, kernel="fast")
    from stelab.sbn import get_estimator

    with pytest.raises(ConfigError, match=rf"chunk_elements must be an integer in \[1, {2**40}\]"):
        get_estimator("psa", chunk_elements=2**40 + 1)
    assert get_estimator("psa", chunk_elements=2**40).chunk_elements == 2**40


def _flip_by_definition(a, e, x, w):
    """out[r, i] = sum_j e[r, j] (sigma(a[r, j] - 2 w[j, i] x[r, i]) - sigma(a[r, j])),
    summed over every (r, i, j) at once."""
    t = torch.sigmoid(a[:, :, None] - 2 * w[None] * x[:, None, :]) - torch.sigmoid(a)[:, :, None]
    return (e[:, :, None] * t).sum(1)


def test_compiled_kernel_is_built_once_and_reused(monkeypatch):
    from stelab.sbn import kernels

    builds, calls = [], []
    _counting_compile(monkeypatch, builds, calls)
    a, e, x, w = _flip_problem(D, rows=9, nj=4, ni=6)
    want = _flip_by_definition(a, e, x, w).masked_fill(x == 0, 0.0)
    first = flip_rows(a, e, x, w, get_noise("logistic"), kernel="compiled")
    second = flip_rows(a, e, x, w, get_noise("logistic"), kernel="compiled")
    assert builds == [{"dynamic": True}] and calls == [9, 9] and not kernels.compile_broken
    assert torch.allclose(first, want, rtol=1e-12, atol=1e-13)
    assert torch.equal(second, first)


def test_ratio_conv2d_kernel_choice_is_made_once_per_layer(monkeypatch):
    """An explicit kernel is used as given; "auto" decides on the terms of the whole
    layer (N P C_out C_in K^2 = 4 * 25 * 3 * 18 = 5400), not of a block of examples (one
    example per block here: 1350 terms). Every choice equals the flip rule on the
    layer's dense matrix, computed term by term."""
    from stelab.sbn import kernels

    torch.manual_seed(7)
    conv = SBNConv2d(2, 3, 3, 1, 1, 1, dtype=D)
    x = torch.randint(0, 2, (4, 2, 5, 5), dtype=D) * 2 - 1
    a = conv.preact(x).detach()
    e = torch.randn_like(a)
    with torch.no_grad():
        dense = dense_matrix(conv, (2, 5, 5))
    want = _flip_by_definition(a.flatten(1), e.flatten(1), x.flatten(1), dense).view(x.shape)
    builds, calls = [], []
    _counting_compile(monkeypatch, builds, calls)
    for kernel, limit, compiled in [
        ("auto", 5400, True),
        ("auto", 5401, False),
        ("eager", 1, False),
        ("compiled", 10**9, True),
    ]:
        monkeypatch.setattr(kernels, "AUTO_MIN_TERMS", limit)
        calls.clear()
        got = ratio_conv2d(conv, a, e, x, chunk_elements=450, kernel=kernel)
        assert calls == ([25] * 4 if compiled else []), (kernel, limit)
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-13), (kernel, limit)


def test_ratio_refuses_a_layer_without_a_flip_rule():
    from stelab.sbn.kernels import ratio

    lin = torch.nn.Linear(4, 3, dtype=D)
    x = torch.ones(2, 4, dtype=D)
    a, e = lin(x).detach(), torch.ones(2, 3, dtype=D)
    with pytest.raises(ConfigError, match="PSA has no flip rule for Linear layers"):
        ratio(lin, a, e, x)
