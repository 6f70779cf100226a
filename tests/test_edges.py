"""Numerics at the edges (#11 item 9): every registered estimator, on every quantizer
it serves, in float16/32/64, at 0, ±tiny, bin edges, clip edges and ±fmax.

The gradient must be finite for every finite input and equal to the estimator's
formula, written out here in Python float64 (independently of stelab's code). The
position inside a bin, r = v - round(v) with v = (x - c)/Δ, is taken from the exact
float64 quotient; where that quotient is an integer or beyond 2^p (p the significand
bits of the input's dtype: every float there is an integer) r = 0, the limit the
documented convention gives for |x| ~ fmax. The forward is checked the same way:
finite, on the grid, and for unclipped ``uniform`` beyond 2^p·Δ the input itself.
"""

from __future__ import annotations

import math

import pytest
import torch

from stelab import Quantizer, estimators

DTYPES = [torch.float16, torch.float32, torch.float64]
STEP = 0.25  # exact in every dtype, so bin and clip edges are exact inputs
# absolute tolerance per dtype: r carries the rounding of x/Δ (|v| <= 4/Δ = 16 here)
TOL = {torch.float16: 6e-2, torch.float32: 1e-4, torch.float64: 1e-10}


def p_bound(dtype: torch.dtype) -> float:
    """2^p: from there on every float of ``dtype`` is an integer."""
    return {torch.float16: 2.0**11, torch.float32: 2.0**24, torch.float64: 2.0**53}[dtype]


def sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))


# --- the quantizers, with their levels and jumps written out by hand -------------------
# lo, hi: lowest/highest level; off: jumps at off + iΔ; first/last jump; c: bin-centre
# offset of the cyclical estimators; q: the forward.


def _uniform4(x: float) -> float:
    if math.isinf(x / STEP):
        return -8 * STEP if x < 0 else 7 * STEP
    return STEP * min(max(round(x / STEP), -8), 7)


def _unclipped(x: float, dtype: torch.dtype) -> float:
    v = x / STEP
    if math.isinf(v) or abs(v) >= p_bound(dtype):
        return x
    return STEP * round(v)


def _act2(x: float) -> float:
    v = x / STEP
    if math.isinf(v):
        return 3 * STEP if v > 0 else 0.0
    return STEP * min(max(math.ceil(v), 0), 3)


QUANTS = {
    "identity": dict(args=dict(fn="identity"), lo=-math.inf, hi=math.inf, q=lambda x, d: x),
    "sign": dict(args=dict(fn="sign"), lo=-1.0, hi=1.0, q=lambda x, d: 1.0 if x >= 0 else -1.0),
    "heaviside": dict(args=dict(fn="heaviside"), lo=0.0, hi=1.0, q=lambda x, d: float(x > 0)),
    "ternary": dict(
        args=dict(fn="ternary", threshold=0.5),
        lo=-1.0,
        hi=1.0,
        q=lambda x, d: 0.0 if abs(x) <= 0.5 else math.copysign(1.0, x),
    ),
    "uniform4": dict(
        args=dict(fn="uniform", bits=4, step=STEP),
        lo=-8 * STEP,
        hi=7 * STEP,
        off=STEP / 2,
        first=-7.5 * STEP,
        last=6.5 * STEP,
        c=0.0,
        q=lambda x, d: _uniform4(x),
    ),
    "uniform4_channel": dict(
        args=dict(fn="uniform", bits=4, step="channel"),
        lo=-8 * STEP,
        hi=7 * STEP,
        off=STEP / 2,
        first=-7.5 * STEP,
        last=6.5 * STEP,
        c=0.0,
        q=lambda x, d: _uniform4(x),
    ),
    "uniform4_learned": dict(
        args=dict(fn="uniform", bits=4, step=STEP, learn_step=True),
        lo=-8 * STEP,
        hi=7 * STEP,
        off=STEP / 2,
        first=-7.5 * STEP,
        last=6.5 * STEP,
        c=0.0,
        q=lambda x, d: _uniform4(x),
    ),
    "uniform_unclipped": dict(
        args=dict(fn="uniform", step=STEP),
        lo=-math.inf,
        hi=math.inf,
        off=STEP / 2,
        first=-math.inf,
        last=math.inf,
        c=0.0,
        q=_unclipped,
    ),
    "act2": dict(
        args=dict(fn="act", bits=2, alpha=STEP),
        lo=0.0,
        hi=3 * STEP,
        off=0.0,
        first=0.0,
        last=2 * STEP,
        c=-STEP / 2,
        q=lambda x, d: _act2(x),
    ),
    "act2_learned": dict(
        args=dict(fn="act", bits=2, alpha=STEP, learn_step=True),
        lo=0.0,
        hi=3 * STEP,
        off=0.0,
        first=0.0,
        last=2 * STEP,
        c=-STEP / 2,
        q=lambda x, d: _act2(x),
    ),
}


