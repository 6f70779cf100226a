"""Quantized layers, one-line model conversion and a per-layer summary.

* :class:`QuantLinear` / :class:`QuantConv2d`: ``nn.Linear`` / ``nn.Conv2d`` whose
  weight (and optionally input) pass through a :class:`~stelab.quantizers.Quantizer`.
  The latent weights stay float; the quantizer's estimator decides their gradient.
* :class:`~stelab.quantizers.QuantAct`: an activation quantizer as a module.
* :func:`quantize`: convert a plain torch model in place or as a copy,
  keeping its weights, with per-layer overrides by module-name pattern.
* :func:`summary`: a table per layer with bits, estimator, memory at deployed
  precision and MACs, like Larq's ``lq.models.summary`` plus the estimator column.
"""

from __future__ import annotations

import copy
import fnmatch
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import estimators as _est
from .errors import ConfigError, StelabTypeError, StelabWarning, check_int, closest
from .quantizers import QUANTIZER_PARAMS, QuantAct, Quantizer
from .specs import QUANT_SPEC_HELP, quant_spec

__all__ = [
    "QuantLinear",
    "QuantConv2d",
    "QuantAct",
    "quantize",
    "summary",
    "Summary",
    "unconvertible",
]


class _QuantWeightMixin:
    weight_quantizer: Quantizer | None
    input_quantizer: Quantizer | None

    def _init_quantizers(self, weight_quantizer: Any, input_quantizer: Any) -> None:
        self.weight_quantizer = _check_quantizer("weight_quantizer", weight_quantizer)
        self.input_quantizer = _check_quantizer("input_quantizer", input_quantizer)

    def quantized_weight(self) -> Tensor:
        """The weight as used in forward (quantized when a weight quantizer is set)."""
        w = self.weight  # type: ignore[attr-defined]
        return w if self.weight_quantizer is None else self.weight_quantizer(w)

    def _quant_input(self, x: Tensor) -> Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    @classmethod
    def from_float(
        cls,
        m: nn.Module,
        weight_quantizer: Quantizer | None = None,
        input_quantizer: Quantizer | None = None,
    ):
        """A quantized layer that *shares* the float layer ``m``'s parameters
        (so optimizers holding them keep working) and keeps its settings."""
        base = cls.__mro__[2]  # nn.Linear or nn.Conv2d
        if type(m) is not base:
            raise StelabTypeError(f"{cls.__name__}.from_float needs a {base.__name__}, got {m!r}")
        new = copy.copy(m)  # shallow: same Parameter objects, own attribute dict
        new.__class__ = cls
        new._parameters = dict(m._parameters)
        new._buffers = dict(m._buffers)
        new._modules = dict(m._modules)
        new._init_quantizers(weight_quantizer, input_quantizer)
        return new


def _check_quantizer(name: str, q: Any) -> Quantizer | None:
    if q is None or isinstance(q, Quantizer):
        return q
    raise StelabTypeError(f"{name} must be a stelab Quantizer or None, got {type(q).__name__}")


class QuantLinear(_QuantWeightMixin, nn.Linear):
    """``nn.Linear`` with quantized weight and optional quantized input.

    y = q_in(x) · q_w(W)ᵀ + b. The bias stays float. Example::

        QuantLinear(256, 10, weight_quantizer=Quantizer("sign", "approx_sign"))
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_quantizer: Quantizer | None = None,
        input_quantizer: Quantizer | None = None,
        device: Any = None,
        dtype: Any = None,
    ):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._init_quantizers(weight_quantizer, input_quantizer)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self._quant_input(x), self.quantized_weight(), self.bias)


class QuantConv2d(_QuantWeightMixin, nn.Conv2d):
    """``nn.Conv2d`` with quantized weight and optional quantized input.

    Same arguments as ``nn.Conv2d`` plus ``weight_quantizer`` and ``input_quantizer``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        *,
        weight_quantizer: Quantizer | None = None,
        input_quantizer: Quantizer | None = None,
        device: Any = None,
        dtype: Any = None,
    ):
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
            padding_mode,
            device=device,
            dtype=dtype,
        )
        self._init_quantizers(weight_quantizer, input_quantizer)

    def forward(self, x: Tensor) -> Tensor:
        return self._conv_forward(self._quant_input(x), self.quantized_weight(), self.bias)


# ---------------------------------------------------------------------------
# quantize(): convert a plain model
# ---------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------
# summary()
# ---------------------------------------------------------------------------


@dataclass
class LayerRow:
    name: str
    type: str
    output_shape: tuple[int, ...]
    weight_bits: int | None
    act_bits: int | None
    estimator: str
    params: int
    memory_bytes: float
    macs: int
    #: what quantize() cannot convert here and leaves float: "weights" or
    #: "activation" (see :func:`unconvertible`) and activations called as
    #: functions in forward, e.g. "F.relu x2"; "" when nothing
    not_convertible: str = ""


