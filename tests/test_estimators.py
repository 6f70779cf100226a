"""Every estimator's backward against its formula, written out here independently.

The grid holds the points where bugs hide: 0, ±clip, the quantizer's bin edges,
far outside the range, NaN-free random points; both float32 and float64.
A second check compares each estimator with central finite differences of the
smooth function it is the derivative of (where one exists).
"""

from __future__ import annotations

import math

import pytest
import torch

import stelab
from stelab import Quantizer
from stelab.errors import ConfigError

DTYPES = [torch.float32, torch.float64]


def sig(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v)) if v >= 0 else math.exp(v) / (1.0 + math.exp(v))


def grid(extra: list[float]) -> list[float]:
    g = torch.Generator().manual_seed(0)
    rnd = (torch.rand(40, generator=g, dtype=torch.float64) * 8 - 4).tolist()
    pts = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 1e3, -1e3, 1e6, -1e6, 1e-7, -1e-7]
    return pts + extra + rnd


def backward(q: Quantizer, xs: list[float], dtype: torch.dtype, g: torch.Tensor | None = None):
    x = torch.tensor(xs, dtype=dtype, requires_grad=True)
    y = q(x)
    y.backward(torch.ones_like(x) if g is None else g.to(dtype))
    return x.grad, y


# (quantizer args, estimator, params, formula q'(x) as a python function, extra grid points)
def _swish(beta: float):
    def f(x: float) -> float:
        bx = beta * x
        if abs(bx) > 700:
            return 0.0
        return beta * (2 - bx * math.tanh(bx / 2)) / (1 + math.cosh(bx))

    return f


def _dsq(k: float, step: float, offset: float, first: float, last: float):
    s = 1 / math.tanh(k / 2)

    def f(x: float) -> float:
        if x < first - step / 2 or x > last + step / 2:
            return 0.0
        u = (x - offset) / step
        r = u - round(u)
        return s * k / 2 / math.cosh(k * r) ** 2

    return f


