"""Model zoo: the networks of the reproduced papers, built from stelab layers.

Every model takes an :class:`ActConfig` (activation bits, estimator, α) and an
optional weight-quantizer spec (as in :func:`stelab.quantize`), and works at
8×8, 28×28 and 32×32 inputs.

[Y19] form (``lenet5``, ``vgg11``, ``resnet20``): float weights by default, a
batch norm *without* scale and shift before every quantized activation, the
activation quantizer σ_α with ``bits`` bits (``bits=None``: float ReLU, the
full-precision model whose weights initialise the quantized one; their state
dicts differ only by the quantizers' steps, and :func:`transfer_weights` carries
weights across).

``convnet``: the small conv net used for [S24] (conv32-conv64-dense256-dense10).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import estimators as _est
from .errors import ConfigError, StelabTypeError, check_int
from .nn import QuantSpec, quantize
from .quantizers import QuantAct, halfnormal_alpha
from .registry import Registry

__all__ = [
    "ActConfig",
    "build",
    "names",
    "transfer_weights",
    "check_fits",
    "LeNet5",
    "VGG11",
    "ResNet20",
    "ConvNet",
]


@dataclass(frozen=True)
class ActConfig:
    """Activation quantization of a zoo model.

    ``bits``: None for float ReLU, else 1..16 for [Y19]'s σ_α.
    ``estimator``: its backward rule (name or Estimator); [Y19] compares
    ``ste`` (identity), ``relu`` and ``clipped_relu``.
    ``alpha``: the resolution; None means MSE-optimal for a half-Gaussian
    (:func:`stelab.quantizers.halfnormal_alpha`), as in [Y19].
    """

    bits: int | None = None
    estimator: Any = "clipped_relu"
    alpha: float | None = None
    estimator_params: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.bits is not None:
            object.__setattr__(self, "bits", check_int("bits", self.bits, 1, 16))
            _est.get(self.estimator, **dict(self.estimator_params))  # validate early

    def make(self) -> nn.Module:
        """A fresh activation module: nn.ReLU or a QuantAct."""
        if self.bits is None:
            return nn.ReLU()
        alpha = self.alpha if self.alpha is not None else _alpha(self.bits)
        return QuantAct(
            "act", self.estimator, bits=self.bits, alpha=alpha, **dict(self.estimator_params)
        )


_ALPHA_CACHE: dict[int, float] = {}


def _alpha(bits: int) -> float:
    if bits not in _ALPHA_CACHE:
        _ALPHA_CACHE[bits] = halfnormal_alpha(bits)
    return _ALPHA_CACHE[bits]


def _as_act(act: ActConfig | dict[str, Any] | None) -> ActConfig:
    if act is None:
        return ActConfig()
    if isinstance(act, ActConfig):
        return act
    if isinstance(act, dict):
        kw = dict(act)
        params = kw.pop("estimator_params", {})
        return ActConfig(**kw, estimator_params=tuple(sorted(dict(params).items())))
    raise StelabTypeError(f"act must be an ActConfig, a dict or None, got {type(act).__name__}")


def _bn(channels: int, dim: int = 2) -> nn.Module:
    """Batch norm without scale and shift ([Y19])."""
    return (nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d)(channels, affine=False)


def _check_shape(in_shape: tuple[int, ...], label: str = "in_shape") -> tuple[int, int, int]:
    if len(in_shape) != 3 or any(int(s) <= 0 for s in in_shape):
        raise ConfigError(f"{label} must be (channels, height, width), got {tuple(in_shape)}")
    c, h, w = (int(s) for s in in_shape)
    if h < 8 or w < 8:
        raise ConfigError(f"{label} height and width must be >= 8, got {h}x{w}")
    return c, h, w


class LeNet5(nn.Module):
    """LeNet-5 in [Y19]'s form.

    conv5(6, pad 2) - BN - σ - pool2 - conv5(16) - BN - σ - pool2 - fc120 - BN - σ -
    fc84 - BN - σ - fc(num_classes). The second conv is unpadded when its input is
    at least 10 pixels (the classic 28×28 → 16×5×5 layout), padded otherwise
    (8×8 digits → 16×2×2).
    """

    def __init__(
        self,
        num_classes: int = 10,
        in_shape: tuple[int, int, int] = (1, 28, 28),
        act: ActConfig | dict[str, Any] | None = None,
    ):
        super().__init__()
        c, h, w = _check_shape(in_shape)
        a = _as_act(act)
        pad2 = 0 if min(h, w) // 2 >= 10 else 2
        h2, w2 = (h // 2 + 2 * pad2 - 4) // 2, (w // 2 + 2 * pad2 - 4) // 2
        self.features = nn.Sequential(
            nn.Conv2d(c, 6, 5, padding=2), _bn(6), a.make(), nn.MaxPool2d(2),
            nn.Conv2d(6, 16, 5, padding=pad2), _bn(16), a.make(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(16 * h2 * w2, 120), _bn(120, 1), a.make(),
            nn.Linear(120, 84), _bn(84, 1), a.make(),
            nn.Linear(84, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


_VGG11 = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """VGG-11 (CIFAR variant) in [Y19]'s form: conv3(pad 1) - BN - σ blocks with
    max-pools (ceil mode, so small inputs reach 1×1), then fc(num_classes)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_shape: tuple[int, int, int] = (3, 32, 32),
        act: ActConfig | dict[str, Any] | None = None,
        width: float = 1.0,
    ):
        super().__init__()
        c, _, _ = _check_shape(in_shape)
        a = _as_act(act)
        layers: list[nn.Module] = []
        for v in _VGG11:
            if v == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                out = max(1, int(v * width))
                layers += [nn.Conv2d(c, out, 3, padding=1), _bn(out), a.make()]
                c = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, a: ActConfig):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = _bn(cout)
        self.act1 = a.make()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = _bn(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))
        self.act2 = a.make()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.act2(y + self.shortcut(x))