def kind(qname: str) -> str:
    return QUANTS[qname]["args"]["fn"]


def position(x: float, offset: float, dtype: torch.dtype) -> float:
    """r = v - round(v) (half to even), v = (x - offset)/Δ in exact float64; 0 beyond 2^p."""
    v = (x - offset) / STEP
    if math.isinf(v) or abs(v) >= p_bound(dtype):
        return 0.0
    return v - round(v)


def inside(x: float, Q: dict) -> bool:
    """Within the outer half-bins of a clipped quantizer (everywhere when unclipped)."""
    return Q["first"] - STEP / 2 <= x <= Q["last"] + STEP / 2


# --- the estimators' formulas ---------------------------------------------------------


def ref_grad(est: str, x: float, Q: dict, dtype: torch.dtype) -> float:
    lo, hi = Q["lo"], Q["hi"]
    if est == "ste":
        return 1.0
    if est == "clipped":
        return float(lo <= x <= hi)
    if est == "relu":
        return float(x > 0)
    if est == "clipped_relu":
        return float(0 < x < hi)
    if est == "approx_sign":
        return max(0.0, 2 - 2 * abs(x))
    if est == "swish_sign":  # beta = 5
        bx = 5.0 * x
        if abs(bx) > 700:
            return 0.0
        return 5.0 * (2 - bx * math.tanh(bx / 2)) / (1 + math.cosh(bx))
    if est == "logistic":  # scale = 1
        return (hi - lo) * sig(x) * (1 - sig(x))
    if est == "ewgs":  # g = 1, delta = 0.2: 1 + 0.2·(x - q(x))
        return 1.0 + 0.2 * (x - Q["q"](x, dtype))
    if est == "dsq":  # k = 3
        if not inside(x, Q):
            return 0.0
        r = position(x, Q["off"], dtype)
        return (1 / math.tanh(1.5)) * 1.5 / math.cosh(3 * r) ** 2
    # the cyclical estimators [S24]: r in [-1/2, 1/2) measured from the bin centre
    if not inside(x, Q):
        return 0.0
    r = position(x, Q["c"], dtype)
    if r >= 0.5:
        r -= 1
    if est == "cosine":  # a = 0.5
        return 1 + 0.5 * math.cos(2 * math.pi * r)
    if est == "triangle_wave":  # m = 0.5
        return 0.5 + 4 * 0.5 * abs(r)
    if est == "soft_staircase":  # k = 6
        s = sig(6 * (abs(r) - 0.5))
        return 6 / math.tanh(1.5) * s * (1 - s)
    if est == "periodic":  # func = None: 1
        return 1.0
    raise AssertionError(f"no reference formula for estimator {est!r}: add one here")


def inputs(dtype: torch.dtype) -> list[float]:
    fi = torch.finfo(dtype)
    edges = [(k + 0.5) * STEP for k in range(-9, 9)]  # bin edges of uniform, centres of act
    centres = [k * STEP for k in range(-9, 9)]
    clip = [-2.0, 1.75, -2.125, 1.875, -2.1251, 1.8751, -2.25, 2.0, 0.75, 0.625, 0.875, 1.0]
    special = [0.0, -0.0, fi.tiny, -fi.tiny, fi.tiny * fi.eps, -fi.tiny * fi.eps, fi.max, -fi.max]
    special += [fi.max / 2, -fi.max / 2, 1e3, -1e3, 6e4, -6e4, 0.5, -0.5, 1.0, -1.0]
    g = torch.Generator().manual_seed(0)
    rnd = (torch.rand(30, generator=g, dtype=torch.float64) * 8 - 4).tolist()
    xs = torch.tensor(special + edges + centres + clip + rnd, dtype=torch.float64)
    return xs.to(dtype).tolist()  # the references see the same rounded numbers


def make(qname: str, est: str, n: int) -> Quantizer:
    args = dict(QUANTS[qname]["args"])
    if args.get("step") == "channel":
        args["step"] = torch.full((n,), STEP, dtype=torch.float64)
    return Quantizer(args.pop("fn"), est, **args)


def combos() -> list[tuple[str, str]]:
    out = []
    for est in estimators.names():
        serves = estimators.get(est).serves
        for qname in QUANTS:
            if serves is not None and kind(qname) not in serves:
                continue
            try:
                make(qname, est, 1)
            except ValueError:  # e.g. clipped_relu cannot serve an unclipped quantizer
                continue
            out.append((est, qname))
    return out


