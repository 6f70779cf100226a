"""Forward values at the points where bugs hide, LSQ's step gradient, stochastic
rounding, module behaviour (state dicts, dtype/device moves) and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from stelab import QuantAct, Quantizer, halfnormal_alpha
from stelab.errors import ConfigError


def fwd(q: Quantizer, xs: list[float], dtype=torch.float64) -> list[float]:
    return q(torch.tensor(xs, dtype=dtype)).tolist()


def py_round_half_even(v: float) -> float:
    return float(round(v))  # Python's round is half-to-even, like torch.round


def test_sign_heaviside_ternary_exact():
    xs = [0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 3.0, -3.0, 1e30, -1e30]
    assert fwd(Quantizer("sign"), xs) == [1, 1, 1, -1, 1, -1, 1, -1, 1, -1]
    assert fwd(Quantizer("heaviside"), xs) == [0, 0, 1, 0, 1, 0, 1, 0, 1, 0]
    assert fwd(Quantizer("ternary", threshold=0.5), xs) == [0, 0, 0, 0, 0, 0, 1, -1, 1, -1]
    assert fwd(Quantizer("ternary", threshold=0.25), [0.25, 0.2500001, -0.26]) == [0, 1, -1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_uniform_exact_including_half_points_and_clipping(bits, dtype):
    step = 0.25  # a power of two: every level and half-point is exact in float32
    qn, qp = 2 ** (bits - 1), 2 ** (bits - 1) - 1
    ks = range(-qn - 3, qp + 4)
    xs = [k * step for k in ks] + [(k + 0.5) * step for k in ks] + [1e6, -1e6]
    expect = [step * min(max(py_round_half_even(x / step), -qn), qp) for x in xs]
    assert fwd(Quantizer("uniform", bits=bits, step=step), xs, dtype) == expect


def test_uniform_unclipped_rounds_half_to_even():
    q = Quantizer("uniform", bits=None, step=1.0)
    assert fwd(q, [0.5, 1.5, 2.5, -0.5, -1.5, 1000.5]) == [0, 2, 2, 0, -2, 1000]


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_act_quantizer_y19_definition(bits):
    a = 0.5
    top = (2**bits - 1) * a
    xs = [-1.0, 0.0, 1e-9, a, a + 1e-9, 2 * a, (2**bits - 2) * a, (2**bits - 2) * a + 1e-9,
          top, top + 1.0, 1e9]  # fmt: skip

    def sigma(x: float) -> float:  # docs/estimators.md, case by case
        if x <= 0:
            return 0.0
        if x <= (2**bits - 2) * a:
            return a * math.ceil(x / a)
        return top

    assert fwd(Quantizer("act", bits=bits, alpha=a), xs) == [sigma(x) for x in xs]


def test_identity_quantizer_is_exact_and_ste_gradient_is_true_gradient():
    x = torch.randn(10, dtype=torch.float64, requires_grad=True)
    y = Quantizer("identity")(x)
    (y**2).sum().backward()
    assert torch.equal(y.detach(), x.detach())
    torch.testing.assert_close(x.grad, 2 * x.detach())


@pytest.mark.parametrize(
    ("s", "xs"),
    [
        (0.3, [-2.0, -1.2, -0.45, -0.1, 0.0, 0.2, 0.44, 0.9, 5.0]),
        # a binary step: the outermost levels -Qn·s = -1 and Qp·s = 0.75 exactly (the
        # clipped side's value, -Qn / Qp, holds at them), and just inside them
        (0.25, [-1.0, -0.9999999, -0.45, -0.1, 0.0, 0.2, 0.7499999, 0.75, 0.8]),
    ],
)
def test_lsq_step_gradient_matches_formula(s, xs):
    bits = 3
    qn, qp = 4, 3
    q = Quantizer("uniform", "ste", bits=bits, step=s, learn_step=True)
    x = torch.tensor(xs, dtype=torch.float64)
    g = torch.tensor([1.0, -2.0, 0.5, 1.0, 3.0, -1.0, 2.0, 0.7, 1.5], dtype=torch.float64)
    q(x).backward(g)
    # Esser et al. 2020, eq. 3: dq/ds = -x/s + round(x/s) inside, -Qn / Qp outside
    d = []
    for v in x.tolist():
        u = v / s
        d.append(-qn if u <= -qn else (qp if u >= qp else -u + py_round_half_even(u)))
    expect = sum(gi * di for gi, di in zip(g.tolist(), d, strict=True)) / math.sqrt(x.numel() * qp)
    assert q.step.grad.item() == pytest.approx(expect, rel=1e-12)


def test_lsq_per_channel_step_and_activation_scale():
    step = torch.tensor([[0.1], [0.2]], dtype=torch.float64)
    q = Quantizer("uniform", bits=4, step=step, learn_step=True)
    w = torch.randn(2, 5, dtype=torch.float64)
    q(w).sum().backward()
    assert q.step.grad.shape == (2, 1)
    for c in range(2):  # each channel's gradient only sees its own row
        qc = Quantizer("uniform", bits=4, step=step[c, 0].item(), learn_step=True)
        qc(w[c]).sum().backward()
        # N differs (10 vs 5 elements): undo the scale before comparing
        torch.testing.assert_close(
            q.step.grad[c, 0] * math.sqrt(10 * 7), qc.step.grad * math.sqrt(5 * 7)
        )
    a = QuantAct("act", bits=2, alpha=0.5, learn_step=True)
    x = torch.rand(8, 3, 4, dtype=torch.float64) * 2
    a(x).sum().backward()
    b = Quantizer("act", bits=2, alpha=0.5, learn_step=True)  # N = all elements
    b(x).sum().backward()
    torch.testing.assert_close(a.step.grad, b.step.grad * math.sqrt(8))


def test_stochastic_rounding_is_unbiased():
    g = torch.Generator().manual_seed(0)
    q = Quantizer("uniform", bits=None, step=0.5, rounding="stochastic", generator=g)
    x = torch.tensor([0.1, 0.3, -0.7, 1.24], dtype=torch.float64)
    n = 200_000
    ys = q(x.repeat(n, 1))
    assert set(torch.unique(ys / 0.5).tolist()) <= {-2, -1, 0, 1, 2, 3}
    mean, se = ys.mean(0), ys.std(0) / math.sqrt(n)
    assert ((mean - x).abs() < 5 * se + 1e-12).all()  # 5 SE: false alarm < 1e-6 per entry


def test_stochastic_rounding_reproducible_with_generator():
    x = torch.randn(100)
    a = Quantizer("uniform", bits=4, step=0.1, rounding="stochastic",
                  generator=torch.Generator().manual_seed(3))(x)  # fmt: skip
    b = Quantizer("uniform", bits=4, step=0.1, rounding="stochastic",
                  generator=torch.Generator().manual_seed(3))(x)  # fmt: skip
    assert torch.equal(a, b)


def test_halfnormal_alpha_one_bit_closed_form_and_optimality():
    # golden-section search on a flat minimum locates it to ~sqrt(machine eps)
    assert halfnormal_alpha(1) == pytest.approx(math.sqrt(2 / math.pi), abs=2e-8)
    # Monte Carlo check that the returned alpha beats nearby values for 2 bits
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2_000_000, generator=g, dtype=torch.float64).abs()
    a = halfnormal_alpha(2)

    def mse(al: float) -> float:
        return float(((al * torch.clamp(torch.ceil(x / al), 0, 3) - x) ** 2).mean())

    assert mse(a) < mse(a * 1.05) and mse(a) < mse(a * 0.95)


def test_state_dict_round_trip_and_dtype_move():
    q = Quantizer("uniform", "dsq", bits=4, step=0.07, k=2.0)
    q2 = Quantizer("uniform", "dsq", bits=4, step=1.0, k=2.0)
    q2.load_state_dict(q.state_dict())
    x = torch.randn(50)
    assert torch.equal(q(x), q2(x))
    q32 = Quantizer("act", bits=2, alpha=0.5).to(torch.float32)
    assert q32.step.dtype == torch.float32
    assert q32(torch.randn(3, dtype=torch.float64)).dtype == torch.float64
    assert "bits=4" in repr(q) and "dsq(k=2.0)" in repr(q)


def test_with_estimator_keeps_forward_and_step():
    q = Quantizer("uniform", "dsq", bits=4, step=0.1, k=3.0)
    s = q.with_estimator("ste")
    x = torch.randn(20)
    assert torch.equal(q(x), s(x)) and s.estimator.name == "ste"


@pytest.mark.parametrize(
    "kwargs,word",
    [
        (dict(fn="uniform", bits=0, step=0.1), "bits"),
        (dict(fn="uniform", bits=-2, step=0.1), "bits"),
        (dict(fn="uniform", bits=2.5, step=0.1), "bits"),
        (dict(fn="uniform", bits=17, step=0.1), "bits"),
        (dict(fn="uniform", bits=1, step=0.1), "bits"),
        (dict(fn="act", bits=None, step=0.1), "bits"),
        (dict(fn="uniform", bits=4, step=0), "step"),
        (dict(fn="uniform", bits=4, step=-1.0), "step"),
        (dict(fn="uniform", bits=4, step=float("nan")), "step"),
        (dict(fn="uniform", bits=4), "step"),
        (dict(fn="sign", step=0.1), "step"),
        (dict(fn="sign", bits=4), "bits"),
        (dict(fn="ternary", threshold=0), "threshold"),
        (dict(fn="sign", rounding="stochastic"), "rounding"),
        (dict(fn="uniform", bits=4, step=0.1, rounding="up"), "rounding"),
        (dict(fn="sign", learn_step=True), "learn_step"),
        (dict(fn="uniform", bits=None, step=0.1, learn_step=True), "bits"),
        (dict(fn="signn"), "sign"),
        (dict(fn="uniform", bits=4, step=torch.tensor([0.1, -0.1])), "step"),
    ],
)
def test_bad_quantizer_arguments(kwargs, word):
    kwargs = dict(kwargs)
    with pytest.raises(ValueError) as e:
        Quantizer(kwargs.pop("fn"), **kwargs)
    assert word in str(e.value)


def test_integer_input_is_a_type_error():
    with pytest.raises(TypeError, match="floating-point"):
        Quantizer("sign")(torch.arange(3))
    with pytest.raises(TypeError, match="tensor"):
        Quantizer("sign")([1.0, 2.0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "make",
    [
        lambda: Quantizer("sign", "swish_sign"),
        lambda: Quantizer("uniform", "dsq", bits=4, step=0.1),
        lambda: Quantizer("act", "clipped_relu", bits=2, alpha=0.5, learn_step=True),
    ],
)
def test_cuda_matches_cpu(make):
    q, qc = make(), make().cuda()
    x = torch.randn(1000, dtype=torch.float64, requires_grad=True)
    xc = x.detach().cuda().requires_grad_(True)
    q(x).sum().backward()
    qc(xc).sum().backward()
    torch.testing.assert_close(xc.grad.cpu(), x.grad)
    if q.learn_step:
        torch.testing.assert_close(qc.step.grad.cpu(), q.step.grad)


@pytest.mark.parametrize(
    "fn,kw",
    [
        ("sign", {}),
        ("heaviside", {}),
        ("ternary", {"threshold": 0.3}),
        ("uniform", {"bits": 3, "step": 0.5}),
        ("act", {"bits": 2, "step": 0.5}),
    ],
)
def test_context_levels_and_jumps_are_where_the_forward_jumps(fn, kw):
    """The Context an estimator sees, against the forward function itself: lo/hi are its
    lowest/highest outputs, first/last_jump where it first/last changes value (located on
    a 1e-4 grid), and every jump sits at jump_offset + i·step."""
    q = Quantizer(fn, "ste", **kw)
    ctx = q.context()
    x = torch.linspace(-6, 6, 120001, dtype=torch.float64)
    with torch.no_grad():
        y = q(x)
    change = (y[1:] != y[:-1]).nonzero().flatten()
    jumps = ((x[change] + x[change + 1]) / 2).tolist()
    assert float(ctx.lo) == float(y.min()) and float(ctx.hi) == float(y.max())
    assert float(ctx.first_jump) == pytest.approx(jumps[0], abs=1e-4)
    assert float(ctx.last_jump) == pytest.approx(jumps[-1], abs=1e-4)
    step, off = float(ctx.step), float(ctx.jump_offset)
    for j in jumps:
        k = round((j - off) / step)
        assert j == pytest.approx(off + k * step, abs=1e-4), (j, off, step)


# --- survivors of a mutation sample (docs/testing.md)


def test_ternary_default_threshold_is_one_half():
    """sign(x)·1{|x| > t} with t = 0.5 unless given: 0.49 and 0.5 map to 0, 0.51 to 1."""
    q = Quantizer("ternary")
    x = torch.tensor([0.49, 0.5, 0.51, -0.49, -0.51, 2.0], dtype=torch.float64)
    assert q(x).tolist() == [0.0, 0.0, 1.0, 0.0, -1.0, 1.0]
    assert "threshold=0.5" in repr(q)
    q3 = Quantizer("ternary", threshold=0.3)
    assert q3(x).tolist() == [1.0, 1.0, 1.0, -1.0, -1.0, 1.0]
    assert "threshold=0.3" in repr(q3)
    from stelab.quantizers import Forward

    fwd = Forward("ternary")  # the forward alone has the same default
    assert fwd.threshold == 0.5 and fwd(x).tolist() == q(x).tolist()


def test_repr_names_a_learned_step():
    q = Quantizer("uniform", "ste", bits=4, step=0.1, learn_step=True)
    assert "step=0.1" in repr(q) and "learn_step=True" in repr(q)
    assert "learn_step" not in repr(Quantizer("uniform", "ste", bits=4, step=0.1))


def test_a_forward_pickled_as_the_base_class_unpickles_as_its_kind():
    """Objects pickled before the kinds were classes (type Forward, a kind field) come
    back as their kind's class and quantize as it does."""
    import pickle

    from stelab.quantizers import Forward

    new = Forward("uniform", 4)
    legacy = object.__new__(Forward)
    legacy.__dict__.update(new.__dict__)
    back = pickle.loads(pickle.dumps(legacy))
    assert type(back) is type(new) and type(back) is not Forward
    x = torch.linspace(-2, 2, 41, dtype=torch.float64)
    assert torch.equal(back(x, 0.25), new(x, 0.25))
    again = pickle.loads(pickle.dumps(new))
    assert type(again) is type(new) and torch.equal(again(x, 0.25), new(x, 0.25))