class ResNet20(nn.Module):
    """ResNet-20 (CIFAR variant, He et al. 2016) in [Y19]'s form: 3 stages of 3
    basic blocks (16, 32, 64 channels), projection shortcuts, BN without affine
    before every σ, global average pool, fc(num_classes)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_shape: tuple[int, int, int] = (3, 32, 32),
        act: ActConfig | dict[str, Any] | None = None,
        width: int = 16,
    ):
        super().__init__()
        c, _, _ = _check_shape(in_shape)
        a = _as_act(act)
        w = check_int("width", width, 1, 1024)
        self.stem = nn.Sequential(nn.Conv2d(c, w, 3, 1, 1, bias=False), _bn(w), a.make())
        blocks = []
        cin = w
        for i, cout in enumerate((w, 2 * w, 4 * w)):
            for j in range(3):
                blocks.append(_Block(cin, cout, 2 if (i > 0 and j == 0) else 1, a))
                cin = cout
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.layers(self.stem(x))).flatten(1))


class ConvNet(nn.Module):
    """Small conv net for [S24]: conv3(32, pad 1) - σ - pool2 - conv3(64, pad 1) - σ -
    pool2 - fc256 - σ - fc(num_classes); σ = ReLU unless ``act`` quantizes it.
    Weight quantization comes from the ``weights`` spec of :func:`build`."""

    def __init__(
        self,
        num_classes: int = 10,
        in_shape: tuple[int, int, int] = (1, 28, 28),
        act: ActConfig | dict[str, Any] | None = None,
    ):
        super().__init__()
        c, h, w = _check_shape(in_shape)
        a = _as_act(act)
        self.features = nn.Sequential(
            nn.Conv2d(c, 32, 3, padding=1), a.make(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), a.make(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * (h // 4) * (w // 4), 256), a.make(),
            nn.Linear(256, num_classes),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


#: the model zoo: name -> constructor ``(num_classes, in_shape, act, **options)``
MODELS: Registry[Callable[..., nn.Module]] = Registry("model", identifiers=False)
for _name, _ctor in (
    ("lenet5", LeNet5),
    ("vgg11", VGG11),
    ("resnet20", ResNet20),
    ("convnet", ConvNet),
):
    MODELS.add(_name, _ctor)


def names() -> list[str]:
    """Names of the zoo models."""
    return MODELS.names()


def register(name: str, ctor: Callable[..., nn.Module]) -> None:
    """Add (or replace) a model constructor in the zoo (used by :mod:`stelab.sbn`)."""
    MODELS.add(name, ctor, overwrite=True)


def options(name: str) -> tuple[str, ...]:
    """The keyword parameters of the zoo model ``name``'s constructor (e.g. ``width``)."""
    return MODELS.params(name)


