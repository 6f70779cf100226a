"""Flip kernels of PSA ([S20] §3 step 3, §4 "ratio convolution").

For a layer ``a = W x + b`` with states ``x`` in {-1, +1} and weights ``e_j`` from
the layer above, PSA needs, for every input unit i,

    d_i = sum_j e_j [F(a_j - 2 W_ji x_i) - F(a_j)],

the change of the layer's (linearised) expected contribution when ``x_i`` flips.
For a convolution the same sum runs over the (out-channel, position) pairs whose
window holds i: with ``xu = unfold(x)`` (rows = (example, out position),
columns = (in channel, kernel offset)) it is :func:`flip_rows` on those rows
followed by ``fold`` ([S20] §4). It has the multiply-accumulate count of a
data-gradient convolution but is nonlinear in W (no GEMM), and is computed in
blocks so no B x C_out x C_in K^2 x HW tensor is ever formed.

Three implementations of :func:`flip_rows`, equal up to rounding:

* generic (any noise): ``F(addcmul(a, x, -2W))`` per term, then a batched mat-vec;
* logistic, eager: exp-free, ``sigma(a - t) = B / (B + P)`` with ``B = exp(a - s)``,
  ``P = exp(t - s)`` precomputed (add, reciprocal, mat-vec per term);
* logistic, compiled: the same formula as one fused ``torch.compile`` loop
  (about 7x faster than eager on CPU; used by ``kernel="auto"`` for large layers
  when ``torch.compile`` works, falling back to eager with a warning otherwise).

Reference: [S20] Shekhovtsov, Yanush, Flach. Path Sample-Analytic Gradient
Estimators for Stochastic Binary Networks. NeurIPS 2020, arXiv:2006.03143.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .layers import SBNConv2d, SBNLinear
from .noise import Logistic, Noise

__all__ = ["flip_rows", "ratio_linear", "ratio_conv2d", "ratio", "KERNELS", "AUTO_MIN_TERMS"]

#: kernel choices: "auto" (compiled for large logistic layers, else eager), "eager", "compiled"
KERNELS = ("auto", "eager", "compiled")
#: with kernel="auto", layers with at least this many terms (rows x J x I) use the compiled kernel
AUTO_MIN_TERMS = 2**25

#: the compiled flip kernel, built on first use; compile_broken: torch.compile failed here once
compiled_kernel: Any = None
compile_broken = False


def check_kernel(kernel: str) -> str:
    if kernel not in KERNELS:
        raise ConfigError(f"kernel must be one of {', '.join(map(repr, KERNELS))}, got {kernel!r}")
    return kernel


def _fast_logistic(noise: Noise, dtype: torch.dtype) -> bool:
    return isinstance(noise, Logistic) and dtype in (torch.float32, torch.float64)


def _use_compiled(kernel: str, noise: Noise, dtype: torch.dtype, terms: int) -> bool:
    if kernel == "eager" or compile_broken or not _fast_logistic(noise, dtype):
        return False
    return kernel == "compiled" or terms >= AUTO_MIN_TERMS


def _blocks(nj: int, width: int, chunk_elements: int) -> tuple[int, int]:
    """(rows per block, j per block) so that one (rows, j, width) temporary fits the budget."""
    jc = max(1, min(nj, chunk_elements // max(width, 1)))
    return max(1, chunk_elements // (jc * width)), jc


def _shifted(a: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``B = exp(clamp(a - s))`` (R, J) and ``P(+-) = exp(+-2w - s)`` (J, I), ``s_j = max|2w_j|``.

    ``sigma(a - t) = B / (B + P)`` for ``t = +-2w``. The clamp (+-60 in float32, +-600
    in float64) keeps ``B`` finite and normal; it changes nothing unless a weight
    exceeds ~12 in magnitude while a pre-activation exceeds ~60.
    """
    lim = 60.0 if a.dtype == torch.float32 else 600.0
    t = w * 2.0
    s = t.abs().amax(1, keepdim=True)
    b = torch.exp((a - s.t()).clamp_(-lim, lim))
    return b, torch.exp(t - s), torch.exp(-t - s)


@torch.no_grad()
def flip_rows(
    a: Tensor,
    e: Tensor,
    x: Tensor,
    w: Tensor,
    noise: Noise,
    chunk_elements: int = 2**19,
    kernel: str = "auto",
) -> Tensor:
    """Row-wise PSA flip differences (step 3 of [S20] §3 for a batch of dense layers).

        out[r, i] = sum_j e[r, j] F(a[r, j] - 2 w[j, i] x[r, i]) - sum_j e[r, j] F(a[r, j])

    ``a``, ``e``: (R, J); ``x``: (R, I) in {-1, +1} (0 marks padding and gives 0);
    ``w``: (J, I). Eager temporaries hold at most ``chunk_elements`` entries.
    ``kernel``: ``"auto"``, ``"eager"`` or ``"compiled"`` (see the module docstring).
    """
    check_kernel(kernel)
    return _flip(a, e, x, w, noise, chunk_elements, kernel).masked_fill_(x == 0, 0.0)