@dataclass
class Summary:
    """Per-layer table and totals; ``str(summary)`` renders it as text."""

    rows: list[LayerRow] = field(default_factory=list)
    total_params: int = 0
    trainable_params: int = 0
    quantized_params: int = 0
    float32_bytes: float = 0.0
    deployed_bytes: float = 0.0
    total_macs: int = 0

    @property
    def compression(self) -> float:
        return self.float32_bytes / self.deployed_bytes if self.deployed_bytes else 1.0

    def __str__(self) -> str:
        head = ["Layer", "Type", "Output shape", "W bits", "A bits", "Estimator", "Params",
                "Memory", "MACs", "Not convertible"]  # fmt: skip
        body = [
            [
                r.name or "<model>",
                r.type,
                "x".join(map(str, r.output_shape)),
                "-" if r.weight_bits is None else str(r.weight_bits),
                "-" if r.act_bits is None else str(r.act_bits),
                r.estimator or "-",
                f"{r.params:,}",
                _fmt_bytes(r.memory_bytes),
                f"{r.macs:,}",
                r.not_convertible,
            ]
            for r in self.rows
        ]
        flagged = [r for r in self.rows if r.not_convertible]
        if not flagged:  # the column only when there is something to say
            head, body = head[:-1], [b[:-1] for b in body]
        widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
                  for i, h in enumerate(head)]  # fmt: skip
        right = {6, 7, 8}

        def line(cells: list[str]) -> str:
            return "  ".join(
                c.rjust(w) if i in right else c.ljust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        sep = "-" * len(line(head))
        out = [line(head), sep, *map(line, body), sep]
        out += [
            f"Total params: {self.total_params:,} (trainable {self.trainable_params:,}, "
            f"quantized {self.quantized_params:,})",
            f"Total MACs: {self.total_macs:,}",
            f"Float-32 size: {_fmt_bytes(self.float32_bytes)}   Deployed size: "
            f"{_fmt_bytes(self.deployed_bytes)}   Compression: {self.compression:.2f}x",
        ]
        if flagged:
            out.append(
                f"Not convertible by quantize() (stay float): {len(flagged)} layers "
                f"({', '.join(r.name or '<model>' for r in flagged)})"
            )
        if any(r.estimator.endswith(_DEFAULT_MARK) for r in self.rows):
            out.append(
                f"{_DEFAULT_MARK.strip()}: the quantizer's default estimator "
                "(stelab.estimators.DEFAULTS; `stelab estimators` says why)"
            )
        return "\n".join(out)


def _fmt_bytes(b: float) -> str:
    if b < 1024:
        return f"{b:.0f} B" if b == int(b) else f"{b:.1f} B"
    if b < 1024**2:
        return f"{b / 1024:.2f} KiB"
    return f"{b / 1024**2:.2f} MiB"


_DEFAULT_MARK = " (default)"


def _est_label(q: Quantizer) -> str:
    """The estimator of ``q`` for the summary, marked when it is fn's default."""
    return repr(q.estimator) + (_DEFAULT_MARK if getattr(q, "default_estimator", False) else "")


def _functional_activations() -> dict[Any, str]:
    """Activation functions a forward may call directly, with their display names."""
    out: dict[Any, str] = {}
    for f in ("relu", "relu_", "relu6", "hardtanh", "hardtanh_", "leaky_relu", "leaky_relu_",
              "gelu", "silu", "mish", "elu", "selu", "celu", "hardswish", "hardsigmoid",
              "softplus", "tanh", "sigmoid", "logsigmoid"):  # fmt: skip
        if hasattr(F, f):
            out[getattr(F, f)] = f"F.{f}"
    for f in ("relu", "relu_", "tanh", "tanh_", "sigmoid", "sigmoid_"):
        if hasattr(torch, f):
            out.setdefault(getattr(torch, f), f"torch.{f}")
        if hasattr(Tensor, f):
            out.setdefault(getattr(Tensor, f), f"Tensor.{f}")
    return out


def _is_leaf(m: nn.Module) -> bool:
    return isinstance(m, (QuantLinear, QuantConv2d, Quantizer)) or not any(m.children())


def summary(
    model: nn.Module,
    input_size: Iterable[int],
    *,
    dtype: torch.dtype = torch.float32,
    device: Any = None,
    print_fn: Callable[[str], Any] | None = None,
) -> Summary:
    """Per-layer summary of ``model`` for one input of shape ``input_size`` (no batch dim).

    Columns: type, output shape, weight bits, activation bits (of the layer's input
    quantizer or of a standalone quantizer), estimator (marked "(default)" when the
    quantizer was given none and uses its forward function's default), parameter
    count, memory of the parameters at deployed precision (quantized weights at
    their bits, all else 32-bit float), and multiply-accumulates per sample
    (Linear: in·out; Conv2d: H_out·W_out·C_out·(C_in/groups)·k_h·k_w). Totals with
    the float-32 size and the compression ratio. Pass ``print_fn=print`` to print it.

    A "Not convertible" column (shown when not empty) names what :func:`quantize`
    cannot convert and leaves float: layers with weights it does not handle
    (Conv1d, LSTM, ...: "weights"), activation modules it does not handle (GELU,
    ...: "activation"), and activations a module's ``forward`` calls as functions
    (``F.relu``, ``torch.tanh``, ...), found while running the input; a module
    calling them gets a row of its own even if it is not a leaf.
    """
    if not isinstance(model, nn.Module):
        raise StelabTypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    try:
        shape = tuple(int(s) for s in input_size)
    except (TypeError, ValueError):
        raise ConfigError(f"input_size must be a sequence of ints, got {input_size!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise ConfigError(f"input_size must be positive sizes without the batch dim, got {shape}")
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else "cpu"

    from collections import Counter

    from torch.overrides import TorchFunctionMode

    outputs: dict[str, tuple[int, ...]] = {}
    modules = list(model.named_modules())
    nested = {
        id(q)
        for _, m in modules
        if isinstance(m, (QuantLinear, QuantConv2d))
        for q in (m.weight_quantizer, m.input_quantizer)
        if q is not None
    }
    modules = [(n, m) for n, m in modules if id(m) not in nested]
    # activations called as functions, counted per calling module (the innermost
    # module running); those inside activation modules and quantizers are theirs
    calls: dict[str, Counter[str]] = {}
    stack: list[tuple[str, nn.Module]] = []
    watched = _functional_activations()

    class _Spy(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
            label = watched.get(func)
            if label is not None and stack:
                n, mod = stack[-1]
                own = type(mod).__module__ == "torch.nn.modules.activation"
                if not own and not isinstance(mod, Quantizer):
                    calls.setdefault(n, Counter())[label] += 1
            return func(*args, **(kwargs or {}))

    hooks = []
    for n, m in modules:

        def pre(mod: nn.Module, inp: Any, n: str = n) -> None:
            stack.append((n, mod))

        def hook(mod: nn.Module, inp: Any, out: Any, n: str = n) -> None:
            if stack:
                stack.pop()
            if isinstance(out, Tensor):
                outputs[n] = tuple(out.shape[1:])

        hooks.append(m.register_forward_pre_hook(pre))
        hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _Spy():
            model(torch.zeros((1, *shape), dtype=dtype, device=device))
    except Exception as e:
        raise ConfigError(f"model does not accept input_size {shape}: {e}") from None
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)

    def flag(n: str, m: nn.Module) -> str:
        parts = [unconvertible(m) or ""]
        parts += [f"{f} x{c}" if c > 1 else f for f, c in calls.get(n, Counter()).items()]
        return ", ".join(p for p in parts if p)

    # leaves (the model itself when it is one), and any module calling activations
    # as functions or owning weights quantize() cannot convert
    leaves = [(n, m) for n, m in modules if _is_leaf(m) or flag(n, m)]

    s = Summary()
    seen: set[int] = set()
    for n, m in leaves:
        mine = m.parameters(recurse=_is_leaf(m))  # a flagged non-leaf: its own only
        own = [p for p in mine if id(p) not in seen]
        seen.update(id(p) for p in own)
        nparams = sum(p.numel() for p in own)
        wq = getattr(m, "weight_quantizer", None)
        iq = getattr(m, "input_quantizer", None)
        est = ""
        wbits = abits = None
        mem = 0.0
        for p in own:
            bits = 32
            if wq is not None and p is m.weight and wq.bits is not None:
                bits = wq.bits
                s.quantized_params += p.numel()
            mem += p.numel() * bits / 8
        if wq is not None:
            wbits, est = wq.bits, _est_label(wq)
        if isinstance(m, Quantizer):
            abits, est = m.bits, _est_label(m)
        elif iq is not None:
            abits = iq.bits
            est = f"{est}; in: {_est_label(iq)}" if est else _est_label(iq)
        out = outputs.get(n, ())
        macs = 0
        if isinstance(m, nn.Linear):
            macs = m.in_features * m.out_features
        elif isinstance(m, nn.Conv2d) and len(out) == 3:
            kh, kw = m.kernel_size
            macs = out[0] * out[1] * out[2] * (m.in_channels // m.groups) * kh * kw
        s.rows.append(
            LayerRow(n, type(m).__name__, out, wbits, abits, est, nparams, mem, macs, flag(n, m))
        )
        s.deployed_bytes += mem
        s.total_macs += macs
    allp = list(model.parameters())
    s.total_params = sum(p.numel() for p in allp)
    s.trainable_params = sum(p.numel() for p in allp if p.requires_grad)
    s.float32_bytes = 4.0 * s.total_params
    rest = [p for p in allp if id(p) not in seen]  # parameters of non-leaf modules
    s.deployed_bytes += 4.0 * sum(p.numel() for p in rest)
    if print_fn is not None:
        print_fn(str(s))
    return s