def build(
    name: str,
    *,
    num_classes: int = 10,
    in_shape: tuple[int, int, int] = (1, 28, 28),
    act: ActConfig | dict[str, Any] | None = None,
    weights: QuantSpec = None,
    skip: tuple[str, ...] = (),
    overrides: dict[str, Any] | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a zoo model; ``weights``/``skip``/``overrides`` quantize its weights
    as in :func:`stelab.quantize` (activations come from ``act``)."""
    ctor = MODELS.get(name)
    num_classes = check_int("num_classes", num_classes, 1, 2**31 - 1)
    model = ctor(num_classes=num_classes, in_shape=tuple(in_shape), act=act, **kwargs)
    if weights is not None or overrides:
        model = quantize(model, weights=weights, skip=skip, overrides=overrides, inplace=True)
    return model


def _physical_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # not POSIX (Windows): no limit known
        return None


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def check_fits(
    name: str,
    *,
    num_classes: int = 10,
    in_shape: tuple[int, int, int] = (1, 28, 28),
    budget: int | None = None,
    labels: tuple[str, str] = ("in_shape", "num_classes"),
    **kwargs: Any,
) -> int:
    """An upper bound on the bytes a float-32 zoo model needs for one input of
    ``in_shape``, or a ConfigError when it exceeds ``budget`` (default: this
    machine's physical memory).

    need = 4 bytes · (2·P + 3·A), with P the parameter count (weights plus a
    quantized copy) and A the largest tensor of the forward pass (an activation,
    its quantized copy and the next layer's output). The model is built on
    PyTorch's ``meta`` device, which allocates nothing, so a shape of terabytes
    is refused without trying. A is first bounded by (widest conv) · (H+4)(W+4);
    only when that bound is over budget is the forward pass traced on ``meta``
    (slower: ~2 s the first time) for the exact A.
    ``labels`` name ``in_shape`` and ``num_classes`` in the message (e.g. CLI options).
    """
    ctor = MODELS.get(name)
    num_classes = check_int(labels[1], num_classes, 1, 2**31 - 1)
    c, h, w = _check_shape(in_shape, labels[0])
    if budget is None:
        budget = _physical_memory()
    limit = budget if budget is not None else 2**62
    where = f"model {name!r} with {labels[0]} {(c, h, w)} and {labels[1]} {num_classes}"
    have = (
        f"more than the {_fmt_bytes(budget)} of memory this machine has"
        if budget is not None
        else "too much"
    )
    hint = f"; use a smaller {labels[0]} or {labels[1]}"
    if 12 * c * h * w > limit:  # the input alone, before building anything
        raise ConfigError(f"{where} needs over {_fmt_bytes(12 * c * h * w)}, {have}{hint}")
    with torch.device("meta"):
        model = ctor(num_classes=num_classes, in_shape=(c, h, w), act=None, **kwargs)
    params = sum(p.numel() for p in model.parameters())
    if 8 * params > limit:
        raise ConfigError(f"{where} needs over {_fmt_bytes(8 * params)}, {have}{hint}")
    widest = max([c] + [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)])
    need = 8 * params + 12 * widest * (h + 4) * (w + 4)
    if need <= limit:
        return need
    largest = c * h * w

    def hook(mod: nn.Module, inp: Any, out: Any) -> None:
        nonlocal largest
        if isinstance(out, torch.Tensor):
            largest = max(largest, out.numel())

    hooks = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model.eval()(torch.empty((1, c, h, w), device="meta"))
    finally:
        for hk in hooks:
            hk.remove()
    need = 8 * params + 12 * largest
    if need > limit:
        raise ConfigError(f"{where} needs about {_fmt_bytes(need)}, {have}{hint}")
    return need


def transfer_weights(src: nn.Module, dst: nn.Module) -> None:
    """Copy every parameter and buffer of ``src`` into ``dst`` (e.g. a trained
    full-precision model into its quantized twin), leaving ``dst``'s quantizer
    steps alone. Anything else that does not match is an error naming the keys."""
    state = src.state_dict()
    target = dst.state_dict()
    missing = [k for k in target if k not in state and not k.endswith("step")]
    extra = [k for k in state if k not in target]
    wrong = [k for k in state if k in target and state[k].shape != target[k].shape]
    if missing or extra or wrong:
        raise ConfigError(
            f"models do not match: missing {missing[:5]}, unexpected {extra[:5]}, "
            f"shape mismatch {wrong[:5]}"
        )
    dst.load_state_dict(state, strict=False)
