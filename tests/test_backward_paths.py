"""DSQ and EWGS backward: every code path against the reference formula.

A quantizer reaches its estimator's backward by one of three paths: a fixed scalar
step (plain-float context, eager in-place kernels), a tensor step (learned or
per-channel steps, and the path torch.compile traces), and a differentiable
backward (``create_graph=True``). Each must give the formula's value, computed
here independently in float64 Python math, in float32 and float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from stelab import estimators
from stelab.quantizers import Quantizer

DTYPES = [torch.float32, torch.float64]


def _dsq_ref(x: float, k: float, step: float, offset: float, lo: float, hi: float) -> float:
    """(s·k/2)·sech²(k·r), s = 1/tanh(k/2), r = offset from the nearest jump; 0 outside."""
    if x < lo or x > hi:
        return 0.0
    u = (x - offset) / step
    r = u - round(u)
    return (k / math.tanh(k / 2) / 2) / math.cosh(k * r) ** 2


def _points(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x = torch.rand(400, generator=g, dtype=torch.float64) * 2.6 - 0.6
    edges = torch.tensor([-0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.3, -0.3], dtype=torch.float64)
    return torch.cat([x, edges]).to(dtype)


def _quantizer(est: str, path: str, **params) -> Quantizer:
    # act, 2 bits, α = 0.5: levels 0 .. 1.5, jumps at 0, 0.5, 1; dsq's range [-0.25, 1.25]
    if path == "tensor":  # a per-channel (here: one-element 1-D) step: context of tensors
        return Quantizer("act", est, bits=2, step=torch.tensor([0.5]), **params)
    return Quantizer("act", est, bits=2, step=0.5, **params)


def _grad(q: Quantizer, x: torch.Tensor, g: torch.Tensor, path: str) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    y = q(x)
    if path == "double":  # a differentiable backward, as for gradient penalties
        (gx,) = torch.autograd.grad(y, x, g, create_graph=True)
        assert gx.requires_grad
        return gx.detach()
    (gx,) = torch.autograd.grad(y, x, g)
    return gx


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("path", ["float", "tensor", "double"])
def test_dsq_backward_matches_formula(dtype, path):
    k = 3.0
    q = _quantizer("dsq", path, k=k)
    x = _points(dtype)
    g = torch.linspace(-2, 2, x.numel(), dtype=dtype)
    got = _grad(q, x, g, path)
    assert got.dtype == dtype
    expect = (
        torch.tensor(
            [_dsq_ref(v, k, 0.5, 0.0, -0.25, 1.25) for v in x.tolist()], dtype=torch.float64
        )
        * g.double()
    )
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got.double(), expect, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize("path", ["float", "tensor", "double"])
def test_ewgs_backward_matches_formula(dtype, path):
    delta = 0.3
    q = _quantizer("ewgs", path, delta=delta)
    x = _points(dtype)
    g = torch.linspace(-2, 2, x.numel(), dtype=dtype)
    got = _grad(q, x, g, path)
    # g·(1 + δ·sign(g)·(x - q(x))), q(x) = α·clamp(ceil(x/α), 0, 3) in Python math
    qx = [0.5 * min(max(math.ceil(v / 0.5), 0), 3) for v in x.tolist()]
    expect = torch.tensor(
        [
            gv * (1 + delta * math.copysign(1.0, gv) * (v - qv)) if gv else 0.0
            for v, qv, gv in zip(x.tolist(), qx, g.tolist(), strict=True)
        ],
        dtype=torch.float64,
    )
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(got.double(), expect, rtol=tol, atol=tol)


def test_dsq_double_backward_is_the_formula_derivative():
    """With create_graph the input gradient is itself differentiable: d/dg of
    Σ g·q̂'(x) is q̂'(x) (checked against the formula, float64)."""
    q = _quantizer("dsq", "float", k=3.0)
    x = _points(torch.float64).requires_grad_(True)
    g = torch.ones_like(x, requires_grad=True)
    (gx,) = torch.autograd.grad(q(x), x, g, create_graph=True)
    (dg,) = torch.autograd.grad(gx.sum(), g)
    expect = torch.tensor(
        [_dsq_ref(v, 3.0, 0.5, 0.0, -0.25, 1.25) for v in x.tolist()], dtype=torch.float64
    )
    torch.testing.assert_close(dg, expect, rtol=1e-12, atol=1e-12)


#: the estimators stelab ships (classes defined in stelab.estimators; not ones other
#: test modules may have registered by the time this one is collected)
BUILTIN = [
    n
    for n in estimators.names()
    if type(estimators.get(n)).__module__ == "stelab.estimators"
    and not isinstance(estimators.get(n), estimators.Custom)
]


def _compile_case(est: str) -> Quantizer:
    """A quantizer the built-in estimator ``est`` serves (act first, then uniform, sign)."""
    serves = estimators.get(est).serves
    if serves is None or "act" in serves:
        return Quantizer("act", est, bits=2, step=0.5)
    if "uniform" in serves:
        return Quantizer("uniform", est, bits=4, step=0.25)
    return Quantizer(sorted(serves)[-1], est)  # sign (or ternary)


def test_builtin_list_holds_the_shipped_estimators():
    assert {"ste", "clipped", "clipped_relu", "dsq", "ewgs", "cosine", "swish_sign"} <= set(BUILTIN)


@pytest.mark.parametrize("est", BUILTIN)
def test_compiled_quantizer_has_no_graph_break(est):
    """torch.compile sees forward and backward of the quantizer as one graph (the
    tensor-step context, no host reads), so the compiler can fuse the backward; for
    every built-in estimator."""
    import torch._dynamo

    q = _compile_case(est)
    torch._dynamo.reset()
    out = torch._dynamo.explain(q)(torch.randn(8, 4, requires_grad=True))
    assert out.graph_count == 1
    assert out.graph_break_count == 0, out.break_reasons


@pytest.mark.parametrize("est", ["dsq", "ewgs", "cosine"])
def test_compiled_backward_in_one_graph_matches_eager(est):
    """fullgraph=True (an error on any graph break, backward included) and the
    compiled input gradient equals eager's (float64, aot_eager: no codegen rounding)."""
    import torch._dynamo

    q = _compile_case(est).double()
    x = _points(torch.float64).requires_grad_(True)
    g = torch.linspace(-2, 2, x.numel(), dtype=torch.float64)
    (want,) = torch.autograd.grad(q(x), x, g)
    torch._dynamo.reset()
    cq = torch.compile(q, backend="aot_eager", fullgraph=True)
    (got,) = torch.autograd.grad(cq(x), x, g)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize(("dtype", "k"), [(torch.float32, 24.0), (torch.float64, 60.0)])