def _flip(
    a: Tensor, e: Tensor, x: Tensor, w: Tensor, noise: Noise, chunk_elements: int, kernel: str
) -> Tensor:
    """:func:`flip_rows` without zeroing padding entries (``fold`` drops those anyway)."""
    rows, nj = a.shape
    ni = x.shape[1]
    if _use_compiled(kernel, noise, a.dtype, rows * nj * ni):
        out = _flip_rows_compiled(a, e, x, w, chunk_elements)
        if out is not None:
            return out
    if _fast_logistic(noise, a.dtype):
        b, pp, pm = _shifted(a, w)
        w2 = torch.cat([pp, pm], dim=1)  # (J, 2I): columns for x = +1, then x = -1

        def fill(z: Tensor, r0: int, r1: int, j0: int, j1: int) -> None:
            torch.add(b[r0:r1, j0:j1, None], w2[None, j0:j1], out=z).reciprocal_()

        out = _contract(e * b, 2 * ni, fill, chunk_elements)
        h = (e * torch.sigmoid(a)).sum(1, keepdim=True)
        return torch.where(x > 0, out[:, :ni], out[:, ni:]).sub_(h)
    else:
        wm = w * -2.0

        def fill(z: Tensor, r0: int, r1: int, j0: int, j1: int) -> None:
            torch.addcmul(a[r0:r1, j0:j1, None], x[r0:r1, None, :], wm[None, j0:j1], out=z)
            noise.cdf_(z)

        out = _contract(e, ni, fill, chunk_elements)
        return out.sub_((e * noise.cdf(a)).sum(1, keepdim=True))


def _contract(e: Tensor, width: int, fill: Any, chunk: int) -> Tensor:
    """``out[r, i] = sum_j e[r, j] z[r, j, i]``, ``z`` filled block by block by ``fill``.

    Blocks of (rows, j) keep each temporary below ``chunk`` entries.
    """
    rows, nj = e.shape
    out = torch.empty(rows, width, dtype=e.dtype, device=e.device)
    rc, jc = _blocks(nj, width, chunk)
    buf = torch.empty(min(rc, rows) * jc * width, dtype=e.dtype, device=e.device)
    for r0 in range(0, rows, rc):
        r1 = min(rows, r0 + rc)
        o = out[r0:r1].unsqueeze(1)
        for j0 in range(0, nj, jc):
            j1 = min(nj, j0 + jc)
            z = buf[: (r1 - r0) * (j1 - j0) * width].view(r1 - r0, j1 - j0, width)
            fill(z, r0, r1, j0, j1)
            ej = e[r0:r1, None, j0:j1]
            if j0 == 0:
                torch.bmm(ej, z, out=o)
            else:
                o.baddbmm_(ej, z)
    return out


def _fused_logistic(eb: Tensor, b: Tensor, x: Tensor, ppt: Tensor, pmt: Tensor) -> Tensor:
    # out[r, i] = sum_j eb[r, j] / (b[r, j] + P_sign(x[r, i])[i, j]); one fused loop when compiled
    p = torch.where(x[:, :, None] > 0, ppt[None], pmt[None])
    return (eb[:, None, :] / (b[:, None, :] + p)).sum(-1)


