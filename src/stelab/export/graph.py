"""The export-time model (every quantizer replaced by its ONNX pattern, integer weight
codes) and :func:`export` / :func:`to_onnx`, which run ``torch.onnx.export`` on it
(see :mod:`stelab.export`)."""

from __future__ import annotations

import contextlib
import copy
import inspect
import logging
import math
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, StelabError, StelabTypeError
from ..nn import QuantConv2d, QuantLinear
from ..quantizers import FORWARDS, Quantizer
from .ops import OPSET, ExportDependencyError, require, translation_table

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


def weight_codes(q: Quantizer, w: Tensor, where: str) -> tuple[Tensor, Tensor, int]:
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
        codes, scale, axis = weight_codes(q, w, where)
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
                custom_translation_table=translation_table(),
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
    from ..io import atomic_write_bytes

    return atomic_write_bytes(path, proto.SerializeToString())
