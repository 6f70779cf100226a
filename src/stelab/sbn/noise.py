"""Injected noise of a stochastic binary unit and the sampling helpers.

A stochastic binary unit ([S20] §2) outputs ``x = sign(a - Z)`` with ``Z`` drawn
i.i.d. from a noise distribution with CDF ``F`` and density ``F'``, so

    P(x = +1 | a) = P(Z < a) = F(a),      P(x = -1 | a) = 1 - F(a) = F(-a).

Every noise here is symmetric (``F(-a) = 1 - F(a)``), so the probability of a
state ``x`` in {-1, +1} is ``F(x * a)`` and ``E[x] = 2F(a) - 1``.

Sampling uses one uniform draw per unit, ``U ~ U(0, 1)``, and
``x = +1 if U < F(a) else -1``, which equals ``sign(a - Z)`` with
``Z = F^{-1}(U)`` (:meth:`Noise.quantile`). The relaxations (Concrete,
Gumbel-ST) use that same ``Z``, so hard and relaxed samples are coupled.

References: [S20] Shekhovtsov, Yanush, Flach, NeurIPS 2020, arXiv:2006.03143.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ..errors import StelabTypeError, unknown

__all__ = [
    "Noise",
    "Logistic",
    "Gaussian",
    "Uniform",
    "get_noise",
    "noise_names",
    "as_generator",
    "uniform_like",
]


class Noise:
    """A symmetric noise distribution: ``F`` (cdf), ``F'`` (pdf), ``F^{-1}`` (quantile)."""

    name: str = "noise"
    formula: str = ""

    def cdf(self, a: Tensor) -> Tensor:
        """``F(a) = P(Z < a)``, differentiable (its derivative is :meth:`pdf`)."""
        raise NotImplementedError

    def cdf_(self, buf: Tensor) -> Tensor:
        """``F`` applied in place to ``buf`` (used by the PSA ratio kernels)."""
        return buf.copy_(self.cdf(buf))

    def pdf(self, a: Tensor) -> Tensor:
        """``F'(a)``, the noise density."""
        raise NotImplementedError

    def log_cdf(self, a: Tensor) -> Tensor:
        """``log F(a)``, stable for large ``|a|``; ``log P(x | a) = log F(x * a)``."""
        return torch.log(self.cdf(a).clamp_min(torch.finfo(a.dtype).tiny))

    def quantile(self, u: Tensor) -> Tensor:
        """``F^{-1}(u)``: the noise value ``Z`` behind a uniform draw ``u``."""
        raise NotImplementedError

    def logit(self, a: Tensor) -> Tensor:
        """``phi(a) = log F(a) - log F(-a)``: the Bernoulli logit of ``P(x=+1) = F(a)``."""
        return self.log_cdf(a) - self.log_cdf(-a)

    def mean(self, a: Tensor) -> Tensor:
        """``E[x | a] = 2F(a) - 1`` for ``x = sign(a - Z)``."""
        return 2.0 * self.cdf(a) - 1.0

    def states(self, a: Tensor, u: Tensor) -> Tensor:
        """Hard sample ``x = +1 if u < F(a) else -1`` (= ``sign(a - F^{-1}(u))``)."""
        return (u < self.cdf(a)).to(a.dtype) * 2.0 - 1.0

    def __repr__(self) -> str:
        return self.name

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other)

    def __hash__(self) -> int:
        return hash(type(self))


class Logistic(Noise):
    """Standard logistic noise: ``F = sigma``, ``F' = sigma (1 - sigma)``, ``E[x] = tanh(a/2)``."""

    name = "logistic"
    formula = "F(a) = 1 / (1 + exp(-a)); F'(a) = F(a) (1 - F(a)); F^{-1}(u) = log(u / (1 - u))"

    def cdf(self, a: Tensor) -> Tensor:
        return torch.sigmoid(a)

    def cdf_(self, buf: Tensor) -> Tensor:
        return torch.sigmoid(buf, out=buf)

    def pdf(self, a: Tensor) -> Tensor:
        s = torch.sigmoid(a)
        return s * (1.0 - s)

    def log_cdf(self, a: Tensor) -> Tensor:
        return torch.nn.functional.logsigmoid(a)

    def quantile(self, u: Tensor) -> Tensor:
        return torch.logit(u)

    def logit(self, a: Tensor) -> Tensor:
        return a

    def mean(self, a: Tensor) -> Tensor:
        return torch.tanh(0.5 * a)