CASES = [
    # identity STE
    (dict(fn="sign"), "ste", {}, lambda x: 1.0, []),
    (dict(fn="uniform", bits=4, step=0.25), "ste", {}, lambda x: 1.0, [2.0, -2.125]),
    # clipped STE, default c = the quantizer range, and explicit c
    (dict(fn="sign"), "clipped", {}, lambda x: float(abs(x) <= 1), [1.0000001, -0.9999999]),
    (dict(fn="sign"), "clipped", {"c": 1.5}, lambda x: float(abs(x) <= 1.5), [1.5, -1.5, 1.51]),
    (
        dict(fn="uniform", bits=3, step=0.5),
        "clipped",
        {},
        lambda x: float(-2.0 <= x <= 1.5),
        [-2.0, 1.5, -2.01, 1.51, 1.25],
    ),
    # ReLU and clipped-ReLU STE ([Y19])
    (dict(fn="heaviside"), "relu", {}, lambda x: float(x > 0), []),
    (dict(fn="heaviside"), "clipped_relu", {}, lambda x: float(0 < x < 1), [0.999999]),
    (
        dict(fn="act", bits=2, step=0.5),
        "clipped_relu",
        {},
        lambda x: float(0 < x < 1.5),
        [1.5, 1.4999, 0.5, 1.0],
    ),
    (
        dict(fn="act", bits=2, step=0.5),
        "clipped_relu",
        {"top": 1.0},
        lambda x: float(0 < x < 1),
        [],
    ),
    (dict(fn="act", bits=4, step=0.1), "relu", {}, lambda x: float(x > 0), [0.1, 1.4, 1.5]),
    # ApproxSign, SwishSign
    (dict(fn="sign"), "approx_sign", {}, lambda x: max(0.0, 2 - 2 * abs(x)), [0.999, 0.25]),
    (dict(fn="sign"), "swish_sign", {}, _swish(5.0), [0.2, -0.2, 150.0, -150.0]),
    (dict(fn="sign"), "swish_sign", {"beta": 2.0}, _swish(2.0), [0.2]),
    # logistic ("deep ST"): 2σ'(x) for sign, σ'(x) for heaviside
    (dict(fn="sign"), "logistic", {}, lambda x: 2 * sig(x) * (1 - sig(x)), []),
    (dict(fn="heaviside"), "logistic", {}, lambda x: sig(x) * (1 - sig(x)), []),
    (
        dict(fn="sign"),
        "logistic",
        {"scale": 3.0},
        lambda x: 2 * 3 * sig(3 * x) * (1 - sig(3 * x)),
        [],
    ),
    # DSQ on uniform (jumps at (i + 1/2)Δ) and on act (jumps at iα)
    (
        dict(fn="uniform", bits=3, step=0.5),
        "dsq",
        {"k": 3.0},
        _dsq(3.0, 0.5, 0.25, -1.75, 1.25),
        [0.25, -0.25, 1.25, -1.75, 1.5, -2.0, 1.51, -2.01, 0.375],
    ),
    (
        dict(fn="uniform", bits=None, step=0.1),
        "dsq",
        {"k": 5.0},
        _dsq(5.0, 0.1, 0.05, -math.inf, math.inf),
        [0.05, 0.15, 12.35],
    ),
    (
        dict(fn="act", bits=2, step=0.5),
        "dsq",
        {"k": 2.0},
        _dsq(2.0, 0.5, 0.0, 0.0, 1.0),
        [-0.25, -0.2501, 1.25, 1.2501, 0.25, 0.75],
    ),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(
    "qargs,est,params,formula,extra",
    CASES,
    ids=[f"{c[0]['fn']}-{c[1]}-{i}" for i, c in enumerate(CASES)],
)
def test_backward_matches_formula(qargs, est, params, formula, extra, dtype):
    qargs = dict(qargs)
    q = Quantizer(qargs.pop("fn"), est, **qargs, **params)
    xs = grid(extra)
    # feed the grid as dtype values: the formula sees the same rounded numbers
    xs = torch.tensor(xs, dtype=dtype).tolist()
    if dtype == torch.float32 and est == "dsq" and qargs.get("bits") is None:
        # float32 cannot hold the position inside a bin once |x|/step ~ 1e6
        # (documented); keep the points where it can
        xs = [x for x in xs if abs(x) < 1e3]
    grad, _ = backward(q, xs, dtype)
    expect = torch.tensor([formula(x) for x in xs], dtype=torch.float64)
    assert grad.dtype == dtype
    # float32: x/step carries a relative error ~6e-8·|x/step|, amplified by dsq's slope
    tol = 1e-12 if dtype == torch.float64 else (1e-4 if est == "dsq" else 2e-6)
    torch.testing.assert_close(grad.double(), expect, rtol=tol, atol=tol)


@pytest.mark.parametrize(
    "qargs,est,params,formula,extra",
    [c for c in CASES if c[1] != "ste"],
    ids=[f"{c[0]['fn']}-{c[1]}-{i}" for i, c in enumerate(CASES) if c[1] != "ste"],
)
def test_derivative_matches_formula_at_the_edges(qargs, est, params, formula, extra):
    """``derivative()`` is a second code path (the disguise map and the conversion call
    it; backward uses fused kernels): the same formula at the same points, including
    the edges 0, ±1 and the levels, where an open/closed interval flip shows."""
    qargs = dict(qargs)
    q = Quantizer(qargs.pop("fn"), est, **qargs, **params)
    xs = grid(extra)
    d = q.estimator.derivative(torch.tensor(xs, dtype=torch.float64), q.context())
    expect = torch.tensor([formula(x) for x in xs], dtype=torch.float64)
    torch.testing.assert_close(d.double(), expect, rtol=1e-12, atol=1e-12)


def test_relu_derivative_is_zero_at_zero_and_one_just_above():
    q = Quantizer("heaviside", "relu")
    x = torch.tensor([-1e-300, 0.0, -0.0, 5e-324, 1e-300], dtype=torch.float64)
    assert q.estimator.derivative(x, q.context()).tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_ewgs_uses_gradient_sign_and_quantization_error():
    q = Quantizer("uniform", "ewgs", bits=4, step=0.5, delta=0.3)
    xs = [0.1, 0.2, -0.1, 0.74, 3.9, -4.2, 0.0]
    qs = [0.0, 0.0, 0.0, 0.5, 3.5, -4.0, 0.0]  # Δ·clamp(round(x/Δ), -8, 7)
    for gsign in (1.0, -1.0):
        g = torch.full((len(xs),), 2.0 * gsign, dtype=torch.float64)
        grad, y = backward(q, xs, torch.float64, g)
        assert y.tolist() == qs
        expect = [2.0 * gsign * (1 + 0.3 * gsign * (x - v)) for x, v in zip(xs, qs, strict=True)]
        torch.testing.assert_close(grad, torch.tensor(expect, dtype=torch.float64))


def test_ewgs_delta_zero_is_identity():
    q = Quantizer("sign", "ewgs", delta=0.0)
    g = torch.randn(50, dtype=torch.float64)
    grad, _ = backward(q, torch.randn(50).tolist(), torch.float64, g)
    torch.testing.assert_close(grad, g)


# --- estimators are derivatives of smooth surrogates: compare with finite differences


def _fd(F, x: torch.Tensor, h: float = 1e-6) -> torch.Tensor:
    return (F(x + h) - F(x - h)) / (2 * h)


SMOOTH = [
    ("sign", {}, "approx_sign", {},
     lambda x: torch.where(x.abs() >= 1, torch.sign(x), 2 * x - x * x.abs())),
    ("sign", {}, "swish_sign", {"beta": 5.0},
     lambda x: 2 * torch.sigmoid(5 * x) * (1 + 5 * x * (1 - torch.sigmoid(5 * x))) - 1),
    ("sign", {}, "logistic", {"scale": 2.0}, lambda x: 2 * torch.sigmoid(2 * x) - 1),
    ("heaviside", {}, "clipped_relu", {}, lambda x: x.clamp(0, 1)),
    ("uniform", {"bits": None, "step": 0.5}, "dsq", {"k": 3.0},
     lambda x: 0.5 * torch.floor(x / 0.5)
     + 0.25 * (1 + torch.tanh(3 * ((x - 0.5 * torch.floor(x / 0.5)) - 0.25) / 0.5)
               / math.tanh(1.5))),
]  # fmt: skip


@pytest.mark.parametrize("fn,qkw,est,params,F", SMOOTH, ids=[s[2] for s in SMOOTH])
def test_estimator_is_derivative_of_smooth_surrogate(fn, qkw, est, params, F):
    q = Quantizer(fn, est, **qkw, **params)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(200, generator=g, dtype=torch.float64) * 6 - 3
    # stay away from kinks of the surrogates (|x| = 1, 0, bin edges of dsq at multiples of Δ)
    x = x[
        ((x.abs() - 1).abs() > 1e-3)
        & (x.abs() > 1e-3)
        & ((x / 0.5 - torch.round(x / 0.5)).abs() > 1e-3)
    ]
    xg = x.clone().requires_grad_(True)
    q(xg).sum().backward()
    torch.testing.assert_close(xg.grad, _fd(F, x), rtol=1e-6, atol=1e-7)
    # and gradcheck confirms the surrogate itself is smooth there (independent truth)
    assert torch.autograd.gradcheck(F, (x[:5].clone().requires_grad_(True),))


def test_dsq_averages_one_over_a_bin():
    q = Quantizer("uniform", "dsq", bits=None, step=0.2, k=4.0)
    x = torch.linspace(0.1, 0.3, 200_001, dtype=torch.float64, requires_grad=True)
    q(x).sum().backward()
    mean = torch.trapezoid(x.grad, x.detach()) / 0.2
    assert abs(mean.item() - 1.0) < 1e-9


def test_nan_input_propagates_without_error():
    for est in ["ste", "clipped", "approx_sign", "swish_sign", "logistic"]:
        x = torch.tensor([float("nan"), 0.3], requires_grad=True)
        y = Quantizer("sign", est)(x)
        y.sum().backward()
        assert math.isnan(y[0].item()) and y[1].item() == 1.0


# --- registry


def test_registry_names_and_get():
    for n in ["ste", "clipped", "relu", "clipped_relu", "approx_sign", "swish_sign",
              "logistic", "dsq", "ewgs"]:  # fmt: skip
        assert n in stelab.estimator_names()
        assert stelab.estimator(n).name == n
    assert stelab.estimator("swish_sign", beta=7).beta == 7.0


def test_unknown_estimator_lists_known_and_closest():
    with pytest.raises(ValueError) as e:
        stelab.estimator("aprox_sign")
    msg = str(e.value)
    assert "aprox_sign" in msg and "approx_sign" in msg and "did you mean" in msg
    assert "swish_sign" in msg  # lists the known ones


@pytest.mark.parametrize(
    "name,params,word",
    [
        ("clipped", {"c": 0}, "c"),
        ("clipped", {"c": -1.0}, "c"),
        ("clipped", {"c": float("nan")}, "c"),
        ("swish_sign", {"beta": 0}, "beta"),
        ("logistic", {"scale": float("inf")}, "scale"),
        ("dsq", {"k": -2}, "k"),
        ("ewgs", {"delta": -0.1}, "delta"),
        ("clipped_relu", {"top": 0.0}, "top"),
        ("relu", {"bogus": 1}, "bogus"),
    ],
)
def test_bad_parameters_name_the_parameter(name, params, word):
    with pytest.raises(ValueError) as e:
        stelab.estimator(name, **params)
    assert word in str(e.value)


def test_estimator_that_cannot_serve_quantizer():
    with pytest.raises(ConfigError, match="cannot serve"):
        Quantizer("sign", "dsq")
    with pytest.raises(ConfigError, match="cannot serve"):
        Quantizer("uniform", "approx_sign", bits=4, step=0.1)
    with pytest.raises(ConfigError, match="top"):
        Quantizer("uniform", "clipped_relu", bits=None, step=0.1)


def test_user_estimator_in_one_function_works_by_name():
    @stelab.register_estimator("triangle_test")
    def triangle(x):
        """max(0, 1 - |x|)"""
        return (1 - x.abs()).clamp_min(0)

    try:
        q = Quantizer("sign", "triangle_test")
        x = torch.tensor([-2.0, -0.5, 0.0, 0.25, 1.0], requires_grad=True)
        q(x).sum().backward()
        assert x.grad.tolist() == [0.0, 0.5, 1.0, 0.75, 0.0]
        assert "max(0, 1 - |x|)" in {r["formula"] for r in stelab.estimators.describe()}
        with pytest.raises(ConfigError, match="already registered"):
            stelab.register_estimator("triangle_test")(triangle)
    finally:
        stelab.estimators.REGISTRY.unregister("triangle_test")


def test_custom_estimator_instance_and_bad_return():
    q = Quantizer("sign", stelab.custom(lambda x: 3 * torch.ones_like(x)))
    x = torch.zeros(3, requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [3.0, 3.0, 3.0]
    with pytest.raises(TypeError):
        stelab.custom("not callable")
    bad = Quantizer("sign", stelab.custom(lambda x: 1.0))
    with pytest.raises(TypeError, match="must return a tensor"):
        x = torch.zeros(3, requires_grad=True)
        bad(x).sum().backward()


def test_every_estimator_documents_its_formula():
    for row in stelab.estimators.describe():
        assert row["formula"], row["name"]
        est = stelab.estimator(row["name"])
        assert type(est).__doc__ and len(type(est).__doc__) > 30, row["name"]


STEP_CASES = [c for c in CASES if c[0]["fn"] in ("uniform", "act") and c[0].get("bits")]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "f64"])
@pytest.mark.parametrize(
    "qargs,est,params,formula,extra", STEP_CASES, ids=[c[1] for c in STEP_CASES]
)
def test_tensor_step_path_equals_float_step_path(qargs, est, params, formula, extra, dtype):
    """Fixed scalar steps take fused float kernels; learned steps build the context
    from the step tensor. Both must give the same input gradient."""
    qargs = dict(qargs)
    fn = qargs.pop("fn")
    fast = Quantizer(fn, est, **qargs, **params)
    slow = Quantizer(fn, est, **qargs, **params, learn_step=True)
    xs = torch.tensor(grid(extra), dtype=dtype).tolist()
    g_fast, y_fast = backward(fast, xs, dtype)
    g_slow, y_slow = backward(slow.to(dtype), xs, dtype)
    assert torch.equal(y_fast, y_slow)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-6, atol=1e-6)


