"""The [S24] cyclical weight estimators against their formulas, written out here.

Points where bugs hide: the bin centre (r = 0), the change points (r = ±1/2, where
torch.round rounds half to even), a quarter bin, far outside, the edges of a clipped
quantizer's range; float32 and float64. Independent checks: each formula evaluated
with Python's math on the float64 value of the input, the mean over a bin (1 for every
derivative of a staircase), finite differences of the soft staircase.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from stelab import estimators as E
from stelab.errors import ConfigError, StelabTypeError
from stelab.quantizers import Quantizer

pytestmark = pytest.mark.usefixtures("one_thread")

DTYPES = [torch.float32, torch.float64]
STEP = 0.1


def r_of(x: float, step: float) -> float:
    """Position inside the bin from its centre, in [-1/2, 1/2) (reference)."""
    v = x / step
    r = v - round(v)  # Python round: half to even, like torch.round
    return r - 1.0 if r >= 0.5 else r


def cosine(a):
    return lambda x, step: 1 + a * math.cos(2 * math.pi * x / step)


def triangle(m):
    return lambda x, step: m + 4 * (1 - m) * abs(r_of(x, step))


def soft(k):
    def sig(z):
        return 1 / (1 + math.exp(-z))

    def f(x, step):
        rho = abs(r_of(x, step)) - 0.5  # offset from the nearest change point, <= 0
        d = sig(k * rho) * (1 - sig(k * rho))
        return k * d / (sig(k / 2) - sig(-k / 2))

    return f


CASES = [
    ("cosine", {"a": 0.5}, cosine(0.5)),
    ("cosine", {"a": -0.7}, cosine(-0.7)),
    ("cosine", {"a": 1.3}, cosine(1.3)),  # degenerate but constructible
    ("triangle_wave", {"m": 0.5}, triangle(0.5)),
    ("triangle_wave", {"m": 1.8}, triangle(1.8)),
    ("soft_staircase", {"k": 6.0}, soft(6.0)),
    ("soft_staircase", {"k": 0.3}, soft(0.3)),
]

POINTS = [0.0, -0.0, STEP / 2, -STEP / 2, 3 * STEP / 2, -5 * STEP / 2, STEP / 4, -STEP / 4,
          0.0123, -0.777, 1e3, -1e3, 12345.678]  # fmt: skip


def grad(q: Quantizer, xs: list[float], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.tensor(xs, dtype=dtype, requires_grad=True)
    q(x).sum().backward()
    return x.detach(), x.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name,params,f", CASES)
def test_formula_on_the_grid(name, params, f, dtype):
    q = Quantizer("uniform", name, step=STEP, **params)
    x, g = grad(q, POINTS, dtype)
    step = float(q.step)  # the float32 value the quantizer stores
    # the estimator computes r from x/step in the input's dtype: allow that rounding of r
    # (a few ulps of x/step) times the formula's largest slope in r
    rs = [i / 4000 - 0.5 for i in range(4001)]
    pairs = itertools.pairwise(rs)
    slope = max(abs(f(b * step, step) - f(a * step, step)) * 4000 for a, b in pairs)
    eps = torch.finfo(dtype).eps
    for xi, gi in zip(x.tolist(), g.tolist(), strict=True):
        want = f(xi, step)
        tol = 1e-13 + 4 * eps * ((1 + abs(xi / step)) * slope + abs(want))
        assert gi == pytest.approx(want, abs=tol), (name, params, xi, dtype)


@pytest.mark.parametrize("name,params,f", CASES[:1] + CASES[3:4] + CASES[5:6])
def test_change_points_and_centre_exactly(name, params, f):
    # step 0.5 is exact in binary: the change points are exact half-integers of w/step
    q = Quantizer("uniform", name, step=0.5, **params)
    xs = [0.0, 0.25, -0.25, 0.75, -0.75, 1.25, 0.125]
    x, g = grad(q, xs, torch.float64)
    for xi, gi in zip(xs, g.tolist(), strict=True):
        assert gi == pytest.approx(f(xi, 0.5), abs=1e-14)
    # the change points are where the triangle and the soft staircase peak (m < 1, k > 0)
    if name != "cosine":
        assert g[1] == g.max()


@pytest.mark.parametrize("name,params", [(c[0], c[1]) for c in CASES if c[1] != {"a": 1.3}])
def test_mean_over_a_bin_is_one(name, params):
    # every derivative of a staircase rising by one step per bin averages to 1
    q = Quantizer("uniform", name, step=STEP, **params)
    n = 200_000
    x = (torch.arange(n, dtype=torch.float64) + 0.5) / n * STEP - STEP / 2 + 7 * STEP
    _, g = grad(q, x.tolist(), torch.float64)
    assert g.mean().item() == pytest.approx(1.0, abs=1e-6)


def test_soft_staircase_is_the_derivative_of_the_logistic_staircase():
    k, step = 5.0, 0.2

    def staircase(x: float) -> float:
        u = (x - step / 2) / step  # jumps at step/2 + i*step
        j = round(u)
        rho = u - j
        s = 1 / (1 + math.exp(-k * rho))
        lo, hi = 1 / (1 + math.exp(k / 2)), 1 / (1 + math.exp(-k / 2))
        return step * (j + (s - lo) / (hi - lo))

    q = Quantizer("uniform", "soft_staircase", step=step, k=k)
    xs = [0.013, -0.27, 0.31, 0.5 * step - 1e-3, 2.345]
    _, g = grad(q, xs, torch.float64)
    h = 1e-6
    for xi, gi in zip(xs, g.tolist(), strict=True):
        fd = (staircase(xi + h) - staircase(xi - h)) / (2 * h)
        assert gi == pytest.approx(fd, rel=1e-6)


def test_soft_staircase_equals_dsq_with_half_the_sharpness():
    x = torch.linspace(-1.3, 1.3, 2001, dtype=torch.float64)
    a = Quantizer("uniform", "soft_staircase", step=STEP, k=7.0)
    b = Quantizer("uniform", "dsq", step=STEP, k=3.5)
    ctx = a.context()
    torch.testing.assert_close(
        a.estimator.derivative(x, ctx), b.estimator.derivative(x, ctx), rtol=1e-12, atol=1e-12
    )


def test_periodic_sees_the_position_in_the_bin():
    # fn(r) = 1 + r reveals r: [-1/2, 1/2), change points give -1/2
    q = Quantizer("uniform", "periodic", step=0.5, func=lambda r: 1 + r)
    xs = [0.0, 0.25, -0.25, 0.75, 0.125, -0.125, 0.5, 100.25, -100.25]
    want = [1.0, 0.5, 0.5, 0.5, 1.25, 0.75, 1.0, 0.5, 0.5]
    for dtype in DTYPES:
        _, g = grad(q, xs, dtype)
        assert g.tolist() == want
    # default func: the STE
    _, g = grad(Quantizer("uniform", "periodic", step=0.5), xs, torch.float64)
    assert g.tolist() == [1.0] * len(xs)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["cosine", "triangle_wave", "soft_staircase", "periodic"])
def test_clipped_quantizer_is_zero_outside_its_range(name, dtype):
    # 4-bit: levels -8..7 (times step); the estimator lives on [-8 step, 7 step]
    step = 0.25
    q = Quantizer("uniform", name, bits=4, step=step)
    inside = [-8 * step, 7 * step, 0.0, -7.5 * step, 6.5 * step, 1.3]
    outside = [-8 * step - 1e-3, 7 * step + 1e-3, -100.0, 1e6]
    _, g = grad(q, inside + outside, dtype)
    assert (g[: len(inside)] > 0).all()
    assert (g[len(inside) :] == 0).all()


def test_per_channel_step():
    step = torch.tensor([[0.1], [0.25]])
    q = Quantizer("uniform", "cosine", step=step, a=0.5)
    w = torch.tensor([[0.05, 0.025, 0.3], [0.125, 0.0625, 0.3]], dtype=torch.float64)
    w.requires_grad_(True)
    q(w).sum().backward()
    f = cosine(0.5)
    steps = step[:, 0].tolist()
    want = [[f(x, s) for x in row] for row, s in zip(w.tolist(), steps, strict=True)]
    torch.testing.assert_close(w.grad, torch.tensor(want, dtype=torch.float64))


def test_registered_by_name_with_formula_and_reference():
    rows = {r["name"]: r for r in E.describe()}
    for n in ["cosine", "triangle_wave", "soft_staircase", "periodic"]:
        assert rows[n]["serves"] == ["uniform"]
        assert rows[n]["formula"] and "arXiv:2405.05171" in rows[n]["reference"]
    assert E.get("cosine", a=0.25).a == 0.25
    assert E.get("cosine") == E.get("cosine", a=0.5)


@pytest.mark.parametrize(
    "name,params,exc,words",
    [
        ("cosine", {"a": "x"}, StelabTypeError, ["a", "'x'"]),
        ("cosine", {"a": math.inf}, ConfigError, ["a", "inf", "|a| < 1"]),
        ("triangle_wave", {"m": 2.5}, ConfigError, ["m", "2.5", "[0, 2]"]),
        ("triangle_wave", {"m": -0.1}, ConfigError, ["m", "-0.1", "[0, 2]"]),
        ("soft_staircase", {"k": 0}, ConfigError, ["k", "0", "> 0"]),
        ("periodic", {"func": 3}, StelabTypeError, ["func", "3"]),
    ],
)
def test_bad_parameters_name_parameter_value_and_allowed(name, params, exc, words):
    with pytest.raises(exc) as e:
        E.get(name, **params)
    for w in words:
        assert w in str(e.value)


@pytest.mark.parametrize("m", [0.0, 1e-9, 2.0 - 1e-9, 2.0])
def test_triangle_wave_takes_m_up_to_and_including_its_ends(m):
    """[0, 2] is closed: at m = 0 and m = 2 the profile only touches zero (at the bin
    centres, resp. the change points) and stays a valid, if degenerate, estimator."""
    est = E.get("triangle_wave", m=m)
    r = torch.tensor([0.0, 0.25, -0.5], dtype=torch.float64)
    want = torch.tensor([m, 1.0, 2.0 - m], dtype=torch.float64)
    torch.testing.assert_close(est.profile(r), want, rtol=0, atol=1e-15)


def test_only_serves_uniform():
    with pytest.raises(ConfigError, match="cannot serve quantizer 'sign'"):
        Quantizer("sign", "cosine")


def test_periodic_fn_must_return_a_tensor():
    q = Quantizer("uniform", "periodic", step=0.1, func=lambda r: 1.0)
    x = torch.zeros(3, requires_grad=True)
    with pytest.raises(StelabTypeError, match="must return a tensor"):
        q(x).sum().backward()


@pytest.mark.parametrize("offset", [0.3, 0.5, 0.8])
def test_cyclical_profile_is_read_relative_to_the_levels_of_a_shifted_grid(offset):
    """On a grid whose jumps sit at ``offset + i`` (levels at offset - 1/2 + i; a kind
    other than uniform may shift its grid), q̂' at position r from the nearest level is
    the cosine profile 1 + a cos(2 pi r)."""
    est = E.get("cosine")
    inf = float("inf")
    ctx = E.Context("shifted", -inf, inf, 1.0, offset, -inf, inf)
    level = offset - 0.5
    r = torch.tensor([-0.4, -0.1, 0.0, 0.2, 0.45], dtype=torch.float64)
    x = level + 3.0 + r
    want = 1 + est.a * torch.cos(2 * math.pi * r)
    torch.testing.assert_close(est.derivative(x, ctx), want, rtol=0, atol=1e-12)
