"""stelab: gradient estimators for quantized and binary neural networks."""

__version__ = "0.1.0"
