"""The [S24] lockstep: the custom-estimator model and its STE twins trained on the same
batches, compared after every ``eval_every`` steps.

The training (one optimizer per model, :func:`make_optimizer`; the step loop of
:func:`lockstep`) is kept here, behind one function, so that moving it onto
``stelab.train`` is a change to this module only.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...disguise import equivalent_ste, to_ste
from .config import Config
from .metrics import accuracy, compare
from .model import build, weight_layers

__all__ = ["batches", "lockstep", "make_optimizer"]


def make_optimizer(kind: str, model: nn.Module, lr: float, alpha: float, hp: dict) -> Any:
    """``torch.optim.<kind>`` with lr·alpha on the quantized weights, lr on the rest."""
    qw = [m.weight for m in weight_layers(model)]
    ids = {id(p) for p in qw}
    rest = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": qw, "lr": lr * alpha}, {"params": rest, "lr": lr}]
    return getattr(torch.optim, kind)(groups, lr=lr, **hp)


def batches(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless row indices: a fresh permutation of ``range(n)`` per epoch (seeded), cut
    into full batches (the last partial batch dropped)."""
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch_size + 1, batch_size):
            yield perm[i : i + batch_size]


def lockstep(
    cfg: Config,
    data: Any,
    est: str,
    params: dict,
    opt_kind: str,
    lr: float,
    hp: dict,
    steps: int,
    variants: tuple[str, ...],
    seed: int,
    eval_every: int | None,
    bar: Any = None,
) -> dict[str, Any]:
    """Train the custom model (estimator ``est``) and the STE ``variants`` ("i", "ii",
    "iii"; see :mod:`.trajectories`) on identical batches for ``steps`` steps.

    Records step 0, every ``eval_every`` steps and the last step (only the last when
    ``eval_every`` is None): per model the mean train loss since the last record and the
    test accuracy; per variant :func:`~.metrics.compare`; and how far the custom weights
    moved. Returns the run's settings, ``history`` and its last values ``final``.
    """
    custom = build(cfg, data, est, params, seed)
    eq = equivalent_ste(est, 1.0, params=params, bits=cfg.bits)  # scale-free: step per layer
    alpha = eq.alpha
    models: dict[str, nn.Module] = {"custom": custom}
    opts: dict[str, Any] = {"custom": make_optimizer(opt_kind, custom, lr, 1.0, hp)}
    for v in variants:
        conv = to_ste(custom, map_weights=(v == "iii"))
        models[v] = conv.model
        opts[v] = make_optimizer(opt_kind, conv.model, lr, 1.0 if v == "i" else alpha, hp)
    xtr, ytr, xte, yte = data.train.x, data.train.y, data.test.x, data.test.y
    hist: dict[str, list] = {"step": []}
    for name in models:
        hist[f"loss_{name}"] = []
        hist[f"acc_{name}"] = []
    for v in variants:
        for k in ("flips", "gap_M_mean", "gap_M_max", "gap_id_mean", "gap_id_max"):
            hist[f"{k}_{v}"] = []
    hist["moved"] = []  # mean |w_custom(t) - w_custom(0)| / Δ: how far training went
    w_init = [m.weight.detach().clone() for m in weight_layers(custom)]
    losses = {name: 0.0 for name in models}
    count = 0

    def record(t: int) -> None:
        hist["step"].append(t)
        with torch.no_grad():
            moved = [
                ((m.weight - w0).abs() / m.weight_quantizer.step).flatten()
                for m, w0 in zip(weight_layers(custom), w_init, strict=True)
            ]
        hist["moved"].append(float(torch.cat(moved).mean()))
        for name, m in models.items():
            hist[f"loss_{name}"].append(losses[name] / max(count, 1))
            hist[f"acc_{name}"].append(accuracy(m, xte, yte))
        for v in variants:
            for k, val in compare(custom, models[v], eq).items():
                hist[f"{k}_{v}"].append(val)

    order = batches(len(ytr), cfg.batch_size, seed + 1)
    record(0)
    for t in range(1, steps + 1):
        idx = next(order)
        xb, yb = xtr[idx], ytr[idx]
        for name, m in models.items():
            opts[name].zero_grad(set_to_none=True)
            loss = F.cross_entropy(m(xb), yb)
            loss.backward()
            opts[name].step()
            losses[name] += float(loss.detach())
        count += 1
        if eval_every and (t % eval_every == 0 or t == steps):
            record(t)
            losses = {name: 0.0 for name in models}
            count = 0
        elif not eval_every and t == steps:
            record(t)
        if bar is not None:
            bar.update(len(models))
    return {
        "estimator": est,
        "params": params,
        "optimizer": opt_kind if not hp.get("momentum") else f"{opt_kind}+momentum",
        "lr": lr,
        "hp": hp,
        "alpha": alpha,
        "steps": steps,
        "steps_per_layer": [float(m.weight_quantizer.step) for m in weight_layers(custom)],
        "history": hist,
        "final": {k: v[-1] for k, v in hist.items()},
    }
