"""Per-draw gradient estimates of an SBN estimator, thousands of draws at once.

One *draw* of an estimator is its full-batch gradient estimate with independent
noise for every example ([S20] §5: "one sample"). The fidelity metrics need every
draw separately, not just their average, so this module decomposes one batched
call into per-draw gradients:

* the batch is copied ``G`` times (``x_rep``: row ``c*N + n`` is copy c of example n)
  and the estimator runs once on it with ``samples = M``; copy c then *is* one draw
  (M = 1) or one group of M coupled samples (``reinforce_loo``), because every
  copy gets its own noise and the loss averages over the copies;
* hidden layers: every ``layer.preact`` call is wrapped, and a tensor hook stores
  ``ga = d surrogate / d a`` per row; with the input ``h`` of that call the
  per-copy weight gradient is ``G sum_{rows r of copy c} ga_r h_r^T`` (a convolution:
  the same with ``unfold(h)``, summed over positions), bias ``G sum ga_r``;
* output layer: the same from a forward hook on ``model.output`` (its input and
  ``d surrogate / d eta`` per row). Estimators that also use the output weights
  outside ``model.output(...)`` (PSA's single-flip outputs ``eta - 2 V[:, j] x_j``)
  fail the check below; for them (output layers up to ``JACOBIAN_MAX`` parameters)
  the loss of copy c is multiplied by a weight ``w_c = 1`` (carried in an extra
  column of ``y``) and the per-copy output gradient is the mixed derivative
  ``G d^2 surrogate / (d w_c d theta_out)`` (a batched double backward).

Every batched call is checked: the mean of the per-copy gradients must equal the
autograd gradient of the surrogate. An estimator that fails the check (its
parameters reach the surrogate some other way) falls back to a loop of one call
per draw (correct, slower); :attr:`DrawEngine.engine` and
:attr:`DrawEngine.output_mode` say which was used.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from ..sbn import SBN, SBNConv2d, SBNEstimator, surrogate_loss
from ..sbn.estimators import LossFn, per_example_loss
from .specs import is_coupled, is_deterministic

__all__ = [
    "layer_keys",
    "layer_params",
    "layer_label",
    "flatten_layers",
    "DrawEngine",
    "time_per_draw",
]

#: default rows (copies x samples x examples) per batched call ...
ROW_BUDGET = 2**18
#: ... and hidden-unit activations (rows x units per example) per batched call
ACTIVATION_BUDGET = 2**23
#: output layers with at most this many parameters may use the Jacobian mode
JACOBIAN_MAX = 256
#: default per-call budget of per-copy gradient entries (copies x parameters)
ENTRY_BUDGET = 2**24


def layer_keys(model: SBN) -> list[str]:
    """``["hidden.0", ..., "hidden.{L-1}", "output"]``: the layers the metrics are reported for."""
    return [f"hidden.{k}" for k in range(len(model.hidden))] + ["output"]


def layer_label(key: str) -> str:
    """``hidden.0`` -> ``layer 1``; ``output`` -> ``output``."""
    if key.startswith("hidden."):
        return f"layer {int(key.split('.')[1]) + 1}"
    return key


def _module(model: SBN, key: str) -> nn.Module:
    return model.output if key == "output" else model.hidden[int(key.split(".")[1])]


def layer_params(model: SBN) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Per layer key, its (name, parameter) pairs that require grad: weight, then bias."""
    out: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for key in layer_keys(model):
        mod = _module(model, key)
        pairs = []
        for pname in ("weight", "bias"):
            p = getattr(mod, pname, None)
            if isinstance(p, nn.Parameter) and p.requires_grad:
                pairs.append((f"{key}.{pname}", p))
        out[key] = pairs
    return out


def flatten_layers(
    grads: dict[str, Tensor | None], layers: dict[str, list[tuple[str, nn.Parameter]]]
) -> dict[str, Tensor]:
    """Per layer key, the concatenation of its parameters' gradients (weight, then bias),
    flattened; a missing gradient counts as zeros."""
    out = {}
    for key, pairs in layers.items():
        parts = []
        for name, p in pairs:
            g = grads.get(name)
            parts.append((torch.zeros_like(p) if g is None else g).reshape(-1))
        out[key] = torch.cat(parts) if parts else torch.zeros(0)
    return out


@torch.no_grad()
def _units_per_example(model: SBN, x: Tensor) -> int:
    """Hidden units (all layers) of one example: the activation memory per row."""
    h, total = x[:1], 0
    for layer in model.hidden:
        a = layer.preact(h)
        total += a.numel()
        h = torch.sign(a)
    return total


