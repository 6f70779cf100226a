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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import ConfigError, StelabTypeError
from .quantizers import QuantAct, Quantizer

__all__ = ["QuantLinear", "QuantConv2d", "QuantAct", "quantize", "summary", "Summary"]


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


def _make_quantizer(
    spec: QuantSpec, name: str, module: nn.Module, role: str, weight: Tensor | None
) -> Quantizer | None:
    """Build one quantizer from a spec for the layer ``name``."""
    if spec is None:
        return None
    if isinstance(spec, Quantizer):
        q = copy.deepcopy(spec)
    elif isinstance(spec, str):
        fn, _, est = spec.partition(":")
        q = (QuantAct if role == "activations" else Quantizer)(fn, est or "ste")
    elif isinstance(spec, Mapping):
        kw = dict(spec)
        fn = kw.pop("fn", None)
        if fn is None:
            raise ConfigError(f"{role} spec for {name!r} needs a 'fn' key, got {dict(spec)!r}")
        if kw.get("step") == "auto":
            if weight is None:
                raise ConfigError(
                    f"step='auto' is only for weights (it is computed from them); give "
                    f"{role} of {name!r} a number"
                )
            kw["step"] = auto_step(weight, fn, kw.get("bits"))
        q = (QuantAct if role == "activations" else Quantizer)(fn, **kw)
    elif callable(spec):
        q = spec(name, module)
        if q is not None and not isinstance(q, Quantizer):
            raise StelabTypeError(
                f"{role} factory returned {type(q).__name__} for {name!r}; expected a Quantizer"
            )
    else:
        raise StelabTypeError(
            f"{role} must be None, 'fn[:estimator]', a dict of Quantizer arguments, a "
            f"Quantizer or a function (name, module) -> Quantizer; got {type(spec).__name__}"
        )
    return q


def auto_step(weight: Tensor, fn: str, bits: int | None) -> float:
    """LSQ's initial step for a weight tensor: 2·mean|w| / sqrt(Qp) (Esser et al. 2020)."""
    if fn != "uniform" or bits is None:
        raise ConfigError(f"step='auto' needs fn='uniform' with bits set, got fn={fn!r}")
    qp = 2 ** (int(bits) - 1) - 1
    s = 2 * weight.detach().abs().mean().item() / math.sqrt(qp)
    return s if s > 0 else 1.0


def _match(name: str, patterns: Iterable[str]) -> str | None:
    for p in patterns:
        if fnmatch.fnmatchcase(name, p):
            return p
    return None


def quantize(
    model: nn.Module,
    weights: QuantSpec = None,
    activations: QuantSpec = None,
    *,
    skip: Iterable[str] = (),
    overrides: Mapping[str, Mapping[str, QuantSpec] | None] | None = None,
    inplace: bool = False,
) -> nn.Module:
    """Convert a plain torch model into a quantized one, keeping its weights.

    Every ``nn.Linear`` / ``nn.Conv2d`` becomes a :class:`QuantLinear` /
    :class:`QuantConv2d` with a weight quantizer built from ``weights``; every
    activation module (``nn.ReLU``, ReLU6, Hardtanh, Tanh, LeakyReLU) becomes a
    :class:`QuantAct` built from ``activations``. A spec is

    * ``None``: leave that part float;
    * ``"fn"`` or ``"fn:estimator"``, e.g. ``"sign:approx_sign"``;
    * a dict of :class:`Quantizer` arguments, e.g.
      ``{"fn": "uniform", "bits": 4, "step": "auto", "estimator": "ste"}``
      (``step="auto"``: LSQ's 2·mean|w|/sqrt(Qp) per layer);
    * a :class:`Quantizer` (copied per layer), or a function
      ``(name, module) -> Quantizer | None``.

    ``skip``: module-name patterns (fnmatch, e.g. ``"features.0"``, ``"fc*"``)
    left float. ``overrides``: ``{pattern: {"weights": spec, "activations": spec}}``
    (the first matching pattern wins; keys absent fall back to the defaults;
    ``None`` as the value skips the layer). Parameters are shared with the
    original unless ``inplace=False`` (the default), which converts a deep copy.
    """
    if not isinstance(model, nn.Module):
        raise StelabTypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if isinstance(skip, str):
        skip = (skip,)
    skip = tuple(skip)
    overrides = dict(overrides or {})
    for pat, ov in overrides.items():
        if ov is not None and not set(ov) <= {"weights", "activations"}:
            bad = sorted(set(ov) - {"weights", "activations"})
            raise ConfigError(
                f"override {pat!r} has unknown keys {bad}; allowed: 'weights', 'activations'"
            )
    if not inplace:
        model = copy.deepcopy(model)
    names = {n for n, _ in model.named_modules()}
    for pat in [*skip, *overrides]:
        if not any(fnmatch.fnmatchcase(n, pat) for n in names):
            raise ConfigError(
                f"pattern {pat!r} matches no module; modules are: "
                f"{', '.join(sorted(n for n in names if n)[:20])}"
            )

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

    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, (QuantLinear, QuantConv2d, Quantizer)):
                continue
            specs = specs_for(name)
            if specs is None:
                continue
            wspec, aspec = specs
            new: nn.Module | None = None
            if type(child) in (nn.Linear, nn.Conv2d) and wspec is not None:
                wq = _make_quantizer(wspec, name, child, "weights", child.weight)
                cls = QuantLinear if isinstance(child, nn.Linear) else QuantConv2d
                new = cls.from_float(child, weight_quantizer=wq)
            elif isinstance(child, _ACTIVATIONS) and aspec is not None:
                new = _make_quantizer(aspec, name, child, "activations", None)
            if new is not None:
                setattr(parent, child_name, new)
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
                "Memory", "MACs"]  # fmt: skip
        body = [
            [
                r.name,
                r.type,
                "x".join(map(str, r.output_shape)),
                "-" if r.weight_bits is None else str(r.weight_bits),
                "-" if r.act_bits is None else str(r.act_bits),
                r.estimator or "-",
                f"{r.params:,}",
                _fmt_bytes(r.memory_bytes),
                f"{r.macs:,}",
            ]
            for r in self.rows
        ]
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
        return "\n".join(out)


