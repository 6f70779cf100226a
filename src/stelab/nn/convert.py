"""quantize(): convert a plain torch model, keeping its weights, with per-layer
overrides by module-name pattern; :func:`unconvertible` says what it leaves float."""

from __future__ import annotations

import copy
import fnmatch
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .. import estimators as _est
from ..errors import ConfigError, StelabTypeError, StelabWarning, check_int, closest
from ..quantizers import QUANTIZER_PARAMS, QuantAct, Quantizer
from ..specs import QUANT_SPEC_HELP, quant_spec
from .layers import QuantConv2d, QuantLinear

QuantSpec = None | str | Mapping[str, Any] | Quantizer | Callable[[str, nn.Module], Any]

_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Tanh, nn.LeakyReLU)
# modules of torch.nn.modules.activation that are not elementwise activations
_NOT_ACTIVATIONS = (nn.Softmax, nn.Softmin, nn.LogSoftmax, nn.Softmax2d, nn.MultiheadAttention)
_CONVERTS = "nn.Linear, nn.Conv2d and the activations ReLU, ReLU6, Hardtanh, Tanh, LeakyReLU"


def _role_class(role: str) -> type[Quantizer]:
    return QuantAct if role == "activations" else Quantizer


def _spec_keys(fn: Any, estimator: Any) -> list[str]:
    """The keys a dict spec may hold: fn, estimator, the Quantizer's parameters and
    those of the named estimator (or of fn's default estimator)."""
    keys = ["fn", "estimator", *QUANTIZER_PARAMS]
    if estimator is None and isinstance(fn, str) and fn in _est.DEFAULTS:
        estimator = _est.default_for(fn)
    if estimator in _est.REGISTRY:
        keys += [k for k in _est.REGISTRY.params(estimator) if k not in keys]
    return keys


def _check_spec(spec: QuantSpec, role: str) -> None:
    """Validate a spec before any layer is converted (and even if none matches):
    unknown keys, names and values raise here, naming the key and what is allowed."""
    if spec is None or isinstance(spec, Quantizer):
        return
    if isinstance(spec, (str, Mapping)):
        kw = quant_spec(spec, f"{role} spec")
        fn = kw.pop("fn")
        shown = spec if isinstance(spec, str) else dict(spec)
        allowed = _spec_keys(fn, kw.get("estimator"))
        for key in kw:
            if key not in allowed:
                hint = closest(str(key), allowed)
                raise ConfigError(
                    f"{role} spec {shown!r}: unknown key {key!r}"
                    + (f", did you mean {hint!r}?" if hint else "")
                    + f" (allowed: {', '.join(allowed)})"
                )
        if kw.get("step") == "auto":
            if role != "weights":
                raise ConfigError(
                    f"step='auto' is only for weights (it is computed from them); give "
                    f"{role} a number, got {shown!r}"
                )
            kw["step"] = 1.0  # stands in for the per-layer value while checking the rest
            _role_class(role)(fn, **kw)
            auto_step(torch.ones(1), fn, kw.get("bits"))
        else:
            _role_class(role)(fn, **kw)
        return
    if callable(spec):
        return
    raise StelabTypeError(
        f"{role} must be None, a spec string ({QUANT_SPEC_HELP}), a dict of Quantizer "
        "arguments, a "
        f"Quantizer or a function (name, module) -> Quantizer; got {spec!r} "
        f"({type(spec).__name__})"
    )


def _make_quantizer(
    spec: QuantSpec, name: str, module: nn.Module, role: str, weight: Tensor | None
) -> Quantizer | None:
    """Build one quantizer from a (checked) spec for the layer ``name``."""
    if spec is None:
        return None
    if isinstance(spec, Quantizer):
        q = copy.deepcopy(spec)
    elif isinstance(spec, (str, Mapping)):
        kw = quant_spec(spec, f"{role} spec")
        fn = kw.pop("fn")
        if kw.get("step") == "auto":
            assert weight is not None  # _check_spec allows 'auto' for weights only
            kw["step"] = auto_step(weight, fn, kw.get("bits"))
        q = _role_class(role)(fn, **kw)
    else:
        q = spec(name, module)
        if q is not None and not isinstance(q, Quantizer):
            raise StelabTypeError(
                f"{role} factory returned {type(q).__name__} for {name!r}; expected a Quantizer"
            )
    return q