def test_dsq_eager_float_step_path_keeps_its_tails(dtype, k):
    """The eager fixed-step backward (sigmoid_backward in place) at a k where σ(k)
    rounds to 1: its tails (~2e-9 / ~1e-24 at the bin centres) keep their relative
    accuracy against the float64 formula, never cancel to 0."""
    q = _quantizer("dsq", "float", k=k).to(dtype)
    centres = torch.tensor([0.25, 0.75, -0.2, 1.2], dtype=torch.float64)
    x = torch.cat([_points(torch.float64), centres]).to(dtype)
    x = x[(x >= -0.25) & (x <= 1.25)]  # inside the range: no exact zeros expected
    g = torch.linspace(0.5, 2.0, x.numel(), dtype=dtype)
    gx = _grad(q, x, g, "float")
    expect = (
        torch.tensor(
            [_dsq_ref(v, k, 0.5, 0.0, -0.25, 1.25) for v in x.double().tolist()],
            dtype=torch.float64,
        )
        * g.double()
    )
    assert float(expect.min()) < 1e-8
    # float32: x/α carries ~6e-8 relative error, times the log-slope 2k of sech²(k·r)
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(gx.double(), expect, rtol=rtol, atol=0)


def test_dsq_derivative_keeps_its_tails():
    """Sharp dsq (k = 100): q̂' falls to ~1e-39 at the bin centres; the tensor-step path
    must keep these values (no 1 - σ cancellation to 0), as the [S24] map needs them."""
    from stelab.estimators import get
    from stelab.quantizers import Forward

    k, step = 100.0, 0.1
    ctx = Forward("uniform", None).context(torch.tensor(step, dtype=torch.float64))
    x = torch.linspace(-0.3, 0.3, 601, dtype=torch.float64)
    got = get("dsq", k=k).derivative(x, ctx)
    expect = torch.tensor(
        [_dsq_ref(v, k, step, step / 2, -math.inf, math.inf) for v in x.tolist()],
        dtype=torch.float64,
    )
    assert float(expect.min()) < 1e-30
    torch.testing.assert_close(got, expect, rtol=1e-10, atol=0)