class Inconsistent(Exception):
    """The per-copy decomposition does not add up to the batched gradient (of layer ``key``)."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


class _Capture:
    """Wraps every hidden ``layer.preact`` (and, with ``output=True``, the output layer's
    forward) to record (layer, input, d surrogate / d output) per call."""

    def __init__(self, model: SBN, output: bool = True) -> None:
        self.model = model
        self.records: list[list[Any]] = []
        self.active = True
        self.output = output
        self._handle: Any = None

    def _record(self, k: int | str, h: Tensor, a: Tensor) -> None:
        if not (torch.is_grad_enabled() and a.requires_grad):
            return
        rec: list[Any] = [k, h.detach(), None]
        self.records.append(rec)

        def hook(g: Tensor, rec: list[Any] = rec) -> None:
            if not self.active:
                return
            g = g.detach()
            rec[2] = g if rec[2] is None else rec[2] + g

        a.register_hook(hook)

    def __enter__(self) -> _Capture:
        for k, layer in enumerate(self.model.hidden):
            orig = layer.preact

            def wrapped(h: Tensor, _k: int = k, _orig: Callable[[Tensor], Tensor] = orig) -> Tensor:
                a = _orig(h)
                self._record(_k, h, a)
                return a

            layer.preact = wrapped  # instance attribute shadows the method
        if self.output:

            def fwd_hook(mod: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
                self._record("output", args[0], out)

            self._handle = self.model.output.register_forward_hook(fwd_hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        for layer in self.model.hidden:
            layer.__dict__.pop("preact", None)
        if self._handle is not None:
            self._handle.remove()


def _augment(y: Tensor, copies: int) -> Tensor:
    """``y`` repeated ``copies`` times as float64 columns plus a last column: the copy index."""
    n = y.shape[0]
    cols = y.reshape(n, -1).to(torch.float64).repeat(copies, 1)
    ids = torch.arange(copies, device=y.device, dtype=torch.float64).repeat_interleave(n)
    return torch.cat([cols, ids[:, None]], 1)


class DrawEngine:
    """Per-draw (or per-group) gradient estimates of one estimator, vectorised.

    ``draws(count)`` yields chunks ``{layer key: (K, P_layer) tensor}`` of independent
    one-sample estimates (for estimators that are not coupled); ``groups(m, count)``
    yields ``count`` estimates that each average ``m`` samples (any estimator,
    required for coupled ones such as ``reinforce_loo``); ``constant()`` returns the
    single gradient of a deterministic estimator. ``engine`` is ``"vectorised"``,
    ``"loop"`` (fallback) or ``"deterministic"``. Randomness comes from ``generator``
    in a fixed order, so the same generator state and budgets give the same draws.
    """

    def __init__(
        self,
        model: SBN,
        x: Tensor,
        y: Tensor,
        loss_fn: LossFn,
        estimator: SBNEstimator,
        generator: torch.Generator | None,
        *,
        row_budget: int = ROW_BUDGET,
        entry_budget: int = ENTRY_BUDGET,
        activation_budget: int = ACTIVATION_BUDGET,
        vectorise: bool = True,
    ) -> None:
        self.model, self.x, self.y, self.loss_fn = model, x, y, loss_fn
        self.est = estimator
        self.gen = generator
        self.layers = layer_params(model)
        self.params = [p for pairs in self.layers.values() for _, p in pairs]
        self.n = int(x.shape[0])
        units = _units_per_example(model, x)
        self.row_budget = max(1, min(int(row_budget), int(activation_budget) // max(units, 1)))
        width = sum(p.numel() for p in self.params)
        self.max_copies = max(1, int(entry_budget) // max(width, 1))
        self.deterministic = is_deterministic(estimator)
        self.coupled = is_coupled(estimator)
        self.engine = (
            "deterministic" if self.deterministic else ("vectorised" if vectorise else "loop")
        )
        self.fallback_reason = ""
        #: how the output layer's per-copy gradients are found: "hook" (its forward's
        #: inputs and output gradients) or "jacobian" (the mixed derivative in w)
        self.output_mode = "hook"

    # -- public iterators --------------------------------------------------------------

    def constant(self) -> dict[str, Tensor]:
        """The gradient of a deterministic estimator (one call, ``samples=1``)."""
        return self._single(1)

    def draws(self, count: int) -> Iterator[dict[str, Tensor]]:
        """``count`` independent one-sample estimates, in chunks."""
        if self.coupled:
            raise ConfigError(
                f"estimator {self.est.name!r} couples its samples (min_samples="
                f"{self.est.min_samples}); use groups(m, count)"
            )
        yield from self.groups(1, count)

    def groups(self, m: int, count: int) -> Iterator[dict[str, Tensor]]:
        """``count`` independent estimates with ``samples=m`` each, in chunks."""
        done = 0
        while done < count:
            k = min(count - done, self.max_copies, max(1, self.row_budget // (self.n * m)))
            if self.engine == "vectorised":
                try:
                    chunk = self.batched(k, m)
                except Inconsistent as e:
                    p_out = sum(p.numel() for _, p in self.layers["output"])
                    if e.key == "output" and self.output_mode == "hook" and p_out <= JACOBIAN_MAX:
                        self.output_mode = "jacobian"  # these draws are dropped, not reused
                    else:
                        self.engine, self.fallback_reason = "loop", str(e)
                    continue
            else:
                chunk = self._loop(k, m)
            done += k
            yield chunk

    # -- engines -----------------------------------------------------------------------

    def _grads(self, sur: Tensor) -> dict[str, Tensor | None]:
        names = [n for pairs in self.layers.values() for n, _ in pairs]
        gs = torch.autograd.grad(sur, self.params, allow_unused=True)
        return dict(zip(names, gs, strict=True))

    def _single(self, m: int) -> dict[str, Tensor]:
        sur = surrogate_loss(self.model, self.x, self.y, self.loss_fn, self.est, m, self.gen)
        return {k: v.detach() for k, v in flatten_layers(self._grads(sur), self.layers).items()}

    def _loop(self, k: int, m: int) -> dict[str, Tensor]:
        rows = [self._single(m) for _ in range(k)]
        return {key: torch.stack([r[key] for r in rows]) for key in self.layers}

    def batched(self, copies: int, m: int) -> dict[str, Tensor]:
        model = self.model
        x_rep = self.x.repeat((copies,) + (1,) * (self.x.dim() - 1))
        y_shape, y_dtype = self.y.shape[1:], self.y.dtype
        y_aug = _augment(self.y, copies)
        w = torch.ones(copies, dtype=torch.float64, device=self.x.device, requires_grad=True)
        loss_fn = self.loss_fn

        def weighted(eta: Tensor, ya: Tensor) -> Tensor:
            yy = ya[:, :-1].to(y_dtype).reshape(ya.shape[0], *y_shape)
            f = per_example_loss(loss_fn, eta, yy)
            return f * w[ya[:, -1].long()].to(f.dtype)

        jac = self.output_mode == "jacobian"
        out_pairs = self.layers["output"]
        hid_pairs = [pr for key, prs in self.layers.items() if key != "output" for pr in prs]
        names = [nm for nm, _ in out_pairs] + [nm for nm, _ in hid_pairs]
        with _Capture(model, output=not jac) as cap:
            sur = surrogate_loss(model, x_rep, y_aug, weighted, self.est, m, self.gen)
            if jac and out_pairs:
                # output-layer gradient with its graph (for the mixed derivative in w);
                # then the hidden layers, whose hooks record d sur / d a per row
                cap.active = False
                g_out = torch.autograd.grad(
                    sur, [p for _, p in out_pairs], allow_unused=True, create_graph=True,
                    retain_graph=True,
                )  # fmt: skip
                cap.active = True
                g_hid = torch.autograd.grad(sur, [p for _, p in hid_pairs], allow_unused=True)
                gs = (*g_out, *g_hid)
            else:
                gs = torch.autograd.grad(
                    sur, [p for _, p in out_pairs] + [p for _, p in hid_pairs], allow_unused=True
                )
        grads = dict(zip(names, gs, strict=True))
        out: dict[str, Tensor] = {}
        for key in self.layers:
            if key == "output":
                continue
            k = int(key.split(".")[1])
            recs = [r for r in cap.records if r[0] == k]
            out[key] = self._linear_copies(key, self.model.hidden[k], recs, copies)
        if jac:
            out["output"] = self._output_copies(grads, w, copies)
        else:
            recs = [r for r in cap.records if r[0] == "output"]
            out["output"] = self._linear_copies("output", self.model.output, recs, copies)
        total = {k: v.detach() for k, v in flatten_layers(grads, self.layers).items()}
        self._check(out, total)
        return out

    def _linear_copies(
        self, key: str, layer: nn.Module, records: list[list[Any]], copies: int
    ) -> Tensor:
        """Per-copy (weight, bias) gradients of a linear or conv layer from its recorded
        calls: ``copies * sum_{rows r of copy c} ga_r x_r^T`` (and ``sum ga_r``)."""
        pairs = self.layers[key]
        has_w = any(nm.endswith(".weight") for nm, _ in pairs)
        has_b = any(nm.endswith(".bias") for nm, _ in pairs)
        gw = gb = None
        for _, h, ga in records:
            if ga is None:
                continue
            rows = h.shape[0]
            if rows % (copies * self.n):
                raise Inconsistent(
                    f"{layer_label(key)} saw {rows} rows, not a multiple of copies x examples",
                    key,
                )
            mm = rows // (copies * self.n)
            if isinstance(layer, SBNConv2d):
                cols = F.unfold(h, layer.kernel_size, layer.dilation, layer.padding, layer.stride)
                gv = ga.flatten(2)
                shape = (mm, copies, self.n)
                w_c = torch.einsum(
                    "mgnol,mgnil->goi",
                    gv.view(*shape, *gv.shape[1:]),
                    cols.view(*shape, *cols.shape[1:]),
                ).reshape(copies, -1)
                b_c = gv.view(*shape, *gv.shape[1:]).sum((0, 2, 4))
            else:
                hv = h.flatten(1).view(mm, copies, self.n, -1)
                gv = ga.reshape(mm, copies, self.n, -1)
                w_c = torch.einsum("mgno,mgni->goi", gv, hv).reshape(copies, -1)
                b_c = gv.sum((0, 2))
            gw = w_c if gw is None else gw + w_c
            gb = b_c if gb is None else gb + b_c
        parts = []
        if has_w:
            parts.append(
                gw if gw is not None else layer.weight.new_zeros(copies, layer.weight.numel())
            )
        if has_b:
            parts.append(gb if gb is not None else layer.bias.new_zeros(copies, layer.bias.numel()))
        if not parts:
            return layer.weight.new_zeros(copies, 0)
        return torch.cat(parts, 1) * copies

    def _output_copies(self, grads: dict[str, Tensor | None], w: Tensor, copies: int) -> Tensor:
        pairs = self.layers["output"]
        flat = []
        for nm, p in pairs:
            g = grads.get(nm)
            flat.append(p.new_zeros(p.numel()) if g is None else g.reshape(-1))
        if not flat:
            return self.model.output.weight.new_zeros(copies, 0)
        g_out = torch.cat(flat)
        dtype = g_out.dtype
        if not g_out.requires_grad:
            return g_out.detach().new_zeros(copies, g_out.numel())
        p_out = g_out.numel()
        blocks = []
        try:  # rows of the Jacobian d g_out / d w, a block of output parameters at a time
            for i0 in range(0, p_out, 64):
                i1 = min(p_out, i0 + 64)
                eye = torch.zeros(i1 - i0, p_out, dtype=dtype, device=g_out.device)
                eye[:, i0:i1].fill_diagonal_(1.0)
                (blk,) = torch.autograd.grad(
                    g_out, w, eye, is_grads_batched=True, allow_unused=True, retain_graph=True
                )
                if blk is None:
                    return g_out.detach().new_zeros(copies, p_out)
                blocks.append(blk)
        except RuntimeError as e:  # e.g. an op without a batching rule
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise Inconsistent(f"batched output-layer Jacobian failed: {msg}", "output") from None
        return torch.cat(blocks).detach().t().to(dtype) * copies

    def _check(self, per_copy: dict[str, Tensor], total: dict[str, Tensor]) -> None:
        for key, pc in per_copy.items():
            t = total[key].to(pc.dtype)
            tol = 1e-9 if pc.dtype == torch.float64 else 2e-4
            scale = float(t.norm()) + float(pc.norm(dim=1).mean()) / math.sqrt(pc.shape[0])
            err = float((pc.mean(0) - t).norm())
            if not err <= tol * scale + 1e-30:
                raise Inconsistent(
                    f"per-draw gradients of {layer_label(key)} do not add up to the batched "
                    f"gradient (error {err:.3g}, scale {scale:.3g})",
                    key,
                )


def time_per_draw(
    model: SBN,
    x: Tensor,
    y: Tensor,
    loss_fn: LossFn,
    estimator: SBNEstimator,
    *,
    samples: int = 64,
    repeats: int = 3,
    generator: torch.Generator | None = None,
) -> float:
    """Wall seconds per draw of ``estimator`` used as in training: one
    ``surrogate_loss(samples=M)`` call and its backward, divided by M.

    The median of ``repeats`` timed calls after one warm-up. A deterministic
    estimator is timed with ``samples=1`` (its cost does not grow with M).
    """
    det = is_deterministic(estimator)
    m = 1 if det else max(samples, estimator.min_samples)
    params = [p for p in model.parameters() if p.requires_grad]

    def call() -> None:
        sur = surrogate_loss(model, x, y, loss_fn, estimator, m, generator)
        torch.autograd.grad(sur, params, allow_unused=True)

    call()
    times = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2] / (1 if det else m)
