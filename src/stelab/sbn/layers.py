"""Stochastic binary layers, the SBN container and the networks of [S20].

A stochastic binary network (SBN, [S20] §2) is a stack of layers

    a^k = W^k x^{k-1} + b^k,     x^k = sign(a^k - Z^k),     k = 1..L,

with ``Z^k`` i.i.d. noise (standard logistic by default, see :mod:`.noise`), so
``P(x^k_j = +1 | x^{k-1}) = F(a^k_j)``, states in {-1, +1}, a real input
``x^0``, and a deterministic output layer ``eta = V x^L + c``.

States: every layer computes the sign ``s = sign(a - Z)`` in {-1, +1} and emits the
state ``h = c0 + c1 s``: ``states="pm1"`` (default) gives ``h = s`` in {-1, +1};
``states="01"`` gives ``h = (s + 1) / 2`` in {0, 1} ([S20]'s parametrisation, so
``P(h = 1) = F(a)`` and ``E[h] = F(a)``). The next layer's pre-activation sees ``h``.
Every estimator works on the signs and maps them with :meth:`SBNLinear.to_state`, so
one code path serves both (a flip ``s -> -s`` changes ``h`` by ``-2 c1 s``). The training
objective is the expected loss ``E_Z[ mean_n loss(eta_n, y_n) ]``; its gradient
is estimated by :meth:`SBN.surrogate_loss` with any estimator of
:mod:`stelab.sbn.estimators`.

References: [S20] Shekhovtsov, Yanush, Flach. Path Sample-Analytic Gradient
Estimators for Stochastic Binary Networks. NeurIPS 2020, arXiv:2006.03143.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, StelabTypeError, check_int
from .base import LossFn, SBNEstimator
from .base import get as get_estimator
from .noise import Noise, as_generator, get_noise, uniform_like

__all__ = [
    "SBNLinear",
    "SBNConv2d",
    "SBNLayer",
    "SBN",
    "sbn_mlp",
    "sbn_conv8",
    "data_init",
    "CONV8_ARCH",
    "STATES",
    "LAYER_TYPES",
]

#: state parametrisations: "pm1" (h = s in {-1, +1}) and "01" (h = (s + 1) / 2 in {0, 1})
STATES = ("pm1", "01")


def _pair(name: str, value: Any, lo: int) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise ConfigError(f"{name} must be an int or a pair of ints, got {value!r}")
        return (check_int(name, value[0], lo, 2**31), check_int(name, value[1], lo, 2**31))
    v = check_int(name, value, lo, 2**31)
    return (v, v)


def _check_states(states: Any) -> str:
    if states not in STATES:
        raise ConfigError(
            f"states must be one of {', '.join(map(repr, STATES))} ('pm1': {{-1, +1}}, "
            f"'01': {{0, 1}}), got {states!r}"
        )
    return states


class _States:
    """The state map of a stochastic binary layer: sign ``s`` in {-1, +1} -> state ``h``.

    h = c0 + c1 s,    (c0, c1) = (0, 1) for states="pm1",  (1/2, 1/2) for states="01"
    """

    states: str = "pm1"

    @property
    def state_scale(self) -> float:
        """``c1``: flipping the sign ``s -> -s`` changes the state by ``-2 c1 s``."""
        return 1.0 if self.states == "pm1" else 0.5

    def to_state(self, s: Tensor) -> Tensor:
        """The state ``h = c0 + c1 s`` of signs (or relaxed signs) ``s`` in [-1, 1];
        differentiable; the identity for ``states="pm1"``."""
        return s if self.states == "pm1" else (s + 1.0) * 0.5


def _reset(weight: Tensor, bias: Tensor | None, fan_in: int) -> None:
    # the torch.nn.Linear / Conv2d default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for both
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
        nn.init.uniform_(bias, -bound, bound)


class SBNLinear(_States, nn.Module):
    """Stochastic binary fully-connected layer ([S20] §2).

        a = W x + b,    s = sign(a - Z),    Z ~ noise i.i.d.,    P(s = +1 | x) = F(a),
        x_out = c0 + c1 s   (s for states="pm1", (s + 1) / 2 for states="01")

    ``W`` has shape (out_features, in_features). An input with more than two
    dimensions is flattened after the batch dimension (so a linear layer can
    follow a convolution). ``noise``: ``"logistic"`` (default, ``F = sigma``),
    ``"gaussian"`` or ``"uniform"`` (on [-1, 1]), or a :class:`~.noise.Noise`.
    ``states``: ``"pm1"`` (default, {-1, +1}) or ``"01"`` ({0, 1}, [S20]'s choice).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        noise: str | Noise = "logistic",
        *,
        states: str = "pm1",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = check_int("in_features", in_features, 1, 2**31)
        self.out_features = check_int("out_features", out_features, 1, 2**31)
        self.noise = get_noise(noise)
        self.states = _check_states(states)
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(self.out_features, self.in_features, **kw))
        self.bias = nn.Parameter(torch.empty(self.out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's default init: ``W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
        _reset(self.weight, self.bias, self.in_features)

    def preact(self, x: Tensor) -> Tensor:
        """Pre-activation ``a = W x + b`` (input flattened after the batch dimension)."""
        if x.dim() > 2:
            x = x.flatten(1)
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: Tensor, generator: torch.Generator | int | None = None) -> Tensor:
        """One sample ``x_out = to_state(sign(a - Z))``."""
        a = self.preact(x)
        s = self.noise.states(a, uniform_like(a, as_generator(generator, a.device)))
        return self.to_state(s)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, noise={self.noise.name}, states={self.states}"
        )


