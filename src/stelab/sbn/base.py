"""The SBN estimator base class and its registry.

Below both :mod:`.layers` (whose :meth:`~.layers.SBN.surrogate_loss` resolves
estimator names here) and :mod:`.estimators` (which registers the estimators):
neither imports the other's way round, so there is no import cycle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from ..errors import ConfigError, StelabTypeError
from ..registry import Registry

if TYPE_CHECKING:
    from .layers import SBN

__all__ = ["ESTIMATORS", "LossFn", "SBNEstimator", "get", "names", "register"]

LossFn = Callable[[Tensor, Tensor], Tensor]


class SBNEstimator:
    """Base class of SBN gradient estimators.

    Subclasses set ``name`` (by :func:`register`), ``formula`` (plain-text
    math), ``reference``, ``supports`` (hidden layer types; None, the default:
    every hidden layer type an SBN takes, SBNLinear and SBNConv2d),
    ``min_samples`` and ``unbiased`` (for every layer), validate their
    parameters in ``__init__`` and implement :meth:`estimate`.
    """

    name: ClassVar[str] = "sbn_estimator"
    formula: ClassVar[str] = ""
    reference: ClassVar[str] = ""
    supports: ClassVar[tuple[type[nn.Module], ...] | None] = None
    min_samples: ClassVar[int] = 1
    unbiased: ClassVar[bool] = False

    def estimate(
        self,
        model: SBN,
        x: Tensor,
        y: Tensor,
        loss_fn: LossFn,
        samples: int,
        generator: torch.Generator | None,
    ) -> tuple[Tensor, Tensor]:
        """``(value, surrogate)``: loss estimate and a scalar whose gradient is the estimate.

        ``x``, ``y`` are the un-replicated batch; ``samples`` >= ``min_samples``.
        """
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """Constructor parameters (for repr and summaries)."""
        return {}

    def check(self, model: SBN, samples: int) -> None:
        """Raise ConfigError for a layer type or a ``samples`` this estimator can't handle."""
        if self.supports is not None:
            for i, layer in enumerate(model.hidden):
                if not isinstance(layer, self.supports):
                    ok = ", ".join(t.__name__ for t in self.supports)
                    raise ConfigError(
                        f"estimator {self.name!r} does not support {type(layer).__name__} "
                        f"layers (hidden layer {i}); it supports: {ok}"
                    )
        if samples < self.min_samples:
            raise ConfigError(
                f"estimator {self.name!r} needs samples >= {self.min_samples}, "
                f"got samples={samples}"
            )

    def __repr__(self) -> str:
        p = ", ".join(f"{k}={v!r}" for k, v in self.params().items())
        return f"{self.name}({p})" if p else self.name

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and self.params() == other.params()  # type: ignore[attr-defined]

    def __hash__(self) -> int:
        return hash((type(self), tuple(sorted(self.params().items()))))


#: every registered SBN estimator. Names are resolved once: the instance built for a
#: (name, parameters) pair is cached (estimators hold only their constructor
#: parameters), so a name costs one dict look-up after its first use
ESTIMATORS: Registry[type[SBNEstimator]] = Registry("SBN estimator", base=SBNEstimator, cache=True)


def register(name: str, *, overwrite: bool = False) -> Callable[[type], type]:
    """Class decorator registering an :class:`SBNEstimator` subclass under ``name``."""
    ESTIMATORS.check_name(name)

    def deco(cls: type) -> type:
        ESTIMATORS.add(name, cls, overwrite=overwrite)  # type: ignore[arg-type]
        cls.name = name  # type: ignore[attr-defined]
        return cls

    return deco


def names() -> list[str]:
    """Names of every registered SBN estimator."""
    return ESTIMATORS.names()


def get(estimator: str | SBNEstimator, **params: Any) -> SBNEstimator:
    """An SBN estimator by name with its parameters (e.g. ``get("concrete", tau=0.1)``).

    Names are resolved once: the instance built for a (name, parameters) pair is
    cached and returned again (estimators are immutable), so passing a name costs
    the same as passing a prebuilt object. Unhashable parameters are not cached.
    """
    if isinstance(estimator, SBNEstimator):
        if params:
            raise ConfigError(f"parameters {sorted(params)} given with an estimator instance")
        return estimator
    if not isinstance(estimator, str):
        raise StelabTypeError(
            f"estimator must be a name or an SBNEstimator, got {type(estimator).__name__}"
        )
    return ESTIMATORS.build(estimator, **params)