class Gaussian(Noise):
    """Standard normal noise: ``F = Phi``, ``F' = exp(-a^2/2) / sqrt(2 pi)``."""

    name = "gaussian"
    formula = "F(a) = Phi(a) = (1 + erf(a / sqrt 2)) / 2; F'(a) = exp(-a^2 / 2) / sqrt(2 pi)"

    def cdf(self, a: Tensor) -> Tensor:
        return torch.special.ndtr(a)

    def cdf_(self, buf: Tensor) -> Tensor:
        return torch.special.ndtr(buf, out=buf)

    def pdf(self, a: Tensor) -> Tensor:
        return torch.exp(-0.5 * a * a) * (1.0 / math.sqrt(2.0 * math.pi))

    def log_cdf(self, a: Tensor) -> Tensor:
        return torch.special.log_ndtr(a)

    def quantile(self, u: Tensor) -> Tensor:
        return torch.special.ndtri(u)


class Uniform(Noise):
    """Uniform noise on [-1, 1]: ``F(a) = clamp((a + 1)/2, 0, 1)``, ``F' = 1/2 on (-1, 1)``."""

    name = "uniform"
    formula = "F(a) = clamp((a + 1) / 2, 0, 1); F'(a) = 1{|a| < 1} / 2; F^{-1}(u) = 2u - 1"

    def cdf(self, a: Tensor) -> Tensor:
        return ((a + 1.0) * 0.5).clamp(0.0, 1.0)

    def cdf_(self, buf: Tensor) -> Tensor:
        return buf.add_(1.0).mul_(0.5).clamp_(0.0, 1.0)

    def pdf(self, a: Tensor) -> Tensor:
        return (a.abs() < 1.0).to(a.dtype) * 0.5

    def quantile(self, u: Tensor) -> Tensor:
        return 2.0 * u - 1.0


_NOISES: dict[str, type[Noise]] = {"logistic": Logistic, "gaussian": Gaussian, "uniform": Uniform}


def noise_names() -> list[str]:
    """Names of the available noise distributions."""
    return sorted(_NOISES)


def get_noise(noise: str | Noise) -> Noise:
    """A :class:`Noise` by name (``"logistic"``, ``"gaussian"``, ``"uniform"``) or as is."""
    if isinstance(noise, Noise):
        return noise
    if not isinstance(noise, str):
        raise StelabTypeError(
            f"noise must be a name ({', '.join(noise_names())}) or a Noise, "
            f"got {type(noise).__name__}"
        )
    if noise not in _NOISES:
        raise unknown("noise", noise, _NOISES)
    return _NOISES[noise]()


def as_generator(
    generator: torch.Generator | int | None, device: torch.device | str | None = None
) -> torch.Generator | None:
    """A ``torch.Generator`` from a generator, an integer seed, or None (torch's global RNG).

    An integer seeds a fresh generator on ``device``; the same seed gives the same
    samples bit for bit on CPU.
    """
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, bool) or not isinstance(generator, int):
        raise StelabTypeError(
            f"generator must be a torch.Generator, an integer seed or None, "
            f"got {type(generator).__name__}"
        )
    g = torch.Generator(device=torch.device(device) if device is not None else "cpu")
    g.manual_seed(generator)
    return g


def uniform_like(a: Tensor, generator: torch.Generator | None) -> Tensor:
    """``U ~ U(0, 1)`` shaped like ``a`` (same dtype/device), drawn from ``generator``."""
    return torch.rand(a.shape, generator=generator, dtype=a.dtype, device=a.device)
