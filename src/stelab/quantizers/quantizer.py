"""The quantizer as a module: :class:`Quantizer` (and :class:`QuantAct`) over one
autograd Function for every (forward, estimator) pair (see :mod:`stelab.quantizers`)."""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from .. import estimators as _est
from ..errors import ConfigError, StelabTypeError, check_int, check_positive
from ..estimators import Context, Estimator
from .forwards import FORWARDS, Forward

# torch internals behind Function.apply's fast path (see _Quantize.apply); if a torch
# release moves them, apply falls back to torch's own path
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)
_unwrap_dead = getattr(getattr(torch, "_functorch", None), "utils", None)
_unwrap_dead = getattr(_unwrap_dead, "unwrap_dead_wrappers", None)
if _unwrap_dead is None:
    _transforms_active = None


class _Quantize(torch.autograd.Function):
    """y = fwd(x); backward g_x = est.grad_input(x, y, g); LSQ gradient for a learned step.

    One Function serves every (forward, estimator) pair. ``qctx`` is the
    estimator's context with plain-float levels when the step is a fixed scalar
    (the fast path: fused ATen backward kernels take Python scalars); it is None
    for learned or per-channel steps, and then built from the step tensor in
    backward.
    """

    @classmethod
    def apply(cls, *args):  # noqa: D102
        # torch's Function.apply binds the arguments to forward's signature with
        # inspect on every call when setup_context is defined: tens of microseconds, more
        # than the quantizer's own work on a small layer. Every argument is always passed
        # here, positionally, so outside functorch transforms (which need the binding)
        # the call goes straight to autograd's C++ apply, as torch's own does after it.
        # torch.compile traces torch's path
        if _transforms_active is None or torch.compiler.is_compiling() or _transforms_active():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*_unwrap_dead(args))

    @staticmethod
    def forward(x, step, fwd, est, qctx, lsq_scale, generator):  # noqa: D102
        return fwd(x, step, generator)

    @staticmethod
    def setup_context(ctx, inputs, output):  # noqa: D102
        x, step, fwd, est, qctx, lsq_scale, _ = inputs
        learn = lsq_scale is not None
        ctx.fwd, ctx.est, ctx.qctx, ctx.lsq_scale, ctx.learn = fwd, est, qctx, lsq_scale, learn
        ctx.step_const = None if isinstance(step, Tensor) else step
        ctx.save_for_backward(
            x if (est.needs_input or learn) else None,
            output if (est.needs_output or learn) else None,
            step if isinstance(step, Tensor) and (learn or qctx is None) else None,
        )

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        x, y, step = ctx.saved_tensors
        qctx = ctx.qctx
        if qctx is None:
            qctx = ctx.fwd.context(ctx.step_const if step is None else step.detach())
        gx = ctx.est.grad_input(x, y, g, qctx) if ctx.needs_input_grad[0] else None
        gstep = None
        if ctx.learn and ctx.needs_input_grad[1]:
            inside = ((x > qctx.lo) & (x < qctx.hi)).to(x.dtype)
            gs = g * (y - x * inside) / step
            gstep = (gs.sum_to_size(step.shape) * ctx.lsq_scale).to(step.dtype)
        return gx, gstep, None, None, None, None, None


def quantize_tensor(
    x: Tensor,
    fwd: Forward,
    estimator: Estimator,
    step: Tensor | float | None = None,
    *,
    lsq_scale: float | None = None,
    generator: torch.Generator | None = None,
    context: Context | None = None,
) -> Tensor:
    """Functional form: ``fwd(x)`` forward, ``estimator`` backward.

    ``lsq_scale`` (with a tensor ``step`` that requires grad) enables LSQ's step
    gradient scaled by that factor. ``context``: the estimator's context if the
    caller has it (built from ``step`` in backward otherwise).
    """
    return _Quantize.apply(x, step, fwd, estimator, context, lsq_scale, generator)


QUANTIZER_PARAMS = (
    "bits",
    "step",
    "alpha",
    "threshold",
    "rounding",
    "learn_step",
    "per_sample",
    "generator",
)


def _as_step(step: Any, name: str = "step") -> Tensor:
    if isinstance(step, Tensor):
        if not step.is_floating_point():
            raise StelabTypeError(f"{name} must be a floating-point tensor, got dtype {step.dtype}")
        bad = ~torch.isfinite(step) | (step <= 0)
        if bool(bad.any()):
            raise ConfigError(f"{name} must be finite and > 0 everywhere, got {step.flatten()[:4]}")
        return step.detach().clone()
    # float64 keeps a step like 0.1 exact to double precision; a 0-d tensor does not
    # promote the input's dtype, so float32 inputs stay float32
    return torch.tensor(check_positive(name, step), dtype=torch.float64)