def test_identity_context_has_no_levels_and_no_jumps():
    """The identity forward is unclipped and never jumps: lo/hi and both outermost jumps
    are at -inf/+inf, so an estimator that clips at the outermost jumps clips nothing."""
    import math

    from stelab.quantizers import Forward

    c = Forward("identity").context(0.5)
    assert (c.kind, c.lo, c.hi, c.first_jump, c.last_jump) == (
        "identity",
        -math.inf,
        math.inf,
        -math.inf,
        math.inf,
    )
    # no levels: whatever step is passed, a unit step and no offset, so a formula in units
    # of the step (x / step) reads x itself
    assert (c.step, c.jump_offset) == (1.0, 0.0)


@pytest.mark.parametrize(
    ("fn", "kw", "bits"),
    [
        ("sign", {}, 1),
        ("heaviside", {}, 1),
        ("ternary", {}, 2),  # three levels take two bits
        ("uniform", {"bits": 3, "step": 0.1}, 3),
        ("act", {"bits": 2, "step": 0.5}, 2),
        ("uniform", {"step": 0.1}, None),  # unclipped: no fixed width
        ("identity", {}, None),
    ],
)
def test_deployed_bits_of_every_builtin_kind(fn, kw, bits):
    """The width a deployed value takes (summaries, compression, export): the levels'
    count rounded up to a power of two."""
    assert Quantizer(fn, **kw).bits == bits


