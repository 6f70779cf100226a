"""The path sample-analytic (PSA) estimator of [S20] §3, for linear and conv layers.

One sampled forward path, then a backward recursion in which the chain rule's
derivatives are replaced by exact finite differences under single-unit flips
(``F`` the noise CDF, ``F'`` its density; ``x`` the sampled states):

1. output:  ``d^L_j = f(eta with x^L_j flipped) - f(eta)``,
   ``eta_(j) = eta - 2 c V[:, j] x^L_j``;
2. layer k = L..1:  ``e^k_j = -x^k_j d^k_j``,  ``ga^k_j = e^k_j F'(a^k_j)``,
   ``dW^k_ji = ga^k_j x^{k-1}_i``,  ``db^k_j = ga^k_j``;
3. below (k >= 2):  ``d^{k-1}_i = sum_j e^k_j [F(a^k_j - 2 c W^k_ji x^{k-1}_i) - F(a^k_j)]``;
4. output parameters: gradient of ``(1/J) sum_j [pi_j f(eta) + (1 - pi_j) f(eta_(j))]``,
   ``pi_j = sg(F(x^L_j a^L_j))`` (the probability of the sampled state).

Here ``x`` are the sampled *signs* in {-1, +1} and ``c`` the state scale of the layer
that emits them (``c = 1`` for states in {-1, +1}; ``c = 1/2`` for states in {0, 1},
``h = (x + 1)/2``, whose flip changes ``h`` by ``-2 c x``): one code path for both.

Unbiased for the output layer and the last hidden layer; the bias comes only
from linearising through deeper layers. For a convolution, step 3 is the
"ratio convolution": with ``xu = unfold(x^{k-1})`` (one column per output
position p, one row per (input channel, kernel offset) ro),

    cols[n, ro, p] = sum_c e[n, c, p] F(a[n, c, p] - 2 W[c, ro] xu[n, ro, p]) - sum_c e F(a)
    d^{k-1} = fold(cols)

which is exactly step 3 for the dense matrix of the convolution (entries
outside the kernel window give ``F(a) - F(a) = 0``). It costs the multiply-
accumulate count of a data-gradient convolution but is nonlinear in W (no GEMM).
The kernels live in :mod:`.kernels`: computed in blocks, so no
B x C_out x C_in K^2 x HW tensor is ever formed.

Reference: [S20] Shekhovtsov, Yanush, Flach. Path Sample-Analytic Gradient
Estimators for Stochastic Binary Networks. NeurIPS 2020, arXiv:2006.03143, §3-4.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError, check_int
from .estimators import LossFn, SBNEstimator, per_example_loss, register, replicate, sample_path
from .kernels import check_kernel, ratio
from .layers import SBN

__all__ = ["PSA"]

_OUTPUT_RULES = ("local", "sample")


@register("psa")
class PSA(SBNEstimator):
    """Path sample-analytic estimator ([S20] §3, Alg. 1), linear and conv layers.

        d^L_j = f(eta - 2 c V[:, j] x^L_j) - f(eta)
        ga^k_j = -x^k_j d^k_j F'(a^k_j);   dW^k = ga^k (h^{k-1})^T,  db^k = ga^k
        d^{k-1}_i = sum_j (-x^k_j d^k_j) [F(a^k_j - 2 c W^k_ji x^{k-1}_i) - F(a^k_j)]

    (``x`` signs, ``h = c0 + c x`` the layer's states, see the module docstring)
        output: grad of (1/J) sum_j [pi_j f(eta) + (1 - pi_j) f(eta_(j))], pi_j = sg(F(x_j a_j))

    Parameters: ``output`` = ``"local"`` (step 4 above, default) or ``"sample"``
    (plain ``grad f(eta)`` at the sample; also unbiased, noisier);
    ``chunk_elements`` = the largest temporary of the eager flip kernels (memory/speed);
    ``kernel`` = ``"auto"`` (default: a ``torch.compile``d fused kernel for large
    logistic layers, its first use compiles for ~10-20 s; eager otherwise),
    ``"eager"`` or ``"compiled"`` (see :mod:`.kernels`).
    Unbiased for the last hidden layer and the output layer only. Randomness:
    one ``U(0, 1)`` tensor per hidden layer, shaped like its pre-activation of
    the replicated batch, in layer order.
    """

    formula = "ga_j = -x_j F'(a_j) d_j; d_i = sum_j -x_j d_j [F(a_j - 2 W_ji x_i) - F(a_j)]"
    reference = "[S20] Shekhovtsov, Yanush, Flach 2020, §3 (PSA), §4 (ratio convolution)"

    def __init__(
        self, output: str = "local", chunk_elements: int = 2**19, kernel: str = "auto"
    ) -> None:
        if output not in _OUTPUT_RULES:
            raise ConfigError(
                f"output must be one of {', '.join(map(repr, _OUTPUT_RULES))}, got {output!r}"
            )
        self.output = output
        self.chunk_elements = check_int("chunk_elements", chunk_elements, 1, 2**40)
        self.kernel = check_kernel(kernel)

    def params(self) -> dict[str, Any]:
        return {"output": self.output, "chunk_elements": self.chunk_elements, "kernel": self.kernel}

    def estimate(
        self,
        model: SBN,
        x: Tensor,
        y: Tensor,
        loss_fn: LossFn,
        samples: int,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        hs, pre, ss = sample_path(model, x, samples, generator)
        yr = replicate(y, samples)
        top = model.hidden[-1]
        xl = ss[-1].flatten(1)  # signs of the last hidden layer
        rows, nj = xl.shape
        eta = model.output_preact(hs[-1])
        f0 = per_example_loss(loss_fn, eta, yr)
        # step 1: all single flips of the last hidden layer, eta_(j) = eta - 2 c V[:, j] x_j
        # (c = the layer's state scale; differentiable in V, c only for the "local" rule)
        local = self.output == "local"
        with torch.set_grad_enabled(local and torch.is_grad_enabled()):
            v = model.output.weight
            if top.state_scale != 1.0:
                v = v * top.state_scale
            eta_flip = eta[:, None, :] - 2.0 * xl[:, :, None] * v.t()[None]
            f_flip = per_example_loss(
                loss_fn, eta_flip.reshape(rows * nj, -1), yr.repeat_interleave(nj, dim=0)
            ).view(rows, nj)
        d = (f_flip - f0[:, None]).detach()
        # step 4: output-layer parameters
        if local:
            with torch.no_grad():
                pi = top.noise.cdf(xl * pre[-1].detach().flatten(1))
            sur = (pi * f0[:, None] + (1.0 - pi) * f_flip).mean(1).mean()
        else:
            sur = f0.mean()
        # steps 2-3, top-down
        d = d.view(ss[-1].shape)
        for k in range(len(model.hidden) - 1, -1, -1):
            layer, a = model.hidden[k], pre[k]
            with torch.no_grad():
                ad = a.detach()
                e = d * -ss[k]
                ga = e * layer.noise.pdf(ad)
                if k > 0:
                    c = model.hidden[k - 1].state_scale
                    d = ratio(layer, ad, e, ss[k - 1], self.chunk_elements, self.kernel, c)
            sur = sur + (ga * a).sum() / rows
        return f0.detach().mean(), sur