class Quantizer(nn.Module):
    """A forward function paired with a gradient estimator, as a module.

    Args:
        fn: forward function name: ``identity``, ``sign``, ``heaviside``,
            ``ternary``, ``uniform`` or ``act`` (see the module docstring).
        estimator: an estimator name (``stelab.estimators.names()``), an
            :class:`~stelab.estimators.Estimator`, or a function ``x -> q̂'(x)``.
            None (the default) takes the one stelab's reproductions support for
            ``fn`` (``stelab.estimators.DEFAULTS``, with the measurement behind each):
            ``clipped`` for sign and ternary ([S20]: in a sign network the
            identity STE's gradient is 7-1900x off, the clipped STE's 1-7x),
            ``clipped_relu`` for heaviside and act ([Y19]), ``ste`` for uniform
            ([S24]) and identity.
        bits: bit width for ``uniform`` (2..16, or None for unclipped) and
            ``act`` (1..16).
        step: level spacing Δ for ``uniform`` / resolution α for ``act``: a
            positive number, or a tensor broadcastable to the input (per channel).
            ``alpha`` is accepted as a synonym for ``act``.
        threshold: t for ``ternary`` (default 0.5).
        rounding: ``"nearest"`` (half to even) or ``"stochastic"`` (uniform only).
        learn_step: make the step a parameter trained with LSQ's gradient.
        per_sample: LSQ's N counts elements per sample (activations) rather than
            all elements (weights).
        generator: ``torch.Generator`` used by stochastic rounding.
        **estimator_params: parameters of the estimator, e.g. ``beta=5``.

    Example::

        q = Quantizer("sign", "swish_sign", beta=10)
        a = Quantizer("act", "clipped_relu", bits=2, step=0.5)
    """

    def __init__(
        self,
        fn: str = "sign",
        estimator: str | Estimator | Any = None,
        *,
        bits: int | None = None,
        step: float | Tensor | None = None,
        alpha: float | Tensor | None = None,
        threshold: float = 0.5,
        rounding: str = "nearest",
        learn_step: bool = False,
        per_sample: bool = False,
        generator: torch.Generator | None = None,
        **estimator_params: Any,
    ):
        super().__init__()
        kind = FORWARDS.get(fn)  # unknown: "unknown quantizer ... (did you mean ...)"
        if alpha is not None:
            if fn != "act" or step is not None:
                raise ConfigError(
                    "alpha is the step of the 'act' quantizer; give either step or alpha, "
                    f"got fn={fn!r}, step={step!r}, alpha={alpha!r}"
                )
            step = alpha
        if rounding not in ("nearest", "stochastic"):
            raise ConfigError(f"rounding must be 'nearest' or 'stochastic', got {rounding!r}")
        if rounding == "stochastic" and not kind.stochastic_ok:
            ok = [k for k in FORWARDS.names() if FORWARDS.get(k).stochastic_ok]
            raise ConfigError(
                f"rounding='stochastic' needs fn={' or '.join(map(repr, ok))}, got fn={fn!r}"
            )
        if kind.bits_range is not None:
            if bits is not None:
                bits = check_int("bits", bits, *kind.bits_range)
            elif kind.bits_required:
                lo, hi = kind.bits_range
                raise ConfigError(
                    f"bits is required for the {fn!r} quantizer (an integer in [{lo}, {hi}])"
                )
        elif bits is not None and not (kind.bits_ok and bits == kind.deployed):
            raise ConfigError(f"bits is not a parameter of the {fn!r} quantizer, got bits={bits!r}")
        else:
            bits = None
        if kind.takes_threshold:
            threshold = check_positive("threshold", threshold)
        self.fwd = Forward(fn, bits, float(threshold), rounding)

        if self.fwd.has_step:
            if step is None:
                raise ConfigError(f"step is required for the {fn!r} quantizer (a number > 0)")
            step_t = _as_step(step, "alpha" if alpha is not None else "step")
            if learn_step:
                if bits is None:
                    raise ConfigError("learn_step=True needs a clipped quantizer: set bits")
                self.step = nn.Parameter(step_t)
            else:
                self.register_buffer("step", step_t)
        else:
            if step is not None:
                raise ConfigError(f"step is not a parameter of the {fn!r} quantizer")
            if learn_step:
                ok = " or ".join(repr(k) for k in FORWARDS.names() if FORWARDS.get(k).has_step)
                raise ConfigError(f"learn_step needs fn={ok}, got fn={fn!r}")
            self.step = None
        self.learn_step = bool(learn_step)
        self.per_sample = bool(per_sample)
        self.generator = generator

        #: True when the estimator is ``fn``'s default (``estimator=None``)
        self.default_estimator = estimator is None
        if estimator is None:
            estimator = _est.default_for(fn)
        try:
            self.estimator = _est.get(estimator, **estimator_params)
        except ConfigError as e:
            if estimator_params and "unexpected parameters" in str(e):
                raise ConfigError(
                    f"{e}. Quantizer parameters are: {', '.join(QUANTIZER_PARAMS)}"
                ) from None
            raise
        self.estimator.check(self.fwd.context(1.0 if self.fwd.has_step else None))

    # -- properties used by summaries, conversion and the CLI -------------------

    @property
    def kind(self) -> str:
        """The forward function's name: ``identity``, ``sign``, ``heaviside``,
        ``ternary``, ``uniform`` or ``act``."""
        return self.fwd.kind

    @property
    def bits(self) -> int | None:
        """Bits per element at deployment; None when the output stays floating point."""
        return self.fwd.deployed_bits

    def context(self) -> Context:
        """The :class:`~stelab.estimators.Context` the estimator sees: the lowest and
        highest output level, the step and the positions of the jumps, in the units of
        the input (tensors for a tensor step; ``±inf`` where unclipped)."""
        return self.fwd.context(None if self.step is None else self.step.detach())

    def forward(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor):
            raise StelabTypeError(f"quantizer input must be a tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise StelabTypeError(
                f"quantizer input must be a floating-point tensor, got dtype {x.dtype}"
            )
        lsq = None
        if self.learn_step:
            n = math.prod(x.shape[1:]) if (self.per_sample and x.dim() > 1) else x.numel()
            # an empty input has no gradient to scale; max() keeps the scale finite
            lsq = 1.0 / math.sqrt(max(n, 1) * self.fwd.qrange[1])
        return quantize_tensor(
            x,
            self.fwd,
            self.estimator,
            self.step,
            lsq_scale=lsq,
            generator=self.generator,
            context=self._float_context(),
        )

    def _float_context(self) -> Context | None:
        """The estimator's context with plain floats, for a fixed scalar step.

        Cached on the step buffer's identity and version, so the one host read
        (``float(step)``) happens only when the step changes (load_state_dict,
        ``.to()``, an in-place edit), never per call. None (built from the
        tensor in backward) for learned or per-channel steps and under
        ``torch.compile``.
        """
        s = self.step
        if s is None:
            return self.fwd.context(None)
        if self.learn_step or s.numel() != 1 or torch.compiler.is_compiling():
            return None
        key = (s.data_ptr(), s._version, s.dtype, s.device)
        if self.__dict__.get("_ctx_key") != key:
            self.__dict__["_ctx"] = self.fwd.context(float(s))
            self.__dict__["_ctx_key"] = key
        return self.__dict__["_ctx"]

    def extra_repr(self) -> str:
        parts = [repr(self.fwd.kind)]
        if self.fwd.bits is not None:
            parts.append(f"bits={self.fwd.bits}")
        if self.step is not None:
            s = self.step
            parts.append(f"step={s.item():.4g}" if s.numel() == 1 else f"step=<{tuple(s.shape)}>")
            if self.learn_step:
                parts.append("learn_step=True")
        if self.fwd.takes_threshold:
            parts.append(f"threshold={self.fwd.threshold:g}")
        if self.fwd.rounding != "nearest":
            parts.append(f"rounding={self.fwd.rounding!r}")
        parts.append(f"estimator={self.estimator!r}")
        return ", ".join(parts)

    def with_estimator(self, estimator: str | Estimator | None, **params: Any) -> Quantizer:
        """A copy of this quantizer with another estimator (same forward and step;
        None: the forward function's default)."""
        new = Quantizer.__new__(type(self))
        nn.Module.__init__(new)
        new.fwd = self.fwd
        new.learn_step, new.per_sample, new.generator = (
            self.learn_step,
            self.per_sample,
            self.generator,
        )
        if self.step is None:
            new.step = None
        elif self.learn_step:
            new.step = nn.Parameter(self.step.detach().clone())
        else:
            new.register_buffer("step", self.step.detach().clone())
        new.default_estimator = estimator is None
        if estimator is None:
            estimator = _est.default_for(self.fwd.kind)
        new.estimator = _est.get(estimator, **params)
        new.estimator.check(new.context())
        return new


class QuantAct(Quantizer):
    """An activation quantizer as a module (a :class:`Quantizer` whose LSQ
    gradient scale counts elements per sample). Same arguments as Quantizer::

        QuantAct("act", "clipped_relu", bits=2, alpha=0.5)
    """

    def __init__(self, fn: str = "act", estimator: Any = None, **kwargs: Any):
        kwargs.setdefault("per_sample", True)
        super().__init__(fn, estimator, **kwargs)


def context_with(ctx: Context, **changes: Any) -> Context:
    """A copy of ``ctx`` with some fields changed (for custom estimators' tests)."""
    return replace(ctx, **changes)