@pytest.mark.parametrize(("fn", "ok"), [("sign", 1), ("heaviside", 1)])
def test_binary_kinds_accept_bits_1_only(fn, ok):
    assert Quantizer(fn, bits=ok).bits == ok
    with pytest.raises(ConfigError, match=f"bits is not a parameter of the '{fn}' quantizer"):
        Quantizer(fn, bits=ok + 1)


def test_with_estimator_checks_the_new_pairing():
    q = Quantizer("sign", "ste")
    assert q.with_estimator("approx_sign").estimator.name == "approx_sign"
    with pytest.raises(ConfigError, match="cannot serve quantizer 'sign'"):
        q.with_estimator("dsq")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_unclipped_uniform_with_a_float_step_equals_the_tensor_step(dtype):
    """The unclipped grid's clamp to ±2^p·Δ has a float and a tensor-step branch; both
    give Δ·round(x/Δ) within the range and x itself beyond it, bit for bit alike."""
    from stelab.quantizers import Forward

    fwd = Forward("uniform", None)
    big = 2.0 / torch.finfo(dtype).eps * 0.25  # 2^p·Δ
    x = torch.tensor([-3.3, -0.1, 0.0, 0.12, 0.125, 0.37, 7.9, 4 * big, -4 * big], dtype=dtype)
    got_f = fwd.q(x, 0.25)
    got_t = fwd.q(x, torch.tensor(0.25, dtype=dtype))
    assert torch.equal(got_f, got_t)
    want = torch.cat([torch.round(x[:7] / 0.25) * 0.25, x[7:]])
    assert torch.equal(got_f, want)


