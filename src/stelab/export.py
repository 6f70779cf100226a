"""Quantized ONNX export: integer weights and QuantizeLinear/DequantizeLinear pairs.

``stelab.export(model, example_input, "model.onnx")`` writes an ONNX file (opset
21) in which every quantizer of ``model`` is an ONNX quantization pattern instead
of float ``Div/Round/Clip/Mul`` arithmetic, and every quantized weight is stored
as an integer initialiser with its scale::

    quantizer          ONNX pattern (s: the step Δ or α, float32; codes k)
    -----------------  ------------------------------------------------------------
    weight uniform/act W = DequantizeLinear(K, s, 0[, axis])      K int8 (int16 for
                       9..16 bits; int8/16/32 by range when unclipped), uint8/16 (act)
    weight sign,       W = DequantizeLinear(K, 1, 0)               K int8 in {-1, 0, 1}
    heaviside, ternary
    uniform (b bits)   y = DequantizeLinear(Clip(QuantizeLinear(x, s, z), lo+z, hi+z), s, z)
                       k = clamp(round(x/s), lo, hi), lo = -2^(b-1), hi = 2^(b-1) - 1,
                       stored as uint8 k + z, z = 128 (uint16, z = 2^15, for 9..16 bits);
                       the Clip (integer domain) only when b < 8
    act (b bits)       y = DequantizeLinear(Clip(QuantizeLinear(Ceil(x/s), 1, 0), 0, hi), s, 0)
                       k = clamp(ceil(x/s), 0, 2^b - 1) uint8 (uint16) ([Y19]'s σ_α;
                       the integer ceil(x/s) passes QuantizeLinear unchanged)
    9..15 bits         as above, but the clamp comes before QuantizeLinear, in float
                       (onnxruntime has no 16-bit Clip): Clip(x, fl(lo·s), fl(hi·s))
                       for uniform, Clip(Ceil(x/s), 0, hi) for act; equally exact
    uniform, bits=None y = Round(x/s)·s   (float: QuantizeLinear has no unclipped type)
    sign               y = Where(x >= 0, 1, -1)
    heaviside          y = CastLike(x > 0, x)
    ternary            y = Sign(Shrink(x, lambd=t))
    identity           nothing

Per-channel steps (one non-singleton axis) become 1-D scales with ``axis``;
learned (LSQ) steps export their current value. Layers without a quantizer stay
float. Batch norm, pooling and the rest go through ``torch.onnx.export``.

Why the torch.export-based exporter (``torch.onnx.export(..., dynamo=True)``) with
custom ops and a translation table: the TorchScript exporter is deprecated (slated
for removal) and stops at opset 20, which lacks int16/uint16 QuantizeLinear. Each
pattern above is a ``torch.library`` custom op (``stelab::quantize_linear`` ...)
whose eager kernel has the ONNX operator's semantics and whose translation emits
exactly that operator, so nothing is re-derived by pattern matching. The
exporter's optimiser runs (it removes shape plumbing) and keeps
QuantizeLinear/DequantizeLinear (onnxscript >= 0.6); :func:`to_onnx` checks that
every integer weight reached the file. Signed activation codes are stored as
uint8 with zero point 128 rather than int8: onnxruntime (1.32) turns an int8
pair followed by Reshape/Unsqueeze into an invalid graph at session creation.

Exactness: QuantizeLinear computes round_half_even(x/s) in float32 and
DequantizeLinear k·s in float32, the same operations as stelab's forward (whose
float64 step buffers are cast to float32 for a float32 input), so a quantizer's
output is bit-identical for the same input; the test suite checks this at bin
edges, ties and clip limits in onnxruntime. The layers between quantizers are
another matter: onnxruntime's convolutions (and its Conv+BatchNorm fusion) add
in another order than torch's, so a pre-activation within a few ulp of a jump
can land on the other side and move by one level. Trained networks rarely put
values there; a freshly initialised network with bias-free convolutions and
batch norm at mean 0 does: sums of quantized terms that cancel exactly give 0,
the first jump of [Y19]'s act, and the rounding residue (±1e-9) decides. NaN
inputs are the other exception: stelab propagates them, ONNX QuantizeLinear does
not define them.

Runtimes may do more than the graph says: onnxruntime's default session fuses
DequantizeLinear → Conv/Gemm → QuantizeLinear into integer kernels (QLinearConv)
and rounds a float bias to int32 at scale s_in·s_w, which moves outputs by whole
levels where that scale is coarse (sign weights have scale 1). Run with the session
option ``session.disable_quant_qdq=1`` (what :func:`run_onnx` does by default) for
stelab's exact semantics.

``onnx``, ``onnxscript`` and ``onnxruntime`` are optional (``pip install
stelab[export]``) and imported inside the functions that need them;
:func:`exported_size` needs none of them.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import os
import sys
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, StelabError, StelabTypeError
from .nn import QuantConv2d, QuantLinear
from .quantizers import FORWARDS, Quantizer

__all__ = [
    "OPSET",
    "ExportDependencyError",
    "ExportSize",
    "export",
    "exported_size",
    "count_ops",
    "run_onnx",
]

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


def _translation_table() -> dict[Any, Any]:
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


# ---------------------------------------------------------------------------
# Quantizer -> integer codes, scale, axis
# ---------------------------------------------------------------------------

_INT_TYPES = (torch.int8, torch.int16, torch.int32)
_UINT_TYPES = (torch.uint8, torch.uint16)


def _storage_dtype(kind: str, bits: int | None) -> torch.dtype:
    """The integer type of a ``bits``-bit code of a uniform (signed) or act (unsigned)
    quantizer."""
    if kind == "act":
        return torch.uint8 if bits <= 8 else torch.uint16
    return torch.int8 if bits <= 8 else torch.int16


def _fitting_dtype(codes: Tensor) -> torch.dtype:
    """The smallest signed type holding every code (unclipped uniform weights)."""
    lo, hi = (int(codes.min()), int(codes.max())) if codes.numel() else (0, 0)
    for dt in _INT_TYPES:
        info = torch.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return dt
    raise ConfigError(
        f"unclipped weight codes reach [{lo}, {hi}], beyond int32; set bits or a larger step"
    )


def _step_axis(step: Tensor, ndim: int, where: str) -> tuple[Tensor, int]:
    """(scale, axis) for ONNX: a 0-d scale, or a 1-D one along the single
    non-singleton axis of a per-channel step broadcast against an ``ndim`` tensor."""
    if step.numel() == 1:
        return step.detach().reshape(()).to(torch.float32), 1
    if step.dim() > ndim:
        raise ConfigError(
            f"{where}: step of shape {tuple(step.shape)} has more dims than its input"
        )
    big = [d for d, n in enumerate(step.shape) if n != 1]
    if len(big) != 1:
        raise ConfigError(
            f"{where}: step of shape {tuple(step.shape)} varies along {len(big)} axes; ONNX "
            "QuantizeLinear/DequantizeLinear take a scalar step or one per channel of one axis"
        )
    axis = big[0] + (ndim - step.dim())
    return step.detach().reshape(-1).to(torch.float32), axis


def _check_exportable(q: Quantizer, where: str) -> None:
    if q.fwd.onnx is None:
        raise ConfigError(
            f"{where}: quantizer {q.kind!r} has no ONNX pattern (its Forward class sets "
            "onnx = None); quantizers with one: "
            + ", ".join(k for k in FORWARDS.names() if FORWARDS.get(k).onnx)
        )
    if q.fwd.rounding == "stochastic":
        raise ConfigError(
            f"{where}: rounding='stochastic' cannot be exported (its forward is random); "
            "quantize with rounding='nearest' for deployment"
        )


def _weight_codes(q: Quantizer, w: Tensor, where: str) -> tuple[Tensor, Tensor, int]:
    """(integer codes, scale, axis) with DequantizeLinear(codes, scale, 0, axis) equal
    to ``q``'s forward of the weight ``w``."""
    _check_exportable(q, where)
    w = w.detach()
    fwd = q.fwd
    if fwd.onnx in ("sign", "heaviside", "ternary"):
        codes = fwd(w).to(torch.int8)
        return codes, torch.tensor(1.0), 1
    step = q.step.detach()
    u = torch.div(w, step)  # stelab's forward: the same division, then round/ceil and clamp
    u = u.ceil() if fwd.onnx == "act" else u.round()
    lo, hi = fwd.qrange
    if math.isfinite(lo):
        u = u.clamp(lo, hi)
        dtype = _storage_dtype(fwd.onnx, fwd.bits)
    else:
        dtype = _fitting_dtype(u)
    scale, axis = _step_axis(step, w.dim(), where)
    return u.to(dtype), scale, axis


