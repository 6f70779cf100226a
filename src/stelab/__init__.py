"""stelab: gradient estimators for quantized and binary neural networks.

The public API, re-exported from the core modules (which import torch only)::

    import stelab
    q = stelab.Quantizer("sign", "approx_sign")
    model = stelab.quantize(torch_model, weights="sign:ste", activations={...})
    stelab.summary(model, (1, 28, 28), print_fn=print)

Names are resolved on first use (PEP 562), so ``import stelab`` and the CLI's
``--help`` do not pay for importing torch until something needs it. Subpackages:
``stelab.models``, ``stelab.data``, ``stelab.sbn``, ``stelab.theory``,
``stelab.disguise``, ``stelab.analysis``, ``stelab.train``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (module, attribute)
_EXPORTS: dict[str, tuple[str, str]] = {
    "ConfigError": ("errors", "ConfigError"),
    "DataError": ("errors", "DataError"),
    "StelabError": ("errors", "StelabError"),
    "StelabTypeError": ("errors", "StelabTypeError"),
    "StelabWarning": ("errors", "StelabWarning"),
    "Estimator": ("estimators", "Estimator"),
    "custom": ("estimators", "custom"),
    "estimator": ("estimators", "get"),
    "estimator_names": ("estimators", "names"),
    "register_estimator": ("estimators", "register"),
    "Quantizer": ("quantizers", "Quantizer"),
    "QuantAct": ("quantizers", "QuantAct"),
    "halfnormal_alpha": ("quantizers", "halfnormal_alpha"),
    "QuantLinear": ("nn", "QuantLinear"),
    "QuantConv2d": ("nn", "QuantConv2d"),
    "quantize": ("nn", "quantize"),
    "summary": ("nn", "summary"),
}

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
    "StelabWarning",
    "__version__",
    "custom",
    "estimator",
    "estimator_names",
    "estimators",
    "export",
    "halfnormal_alpha",
    "quantize",
    "register_estimator",
    "summary",
]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        module, attr = _EXPORTS[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    if name in ("estimators", "export"):  # modules (stelab.export is also callable)
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'stelab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS, "estimators", "export"})


if TYPE_CHECKING:  # for type checkers and IDEs
    from . import estimators
    from .errors import ConfigError, DataError, StelabError, StelabTypeError, StelabWarning
    from .estimators import Estimator, custom
    from .estimators import get as estimator
    from .estimators import names as estimator_names
    from .estimators import register as register_estimator
    from .nn import QuantConv2d, QuantLinear, quantize, summary
    from .quantizers import QuantAct, Quantizer, halfnormal_alpha