# --- paths no other test took (branch coverage of quantizers/ and estimators/) ---


def test_with_estimator_copies_a_learned_step_as_a_fresh_parameter():
    q = Quantizer("uniform", "ste", bits=4, step=0.25, learn_step=True)
    s = q.with_estimator("clipped")
    assert isinstance(s.step, torch.nn.Parameter) and s.learn_step
    assert [n for n, _ in s.named_parameters()] == ["step"]
    assert s.step.data_ptr() != q.step.data_ptr() and float(s.step) == 0.25
    # LSQ's step gradient reaches the copy's step, not the original's
    s(torch.tensor([0.3, -0.6])).sum().backward()
    assert s.step.grad is not None and q.step.grad is None
    fixed = Quantizer("uniform", "ste", bits=4, step=0.25).with_estimator("clipped")
    assert list(fixed.parameters()) == [] and "step" in dict(fixed.named_buffers())


def test_with_estimator_none_is_the_forward_functions_default():
    q = Quantizer("uniform", "dsq", bits=4, step=0.1, k=3.0)
    assert not q.default_estimator
    d = q.with_estimator(None)
    assert d.estimator.name == "ste" and d.default_estimator
    assert Quantizer("sign", "clipped").with_estimator(None).estimator.name == "clipped"
    assert not d.with_estimator("clipped").default_estimator