class SBNConv2d(_States, nn.Module):
    """Stochastic binary 2-d convolution ([S20] §2, §4): one binary unit per (channel, position).

        a = conv2d(x, W) + b,    s = sign(a - Z),    P(s[c, p] = +1 | x) = F(a[c, p]),
        x_out = c0 + c1 s   (s for states="pm1", (s + 1) / 2 for states="01")

    ``W`` has shape (out_channels, in_channels, kh, kw); zero padding (of the input's
    states); no groups.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        dilation: int | tuple[int, int] = 1,
        bias: bool = True,
        noise: str | Noise = "logistic",
        *,
        states: str = "pm1",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_channels = check_int("in_channels", in_channels, 1, 2**31)
        self.out_channels = check_int("out_channels", out_channels, 1, 2**31)
        self.kernel_size = _pair("kernel_size", kernel_size, 1)
        self.stride = _pair("stride", stride, 1)
        self.padding = _pair("padding", padding, 0)
        self.dilation = _pair("dilation", dilation, 1)
        self.noise = get_noise(noise)
        self.states = _check_states(states)
        kw = {"device": device, "dtype": dtype}
        shape = (self.out_channels, self.in_channels, *self.kernel_size)
        self.weight = nn.Parameter(torch.empty(shape, **kw))
        self.bias = nn.Parameter(torch.empty(self.out_channels, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch's default init: ``W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))``."""
        kh, kw = self.kernel_size
        _reset(self.weight, self.bias, self.in_channels * kh * kw)

    def preact(self, x: Tensor) -> Tensor:
        """Pre-activation ``a = conv2d(x, W) + b``."""
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation)

    def forward(self, x: Tensor, generator: torch.Generator | int | None = None) -> Tensor:
        """One sample ``x_out = to_state(sign(a - Z))``."""
        a = self.preact(x)
        s = self.noise.states(a, uniform_like(a, as_generator(generator, a.device)))
        return self.to_state(s)

    def output_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """Spatial output size ``floor((s + 2 pad - dil (k - 1) - 1) / stride) + 1`` per axis."""
        return tuple(  # type: ignore[return-value]
            (s + 2 * p - d * (k - 1) - 1) // st + 1
            for s, p, d, k, st in zip(
                size, self.padding, self.dilation, self.kernel_size, self.stride, strict=True
            )
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"bias={self.bias is not None}, noise={self.noise.name}, states={self.states}"
        )


SBNLayer = SBNLinear | SBNConv2d
#: the hidden layer types an SBN takes
LAYER_TYPES = (SBNLinear, SBNConv2d)


