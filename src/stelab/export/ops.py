"""The optional dependencies (:func:`require`) and the custom ops: eager kernels with
the ONNX operators' semantics (``stelab::quantize_linear`` ...) and their ONNX
translations (see :mod:`stelab.export`)."""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import StelabError

OPSET = 21
_INSTALL = "pip install stelab[export]"


class ExportDependencyError(StelabError, ImportError):
    """onnx / onnxscript / onnxruntime is not installed."""


def require(*modules: str) -> list[types.ModuleType]:
    import importlib

    out = []
    for name in modules:
        try:
            out.append(importlib.import_module(name))
        except ImportError:
            raise ExportDependencyError(
                f"ONNX export needs the {name!r} package, which is not installed: {_INSTALL}"
            ) from None
    return out


# ---------------------------------------------------------------------------
# Custom ops: eager kernels with the ONNX operators' semantics
# ---------------------------------------------------------------------------


def _bcast(scale: Tensor, ndim: int, axis: int) -> Tensor:
    """A 1-D per-axis scale reshaped to broadcast along ``axis`` of an ``ndim`` tensor."""
    if scale.dim() == 0:
        return scale
    shape = [1] * ndim
    shape[axis] = scale.numel()
    return scale.reshape(shape)


@torch.library.custom_op("stelab::quantize_linear", mutates_args=())
def _quantize_linear(x: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    """ONNX QuantizeLinear: saturate(round_half_even(x / scale) + zero_point)."""
    info = torch.iinfo(zero_point.dtype)
    u = torch.round(x / _bcast(scale, x.dim(), axis)) + zero_point.to(x.dtype)
    return u.clamp(info.min, info.max).to(zero_point.dtype)


@_quantize_linear.register_fake
def _(x, scale, zero_point, axis):
    return torch.empty(x.shape, dtype=zero_point.dtype, device=x.device)


@torch.library.custom_op("stelab::dequantize_linear", mutates_args=())
def _dequantize_linear(q: Tensor, scale: Tensor, zero_point: Tensor, axis: int) -> Tensor:
    """ONNX DequantizeLinear: (q - zero_point) · scale."""
    diff = q.to(scale.dtype) - zero_point.to(scale.dtype)
    return diff * _bcast(scale, q.dim(), axis)


@_dequantize_linear.register_fake
def _(q, scale, zero_point, axis):
    return torch.empty(q.shape, dtype=scale.dtype, device=q.device)


@torch.library.custom_op("stelab::clip_int", mutates_args=())
def _clip_int(q: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """ONNX Clip in the integer domain: clamp(q, lo, hi) (0-d bounds of q's type)."""
    return torch.clamp(q, lo, hi)


@_clip_int.register_fake
def _(q, lo, hi):
    return torch.empty_like(q)


@torch.library.custom_op("stelab::sign", mutates_args=())
def _sign(x: Tensor) -> Tensor:
    """+1 if x >= 0 else -1."""
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)


@_sign.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("stelab::heaviside", mutates_args=())
def _heaviside(x: Tensor) -> Tensor:
    """1{x > 0}."""
    return (x > 0).to(x.dtype)


@_heaviside.register_fake
def _(x):
    return torch.empty_like(x)


@torch.library.custom_op("stelab::ternary", mutates_args=())
def _ternary(x: Tensor, threshold: float) -> Tensor:
    """sign(x)·1{|x| > t}."""
    return torch.sign(F.hardshrink(x, threshold))


@_ternary.register_fake
def _(x, threshold):
    return torch.empty_like(x)


def translation_table() -> dict[Any, Any]:
    """The ONNX translation of each custom op (onnxscript, imported here)."""
    from onnxscript import opset21 as op

    def quantize_linear(x, scale, zero_point, axis: int):
        return op.QuantizeLinear(x, scale, zero_point, axis=axis)

    def dequantize_linear(q, scale, zero_point, axis: int):
        return op.DequantizeLinear(q, scale, zero_point, axis=axis)

    def clip_int(q, lo, hi):
        return op.Clip(q, lo, hi)

    def sign(x):
        zero = op.CastLike(op.Constant(value_float=0.0), x)
        one = op.CastLike(op.Constant(value_float=1.0), x)
        minus_one = op.CastLike(op.Constant(value_float=-1.0), x)
        return op.Where(op.GreaterOrEqual(x, zero), one, minus_one)

    def heaviside(x):
        zero = op.CastLike(op.Constant(value_float=0.0), x)
        return op.CastLike(op.Greater(x, zero), x)

    def ternary(x, threshold: float):
        return op.Sign(op.Shrink(x, lambd=threshold, bias=0.0))

    ops = torch.ops.stelab
    return {
        ops.quantize_linear.default: quantize_linear,
        ops.dequantize_linear.default: dequantize_linear,
        ops.clip_int.default: clip_int,
        ops.sign.default: sign,
        ops.heaviside.default: heaviside,
        ops.ternary.default: ternary,
    }
