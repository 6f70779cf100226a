"""One entry point for gradient fidelity: SBNs and deterministic quantized networks."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn

from ..errors import StelabTypeError

__all__ = ["gradcheck"]


def gradcheck(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    estimators: str | Sequence[Any] | None = None,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
    **kwargs: Any,
) -> Any:
    """Gradient fidelity of ``estimators`` on ``model`` with data ``(x, y)``.

    * a stochastic binary network (:class:`stelab.sbn.SBN`):
      :func:`~stelab.analysis.gradient_fidelity` against the exact / Monte-Carlo
      gradient of the expected loss (default estimators ``psa,dst,arm,reinforce``;
      default loss :func:`stelab.sbn.logistic_loss` for one output, else cross-entropy);
    * any other ``nn.Module`` with stelab quantizers:
      :func:`~stelab.analysis.deterministic_fidelity` (descent test and bias against the
      stochastic relaxation; default estimators ``ste,relu,clipped_relu``; default loss
      cross-entropy).

    ``loss_fn(out, y)`` returns one loss per example; ``kwargs`` go to the function chosen.
    """
    from ..sbn import SBN

    if not isinstance(model, nn.Module):
        raise StelabTypeError(f"model must be a torch nn.Module, got {type(model).__name__}")
    if isinstance(model, SBN):
        import torch.nn.functional as F

        from ..sbn import logistic_loss
        from .fidelity import gradient_fidelity

        if loss_fn is None:
            out_features = getattr(model.output, "out_features", 2)
            loss_fn = (
                logistic_loss
                if out_features == 1
                else lambda eta, t: F.cross_entropy(eta, t, reduction="none")
            )
        return gradient_fidelity(
            model, x, y, loss_fn, estimators or ("psa", "dst", "arm", "reinforce"), **kwargs
        )
    from .deterministic import cross_entropy, deterministic_fidelity

    return deterministic_fidelity(
        model,
        x,
        y,
        estimators or "ste,relu,clipped_relu",
        loss_fn=loss_fn or cross_entropy,
        **kwargs,
    )