class SBN(nn.Module):
    """A stochastic binary network: stochastic hidden layers, then a deterministic linear output.

        x^k = sign(W^k x^{k-1} + b^k - Z^k)   (k = 1..L),      eta = V x^L + c

    ``SBN(*hidden, output=nn.Linear(...))``. The hidden layers are
    :class:`SBNLinear` / :class:`SBNConv2d`; a tensor with more than two
    dimensions is flattened before a linear layer. The objective is
    ``E_Z[mean_n loss_fn(eta_n, y_n)]`` ([S20] eq. 1); :meth:`surrogate_loss`
    gives its gradient estimate for any registered estimator.
    """

    def __init__(self, *hidden: nn.Module, output: nn.Linear) -> None:
        super().__init__()
        if not hidden:
            raise ConfigError("SBN needs at least one stochastic hidden layer, got none")
        for i, layer in enumerate(hidden):
            if not isinstance(layer, LAYER_TYPES):
                raise StelabTypeError(
                    f"SBN hidden layer {i} must be SBNLinear or SBNConv2d, "
                    f"got {type(layer).__name__}"
                )
        if not isinstance(output, nn.Linear):
            raise StelabTypeError(
                f"SBN output must be a torch.nn.Linear, got {type(output).__name__}"
            )
        self.hidden = nn.ModuleList(hidden)
        self.output = output

    def output_preact(self, x: Tensor) -> Tensor:
        """``eta = V x^L + c`` (``x^L`` flattened after the batch dimension)."""
        if x.dim() > 2:
            x = x.flatten(1)
        return self.output(x)

    def forward(
        self,
        x: Tensor,
        generator: torch.Generator | int | None = None,
        *,
        mean_field: bool = False,
    ) -> Tensor:
        """One stochastic forward pass: ``eta`` for one noise sample per row.

        With ``mean_field=True``: the deterministic pass ``x^k = to_state(2F(a^k) - 1)``
        (``tanh(a/2)`` for logistic noise and states "pm1", ``F(a)`` for "01") instead
        of sampling.
        """
        g = as_generator(generator, x.device)
        h = x
        for layer in self.hidden:
            a = layer.preact(h)
            s = layer.noise.mean(a) if mean_field else layer.noise.states(a, uniform_like(a, g))
            h = layer.to_state(s)
        return self.output_preact(h)

    def sample_outputs(
        self, x: Tensor, samples: int = 10, generator: torch.Generator | int | None = None
    ) -> Tensor:
        """``samples`` independent forward passes, shape (samples, batch, out_features).

        E.g. the averaged prediction of [S20] §5: ``softmax(eta, -1).mean(0)``.
        """
        samples = check_int("samples", samples, 1, 2**31 - 1)
        g = as_generator(generator, x.device)
        eta = self(x.repeat((samples,) + (1,) * (x.dim() - 1)), g)
        return eta.view(samples, x.shape[0], *eta.shape[1:])

    def surrogate_loss(
        self,
        x: Tensor,
        y: Tensor,
        loss_fn: LossFn,
        estimator: str | SBNEstimator = "psa",
        samples: int = 1,
        generator: torch.Generator | int | None = None,
        **options: Any,
    ) -> Tensor:
        """A scalar whose ``backward()`` fills ``.grad`` with a gradient estimate of

            L(theta) = E_Z[ (1/N) sum_n loss_fn(eta_n, y_n) ]

        averaged over ``samples`` (M >= 1) independent noise draws per example;
        its value is a detached estimate of ``L`` (a sampled-path average; for
        ``exact`` the exact value). ``loss_fn(eta, y)`` must return per-example
        losses (shape (N,)). ``estimator``: a name of
        :mod:`stelab.sbn.estimators` or an :class:`SBNEstimator`; ``options`` are
        its parameters (e.g. ``tau=0.1``). ``generator``: a ``torch.Generator``, an
        integer seed or None (torch's global RNG).
        """
        est = get_estimator(estimator, **options)
        samples = check_int("samples", samples, 1, 2**31 - 1)
        est.check(self, samples)
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise StelabTypeError("x and y must be tensors")
        if x.shape[0] != y.shape[0]:
            raise ConfigError(
                f"x and y must have the same batch size, got {x.shape[0]} and {y.shape[0]}"
            )
        g = as_generator(generator, x.device)
        value, sur = est.estimate(self, x, y, loss_fn, samples, g)
        return value.detach() + (sur - sur.detach())

    def data_init(
        self, x: Tensor, generator: torch.Generator | int | None = None, eps: float = 1e-6
    ) -> SBN:
        """Data-dependent init (see :func:`data_init`); returns ``self``."""
        return data_init(self, x, generator, eps)


@torch.no_grad()
def data_init(
    model: SBN, x: Tensor, generator: torch.Generator | int | None = None, eps: float = 1e-6
) -> SBN:
    """Normalise every hidden pre-activation to mean 0, std 1 per unit on the batch ``x``.

    Layer by layer: ``a = preact(h)``, per unit (per output channel for a
    convolution, pooling batch and positions) ``mu = mean(a)``,
    ``s = std(a) + eps`` (population std), then ``W <- W / s`` and
    ``b <- (b - mu) / s`` (a layer without bias is only scaled), and ``h`` is
    a sample of the re-initialised layer. The output layer is left as is.
    ([S20] §5 "data-dependent initialization"; cf. Salimans & Kingma 2016.)
    """
    if not isinstance(model, SBN):
        raise StelabTypeError(f"data_init expects an SBN, got {type(model).__name__}")
    g = as_generator(generator, x.device)
    h = x
    for layer in model.hidden:
        a = layer.preact(h)
        dims = (0,) if a.dim() == 2 else (0, *range(2, a.dim()))
        mu = a.mean(dims)
        s = a.std(dims, unbiased=False) + eps
        layer.weight.div_(s.view(-1, *([1] * (layer.weight.dim() - 1))))
        if layer.bias is not None:
            layer.bias.sub_(mu).div_(s)
        a = layer.preact(h)
        h = layer.to_state(layer.noise.states(a, uniform_like(a, g)))
    return model