def auto_step(weight: Tensor, fn: str, bits: int | None) -> float:
    """LSQ's initial step for a weight tensor: 2·mean|w| / sqrt(Qp), Qp = 2^(b-1) - 1
    (Esser et al. 2020); 1.0 for an all-zero (or empty) tensor."""
    if fn != "uniform" or bits is None:
        raise ConfigError(f"step='auto' needs fn='uniform' with bits set, got fn={fn!r}")
    qp = 2 ** (check_int("bits", bits, 2, 16) - 1) - 1
    if weight.numel() == 0:
        return 1.0
    s = 2 * weight.detach().abs().mean().item() / math.sqrt(qp)
    return s if 0 < s < math.inf else 1.0


def _match(name: str, patterns: Iterable[str]) -> str | None:
    for p in patterns:
        if fnmatch.fnmatchcase(name, p):
            return p
    return None


def unconvertible(m: nn.Module) -> str | None:
    """What :func:`quantize` would leave float in ``m``: ``"weights"`` for a module
    owning a weight matrix/kernel (a floating parameter of >= 2 dims) that is not an
    ``nn.Linear`` / ``nn.Conv2d`` (Conv1d, ConvTranspose2d, LSTM, Embedding,
    MultiheadAttention and its inner projection, ...), ``"activation"`` for an
    elementwise activation module it does not convert (GELU, SiLU, Sigmoid, ...),
    else None."""
    if isinstance(m, (QuantLinear, QuantConv2d, Quantizer)) or type(m) in (nn.Linear, nn.Conv2d):
        return None
    if any(p.is_floating_point() and p.dim() >= 2 for p in m.parameters(recurse=False)):
        return "weights"
    if (
        type(m).__module__ == "torch.nn.modules.activation"
        and not isinstance(m, _ACTIVATIONS)
        and not isinstance(m, _NOT_ACTIVATIONS)
    ):
        return "activation"
    return None


