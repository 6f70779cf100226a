"""The quantized layers :class:`QuantLinear` and :class:`QuantConv2d`."""

from __future__ import annotations

import copy
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import StelabTypeError
from ..quantizers import Quantizer


class _QuantWeightMixin:
    weight_quantizer: Quantizer | None
    input_quantizer: Quantizer | None

    def _init_quantizers(self, weight_quantizer: Any, input_quantizer: Any) -> None:
        self.weight_quantizer = _check_quantizer("weight_quantizer", weight_quantizer)
        self.input_quantizer = _check_quantizer("input_quantizer", input_quantizer)

    def quantized_weight(self) -> Tensor:
        """The weight as used in forward (quantized when a weight quantizer is set)."""
        w = self.weight  # type: ignore[attr-defined]
        return w if self.weight_quantizer is None else self.weight_quantizer(w)

    def _quant_input(self, x: Tensor) -> Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    @classmethod
    def from_float(
        cls,
        m: nn.Module,
        weight_quantizer: Quantizer | None = None,
        input_quantizer: Quantizer | None = None,
    ):
        """A quantized layer that *shares* the float layer ``m``'s parameters
        (so optimizers holding them keep working) and keeps its settings."""
        base = cls.__mro__[2]  # nn.Linear or nn.Conv2d
        if type(m) is not base:
            raise StelabTypeError(f"{cls.__name__}.from_float needs a {base.__name__}, got {m!r}")
        new = copy.copy(m)  # shallow: same Parameter objects, own attribute dict
        new.__class__ = cls
        new._parameters = dict(m._parameters)
        new._buffers = dict(m._buffers)
        new._modules = dict(m._modules)
        new._init_quantizers(weight_quantizer, input_quantizer)
        return new


def _check_quantizer(name: str, q: Any) -> Quantizer | None:
    if q is None or isinstance(q, Quantizer):
        return q
    raise StelabTypeError(f"{name} must be a stelab Quantizer or None, got {type(q).__name__}")


class QuantLinear(_QuantWeightMixin, nn.Linear):
    """``nn.Linear`` with quantized weight and optional quantized input.

    y = q_in(x) · q_w(W)ᵀ + b. The bias stays float. Example::

        QuantLinear(256, 10, weight_quantizer=Quantizer("sign", "approx_sign"))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_quantizer: Quantizer | None = None,
        input_quantizer: Quantizer | None = None,
        device: Any = None,
        dtype: Any = None,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_quantizers(weight_quantizer, input_quantizer)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self._quant_input(x), self.quantized_weight(), self.bias)


class QuantConv2d(_QuantWeightMixin, nn.Conv2d):
    """``nn.Conv2d`` with quantized weight and optional quantized input.

    Same arguments as ``nn.Conv2d`` plus ``weight_quantizer`` and ``input_quantizer``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        weight_quantizer: Quantizer | None = None,
        input_quantizer: Quantizer | None = None,
        device: Any = None,
        dtype: Any = None,
    ):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        self._init_quantizers(weight_quantizer, input_quantizer)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self._quant_input(x), self.quantized_weight(), self.bias)