# ---------------------------------------------------------------------------
# Export-time modules: the model with every quantizer replaced by its ONNX pattern
# ---------------------------------------------------------------------------


class _ExportQuant(nn.Module):
    """A quantizer as its ONNX pattern (see the module docstring)."""

    def __init__(self, q: Quantizer, where: str):
        super().__init__()
        _check_exportable(q, where)
        self.kind = q.fwd.onnx  # the ONNX pattern (see Forward.onnx)
        self.threshold = q.fwd.threshold
        self.qdq = False
        if not q.fwd.has_step:
            return
        step = q.step.detach().to(torch.float32)
        self.register_buffer("step", step)  # broadcasts against the input (Div)
        lo, hi = q.fwd.qrange
        self.qdq = math.isfinite(lo)
        if not self.qdq:
            return
        # the scale of QuantizeLinear/DequantizeLinear: 0-d, or 1-D along one axis,
        # counted from the right so that it holds for any input rank
        scale, axis = _step_axis(step, step.dim(), where)
        self.register_buffer("scale", scale if step.numel() > 1 else step)
        self.axis_from_end = axis - step.dim()
        # activation codes are unsigned: a signed (uniform) code k is stored as k + 2^7
        # (k + 2^15), i.e. with that zero point. onnxruntime (1.32) rewrites an int8
        # QuantizeLinear/DequantizeLinear pair followed by Reshape/Unsqueeze into an
        # invalid graph (its QDQ propagation); the uint8 form is what it uses itself.
        dtype = _storage_dtype("act", q.fwd.bits)
        zp = 0 if self.kind == "act" else 2 ** (torch.iinfo(dtype).bits - 1)
        info = torch.iinfo(dtype)
        self.lo, self.hi = int(lo), int(hi)
        clip = (self.lo + zp, self.hi + zp) != (info.min, info.max)
        # below 8 bits: Clip of the int8/uint8 codes. 9..15 bits: onnxruntime has no
        # 16-bit Clip, so clamp before quantizing (exact: see _float_clamp)
        self.int_clip = clip and dtype in (torch.int8, torch.uint8)
        self.float_clip = clip and not self.int_clip
        if self.int_clip:
            self.register_buffer("lo_q", torch.tensor(self.lo + zp, dtype=dtype))
            self.register_buffer("hi_q", torch.tensor(self.hi + zp, dtype=dtype))
        if self.float_clip and self.kind == "uniform":  # fl(lo·s), fl(hi·s), per channel
            self.register_buffer("lo_x", torch.tensor(float(self.lo)) * step)
            self.register_buffer("hi_x", torch.tensor(float(self.hi)) * step)
            self.bounds = (float(self.lo_x.min()), float(self.hi_x.max()))  # scalar step
        # zero points have the shape of their scale (ONNX) and the type of the codes
        if self.kind == "act":  # QuantizeLinear of the integer ceil(x/α): scale 1
            self.register_buffer("one", torch.ones((), dtype=torch.float32))
            self.register_buffer("zero_point_q", torch.zeros((), dtype=dtype))
        else:
            self.register_buffer("zero_point_q", torch.full(self.scale.shape, zp, dtype=dtype))
        self.register_buffer("zero_point_dq", torch.full(self.scale.shape, zp, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        k = self.kind
        if k == "identity":
            return x
        if k == "sign":
            return torch.ops.stelab.sign(x)
        if k == "heaviside":
            return torch.ops.stelab.heaviside(x)
        if k == "ternary":
            return torch.ops.stelab.ternary(x, self.threshold)
        if not self.qdq:  # unclipped uniform: no integer type holds every code
            return torch.round(x / self.step) * self.step
        ops = torch.ops.stelab
        axis = x.dim() + self.axis_from_end if self.scale.dim() else 1
        if k == "act":  # ceil(x/α) is an integer: QuantizeLinear with scale 1 keeps it
            u = torch.ceil(x / self.step)
            if self.float_clip:
                u = torch.clamp(u, self.lo, self.hi)
            q = ops.quantize_linear(u, self.one, self.zero_point_q, 1)
        else:
            if self.float_clip:
                x = self._float_clamp(x)
            q = ops.quantize_linear(x, self.scale, self.zero_point_q, axis)
        if self.int_clip:
            q = ops.clip_int(q, self.lo_q, self.hi_q)
        return ops.dequantize_linear(q, self.scale, self.zero_point_dq, axis)

    def _float_clamp(self, x: Tensor) -> Tensor:
        """clamp(x, fl(lo·s), fl(hi·s)): then round(x/s) lands in [lo, hi] exactly as
        clamp(round(x/s), lo, hi) does, since fl(fl(hi·s)/s) is within hi·2^-23 of hi
        (< 1/2 for |hi| < 2^15) and inside the range nothing changes."""
        if self.step.numel() == 1:
            return torch.clamp(x, *self.bounds)
        return torch.minimum(torch.maximum(x, self.lo_x), self.hi_x)


class _DQWeight(nn.Module):
    """An integer weight with its scale: forward gives DequantizeLinear(codes)."""

    def __init__(self, q: Quantizer, w: Tensor, where: str):
        super().__init__()
        codes, scale, axis = _weight_codes(q, w, where)
        self.register_buffer("codes", codes)
        self.register_buffer("scale", scale.to(torch.float32))
        self.register_buffer("zero_point", torch.zeros(scale.shape, dtype=codes.dtype))
        self.axis = axis

    def forward(self) -> Tensor:
        return torch.ops.stelab.dequantize_linear(
            self.codes, self.scale, self.zero_point, self.axis
        )


class _ExportLayer(nn.Module):
    """QuantLinear / QuantConv2d with an integer weight and exported input quantizer."""

    def __init__(self, m: QuantLinear | QuantConv2d, where: str):
        super().__init__()
        self.conv = isinstance(m, QuantConv2d)
        wq = m.weight_quantizer
        if wq is None or wq.kind == "identity":
            self.weight = m.weight
            self.dq = None
        else:
            self.dq = _DQWeight(wq, m.weight, f"{where}.weight_quantizer")
        self.bias = m.bias
        iq = m.input_quantizer
        self.input_quantizer = None if iq is None else _ExportQuant(iq, f"{where}.input_quantizer")
        if self.conv:
            self.stride, self.padding, self.dilation = m.stride, m.padding, m.dilation
            self.groups, self.padding_mode = m.groups, m.padding_mode
            self.pad = m._reversed_padding_repeated_twice

    def forward(self, x: Tensor) -> Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        w = self.weight if self.dq is None else self.dq()
        if not self.conv:
            return F.linear(x, w, self.bias)
        if self.padding_mode != "zeros":  # as nn.Conv2d._conv_forward
            x = F.pad(x, self.pad, mode=self.padding_mode)
            return F.conv2d(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _convert(m: nn.Module, where: str = "model") -> nn.Module:
    if isinstance(m, (QuantLinear, QuantConv2d)):
        return _ExportLayer(m, where)
    if isinstance(m, Quantizer):
        return _ExportQuant(m, where)
    for name, child in list(m.named_children()):
        new = _convert(child, f"{where}.{name}")
        if new is not child:
            setattr(m, name, new)
    return m


def export_module(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every stelab quantizer replaced by the
    custom ops of its ONNX pattern and every quantized weight by integer codes.

    Its eager forward equals ``model.eval()``'s (the custom ops' kernels follow the
    ONNX operators); ``model`` itself is not changed.
    """
    if not isinstance(model, nn.Module):
        raise StelabTypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    return _convert(copy.deepcopy(model).eval())


# ---------------------------------------------------------------------------
# export()
# ---------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's progress lines, deprecation notes and optional-op logs."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
                yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def _check_input(example_input: Any) -> Tensor:
    if not isinstance(example_input, Tensor):
        raise StelabTypeError(
            f"example_input must be a torch tensor (a batch), got {type(example_input).__name__}"
        )
    if example_input.dtype != torch.float32:
        raise ConfigError(
            f"example_input must be a float32 tensor (the exported scales are float32), "
            f"got dtype {example_input.dtype}"
        )
    if example_input.dim() < 1 or example_input.shape[0] < 1:
        raise ConfigError(
            f"example_input must have a batch dimension of size >= 1, got shape "
            f"{tuple(example_input.shape)}"
        )
    return example_input.detach().cpu()


def to_onnx(model: nn.Module, example_input: Tensor, *, dynamic_batch: bool = True) -> Any:
    """The quantized ONNX ``ModelProto`` of ``model`` for inputs like ``example_input``
    (the batch dimension stays free with ``dynamic_batch``). Nothing is written."""
    (onnx,) = require("onnx")
    require("onnxscript")
    if "custom_translation_table" not in inspect.signature(torch.onnx.export).parameters:
        raise ExportDependencyError(
            f"ONNX export needs torch >= 2.6 (torch.onnx.export with a custom translation "
            f"table), found torch {torch.__version__}"
        )
    x = _check_input(example_input)
    m = export_module(model).cpu()
    dyn = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    try:
        with _quiet():
            prog = torch.onnx.export(
                m,
                (x,),
                dynamo=True,
                opset_version=OPSET,
                custom_translation_table=_translation_table(),
                dynamic_shapes=dyn,
                input_names=["input"],
                output_names=["output"],
                optimize=True,
                verbose=False,
            )
    except StelabError:
        raise
    except Exception as e:
        first = " ".join(str(e).split())[:300] or type(e).__name__
        raise ConfigError(f"torch.onnx.export failed for {type(model).__name__}: {first}") from e
    proto = prog.model_proto
    for node in proto.graph.node:  # the exporter's stack traces: local paths, 2x the size
        del node.metadata_props[:]
        node.doc_string = ""
    onnx.checker.check_model(proto)
    _check_integer_weights(m, proto)
    return proto


def _check_integer_weights(m: nn.Module, proto: Any) -> None:
    """Every integer weight reached the file as an integer initialiser (an exporter
    optimiser that folds DequantizeLinear of constants would turn them back to float)."""
    want = sum(isinstance(mod, _DQWeight) for mod in m.modules())
    ints = {i.name for i in proto.graph.initializer if i.data_type not in (1, 10, 11, 16)}
    have = sum(n.op_type == "DequantizeLinear" and n.input[0] in ints for n in proto.graph.node)
    if have < want:
        raise ExportDependencyError(
            f"the ONNX exporter folded {want - have} of {want} integer weights back to float; "
            "onnxscript >= 0.6 keeps them: pip install -U onnxscript"
        )


def export(
    model: nn.Module,
    example_input: Tensor,
    path: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    dynamic_batch: bool = True,
) -> Path:
    """Write ``model`` to ``path`` as a quantized ONNX model (opset 21) and return the path.

    Quantizers become QuantizeLinear/DequantizeLinear pairs (integer weights as
    int8/uint8 initialisers with their scales), sign/heaviside/ternary small ONNX
    patterns, float layers stay float; see :mod:`stelab.export`. ``example_input``
    is one float32 batch; with ``dynamic_batch`` any batch size runs. The file is
    written atomically; an existing ``path`` is an error unless ``overwrite``.
    Needs ``pip install stelab[export]``.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"path {str(path)!r} is a directory; give a file name like model.onnx")
    if path.exists() and not overwrite:
        raise ConfigError(
            f"{str(path)!r} exists; pass overwrite=True (CLI: --overwrite) to replace it"
        )
    proto = to_onnx(model, example_input, dynamic_batch=dynamic_batch)
    from .io import atomic_write_bytes

    return atomic_write_bytes(path, proto.SerializeToString())


# ---------------------------------------------------------------------------
# Inspection: operator counts, sizes, running the file
# ---------------------------------------------------------------------------


def count_ops(onnx_model: Any) -> dict[str, int]:
    """Operator type -> number of nodes in an ONNX model (a path or a ModelProto)."""
    (onnx,) = require("onnx")
    proto = onnx.load(str(onnx_model)) if isinstance(onnx_model, (str, os.PathLike)) else onnx_model
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def run_onnx(path: str | os.PathLike[str], x: Tensor, *, fuse_qdq: bool = False) -> Tensor:
    """Run an exported file in onnxruntime (CPU provider) on ``x``; the first output.

    ``fuse_qdq=False`` (default) runs the graph as written (the session option
    ``session.disable_quant_qdq=1``), which is stelab's eval forward. With its default
    options onnxruntime fuses DequantizeLinear → Conv/Gemm → QuantizeLinear into an
    integer kernel (QLinearConv) and rounds a float bias to int32 at scale
    s_in·s_w on the way: outputs can then move by whole levels where s_in·s_w is
    coarse against the next quantizer's step (e.g. sign weights, scale 1).
    """
    (ort,) = require("onnxruntime")
    opts = ort.SessionOptions()
    if not fuse_qdq:
        opts.add_session_config_entry("session.disable_quant_qdq", "1")
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    (out, *_) = sess.run(None, {name: x.detach().cpu().numpy()})
    return torch.from_numpy(out)


@dataclass(frozen=True)
class ExportSize:
    """Bytes of a model's tensors: all float32 vs as exported (integer weights)."""

    float_bytes: int  #: every parameter and floating-point buffer at 4 bytes
    exported_bytes: int  #: the same with quantized weights as integer codes + scales
    integer_weight_bytes: int  #: the integer codes alone
    quantized_weights: int  #: weight tensors stored as integers

    @property
    def compression(self) -> float:
        return self.float_bytes / self.exported_bytes if self.exported_bytes else 1.0


def exported_size(model: nn.Module) -> ExportSize:
    """Size of the tensors :func:`export` stores for ``model``, next to the float size.

    ``float_bytes`` = 4 · (elements of every parameter and floating-point buffer:
    weights, biases, batch-norm statistics, steps). ``exported_bytes``: the same
    with each quantized weight W (and its step) replaced by its integer codes
    (n_W · itemsize: int8/uint8 up to 8 bits, int16/uint16 up to 16,
    sign/heaviside/ternary int8, unclipped weights the smallest signed type
    holding their codes), its float32 scale and its zero point. Computed from the
    quantizers, without onnx. The exported file adds a few constants: activation
    zero points and clip bounds, and the unit scale / zero shift ONNX
    BatchNormalization needs for a batch norm without affine parameters (LeNet-5:
    +2.7%, ResNet-20: +0.3%).
    """
    if not isinstance(model, nn.Module):
        raise StelabTypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    float_bytes = exported = codes_bytes = nq = 0
    seen: set[int] = set()
    for name, m in model.named_modules():
        if not isinstance(m, (QuantLinear, QuantConv2d)):
            continue
        wq = m.weight_quantizer
        if wq is None or wq.kind == "identity" or id(m.weight) in seen:
            continue
        codes, scale, _ = _weight_codes(wq, m.weight, name or "model")
        nbytes = codes.numel() * codes.element_size()
        codes_bytes += nbytes
        exported += nbytes + scale.numel() * (4 + codes.element_size())
        float_bytes += 4 * m.weight.numel()
        seen.add(id(m.weight))
        if wq.step is not None and id(wq.step) not in seen:  # becomes the scale above
            float_bytes += 4 * wq.step.numel()
            seen.add(id(wq.step))
        nq += 1
    for t in [*model.parameters(), *model.buffers()]:
        if id(t) in seen or not t.is_floating_point():
            continue
        seen.add(id(t))
        float_bytes += 4 * t.numel()
        exported += 4 * t.numel()
    return ExportSize(float_bytes, exported, codes_bytes, nq)


# ``stelab.export(model, example_input, path)`` calls :func:`export` while
# ``stelab.export.exported_size`` etc. stay reachable: the module is callable.
class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Path:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
