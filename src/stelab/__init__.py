"""stelab: gradient estimators for quantized and binary neural networks.

The public API, re-exported from the core modules (which import torch only)::

    import stelab
    q = stelab.Quantizer("sign", "approx_sign")
    model = stelab.quantize(torch_model, weights="sign:ste", activations={...})
    stelab.summary(model, (1, 28, 28), print_fn=print)

Heavier parts are imported on demand: ``stelab.models``, ``stelab.data``,
``stelab.sbn``, ``stelab.theory``, ``stelab.disguise``, ``stelab.analysis``.
"""

from . import estimators
from .errors import ConfigError, DataError, StelabError, StelabTypeError
from .estimators import Estimator, custom
from .estimators import get as estimator
from .estimators import names as estimator_names
from .estimators import register as register_estimator
from .nn import QuantConv2d, QuantLinear, quantize, summary
from .quantizers import QuantAct, Quantizer, halfnormal_alpha

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DataError",
    "Estimator",
    "QuantAct",
    "QuantConv2d",
    "QuantLinear",
    "Quantizer",
    "StelabError",
    "StelabTypeError",
    "custom",
    "estimator",
    "estimator_names",
    "estimators",
    "halfnormal_alpha",
    "quantize",
    "register_estimator",
    "summary",
    "__version__",
]