def _flip_rows_compiled(
    a: Tensor, e: Tensor, x: Tensor, w: Tensor, chunk_elements: int
) -> Tensor | None:
    """The fused kernel, on blocks of rows (``rows x I x J`` terms <= 32 ``chunk_elements``:
    the fused loop forms no such tensor, but this bounds it should the compiler not fuse)."""
    global compiled_kernel, compile_broken
    b, pp, pm = _shifted(a, w)
    eb, ppt, pmt = e * b, pp.t().contiguous(), pm.t().contiguous()
    rows, nj = a.shape
    step = max(1, 32 * chunk_elements // (nj * x.shape[1]))
    try:
        if compiled_kernel is None:
            compiled_kernel = torch.compile(_fused_logistic, dynamic=True)
        parts = [
            compiled_kernel(eb[r0 : r0 + step], b[r0 : r0 + step], x[r0 : r0 + step], ppt, pmt)
            for r0 in range(0, rows, step)
        ]
        out = parts[0] if len(parts) == 1 else torch.cat(parts)
    except Exception as err:  # no C++ compiler, unsupported platform, ...
        compile_broken = True
        warnings.warn(
            f"torch.compile of the PSA flip kernel failed ({type(err).__name__}: {err}); "
            f"using the eager kernel from now on",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return out.sub_((e * torch.sigmoid(a)).sum(1, keepdim=True))


@torch.no_grad()
def ratio_linear(
    layer: SBNLinear,
    a: Tensor,
    e: Tensor,
    x: Tensor,
    chunk_elements: int = 2**19,
    kernel: str = "auto",
    scale: float = 1.0,
) -> Tensor:
    """PSA step 3 through a linear layer: ``d_i = sum_j e_j [F(a_j - 2 c W_ji x_i) - F(a_j)]``.

    ``a``, ``e``: (R, out_features); ``x``: the signs in {-1, +1} of the layer input (any
    shape with R rows, flattened to in_features); ``scale`` = ``c``, the input layer's
    state scale (1 for states in {-1, +1}, 1/2 for {0, 1}: flipping the sign ``x_i``
    changes the input state by ``-2 c x_i``). Returns ``d`` shaped like ``x``.
    """
    check_kernel(kernel)
    w = layer.weight.detach()
    w = w if scale == 1.0 else w * scale
    return _flip(a, e, x.flatten(1), w, layer.noise, chunk_elements, kernel).view(x.shape)


@torch.no_grad()
def ratio_conv2d(
    layer: SBNConv2d,
    a: Tensor,
    e: Tensor,
    x: Tensor,
    chunk_elements: int = 2**19,
    kernel: str = "auto",
    scale: float = 1.0,
) -> Tensor:
    """PSA step 3 through a convolution: the "ratio convolution" of [S20] §4.

        cols[n, ro, p] = sum_c e[n,c,p] [F(a[n,c,p] - 2 c W[c,ro] unfold(x)[n,ro,p]) - F(a[n,c,p])]
        d = fold(cols)

    ``a``, ``e``: (N, C_out, H_out, W_out); ``x``: the input signs (N, C_in, H, W);
    ``scale`` = ``c`` as in :func:`ratio_linear` (zero padding gives sign 0: no flip).
    Equal to :func:`ratio_linear` on the dense matrix of the convolution. Examples are
    unfolded a few at a time (about ``chunk_elements`` unfolded entries).
    """
    check_kernel(kernel)
    n, c = a.shape[:2]
    p = a.shape[2] * a.shape[3]
    w = layer.weight.detach().reshape(c, -1)
    w = w if scale == 1.0 else w * scale
    ro = w.shape[1]
    if kernel == "auto":  # decide once per layer, not per block of examples
        big = _use_compiled(kernel, layer.noise, a.dtype, n * p * c * ro)
        kernel = "compiled" if big else "eager"
    conv = {"kernel_size": layer.kernel_size, "dilation": layer.dilation}
    conv.update(padding=layer.padding, stride=layer.stride)
    d = torch.empty_like(x)
    step = max(1, chunk_elements // (ro * p))
    for n0 in range(0, n, step):
        n1 = min(n, n0 + step)
        m = n1 - n0
        # rows = (example, position), contiguous so the kernels' inner loops vectorise
        xu = F.unfold(x[n0:n1], **conv).transpose(1, 2).contiguous().view(m * p, ro)
        ab = a[n0:n1].reshape(m, c, p).transpose(1, 2).contiguous().view(m * p, c)
        eb = e[n0:n1].reshape(m, c, p).transpose(1, 2).contiguous().view(m * p, c)
        cols = _flip(ab, eb, xu, w, layer.noise, chunk_elements, kernel)
        d[n0:n1] = F.fold(cols.view(m, p, ro).transpose(1, 2), x.shape[-2:], **conv)
    return d


def ratio(
    layer: SBNLinear | SBNConv2d,
    a: Tensor,
    e: Tensor,
    x: Tensor,
    chunk_elements: int = 2**19,
    kernel: str = "auto",
    scale: float = 1.0,
) -> Tensor:
    """:func:`ratio_conv2d` or :func:`ratio_linear`, by layer type."""
    if isinstance(layer, SBNConv2d):
        return ratio_conv2d(layer, a, e, x, chunk_elements, kernel, scale)
    if isinstance(layer, SBNLinear):
        return ratio_linear(layer, a, e, x, chunk_elements, kernel, scale)
    raise ConfigError(f"PSA has no flip rule for {type(layer).__name__} layers")
