"""Inspecting an export: operator counts (:func:`count_ops`), running the file in
onnxruntime (:func:`run_onnx`) and the exported tensors' size (:func:`exported_size`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import StelabTypeError
from ..nn import QuantConv2d, QuantLinear
from .graph import weight_codes
from .ops import require


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
        codes, scale, _ = weight_codes(wq, m.weight, name or "model")
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
