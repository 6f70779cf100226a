"""summary(): a table per layer with bits, estimator, memory at deployed precision
and MACs."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError, StelabTypeError
from ..quantizers import Quantizer
from .convert import unconvertible
from .layers import QuantConv2d, QuantLinear


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
