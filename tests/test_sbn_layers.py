"""SBN layers, noises, the container, the [S20] networks and data-dependent init."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from stelab.errors import ConfigError, StelabTypeError
from stelab.sbn import (
    SBN,
    SBNConv2d,
    SBNLinear,
    data_init,
    get_noise,
    noise_names,
    sbn_conv8,
    sbn_mlp,
)

D = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


CDF = {
    "logistic": lambda z: 1 / (1 + math.exp(-z)),
    "gaussian": lambda z: stats.norm.cdf(z),
    "uniform": lambda z: min(1.0, max(0.0, (z + 1) / 2)),
}


@pytest.mark.parametrize("name", ["logistic", "gaussian", "uniform"])
def test_noise_functions_against_closed_forms(name):
    noise = get_noise(name)
    a = torch.linspace(-3, 3, 61, dtype=D).requires_grad_(True)
    want = torch.tensor([CDF[name](v) for v in a.tolist()], dtype=D)
    assert torch.allclose(noise.cdf(a), want, rtol=1e-12, atol=1e-15)
    # F' is the derivative of F (autograd of the cdf, away from uniform's kinks)
    (g,) = torch.autograd.grad(noise.cdf(a).sum(), a)
    mask = (a.abs() - 1).abs() > 1e-9
    assert torch.allclose(g[mask], noise.pdf(a)[mask], rtol=1e-10, atol=1e-14)
    inner = a.detach()[(want > 1e-12) & (want < 1 - 1e-12)]
    assert torch.allclose(noise.log_cdf(inner), torch.log(noise.cdf(inner)), rtol=1e-10)
    assert torch.allclose(noise.mean(a), 2 * noise.cdf(a) - 1, atol=1e-15)
    u = torch.linspace(0.01, 0.99, 50, dtype=D)
    assert torch.allclose(noise.cdf(noise.quantile(u)), u, rtol=1e-10)
    buf = a.detach().clone()
    assert torch.allclose(noise.cdf_(buf), noise.cdf(a.detach()))
    # symmetric: F(-a) = 1 - F(a)
    assert torch.allclose(noise.cdf(-a), 1 - noise.cdf(a), atol=1e-15)


def test_logistic_mean_is_tanh_half():
    a = torch.linspace(-4, 4, 9, dtype=D)
    assert torch.allclose(get_noise("logistic").mean(a), torch.tanh(a / 2))


@pytest.mark.parametrize("name", ["logistic", "gaussian", "uniform"])
def test_layer_samples_have_probability_F(name):
    """Frequency of +1 over 40k draws vs F(a): binomial z-test, Bonferroni over 3 units
    (false-alarm rate <= 1e-4)."""
    layer = SBNLinear(2, 3, noise=name, dtype=D)
    x = torch.tensor([[0.3, -0.7]], dtype=D)
    n = 40_000
    draws = layer(x.expand(n, 2), generator=torch.Generator().manual_seed(0))
    assert set(draws.unique().tolist()) <= {-1.0, 1.0}
    p = get_noise(name).cdf(layer.preact(x)).detach()[0]
    freq = (draws > 0).to(D).mean(0)
    z = (freq - p) / torch.sqrt(p * (1 - p) / n).clamp_min(1e-12)
    assert z.abs().max() < stats.norm.ppf(1 - 1e-4 / 6)


def test_conv8_matches_the_paper_architecture():
    m = sbn_conv8()
    spec = [(96, 3, 1), (96, 3, 1), (96, 3, 2), (192, 3, 1), (192, 3, 1), (192, 3, 2)]
    spec += [(192, 3, 1), (192, 1, 1)]
    got = [(c.out_channels, c.kernel_size[0], c.stride[0]) for c in m.hidden]
    assert got == spec and all(c.padding == (0, 0) for c in m.hidden)
    assert (m.output.in_features, m.output.out_features) == (768, 10)
    # spatial sizes 30, 28, 13, 11, 9, 4, 2, 2
    h, sizes = torch.zeros(1, 3, 32, 32), []
    for c in m.hidden:
        h = c(h, generator=0)
        sizes.append(h.shape[-1])
    assert sizes == [30, 28, 13, 11, 9, 4, 2, 2]


@pytest.mark.parametrize(
    ("c_in", "size", "padding", "flat"), [(1, 28, 0, 16), (3, 8, 1, 64), (1, (9, 12), 1, 144)]
)
def test_conv8_small_variants(c_in, size, padding, flat):
    m = sbn_conv8(c_in, size, 4, channels=(4, 16), padding=padding)
    assert m.output.in_features == flat
    hw = (size, size) if isinstance(size, int) else size
    eta = m(torch.randn(2, c_in, *hw), generator=1)
    assert eta.shape == (2, 4)


def test_conv8_too_small_input_is_refused():
    with pytest.raises(ConfigError, match="input_size=8 is too small.*padding=1"):
        sbn_conv8(3, 8)


def test_mlp_default_is_the_toy_network():
    m = sbn_mlp()
    assert [(h.in_features, h.out_features) for h in m.hidden] == [(2, 5), (5, 5), (5, 5)]
    assert (m.output.in_features, m.output.out_features) == (5, 1)
    assert "noise=logistic" in repr(m)


def test_data_init_normalises_preactivations():
    torch.manual_seed(0)
    m = sbn_mlp(2, (6, 4), 1, dtype=D)
    conv = sbn_conv8(2, 8, 3, channels=(3, 5), padding=1, dtype=D)
    for model, x in [(m, torch.randn(64, 2, dtype=D) * 5 + 3), (conv, torch.randn(16, 2, 8, 8))]:
        x = x.to(D)
        data_init(model, x, generator=3)
        g = torch.Generator().manual_seed(3)
        h = x
        for layer in model.hidden:
            a = layer.preact(h).detach()
            dims = (0,) if a.dim() == 2 else (0, 2, 3)
            assert torch.allclose(a.mean(dims), torch.zeros((), dtype=D), atol=1e-10)
            assert torch.allclose(a.std(dims, unbiased=False), torch.ones((), dtype=D), atol=1e-5)
            h = layer.noise.states(a, torch.rand(a.shape, generator=g, dtype=D))


def test_sample_outputs_and_mean_field_forward():
    m = sbn_mlp(2, (3,), 2)
    x = torch.randn(5, 2)
    out = m.sample_outputs(x, samples=4, generator=0)
    assert out.shape == (4, 5, 2)
    mf = m(x, mean_field=True)
    want = m.output(torch.tanh(m.hidden[0].preact(x) / 2))
    assert torch.allclose(mf, want)


def test_state_dict_round_trip():
    a, b = sbn_conv8(1, 8, 2, channels=(2, 3), padding=1), sbn_conv8(1, 8, 2, (2, 3), 1)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(a(x, generator=5), b(x, generator=5))


def test_construction_errors_name_the_parameter():
    with pytest.raises(ConfigError, match=r"out_features must be an integer in \[1, .*got 0"):
        SBNLinear(3, 0)
    with pytest.raises(ConfigError, match=r"unknown noise 'logistc'.*did you mean 'logistic'"):
        SBNLinear(3, 2, noise="logistc")
    with pytest.raises(ConfigError, match="kernel_size"):
        SBNConv2d(1, 1, (3, 3, 3))
    with pytest.raises(ConfigError, match="stride"):
        SBNConv2d(1, 1, 3, stride=0)
    with pytest.raises(ConfigError, match="at least one stochastic hidden layer"):
        SBN(output=torch.nn.Linear(2, 1))
    with pytest.raises(StelabTypeError, match="output must be a torch.nn.Linear"):
        SBN(SBNLinear(2, 2), output=torch.nn.Conv2d(1, 1, 1))
    with pytest.raises(ConfigError, match="hidden must be a non-empty sequence"):
        sbn_mlp(hidden=())
    with pytest.raises(ConfigError, match="channels must be a pair"):
        sbn_conv8(channels=(8,))
    with pytest.raises(TypeError, match="generator must be"):
        SBNLinear(2, 2)(torch.randn(1, 2), generator="seed")
    assert noise_names() == ["gaussian", "logistic", "uniform"]


def test_layers_without_bias_draw_only_weights_in_the_default_range():
    """bias=False: no bias parameter, the weights still U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    (fan_in = 7 for the linear layer, 2 * 3 * 3 = 18 for the convolution), and the
    pre-activation is the bias-free product."""
    torch.manual_seed(1)
    lin = SBNLinear(7, 40, bias=False, dtype=D)
    conv = SBNConv2d(2, 10, 3, bias=False, dtype=D)
    for layer, fan_in in [(lin, 7), (conv, 18)]:
        assert layer.bias is None and [n for n, _ in layer.named_parameters()] == ["weight"]
        bound = 1 / math.sqrt(fan_in)
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
    x = torch.randn(3, 7, dtype=D)
    assert torch.equal(lin.preact(x), x @ lin.weight.T)


def test_conv_layer_repr_lists_every_setting():
    conv = SBNConv2d(2, 3, (3, 1), stride=2, padding=(1, 0), bias=False, noise="gaussian",
                     states="01")  # fmt: skip
    assert repr(conv) == (
        "SBNConv2d(2, 3, kernel_size=(3, 1), stride=(2, 2), padding=(1, 0), dilation=(1, 1), "
        "bias=False, noise=gaussian, states=01)"
    )
    assert "bias=True, noise=logistic, states=pm1)" in repr(SBNConv2d(1, 1, 1))


def test_surrogate_loss_checks_its_data():
    m = sbn_mlp(2, (3,), 1, dtype=D)
    x, t = torch.randn(4, 2, dtype=D), torch.ones(4, dtype=D)
    with pytest.raises(StelabTypeError, match="x and y must be tensors"):
        m.surrogate_loss(x.tolist(), t, lambda eta, y: eta[:, 0])
    with pytest.raises(StelabTypeError, match="x and y must be tensors"):
        m.surrogate_loss(x, t.tolist(), lambda eta, y: eta[:, 0])
    with pytest.raises(ConfigError, match="x and y must have the same batch size, got 4 and 3"):
        m.surrogate_loss(x, t[:3], lambda eta, y: eta[:, 0])


def test_data_init_method_returns_the_model_and_scales_bias_free_layers():
    """SBN.data_init is data_init returning the model. Without bias a layer is only
    scaled, W <- W / (std(a) + eps) per unit (population std over the batch), written out
    here layer by layer with the same uniforms (x = +1 iff u < sigma(a))."""
    torch.manual_seed(2)
    m = sbn_mlp(3, (4, 2), 1, bias=False, dtype=D)
    x = torch.randn(50, 3, dtype=D) * 2 + 1
    with torch.no_grad():
        want, h, g = [], x, torch.Generator().manual_seed(7)
        for layer in m.hidden:
            w = layer.weight.clone()
            a = h @ w.T
            sd = ((a - a.mean(0)) ** 2).mean(0).sqrt() + 1e-6
            want.append(w / sd[:, None])
            a = h @ want[-1].T
            h = (torch.rand(a.shape, generator=g, dtype=D) < torch.sigmoid(a)).to(D) * 2 - 1
    assert m.data_init(x, generator=7) is m
    for layer, w in zip(m.hidden, want, strict=True):
        assert layer.bias is None
        assert torch.allclose(layer.weight.detach(), w, rtol=1e-13, atol=0)
    with pytest.raises(StelabTypeError, match="data_init expects an SBN, got Sequential"):
        data_init(torch.nn.Sequential(torch.nn.Linear(3, 1)), x)
