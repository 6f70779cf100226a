"""Quantized layers, one-line model conversion and a per-layer summary.

* :class:`QuantLinear` / :class:`QuantConv2d`: ``nn.Linear`` / ``nn.Conv2d`` whose
  weight (and optionally input) pass through a :class:`~stelab.quantizers.Quantizer`.
  The latent weights stay float; the quantizer's estimator decides their gradient.
* :class:`~stelab.quantizers.QuantAct`: an activation quantizer as a module.
* :func:`quantize`: convert a plain torch model in place or as a copy,
  keeping its weights, with per-layer overrides by module-name pattern.
* :func:`summary`: a table per layer with bits, estimator, memory at deployed
  precision and MACs, like Larq's ``lq.models.summary`` plus the estimator column.

The package: :mod:`~stelab.nn.layers`, :mod:`~stelab.nn.convert` (:func:`quantize`)
and :mod:`~stelab.nn.summarize` (:func:`summary`).
"""

from __future__ import annotations

from typing import Any

from ..quantizers import QuantAct
from .convert import QuantSpec, auto_step, quantize, unconvertible  # noqa: F401  (module API)
from .layers import QuantConv2d, QuantLinear

__all__ = [
    "QuantLinear",
    "QuantConv2d",
    "QuantAct",
    "quantize",
    "summary",
    "Summary",
    "unconvertible",
]

# Whole-model pickles (torch.save(model)) name the layers stelab.nn.QuantLinear etc.:
# keep them there, as before the module was split.
for _cls in (QuantLinear, QuantConv2d):
    _cls.__module__ = __name__
del _cls


def __getattr__(name: str) -> Any:
    """``summary``, ``Summary`` and ``LayerRow`` load on first use (the summary's module is
    not needed to quantize or train, and ``stelab.quantize`` should stay cheap)."""
    if name in ("summary", "Summary", "LayerRow"):
        from . import summarize

        return getattr(summarize, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