def _fmt_bytes(b: float) -> str:
    if b < 1024:
        return f"{b:.0f} B" if b == int(b) else f"{b:.1f} B"
    if b < 1024**2:
        return f"{b / 1024:.2f} KiB"
    return f"{b / 1024**2:.2f} MiB"


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
    quantizer or of a standalone quantizer), estimator, parameter count, memory of
    the parameters at deployed precision (quantized weights at their bits, all
    else 32-bit float), and multiply-accumulates per sample (Linear: in·out;
    Conv2d: H_out·W_out·C_out·(C_in/groups)·k_h·k_w). Totals with the float-32 size
    and the compression ratio. Pass ``print_fn=print`` to print it.
    """
    try:
        shape = tuple(int(s) for s in input_size)
    except (TypeError, ValueError):
        raise ConfigError(f"input_size must be a sequence of ints, got {input_size!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise ConfigError(f"input_size must be positive sizes without the batch dim, got {shape}")
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else "cpu"

    outputs: dict[str, tuple[int, ...]] = {}
    leaves = [(n, m) for n, m in model.named_modules() if n and _is_leaf(m)]
    nested = {
        id(q)
        for _, m in leaves
        if isinstance(m, (QuantLinear, QuantConv2d))
        for q in (m.weight_quantizer, m.input_quantizer)
        if q is not None
    }
    leaves = [(n, m) for n, m in leaves if id(m) not in nested]
    hooks = []
    for n, m in leaves:

        def hook(mod: nn.Module, inp: Any, out: Any, n: str = n) -> None:
            if isinstance(out, Tensor):
                outputs[n] = tuple(out.shape[1:])

        hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros((1, *shape), dtype=dtype, device=device))
    except Exception as e:
        raise ConfigError(f"model does not accept input_size {shape}: {e}") from None
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)

    s = Summary()
    seen: set[int] = set()
    for n, m in leaves:
        own = [p for p in m.parameters() if id(p) not in seen]
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
            wbits, est = wq.bits, repr(wq.estimator)
        if isinstance(m, Quantizer):
            abits, est = m.bits, repr(m.estimator)
        elif iq is not None:
            abits = iq.bits
            est = f"{est}; in: {iq.estimator!r}" if est else repr(iq.estimator)
        out = outputs.get(n, ())
        macs = 0
        if isinstance(m, nn.Linear):
            macs = m.in_features * m.out_features
        elif isinstance(m, nn.Conv2d) and len(out) == 3:
            kh, kw = m.kernel_size
            macs = out[0] * out[1] * out[2] * (m.in_channels // m.groups) * kh * kw
        s.rows.append(LayerRow(n, type(m).__name__, out, wbits, abits, est, nparams, mem, macs))
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
