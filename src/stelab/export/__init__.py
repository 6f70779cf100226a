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

The package: :mod:`~stelab.export.ops` (the custom ops and their ONNX translations),
:mod:`~stelab.export.graph` (the export-time model, :func:`export`) and
:mod:`~stelab.export.run` (:func:`run_onnx`, :func:`count_ops`, :func:`exported_size`).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

from .graph import export, export_module, to_onnx  # noqa: F401  (module API)
from .ops import OPSET, ExportDependencyError, require  # noqa: F401  (module API)
from .run import ExportSize, count_ops, exported_size, run_onnx

__all__ = [
    "OPSET",
    "ExportDependencyError",
    "ExportSize",
    "export",
    "exported_size",
    "count_ops",
    "run_onnx",
]


# ``stelab.export(model, example_input, path)`` calls :func:`export` while
# ``stelab.export.exported_size`` etc. stay reachable: the module is callable.
class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> Path:
        return export(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
