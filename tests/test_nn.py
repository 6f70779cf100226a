"""Quantized layers, quantize() conversion and summary() against hand-computed numbers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stelab
from stelab import QuantAct, QuantConv2d, Quantizer, QuantLinear, quantize, summary
from stelab.errors import ConfigError, StelabTypeError, StelabWarning


def plain_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(4 * 3 * 3, 8), nn.ReLU(), nn.Linear(8, 3),
    )  # fmt: skip


def test_quant_linear_uses_quantized_weight_and_input():
    torch.manual_seed(0)
    lin = QuantLinear(5, 3, weight_quantizer=Quantizer("sign"), input_quantizer=Quantizer("sign"))
    x = torch.randn(4, 5)
    expect = torch.where(x >= 0, 1.0, -1.0) @ torch.where(lin.weight >= 0, 1.0, -1.0).T + lin.bias
    torch.testing.assert_close(lin(x), expect)
    assert "weight_quantizer" in repr(lin) and "sign" in repr(lin)


def test_quant_conv_matches_functional_conv_with_quantized_weight():
    torch.manual_seed(0)
    conv = QuantConv2d(2, 3, 3, padding=1, weight_quantizer=Quantizer("uniform", bits=4, step=0.1))
    x = torch.randn(2, 2, 5, 5)
    wq = 0.1 * torch.clamp(torch.round(conv.weight / 0.1), -8, 7)
    torch.testing.assert_close(conv(x), nn.functional.conv2d(x, wq, conv.bias, padding=1))


def test_latent_weight_gets_estimator_gradient():
    lin = QuantLinear(3, 1, bias=False, weight_quantizer=Quantizer("sign", "clipped"))
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -2.0, 0.9]]))
    x = torch.tensor([[1.0, 2.0, 3.0]])
    lin(x).sum().backward()
    assert lin.weight.grad.tolist() == [[1.0, 0.0, 3.0]]  # clipped STE: |w| <= 1


def test_state_dict_round_trip_and_dtype():
    m = quantize(plain_net(), weights={"fn": "uniform", "bits": 4, "step": "auto"},
                 activations={"fn": "act", "bits": 2, "alpha": 0.5})  # fmt: skip
    m2 = quantize(plain_net(), weights={"fn": "uniform", "bits": 4, "step": 1.0},
                  activations={"fn": "act", "bits": 2, "alpha": 0.9})  # fmt: skip
    with torch.no_grad():
        for p in m2.parameters():
            p.add_(1.0)
    m2.load_state_dict(m.state_dict())
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(m(x), m2(x))
    md = m.double()
    assert md(x.double()).dtype == torch.float64


def test_whole_model_pickle_round_trips_and_names_public_modules_only(tmp_path):
    """torch.save of a whole quantized LeNet-5 loads back with the same output and input
    gradient, and the pickle names stelab classes only by their public modules
    (stelab.nn, stelab.quantizers, stelab.estimators), never by the files inside those
    packages, so moving code between those files does not break saved models."""
    import io
    import pickle

    from stelab import models

    torch.manual_seed(0)
    weights = {"fn": "uniform", "bits": 4, "step": "auto", "estimator": "dsq"}
    m = quantize(models.LeNet5(act={"bits": 2}), weights=weights)
    m.classifier[-1].weight_quantizer = Quantizer("sign", "swish_sign")
    extra = [Quantizer("ternary", "ewgs"), Quantizer("heaviside"), Quantizer("sign", "logistic"),
             Quantizer("uniform", "cosine", step=0.1), Quantizer("uniform", "periodic", step=0.5),
             QuantAct("act", "relu", bits=2, step=0.5)]  # fmt: skip
    x = torch.randn(4, 1, 28, 28)
    z = torch.linspace(-2, 2, 41)

    def run(model):
        xi, zi = x.clone().requires_grad_(), z.clone().requires_grad_()
        y = model(xi)
        ys = [q(zi) for q in model.extra]
        (y.sum() + sum(v.square().sum() for v in ys)).backward()
        return [y.detach(), *[v.detach() for v in ys], xi.grad, zi.grad]

    m.extra = nn.ModuleList(extra)
    before = run(m)  # also fills the quantizers' cached estimator contexts, pickled too
    torch.save(m, tmp_path / "model.pt")
    after = run(torch.load(tmp_path / "model.pt", weights_only=False))
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))

    named = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            named.add((module, name))
            return super().find_class(module, name)

    Recorder(io.BytesIO(pickle.dumps(m))).load()
    modules = {mod for mod, _ in named if mod.split(".")[0] == "stelab"}
    assert modules == {"stelab.models", "stelab.nn", "stelab.quantizers", "stelab.estimators"}
    assert {("stelab.estimators", "DSQ"), ("stelab.estimators", "Context"),
            ("stelab.quantizers", "_Sign"), ("stelab.nn", "QuantConv2d")} <= named  # fmt: skip


def test_quantize_with_identity_preserves_outputs_and_gradients():
    ref = plain_net()
    q = quantize(ref, weights="identity")
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(q(x), ref(x))
    q(x).sum().backward()
    ref(x).sum().backward()
    for (n, p), (_, r) in zip(q.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p.grad, r.grad, msg=n)
    assert isinstance(q[0], QuantConv2d) and isinstance(q[4], QuantLinear)
    assert q[0].weight is not ref[0].weight  # inplace=False converts a copy


def test_quantize_inplace_shares_parameters():
    ref = plain_net()
    params = {id(p) for p in ref.parameters()}
    q = quantize(ref, weights="sign:approx_sign", inplace=True)
    assert q is ref and {id(p) for p in q.parameters()} == params
    assert q[0].weight_quantizer.estimator.name == "approx_sign"


def test_skip_and_overrides_by_pattern():
    q = quantize(
        plain_net(),
        weights={"fn": "uniform", "bits": 4, "step": "auto"},
        activations={"fn": "act", "bits": 2, "alpha": 0.5, "estimator": "relu"},
        skip=["0"],
        overrides={"6": {"weights": "sign:ste"}, "5": {"activations": "heaviside:clipped_relu"}},
    )
    assert type(q[0]) is nn.Conv2d  # skipped
    assert isinstance(q[1], QuantAct) and q[1].estimator.name == "relu"
    assert q[4].weight_quantizer.kind == "uniform"
    assert q[5].kind == "heaviside" and q[5].estimator.name == "clipped_relu"
    assert q[6].weight_quantizer.kind == "sign"


def test_auto_step_is_lsq_init():
    ref = plain_net()
    q = quantize(ref, weights={"fn": "uniform", "bits": 4, "step": "auto"})
    w = ref[4].weight
    assert q[4].weight_quantizer.step.item() == pytest.approx(
        2 * w.abs().mean().item() / 7**0.5, rel=1e-6
    )


@pytest.mark.parametrize(
    "kwargs,word",
    [
        (dict(weights="sgn"), "sgn"),
        (dict(weights={"bits": 4}), "fn"),
        (dict(weights=3.5), "weights"),
        (dict(activations={"fn": "act", "bits": 2, "step": "auto"}), "step='auto'"),
        (dict(weights="sign", skip=["nothing.here"]), "nothing.here"),
        (dict(weights="sign", overrides={"0": {"weight": "sign"}}), "weight"),
        (dict(weights={"fn": "uniform", "bits": 40, "step": 0.1}), "bits"),
    ],
)
def test_quantize_bad_input(kwargs, word):
    with pytest.raises((ValueError, TypeError)) as e:
        quantize(plain_net(), **kwargs)
    assert word in str(e.value)


def test_summary_totals_match_hand_computation():
    q = quantize(
        plain_net(),
        weights={"fn": "uniform", "bits": 4, "step": 0.1},
        activations={"fn": "act", "bits": 2, "alpha": 0.5},
        skip=["6"],
    )
    s = summary(q, (1, 8, 8))
    # conv 1->4, k3 on 8x8: 6x6 out; 36 weights + 4 bias; MACs 4*6*6*1*3*3
    # linear 36->8: 288 weights + 8 bias; linear 8->3 float: 24 + 3
    assert s.total_params == 40 + 296 + 27
    assert s.quantized_params == 36 + 288
    assert s.total_macs == 4 * 6 * 6 * 9 + 36 * 8 + 8 * 3
    assert s.float32_bytes == 4 * 363
    deployed = (36 + 288) * 4 / 8 + (4 + 8) * 4 + 27 * 4
    assert s.deployed_bytes == deployed
    assert s.compression == pytest.approx(4 * 363 / deployed)
    rows = {r.name: r for r in s.rows}
    assert rows["0"].output_shape == (4, 6, 6) and rows["0"].weight_bits == 4
    assert rows["1"].act_bits == 2 and rows["1"].estimator == "clipped_relu (default)"
    text = str(s)
    assert "Compression" in text and "QuantConv2d" in text and "MACs" in text


def test_summary_bad_input_size():
    with pytest.raises(ConfigError, match="input_size"):
        summary(plain_net(), (1, 0, 8))
    with pytest.raises(ConfigError, match="input_size"):
        summary(plain_net(), (3, 8, 8))  # wrong channel count


def test_lenet5_under_torch_compile_matches_eager():
    from stelab import models

    torch.manual_seed(0)
    m = models.build("lenet5", in_shape=(1, 8, 8), act={"bits": 2, "estimator": "clipped_relu"},
                     weights={"fn": "sign", "estimator": "approx_sign"})  # fmt: skip
    x = torch.randn(16, 1, 8, 8)
    y = m(x)
    y.sum().backward()
    g = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    cm = torch.compile(m, backend="aot_eager", fullgraph=True)
    yc = cm(x)
    yc.sum().backward()
    torch.testing.assert_close(yc, y)
    for a, b in zip(g, [p.grad for p in m.parameters()], strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_quantized_model_on_cuda_matches_cpu():
    from stelab import models

    torch.manual_seed(0)
    m = models.build("lenet5", in_shape=(1, 28, 28), act={"bits": 2})
    x = torch.randn(8, 1, 28, 28)
    y = m(x)
    mc = m.cuda()
    torch.testing.assert_close(mc(x.cuda()).cpu(), y, rtol=1e-4, atol=1e-4)


def test_public_api_exports():
    for name in ["Quantizer", "QuantAct", "QuantLinear", "QuantConv2d", "quantize", "summary",
                 "register_estimator", "estimator", "custom"]:  # fmt: skip
        assert hasattr(stelab, name)


# --- #11 item 8: quantize() raises stelab errors and never silently does nothing --------


def test_root_layer_is_converted():
    lin = nn.Linear(4, 2)
    q = quantize(lin, weights="sign:ste")
    assert isinstance(q, QuantLinear) and q.weight_quantizer.estimator.name == "ste"
    x = torch.randn(3, 4)
    expect = x @ torch.where(lin.weight >= 0, 1.0, -1.0).T + lin.bias
    torch.testing.assert_close(q(x), expect)
    # inplace: the result shares the float layer's parameters
    qi = quantize(lin, weights="sign", inplace=True)
    assert qi.weight is lin.weight and qi.bias is lin.bias
    act = quantize(nn.ReLU(), activations={"fn": "act", "bits": 2, "alpha": 0.5})
    assert isinstance(act, QuantAct)
    assert act(torch.tensor([-1.0, 0.2, 0.7, 9.0])).tolist() == [0.0, 0.5, 1.0, 1.5]


@pytest.mark.parametrize(
    "kwargs,exc,words",
    [
        (dict(weights=5), StelabTypeError, ["weights", "5"]),
        (dict(activations=[1]), StelabTypeError, ["activations", "[1]"]),
        (dict(weights="sgn"), ConfigError, ["sgn"]),
        (dict(weights="sign:nope"), ConfigError, ["nope"]),
        (dict(weights={"fn": "uniform", "bits": 1, "step": "auto"}), ConfigError, ["bits", "1"]),
        (dict(weights={"fn": "uniform", "bit": 4, "step": "auto"}), ConfigError,
         ["unknown key 'bit'", "did you mean 'bits'"]),
        (dict(weights={"fn": "sign", "bta": 3, "estimator": "swish_sign"}), ConfigError,
         ["unknown key 'bta'", "did you mean 'beta'"]),
    ],
)  # fmt: skip
def test_spec_is_validated_even_when_no_layer_matches(kwargs, exc, words):
    model = nn.Sequential(nn.Flatten())  # nothing quantize() could convert
    with pytest.raises(exc) as e:
        quantize(model, **kwargs)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_auto_step_with_one_bit_names_bits_not_zero_division():
    with pytest.raises(ConfigError, match=r"bits must be an integer in \[2, 16\], got 1"):
        stelab.nn.auto_step(torch.ones(3), "uniform", 1)


def test_spec_that_converts_nothing_raises_or_warns():
    model = nn.Sequential(nn.Linear(2, 2), nn.Flatten())
    with pytest.raises(ConfigError, match="activations='heaviside' converted no layer"):
        quantize(model, activations="heaviside")
    with pytest.warns(StelabWarning, match="converted no layer"):
        out = quantize(model, activations="heaviside", strict=False)
    assert type(out[0]) is nn.Linear
    # everything already quantized: also nothing converted, and said so
    q = quantize(model, weights="sign")
    with pytest.raises(ConfigError, match="already quantized"):
        quantize(q, weights="sign")


def test_shared_module_stays_shared():
    torch.manual_seed(0)
    lin = nn.Linear(2, 2)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    q = quantize(model, weights="sign:ste")
    assert isinstance(q[0], QuantLinear) and q[0] is q[2]
    x = torch.randn(5, 2)
    ws = torch.where(lin.weight >= 0, 1.0, -1.0)
    expect = torch.relu(x @ ws.T + lin.bias) @ ws.T + lin.bias
    torch.testing.assert_close(q(x), expect)
    # inplace keeps the one Parameter
    qi = quantize(model, weights="sign", inplace=True)
    assert qi[0] is qi[2] and qi[0].weight is lin.weight
    # the two uses cannot get different specs
    with pytest.raises(ConfigError, match="same module"):
        quantize(model, weights="sign", skip=["2"])


def test_unconvertible_layers_are_listed_in_a_warning_and_in_summary():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1d = nn.Conv1d(2, 3, 3)
            self.fc = nn.Linear(3, 4)
            self.gelu = nn.GELU()
            self.relu = nn.ReLU()
            self.up = nn.ConvTranspose2d(1, 1, 2)

        def forward(self, x):
            y = nn.functional.relu(self.conv1d(x)).mean(-1)
            y = self.relu(self.gelu(torch.relu(self.fc(y))))
            return self.up(y.view(-1, 1, 2, 2))

    with pytest.warns(StelabWarning) as rec:
        q = quantize(Net(), weights="sign", activations={"fn": "act", "bits": 2, "alpha": 0.5})
    msg = " ".join(str(w.message) for w in rec)
    assert "'conv1d' (Conv1d, weights)" in msg and "'up' (ConvTranspose2d, weights)" in msg
    assert "'gelu' (GELU, activation)" in msg and "'fc'" not in msg and "'relu'" not in msg
    s = summary(q, (2, 6))
    rows = {r.name: r for r in s.rows}
    assert rows["conv1d"].not_convertible == "weights"
    assert rows["up"].not_convertible == "weights"
    assert rows["gelu"].not_convertible == "activation"
    # functional activations are found while running: the model calls F.relu and torch.relu
    assert rows[""].not_convertible == "F.relu, torch.relu"
    assert rows["fc"].not_convertible == "" and rows["relu"].not_convertible == ""
    assert rows["relu"].estimator == "clipped_relu (default)"
    text = str(s)
    assert "Not convertible" in text and "(default)" in text
    # totals are unchanged by the extra row of the (non-leaf) model
    assert s.total_params == sum(p.numel() for p in q.parameters())
    assert s.float32_bytes == 4 * s.total_params


def test_lstm_and_attention_are_reported_not_converted():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = nn.LSTM(4, 4, batch_first=True)
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            h, _ = self.rnn(x)
            h, _ = self.attn(h, h, h)
            return self.head(h)

    with pytest.warns(StelabWarning) as rec:
        q = quantize(Seq(), weights="sign")
    msg = " ".join(str(w.message) for w in rec)
    assert "'rnn' (LSTM, weights)" in msg and "'attn' (MultiheadAttention, weights)" in msg
    assert "'attn.out_proj' (NonDynamicallyQuantizableLinear, weights)" in msg
    assert isinstance(q.head, QuantLinear) and type(q.rnn) is nn.LSTM
    assert stelab.nn.unconvertible(nn.Softmax(dim=1)) is None
    assert stelab.nn.unconvertible(nn.BatchNorm2d(3)) is None


def test_bad_skip_and_summary_model_are_stelab_errors():
    with pytest.raises(StelabTypeError, match="skip"):
        quantize(plain_net(), weights="sign", skip=5)
    with pytest.raises(StelabTypeError, match="model"):
        summary("lenet5", (1, 8, 8))


def test_summary_of_a_fully_convertible_model_has_no_extra_column():
    s = summary(quantize(plain_net(), weights="sign:ste"), (1, 8, 8))
    assert all(r.not_convertible == "" for r in s.rows)
    assert "Not convertible" not in str(s) and "(default)" not in str(s)


def test_empty_inputs_with_learned_step():
    q = Quantizer("uniform", bits=4, step=0.1, learn_step=True)
    x = torch.zeros(0, requires_grad=True)
    q(x).sum().backward()
    assert q.step.grad.item() == 0.0
    a = QuantAct("act", bits=2, alpha=0.5, learn_step=True)
    y = a(torch.zeros(0, 3, 4))
    assert y.shape == (0, 3, 4)
    y.sum().backward()
    assert a.step.grad.item() == 0.0


@pytest.mark.parametrize(
    "fn,kw,default",
    [("sign", {}, "clipped"), ("ternary", {}, "clipped"), ("heaviside", {}, "clipped_relu"),
     ("act", {"bits": 2, "alpha": 0.5}, "clipped_relu"), ("uniform", {"step": 0.1}, "ste"),
     ("identity", {}, "ste")],
)  # fmt: skip
def test_default_estimator_per_quantizer(fn, kw, default):
    q = Quantizer(fn, **kw)
    assert q.estimator.name == default and q.default_estimator
    assert stelab.estimators.DEFAULTS[fn][0] == default and stelab.estimators.DEFAULTS[fn][1]
    assert not Quantizer(fn, "ste", **kw).default_estimator
    # the default acts: clipped_relu on act zeroes the gradient above the top level
    if fn == "act":
        x = torch.tensor([-0.1, 0.7, 2.0], requires_grad=True)
        QuantAct(fn, **kw)(x).sum().backward()
        assert x.grad.tolist() == [0.0, 1.0, 0.0]