COMBOS = combos()


def test_the_sweep_covers_every_registered_estimator_and_quantizer():
    assert {e for e, _ in COMBOS} == set(estimators.names())
    assert {kind(q) for _, q in COMBOS} == set(k for k in ("identity", "sign", "heaviside",
                                                         "ternary", "uniform", "act"))  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES, ids=["f16", "f32", "f64"])
@pytest.mark.parametrize("est,qname", COMBOS, ids=[f"{e}-{q}" for e, q in COMBOS])
def test_gradient_is_finite_and_matches_the_formula(est, qname, dtype):
    xs = inputs(dtype)
    q = make(qname, est, len(xs))
    x = torch.tensor(xs, dtype=dtype, requires_grad=True)
    y = q(x)
    y.backward(torch.ones_like(y))
    grad = x.grad
    assert grad.dtype == dtype and y.dtype == dtype
    bad = [(xs[i], float(grad[i])) for i in range(len(xs)) if not math.isfinite(grad[i])]
    assert not bad, f"non-finite gradients (x, grad): {bad[:6]}"
    expect = torch.tensor([ref_grad(est, v, QUANTS[qname], dtype) for v in xs], dtype=torch.float64)
    rtol = {torch.float16: 4e-3, torch.float32: 2e-6, torch.float64: 1e-12}[dtype]
    torch.testing.assert_close(grad.double(), expect, rtol=rtol, atol=TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=["f16", "f32", "f64"])
@pytest.mark.parametrize("qname", list(QUANTS))
def test_forward_is_finite_and_on_the_grid(qname, dtype):
    xs = inputs(dtype)
    q = make(qname, "ste", len(xs))
    y = q(torch.tensor(xs, dtype=dtype))
    assert y.dtype == dtype and bool(torch.isfinite(y).all())
    expect = torch.tensor([QUANTS[qname]["q"](v, dtype) for v in xs], dtype=torch.float64)
    torch.testing.assert_close(y.double(), expect, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f16", "f32", "f64"])
def test_unclipped_uniform_is_bit_identical_in_range_and_the_input_beyond(dtype):
    """Δ = 0.1 (not exact): wherever Δ·round(x/Δ) computed directly is finite and
    |x| < 2^p·Δ the forward gives exactly that; beyond, x itself (never ±inf)."""
    g = torch.Generator().manual_seed(1)
    fi = torch.finfo(dtype)
    mags = torch.logspace(-6, math.log10(fi.max) - 0.01, 400, dtype=torch.float64)
    signs = torch.randint(0, 2, (400,), generator=g).double() * 2 - 1
    frac = 1 + torch.rand(400, generator=g, dtype=torch.float64)
    x = (mags * signs * frac).clamp(-fi.max, fi.max).to(dtype)
    x = torch.cat([x, torch.tensor([fi.max, -fi.max, 0.05, 0.15, -0.25], dtype=dtype)])
    step = torch.tensor(0.1, dtype=torch.float64)
    y = Quantizer("uniform", step=0.1)(x)
    direct = torch.round(x / step) * step  # the definition, as computed before
    lim = step.to(dtype).double() * p_bound(dtype)
    small = x.double().abs() < lim
    assert bool(torch.isfinite(y).all())
    assert torch.equal(y[small], direct[small])
    assert torch.equal(y[~small], x[~small])
    assert (~small).sum() > 10 and bool((~torch.isfinite(direct)).any())


def test_swish_sign_far_out_in_float32_is_zero_not_nan():
    x = torch.tensor([7e36, -7e36, 3e38, -3.4e38], requires_grad=True)
    Quantizer("sign", "swish_sign")(x).sum().backward()
    assert torch.equal(x.grad.abs(), torch.zeros(4))


def test_0d_input_keeps_its_dtype():
    for dtype in DTYPES:
        for q in (Quantizer("uniform", bits=4, step=0.1), Quantizer("act", bits=2, alpha=0.5)):
            x = torch.tensor(0.7, dtype=dtype, requires_grad=True)
            y = q(x)
            assert y.dtype == dtype and y.dim() == 0
            y.backward()
            assert x.grad.dtype == dtype
        # a per-channel float64 step does not make a float32 weight float64
        w = torch.randn(3, 4)
        qc = Quantizer("uniform", bits=4, step=torch.full((3, 1), 0.1, dtype=torch.float64))
        assert qc(w).dtype == torch.float32