def test_defaults_are_described_and_listed_by_the_cli(capsys):
    from stelab.cli import main

    rows = {r["name"]: r for r in stelab.estimators.describe()}
    assert rows["clipped"]["default_for"] == ["sign", "ternary"]
    assert rows["clipped_relu"]["default_for"] == ["heaviside", "act"]
    assert rows["ste"]["default_for"] == ["identity", "uniform"]
    assert rows["dsq"]["default_for"] == []
    # every forward function has a default that can serve it
    for kind, (name, why) in stelab.estimators.DEFAULTS.items():
        assert why and Quantizer(kind, **({"bits": 2, "step": 0.5} if kind in ("uniform", "act")
                                           else {})).estimator.name == name  # fmt: skip
    assert main(["estimators"]) == 0
    out = capsys.readouterr().out
    assert "default for" in out and "act: clipped_relu - [Y19]" in out


def test_custom_estimators_are_equal_when_function_and_name_are():
    from stelab.estimators.base import Custom

    def f(x):
        return torch.ones_like(x)

    def h(x):
        return torch.ones_like(x)

    assert Custom(f, "a") == Custom(f, "a") and hash(Custom(f, "a")) == hash(Custom(f, "a"))
    assert Custom(f, "a") != Custom(f, "b")  # same function, other name
    assert Custom(f, "a") != Custom(h, "a")  # same name, other function