@pytest.mark.parametrize("est", ["ste", "dsq", "ewgs"])
def test_functorch_transforms_take_torchs_own_apply(est):
    """The quantizer's Function skips torch's per-call argument binding outside functorch
    transforms; under one (torch.func.grad, which needs the binding) it takes torch's own
    path. Both give the estimator's gradient."""
    q = Quantizer("act", estimator=est, bits=2, step=0.5)
    x = torch.linspace(-0.6, 2.1, 41, dtype=torch.float64)
    w = torch.linspace(0.5, 1.5, 41, dtype=torch.float64)  # a g that is not all ones
    xr = x.clone().requires_grad_()
    (q(xr) * w).sum().backward()
    via_func = torch.func.grad(lambda t: (q(t) * w).sum())(x)
    with torch.no_grad():  # as in a backward pass (the eager fast path)
        expected = q.estimator.grad_input(x, q(x), w, q.fwd.context(0.5))
    torch.testing.assert_close(xr.grad, expected, rtol=0, atol=0)
    # under a transform the backward may take the estimator's one-expression formula
    # (the eager fast path's float64 result to an ulp or two)
    torch.testing.assert_close(via_func, expected, rtol=1e-14, atol=1e-15)


def test_dsq_with_an_incoming_gradient_of_another_dtype_is_the_formula():
    """The in-place fast path writes into a buffer of x's dtype; a gradient of another
    dtype (a float64 g for float32 x, as a direct caller may pass) takes the formula path
    and comes back in the promoted dtype, equal to the scalar reference."""
    est = estimators.DSQ(k=4.0)
    ctx = Quantizer("act", estimator="dsq", bits=2, step=0.5).fwd.context(0.5)
    x = _points(torch.float32)
    g = torch.linspace(-1.0, 2.0, x.numel(), dtype=torch.float64)
    with torch.no_grad():
        got = est.grad_input(x, None, g, ctx)
    assert got.dtype == torch.float64
    lo, hi = ctx.first_jump - 0.25, ctx.last_jump + 0.25
    want = [
        gi * _dsq_ref(xi, 4.0, 0.5, 0.0, lo, hi)
        for xi, gi in zip(x.tolist(), g.tolist(), strict=True)
    ]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)


def test_clipped_with_one_float_and_one_tensor_bound_is_the_indicator():
    """A forward may give a float lower level and per-channel tensor upper levels (a
    one-sided kind with a learned step): the one-kernel path needs both bounds as floats,
    so this mix takes the formula, 1{lo <= x <= hi} per channel."""
    hi = torch.tensor([[0.5], [1.0], [1.5]], dtype=torch.float64)
    ctx = estimators.Context("act", 0.0, hi, hi / 3, 0.0, 0.0, 2 * hi / 3)
    x = torch.linspace(-0.5, 2.0, 12, dtype=torch.float64).expand(3, 12)
    g = torch.arange(36, dtype=torch.float64).reshape(3, 12)
    with torch.no_grad():
        got = estimators.get("clipped").grad_input(x, None, g, ctx)
    want = [
        [gv if 0.0 <= xv <= hv else 0.0 for xv, gv in zip(xr, gr, strict=True)]
        for xr, gr, hv in zip(x.tolist(), g.tolist(), hi.flatten().tolist(), strict=True)
    ]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=0, atol=0)


@pytest.mark.parametrize("est", [e for e in BUILTIN if e != "ewgs"])  # ewgs: no q̂'(x) alone
def test_grad_input_is_g_times_the_derivative(est):
    """Each estimator's backward (``grad_input``, often a fused fast path) and its
    documented derivative ``q̂'(x)`` (used by summaries, the [S24] map and analysis)
    agree: grad_input(x, g) == g · derivative(x), on points across and beyond the range."""
    q = _compile_case(est)
    ctx = q.fwd.context(float(q.step) if q.step is not None else None)
    x = torch.linspace(-2.5, 2.5, 1001, dtype=torch.float64)
    g = torch.linspace(-1.0, 3.0, 1001, dtype=torch.float64)
    with torch.no_grad():
        d = q.estimator.derivative(x, ctx)
        assert isinstance(d, torch.Tensor) and d.shape == x.shape
        got = q.estimator.grad_input(x, q(x), g, ctx)
    torch.testing.assert_close(got, g * d, rtol=1e-12, atol=1e-14)