def quantize(
    model: nn.Module,
    weights: QuantSpec = None,
    activations: QuantSpec = None,
    *,
    skip: Iterable[str] = (),
    overrides: Mapping[str, Mapping[str, QuantSpec] | None] | None = None,
    inplace: bool = False,
    strict: bool = True,
) -> nn.Module:
    """Convert a plain torch model into a quantized one, keeping its weights.

    Every ``nn.Linear`` / ``nn.Conv2d`` becomes a :class:`QuantLinear` /
    :class:`QuantConv2d` with a weight quantizer built from ``weights``; every
    activation module (``nn.ReLU``, ReLU6, Hardtanh, Tanh, LeakyReLU) becomes a
    :class:`QuantAct` built from ``activations``. The model itself may be such a
    layer (``quantize(nn.Linear(4, 2), "sign")`` returns a QuantLinear). A spec is

    * ``None``: leave that part float;
    * ``"fn"``, ``"fn:estimator"`` or ``"fn:estimator:key=value..."``, e.g.
      ``"sign:approx_sign"``, ``"uniform:ste:bits=4:step=0.1"`` (without an
      estimator: fn's default, see :data:`stelab.estimators.DEFAULTS`; the grammar
      of :mod:`stelab.specs`, keys as in the dict form);
    * a dict of :class:`Quantizer` arguments, e.g.
      ``{"fn": "uniform", "bits": 4, "step": "auto", "estimator": "ste"}``
      (``step="auto"``: LSQ's 2·mean|w|/sqrt(Qp) per layer);
    * a :class:`Quantizer` (copied per layer), or a function
      ``(name, module) -> Quantizer | None``.

    Specs are checked before anything is converted. ``skip``: module-name
    patterns (fnmatch, e.g. ``"features.0"``, ``"fc*"``) left float.
    ``overrides``: ``{pattern: {"weights": spec, "activations": spec}}`` (the
    first matching pattern wins; keys absent fall back to the defaults; ``None``
    as the value skips the layer). A module used at several places stays one
    module: it is converted once and the quantized layer is shared. Parameters
    are shared with the original with ``inplace=True``; the default converts a
    deep copy.

    ``weights`` / ``activations`` given but converting no layer is a ConfigError
    (a warning with ``strict=False``). Layers quantize() cannot convert
    (:func:`unconvertible`: Conv1d, LSTM, GELU, ...) stay float with a
    :class:`~stelab.errors.StelabWarning` listing them; activations called as
    functions inside ``forward`` (``F.relu``) are never seen here, and
    :func:`summary` lists them.
    """
    if not isinstance(model, nn.Module):
        raise StelabTypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if isinstance(skip, str):
        skip = (skip,)
    if not isinstance(skip, Iterable) or not all(isinstance(p, str) for p in skip):
        raise StelabTypeError(
            f"skip must be a module-name pattern or a list of them (strings), got {skip!r}"
        )
    skip = tuple(skip)
    if overrides is not None and not isinstance(overrides, Mapping):
        raise StelabTypeError(
            f"overrides must be a dict {{pattern: {{'weights': spec, 'activations': spec}}}}, "
            f"got {type(overrides).__name__}"
        )
    overrides = dict(overrides or {})
    _check_spec(weights, "weights")
    _check_spec(activations, "activations")
    for pat, ov in overrides.items():
        if ov is None:
            continue
        if not isinstance(ov, Mapping):
            raise StelabTypeError(
                f"override {pat!r} must be a dict with 'weights'/'activations' or None, "
                f"got {type(ov).__name__}"
            )
        if not set(ov) <= {"weights", "activations"}:
            bad = sorted(set(ov) - {"weights", "activations"})
            raise ConfigError(
                f"override {pat!r} has unknown keys {bad}; allowed: 'weights', 'activations'"
            )
        for role, spec in ov.items():
            _check_spec(spec, role)
    names = {n for n, _ in model.named_modules(remove_duplicate=False)}
    for pat in [*skip, *overrides]:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise ConfigError(
                f"pattern {pat!r} matches no module; modules are: "
                f"{', '.join(sorted(n for n in names if n)[:20])}"
            )
    if not inplace:
        model = copy.deepcopy(model)

    def specs_for(name: str) -> tuple[QuantSpec, QuantSpec] | None:
        if _match(name, skip):
            return None
        pat = _match(name, overrides)
        if pat is None:
            return weights, activations
        ov = overrides[pat]
        if ov is None:
            return None
        return ov.get("weights", weights), ov.get("activations", activations)

    done: dict[int, tuple[str, Any, nn.Module | None]] = {}  # id -> (name, specs, new)
    converted = {"weights": 0, "activations": 0}
    already: list[str] = []
    left: list[tuple[str, str, str]] = []

    def visit(name: str, m: nn.Module) -> nn.Module | None:
        """The replacement of ``m`` (None: keep it), converting its children in place."""
        specs = specs_for(name)
        if id(m) in done:  # a shared module: one conversion, shared like the original
            first, first_specs, new = done[id(m)]
            if specs != first_specs:
                raise ConfigError(
                    f"module {name!r} is the same module as {first!r} but gets other "
                    "quantization specs (skip/overrides); a shared module is converted "
                    "once and stays shared: give both names the same specs"
                )
            return new
        new = None
        if isinstance(m, (QuantLinear, QuantConv2d, Quantizer)):
            already.append(name)
        elif specs is not None:
            wspec, aspec = specs
            if type(m) in (nn.Linear, nn.Conv2d) and wspec is not None:
                wq = _make_quantizer(wspec, name, m, "weights", m.weight)  # type: ignore[arg-type]
                if wq is not None:
                    cls = QuantLinear if isinstance(m, nn.Linear) else QuantConv2d
                    new = cls.from_float(m, weight_quantizer=wq)
                    converted["weights"] += 1
            elif isinstance(m, _ACTIVATIONS) and aspec is not None:
                new = _make_quantizer(aspec, name, m, "activations", None)
                if new is not None:
                    converted["activations"] += 1
            else:
                role = unconvertible(m)
                if role is not None and (wspec if role == "weights" else aspec) is not None:
                    left.append((name or "<model>", type(m).__name__, role))
        done[id(m)] = (name, specs, new)
        if new is None and not isinstance(m, (QuantLinear, QuantConv2d, Quantizer)):
            # not named_children(): it drops the second use of a shared child
            for child_name, child in list(m._modules.items()):
                if child is None:
                    continue
                rep = visit(f"{name}.{child_name}" if name else child_name, child)
                if rep is not None:
                    setattr(m, child_name, rep)
        return new

    root = visit("", model)
    if root is not None:
        model = root

    for role, spec in (("weights", weights), ("activations", activations)):
        if spec is not None and converted[role] == 0:
            kinds = (
                "nn.Linear / nn.Conv2d"
                if role == "weights"
                else ", ".join(t.__name__ for t in _ACTIVATIONS)
            )
            msg = f"{role}={spec!r} converted no layer: the model has no {kinds} module"
            msg += " that skip/overrides leave to it"
            if already:
                msg += f" ({len(already)} modules are already quantized)"
            if role == "activations":
                msg += "; activations called as functions in forward() (F.relu) cannot be converted"
            if strict:
                raise ConfigError(msg + "; pass strict=False to only warn")
            warnings.warn(msg, StelabWarning, stacklevel=2)
    if left:
        listed = ", ".join(f"{n!r} ({t}, {r})" for n, t, r in left)
        warnings.warn(
            f"quantize() left {len(left)} layers float that it cannot convert (it converts "
            f"{_CONVERTS}): {listed}",
            StelabWarning,
            stacklevel=2,
        )
    return model