def sbn_mlp(
    in_features: int = 2,
    hidden: Sequence[int] = (5, 5, 5),
    out_features: int = 1,
    noise: str | Noise = "logistic",
    bias: bool = True,
    *,
    states: str = "pm1",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> SBN:
    """Fully-connected SBN ``in -> hidden... (stochastic binary) -> out (linear)``.

    The default is the toy network of the [S20] gradient-accuracy experiment:
    2 -> 5 -> 5 -> 5 binary units -> 1 linear output. ``states``: ``"pm1"``
    ({-1, +1}) or ``"01"`` ({0, 1}, the paper's) for every hidden layer.
    """
    if isinstance(hidden, int) or not hidden:
        raise ConfigError(f"hidden must be a non-empty sequence of widths, got {hidden!r}")
    kw: dict[str, Any] = {"device": device, "dtype": dtype}
    layers = []
    prev = check_int("in_features", in_features, 1, 2**31)
    for i, w in enumerate(hidden):
        w = check_int(f"hidden[{i}]", w, 1, 2**31)
        layers.append(SBNLinear(prev, w, bias=bias, noise=noise, states=states, **kw))
        prev = w
    out = nn.Linear(prev, check_int("out_features", out_features, 1, 2**31), bias=bias, **kw)
    return SBN(*layers, output=out)


#: The 8-conv network of [S20] §5 (CIFAR-10): (width index, kernel, stride) per layer;
#: width index 0 -> channels[0] (96), 1 -> channels[1] (192).
CONV8_ARCH: tuple[tuple[int, int, int], ...] = (
    (0, 3, 1),
    (0, 3, 1),
    (0, 3, 2),
    (1, 3, 1),
    (1, 3, 1),
    (1, 3, 2),
    (1, 3, 1),
    (1, 1, 1),
)


def sbn_conv8(
    in_channels: int = 3,
    input_size: int | tuple[int, int] = 32,
    num_classes: int = 10,
    channels: tuple[int, int] = (96, 192),
    padding: int = 0,
    noise: str | Noise = "logistic",
    *,
    states: str = "pm1",
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> SBN:
    """The 8-conv SBN of [S20] §5: 96-3-1, 96-3-1, 96-3-2, 192-3-1, 192-3-1, 192-3-2,
    192-3-1, 192-1-1 (out_channels-kernel-stride), each a stochastic sign, then a linear
    classifier on the flattened states.

    With the defaults (3x32x32 input, padding 0) the spatial sizes are
    30, 28, 13, 11, 9, 4, 2, 2, so the classifier is Linear(192*2*2 = 768, 10).
    ``padding`` is applied to the 3x3 convolutions only (the paper uses 0; use 1 for
    small inputs such as 8x8, where padding 0 runs out of pixels). ``channels``
    scales the widths (e.g. (8, 16) for a quick variant). The classifier's input
    size is computed from ``input_size``. ``states``: ``"pm1"`` or ``"01"`` (every layer).
    """
    c_in = check_int("in_channels", in_channels, 1, 2**31)
    hw = _pair("input_size", input_size, 1)
    if not isinstance(channels, (tuple, list)) or len(channels) != 2:
        raise ConfigError(f"channels must be a pair of ints (e.g. (96, 192)), got {channels!r}")
    widths = [check_int(f"channels[{i}]", c, 1, 2**31) for i, c in enumerate(channels)]
    pad = check_int("padding", padding, 0, 16)
    kw: dict[str, Any] = {"device": device, "dtype": dtype}
    layers = []
    size = hw
    for i, (wi, k, s) in enumerate(CONV8_ARCH):
        conv = SBNConv2d(
            c_in, widths[wi], k, s, pad if k > 1 else 0, noise=noise, states=states, **kw
        )
        new = conv.output_size(size)
        if min(new) < 1:
            raise ConfigError(
                f"input_size={input_size!r} is too small for sbn_conv8 with padding={pad}: "
                f"conv layer {i} (kernel {k}, stride {s}) gets a {size[0]}x{size[1]} input; "
                f"use a larger input or padding=1"
            )
        layers.append(conv)
        size, c_in = new, widths[wi]
    out = nn.Linear(c_in * size[0] * size[1], check_int("num_classes", num_classes, 1, 2**31), **kw)
    return SBN(*layers, output=out)
