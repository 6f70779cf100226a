"""Sampled losses and coarse gradients of the two-layer model (mini-batches of Gaussian Z).

The coarse gradients are backpropagated through the library quantizer
``stelab.quantizers.Quantizer("heaviside", estimator=...)``; they are unbiased
estimates of :func:`stelab.theory.two_layer.expected_coarse_grad`. The model and its
conventions are described in :mod:`stelab.theory.two_layer`.
"""

from __future__ import annotations

from typing import Any

import torch

from stelab.errors import ConfigError, StelabTypeError, check_int
from stelab.theory.two_layer.model import LIBRARY_ESTIMATOR, ArrayLike, check_ste, prepare

__all__ = ["batch_loss", "coarse_grad_on_batch", "sample_coarse_grad"]

CHUNK_ELEMS = 1 << 22  # Z entries per chunk in sample_coarse_grad (32 MiB in float64)


def _quantizer(ste: str) -> Any:
    from stelab.quantizers import Quantizer

    return Quantizer("heaviside", estimator=LIBRARY_ESTIMATOR[ste])


def _sample_z(batch: int, m: int, n: int, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(batch, m, n, generator=generator, dtype=torch.float64)


def batch_loss(
    z: torch.Tensor, v: ArrayLike, w: ArrayLike, v_star: ArrayLike, w_star: ArrayLike
) -> torch.Tensor:
    """Empirical loss (1/B) sum_b 1/2 (v^T sigma(Z_b w) - v*^T sigma(Z_b w*))^2 on a batch.

    ``z`` has shape (B, m, n). ``v`` (..., m) and ``w`` (..., n) may carry leading
    dimensions (e.g. a grid of step sizes); returns a tensor of that shape.
    """
    v_t, w_t, vs, ws = prepare(v, w, v_star, w_star, allow_zero_w=True)
    m, n = v_t.shape[-1], w_t.shape[-1]
    z = _check_z(z, m, n)
    lead = v_t.shape[:-1]
    vk, wk = v_t.reshape(-1, m), w_t.reshape(-1, n)  # (K, m), (K, n)
    zf = z.reshape(-1, n)  # (B m, n)
    pre = (zf @ wk.T).reshape(z.shape[0], m, -1)  # (B, m, K)
    out = ((pre > 0).to(z.dtype) * vk.T.unsqueeze(0)).sum(1).T  # (K, B)
    if bool((ws == ws.reshape(-1, n)[:1]).all()) and bool((vs == vs.reshape(-1, m)[:1]).all()):
        tgt = ((zf @ ws.reshape(-1, n)[0]).reshape(z.shape[0], m) > 0).to(z.dtype)
        tgt = (tgt @ vs.reshape(-1, m)[0]).unsqueeze(0)  # (1, B): one teacher for all
    else:
        pre_s = (zf @ ws.reshape(-1, n).T).reshape(z.shape[0], m, -1)
        tgt = ((pre_s > 0).to(z.dtype) * vs.reshape(-1, m).T.unsqueeze(0)).sum(1).T
    return (0.5 * ((out - tgt) ** 2).mean(-1)).reshape(lead)


def _check_z(z: Any, m: int, n: int) -> torch.Tensor:
    if not isinstance(z, torch.Tensor):
        raise StelabTypeError(
            f"z must be a torch.Tensor of shape (B, m, n), got {type(z).__name__}"
        )
    if z.ndim != 3 or z.shape[1] != m or z.shape[2] != n or z.shape[0] < 1:
        raise ConfigError(f"z must have shape (B >= 1, m={m}, n={n}), got {tuple(z.shape)}")
    return z.to(torch.float64)


def coarse_grad_on_batch(
    z: torch.Tensor, v: ArrayLike, w: ArrayLike, v_star: ArrayLike, w_star: ArrayLike, ste: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dl/dv, g_mu) averaged over the given batch ``z`` of shape (B, m, n).

    Computed with autograd through ``stelab.quantizers.Quantizer("heaviside",
    estimator=...)``: forward sigma(x) = 1{x > 0}, backward the STE derivative. The
    teacher output uses the plain forward. v, w, v_star, w_star must be 1-D.
    """
    ste = check_ste(ste)
    v_t, w_t, vs, ws = prepare(v, w, v_star, w_star)
    if v_t.ndim != 1 or w_t.ndim != 1:
        raise ConfigError(
            f"v, w, v_star, w_star must be 1-D here, got v {tuple(v_t.shape)}, w {tuple(w_t.shape)}"
        )
    z = _check_z(z, v_t.shape[0], w_t.shape[0])
    act = _quantizer(ste)
    return _autograd_chunk(act, z, v_t, w_t, vs, ws, z.shape[0])


def _autograd_chunk(
    act: Any,
    z: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    vs: torch.Tensor,
    ws: torch.Tensor,
    total: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    v_ = v.detach().clone().requires_grad_(True)
    w_ = w.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = (act(z @ w_) * v_).sum(-1)
        with torch.no_grad():
            tgt = ((z @ ws > 0).to(z.dtype) * vs).sum(-1)
        loss = 0.5 * ((out - tgt) ** 2).sum() / total
        gv, gw = torch.autograd.grad(loss, (v_, w_))
    return loss.detach(), gv, gw


def sample_coarse_grad(
    v: ArrayLike,
    w: ArrayLike,
    v_star: ArrayLike,
    w_star: ArrayLike,
    ste: str,
    batch: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mini-batch coarse gradient (mean over ``batch`` samples of dl/dv and of g_mu).

    Draws Z_1..Z_B i.i.d. with N(0, 1) entries (shape (B, m, n), float64, from
    ``generator``) and backpropagates l = 1/(2B) sum_b (v^T sigma(Z_b w) - y*(Z_b))^2
    through the library quantizer ``Quantizer("heaviside", estimator=E)`` with E the
    library name of ``ste`` (identity -> "ste", relu -> "relu", clipped_relu ->
    "clipped_relu"). An unbiased estimate of :func:`expected_coarse_grad`. Sampling is
    done in chunks of at most ~4M entries of Z to bound memory. v, w, v_star, w_star
    must be 1-D.
    """
    ste = check_ste(ste)
    batch = check_int("batch", batch, 1, 2**62)
    v_t, w_t, vs, ws = prepare(v, w, v_star, w_star)
    if v_t.ndim != 1 or w_t.ndim != 1:
        raise ConfigError(
            f"v, w, v_star, w_star must be 1-D here, got v {tuple(v_t.shape)}, w {tuple(w_t.shape)}"
        )
    m, n = v_t.shape[0], w_t.shape[0]
    act = _quantizer(ste)
    chunk = max(1, CHUNK_ELEMS // (m * n))
    gv = torch.zeros(m, dtype=torch.float64)
    gw = torch.zeros(n, dtype=torch.float64)
    done = 0
    while done < batch:
        b = min(chunk, batch - done)
        z = _sample_z(b, m, n, generator)
        _, cv, cw = _autograd_chunk(act, z, v_t, w_t, vs, ws, batch)
        gv += cv
        gw += cw
        done += b
    return gv, gw