def test_stochastic_rounding_shows_in_the_repr_nearest_does_not():
    st = Quantizer("uniform", bits=4, step=0.1, rounding="stochastic")
    assert "rounding='stochastic'" in repr(st)
    assert "rounding" not in repr(Quantizer("uniform", bits=4, step=0.1))


def test_quantize_tensor_with_a_float_step_builds_the_context_itself():
    """The functional form with a float step and no context: forward levels and the
    clipped STE's gradient (1 on the output range [-2Δ, Δ] of a 2-bit grid, else 0)."""
    from stelab.estimators import get
    from stelab.quantizers import Forward, quantize_tensor

    x = torch.tensor([-0.61, -0.5, 0.12, 0.25, 0.26, 2.0], requires_grad=True)
    y = quantize_tensor(x, Forward("uniform", 2), get("clipped"), 0.25)
    assert y.tolist() == [-0.5, -0.5, 0.0, 0.25, 0.25, 0.25]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0, 0.0]


def test_unexpected_estimator_parameters_list_the_quantizers_own():
    with pytest.raises(
        ConfigError, match=r"unexpected parameters \['steps'\].*Quantizer parameters are: .*step"
    ):
        Quantizer("uniform", "ste", bits=4, step=0.1, steps=2)
    # an unknown estimator name is reported as such, with or without parameters
    for extra in ({}, {"k": 2.0}):
        with pytest.raises(ConfigError, match="unknown estimator 'nosuch'") as err:
            Quantizer("uniform", "nosuch", bits=4, step=0.1, **extra)
        assert "Quantizer parameters" not in str(err.value)