def test_cyclical_estimator_on_a_one_sided_range_is_zero_below_it():
    """A forward clipped on one side only (jumps from 0.05 up, unbounded above): the
    cyclical q̂' is 0 below the lowest jump's half-bin (x < 0) and periodic above."""
    from stelab.estimators import Context

    ctx = Context("uniform", 0.0, math.inf, 0.1, 0.05, 0.05, math.inf)
    x = torch.tensor([-1.0, -0.06, -0.04, 0.0, 0.3, 1e3], dtype=torch.float64)
    d = stelab.estimators.get("cosine", a=0.5).derivative(x, ctx)
    want = [0.0] * 3 + [1 + 0.5 * math.cos(2 * math.pi * v / 0.1) for v in x.tolist()[3:]]
    torch.testing.assert_close(d, torch.tensor(want, dtype=torch.float64), rtol=1e-9, atol=1e-12)


# a non-default value for every parameter of the built-in estimators
NON_DEFAULT = {
    "clipped": {"c": 2.0},
    "clipped_relu": {"top": 3.0},
    "cosine": {"a": 0.25},
    "dsq": {"k": 5.0},
    "ewgs": {"delta": 0.1},
    "logistic": {"scale": 2.0},
    "soft_staircase": {"k": 4.0},
    "swish_sign": {"beta": 3.0},
    "triangle_wave": {"m": 1.5},
}


@pytest.mark.parametrize("name", sorted(NON_DEFAULT))
def test_parameters_round_trip_through_params_equality_and_repr(name):
    """An estimator built with non-default parameters reports them (params(), repr),
    equals one rebuilt from its params(), and differs from the default one."""
    e = stelab.estimators.get(name, **NON_DEFAULT[name])
    default = stelab.estimators.get(name)
    assert e.params() == {**default.params(), **NON_DEFAULT[name]}
    assert e == stelab.estimators.get(name, **e.params()) and e != default
    assert hash(e) == hash(stelab.estimators.get(name, **e.params()))
    ((key, value),) = NON_DEFAULT[name].items()
    assert f"{key}={value}" in repr(e)


def test_every_parameterised_builtin_has_a_non_default_case():
    with_params = {n for n in stelab.estimators.names() if stelab.estimators.get(n).params()}
    assert with_params - {"periodic"} == set(NON_DEFAULT)  # periodic's func: a callable
