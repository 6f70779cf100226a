"""The open registries: a quantizer added in this file only works everywhere.

Two forward functions are registered here (never in the library): ``round3_test``,
a 3-level step-free quantizer clamp(round(x), -1, 1), and ``floor_test``, a b-bit
unsigned floor staircase with a step. Each is then used through Quantizer,
stelab.quantize (dict and string specs), a config, a zoo model and a training step,
its outputs and gradients checked against closed forms computed here.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stelab
import stelab.sbn.base
from stelab import estimators
from stelab.config import parse_config
from stelab.errors import ConfigError, StelabTypeError
from stelab.estimators import Context
from stelab.quantizers import (
    FORWARDS,
    Forward,
    Staircase,
    forward_names,
    register_forward,
    unregister_forward,
)
from stelab.registry import Registry


class Round3(Forward):
    formula = "clamp(round(x), -1, 1)"
    deployed = 2
    default_estimator = "clipped"
    default_reason = "test: the clipped STE over the output range [-1, 1]"

    def q(self, x, step, generator=None):
        return torch.round(x).clamp_(-1.0, 1.0)

    def context(self, step):
        return Context(self.kind, -1.0, 1.0, 1.0, 0.5, -0.5, 0.5)


class FloorQ(Staircase):
    formula = "step * clamp(floor(x/step), 0, 2^b - 1)"
    bits_range = (1, 8)
    bits_required = True

    @property
    def qrange(self):
        return (0.0, 2.0**self.bits - 1)

    def jumps(self):
        return 0.0, 1.0, self.qrange[1]

    def q(self, x, step, generator=None):
        lo, hi = self.qrange
        return torch.div(x, step).floor_().clamp_(lo, hi).mul_(step)


@pytest.fixture
def kinds():
    register_forward("round3_test")(Round3)
    register_forward("floor_test")(FloorQ)
    try:
        yield
    finally:
        unregister_forward("round3_test")
        unregister_forward("floor_test")


def test_registered_quantizers_forward_and_default_estimator(kinds):
    assert {"round3_test", "floor_test"} <= set(forward_names())
    x = torch.tensor([-2.0, -0.6, -0.5, 0.4, 0.5, 1.5, 3.0])
    q = stelab.Quantizer("round3_test")
    # torch.round: halves to even, so -0.5 -> 0 and 0.5 -> 0
    assert q(x).tolist() == [-1.0, -1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert repr(q.estimator) == "clipped" and q.default_estimator
    assert estimators.default_for("round3_test") == "clipped"
    assert q.bits == 2  # deployed bits, as summaries report
    f = stelab.Quantizer("floor_test", bits=2, step=0.5)
    assert f(x).tolist() == [0.0, 0.0, 0.0, 0.0, 0.5, 1.5, 1.5]
    assert repr(f.estimator) == "ste"  # the class default
    ctx = f.context()
    assert (float(ctx.lo), float(ctx.hi), float(ctx.first_jump), float(ctx.last_jump)) == (
        0.0,
        1.5,
        0.5,
        1.5,
    )


def test_registered_quantizer_parameters_are_checked_from_its_class(kinds):
    with pytest.raises(ConfigError, match="bits is required for the 'floor_test'.*\\[1, 8\\]"):
        stelab.Quantizer("floor_test", step=0.5)
    with pytest.raises(ConfigError, match="bits must be an integer in \\[1, 8\\]"):
        stelab.Quantizer("floor_test", bits=9, step=0.5)
    with pytest.raises(ConfigError, match="step is required"):
        stelab.Quantizer("floor_test", bits=2)
    with pytest.raises(ConfigError, match="step is not a parameter of the 'round3_test'"):
        stelab.Quantizer("round3_test", step=0.5)
    with pytest.raises(ConfigError, match="bits is not a parameter of the 'round3_test'"):
        stelab.Quantizer("round3_test", bits=2)
    with pytest.raises(ConfigError, match="rounding='stochastic' needs fn='uniform'"):
        stelab.Quantizer("floor_test", bits=2, step=0.5, rounding="stochastic")
    with pytest.raises(ConfigError, match="did you mean 'round3_test'"):
        stelab.Quantizer("round3_tst")
    with pytest.raises(ConfigError, match="already registered"):
        register_forward("round3_test")(Round3)
    with pytest.raises(StelabTypeError, match="Forward subclass"):
        register_forward("not_a_forward")(object)


def test_quantize_with_a_registered_quantizer_trains_with_the_estimators_gradient(kinds):
    torch.manual_seed(0)
    lin = nn.Linear(5, 3, bias=False)
    with torch.no_grad():
        lin.weight.mul_(4)  # some weights beyond the clipped STE's range [-1, 1]
    w0 = lin.weight.detach().clone()
    model = stelab.quantize(lin, "round3_test:clipped")
    assert type(model).__name__ == "QuantLinear" and model.weight_quantizer.kind == "round3_test"
    x = torch.randn(4, 5)
    qw = torch.round(w0).clamp(-1, 1)
    assert torch.equal(model(x), x @ qw.T)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = model(x).square().sum()
    loss.backward()
    # closed form: dL/dq(W) = 2 (x q(W)^T)^T x; the clipped STE passes it where |w| <= 1
    g_q = 2 * (x @ qw.T).T @ x
    expected = g_q * ((w0 >= -1) & (w0 <= 1)).to(w0.dtype)
    assert (w0.abs() > 1).any() and (w0.abs() <= 1).any()
    torch.testing.assert_close(model.weight.grad, expected)
    opt.step()
    torch.testing.assert_close(model.weight.detach(), w0 - 0.1 * expected)


def test_dict_and_string_specs_of_a_registered_quantizer_agree(kinds):
    torch.manual_seed(1)
    base = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2))
    spec = {"fn": "floor_test", "bits": 2, "step": 0.25, "estimator": "ste"}
    a = stelab.quantize(base, weights=spec, activations="round3_test")
    b = stelab.quantize(base, weights="floor_test:ste:bits=2:step=0.25", activations="round3_test")
    x = torch.randn(8, 6)
    torch.testing.assert_close(a(x), b(x))
    a(x).sum().backward()
    b(x).sum().backward()
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.grad, pb.grad)
    with pytest.raises(ConfigError, match="unknown key 'bts'.*did you mean 'bits'"):
        stelab.quantize(base, weights="floor_test:ste:bts=2:step=0.25")
    # summaries read the deployed bits from the registered class: 2 bits per weight
    summ = stelab.summary(a, (6,))
    assert [r.weight_bits for r in summ.rows if r.weight_bits is not None] == [2, 2]
    assert summ.quantized_params == 6 * 4 + 4 * 2


def test_config_and_zoo_model_accept_a_registered_quantizer(kinds):
    cfg = parse_config({"model": {"weights": "round3_test:clipped"}})
    assert cfg.model.weights == "round3_test:clipped"
    cfg2 = parse_config({"model": {"weights": {"fn": "floor_test", "bits": 3, "step": 0.1}}})
    assert cfg2.model.weights["fn"] == "floor_test"
    with pytest.raises(ConfigError, match="model.weights.*did you mean 'round3_test'"):
        parse_config({"model": {"weights": "round3_tst:clipped"}})
    torch.manual_seed(2)
    model = stelab.models.build("lenet5", weights=cfg.model.weights)
    kinds_used = {
        m.weight_quantizer.kind
        for m in model.modules()
        if getattr(m, "weight_quantizer", None) is not None
    }
    assert kinds_used == {"round3_test"}
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([1, 7])
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_unregistered_quantizer_is_gone_everywhere():
    register_forward("round3_test")(Round3)
    unregister_forward("round3_test")
    assert "round3_test" not in forward_names() and "round3_test" not in estimators.DEFAULTS
    with pytest.raises(ConfigError, match="unknown quantizer 'round3_test'"):
        stelab.Quantizer("round3_test")
    with pytest.raises(ConfigError, match="unknown quantizer"):
        parse_config({"model": {"weights": "round3_test"}})


def test_registry_mechanism():
    reg: Registry = Registry("shape")

    @reg.register("square")
    class Square:
        def __init__(self, side: float = 1.0):
            self.side = side

    assert reg.names() == ["square"] and "square" in reg and reg.params("square") == ("side",)
    assert reg.build("square", side=2.0).side == 2.0
    with pytest.raises(ConfigError, match="unknown shape 'sqare'.*did you mean 'square'"):
        reg.build("sqare")
    with pytest.raises(ConfigError, match="shape 'square' got unexpected parameters \\['r'\\]"):
        reg.build("square", r=1)
    with pytest.raises(ConfigError, match="Python identifier"):
        reg.register("no-dash")
    assert reg.unregister("square") and not reg.unregister("square") and reg.names() == []
    cached = Registry("thing", cache=True)
    cached.add("t", Square)
    assert cached.build("t", side=1) is cached.build("t", side=1)
    assert cached.build("t", side=1) is not cached.build("t", side=1.0)  # 1 and 1.0 differ
    assert FORWARDS.kind == "quantizer"


@pytest.mark.parametrize(
    "register",
    [estimators.register, stelab.quantizers.register_forward, stelab.sbn.base.register],
    ids=["estimator", "quantizer", "sbn-estimator"],
)
@pytest.mark.parametrize("bad", ["two words", "", 3])
def test_register_refuses_a_bad_name_before_anything_is_decorated(register, bad):
    """``register(bad)`` fails at once, not when (or if) its decorator is applied."""
    with pytest.raises(ConfigError, match=r"name must be a Python identifier, got "):
        register(bad)