def test_context_with_changes_only_the_named_fields():
    from stelab.quantizers import context_with

    ctx = Quantizer("uniform", bits=3, step=0.5).context()
    new = context_with(ctx, lo=-1.0, step=0.25)
    assert (new.lo, new.step) == (-1.0, 0.25)
    assert (new.kind, new.hi, new.jump_offset, new.first_jump, new.last_jump) == (
        "uniform",
        1.5,
        0.25,
        -1.75,
        1.25,
    )


def test_forward_formula_names_the_kinds_formula():
    from stelab.quantizers import forward_formula

    assert "clamp(round(x/step)" in forward_formula("uniform")
    assert "ceil(x/alpha)" in forward_formula("act")


def test_a_plain_function_is_a_custom_estimator():
    from stelab.estimators import default_for, get

    est = get(lambda x: 2.0 * x)
    x = torch.tensor([-1.0, 0.5, 3.0])
    ctx = Quantizer("sign").context()
    assert est.name == "custom" and est.derivative(x, ctx).tolist() == [-2.0, 1.0, 6.0]
    with pytest.raises(TypeError, match="estimator must be a name, an Estimator or a function"):
        get(3)
    with pytest.raises(ConfigError, match="unknown quantizer 'nosuch'; known: .*uniform"):
        default_for("nosuch")


@pytest.mark.parametrize(
    "step",
    [
        torch.tensor(0.0),
        torch.tensor([0.1, 0.0, 0.2]),
        torch.tensor([0.1, -0.1]),
        torch.tensor([0.1, float("inf")]),
        torch.tensor([float("nan")]),
    ],
)
def test_a_step_tensor_must_be_finite_and_positive_everywhere(step):
    with pytest.raises(ConfigError, match=r"step must be finite and > 0 everywhere, got "):
        Quantizer("uniform", bits=4, step=step)
    with pytest.raises(
        TypeError, match=r"step must be a floating-point tensor, got dtype torch.int64"
    ):
        Quantizer("uniform", bits=4, step=torch.tensor([1, 2]))
    ok = torch.tensor([1e-30, 0.5])  # tiny but positive is allowed
    assert torch.equal(Quantizer("uniform", bits=4, step=ok).step, ok)


@pytest.mark.parametrize("bits", [2, 3, 8])
def test_uniform_qrange_is_the_signed_integer_range_and_unbounded_without_bits(bits):
    from stelab.quantizers import Forward

    assert Forward("uniform", bits).qrange == (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    inf = float("inf")
    assert Forward("uniform").qrange == (-inf, inf)
    assert Forward("act", bits).qrange == (0, 2**bits - 1)
