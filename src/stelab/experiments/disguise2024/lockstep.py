"""The [S24] lockstep: the custom-estimator model and its STE twins trained on the same
batches, compared after every ``eval_every`` steps.

The models train as one :class:`torch.nn.ModuleDict` through :func:`stelab.train.fit`:
the step sums their cross-entropies, and as no two models share a parameter, each
parameter's gradient is that of its own model's loss alone; one optimizer with a
parameter group per model and role (:func:`param_groups`) keeps a per-parameter state
(momentum buffer, Adam moments and step count), so every model follows the trajectory
it would follow with an optimizer of its own on the same batches
(tests/test_disguise2024_lockstep.py checks this against separate torch optimizers).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...config import OptimConfig
from ...disguise import equivalent_ste, to_ste
from ...errors import ConfigError
from .config import Config
from .metrics import accuracy, compare
from .model import build, weight_layers

__all__ = ["lockstep", "optim_config", "param_groups"]

_DEFAULTS = {"momentum": 0.0, "nesterov": False, "weight_decay": 0.0}


def optim_config(kind: str, lr: float, hp: dict) -> OptimConfig:
    """``torch.optim.<kind>(lr=lr, **hp)`` as an :class:`~stelab.config.OptimConfig`:
    ``kind`` "SGD" (hp: momentum, nesterov, weight_decay) or "Adam" (hp: betas, eps,
    weight_decay); a missing hyperparameter takes torch's default."""
    names = {"SGD": ("sgd", ("momentum", "nesterov", "weight_decay")),
             "Adam": ("adam", ("betas", "eps", "weight_decay"))}  # fmt: skip
    if kind not in names:
        raise ConfigError(f"optimizer kind must be one of {sorted(names)}, got {kind!r}")
    name, allowed = names[kind]
    extra = sorted(set(hp) - set(allowed))
    if extra:
        raise ConfigError(
            f"hyperparameters {extra} are not used by {kind} here (allowed: {list(allowed)})"
        )
    kw = {k: hp[k] if k in hp else _DEFAULTS[k] for k in allowed if k in hp or k in _DEFAULTS}
    if "betas" in kw:
        kw["betas"] = tuple(kw["betas"])
    return OptimConfig(name=name, lr=lr, **kw)


def param_groups(models: nn.ModuleDict, lr: float, factors: dict[str, float]) -> list[dict]:
    """Per model: its quantized weights at ``lr · factors[name]``, its other parameters
    at the optimizer's ``lr`` (torch's parameter-group format)."""
    groups: list[dict] = []
    for name, m in models.items():
        qw = [layer.weight for layer in weight_layers(m)]
        ids = {id(p) for p in qw}
        groups.append({"params": qw, "lr": lr * factors[name]})
        groups.append({"params": [p for p in m.parameters() if id(p) not in ids]})
    return groups


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
    *,
    run_dir: str | os.PathLike[str] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train the custom model (estimator ``est``) and the STE ``variants`` ("i", "ii",
    "iii"; see :mod:`.trajectories`) on identical batches for ``steps`` steps.

    ``data``: a :class:`stelab.data.Splits` (accuracy is measured on ``test``). The
    batches: ``cfg.batch_size`` rows, a fresh permutation of the training rows per
    epoch drawn from a generator seeded ``seed + 1``, the incomplete last batch dropped.
    Records step 0, every ``eval_every`` steps and the last step (only the last when
    ``eval_every`` is None): per model the mean train loss since the last record and the
    test accuracy; per variant :func:`~.metrics.compare`; and how far the custom weights
    moved. Returns the run's settings, ``history`` and its last values ``final``.
    ``run_dir``/``resume``: as for :func:`stelab.train.fit` (None: a temporary folder).
    """
    from ...train import fit

    custom = build(cfg, data, est, params, seed)
    eq = equivalent_ste(est, 1.0, params=params, bits=cfg.bits)  # scale-free: step per layer
    alpha = eq.alpha
    models: dict[str, nn.Module] = {"custom": custom}
    factors = {"custom": 1.0}
    for v in variants:
        models[v] = to_ste(custom, map_weights=(v == "iii")).model
        factors[v] = 1.0 if v == "i" else alpha
    net = nn.ModuleDict(models)
    xte, yte = data.test.x, data.test.y
    w_init = [m.weight.detach().clone() for m in weight_layers(custom)]

    def step(m: nn.ModuleDict, batch: tuple[torch.Tensor, torch.Tensor]) -> dict:
        xb, yb = batch
        losses = {name: F.cross_entropy(model(xb), yb) for name, model in m.items()}
        if bar is not None:
            bar.update(len(losses))
        return {
            "loss": sum(losses.values()),
            **{f"loss_{name}": loss.detach() for name, loss in losses.items()},
        }

    def measure(t: int, m: nn.Module) -> dict[str, float]:
        with torch.no_grad():
            moved = [
                ((layer.weight - w0).abs() / layer.weight_quantizer.step).flatten()
                for layer, w0 in zip(weight_layers(custom), w_init, strict=True)
            ]
        out = {"moved": float(torch.cat(moved).mean())}
        out.update({f"acc_{name}": accuracy(model, xte, yte) for name, model in models.items()})
        for v in variants:
            out.update({f"{k}_{v}": val for k, val in compare(custom, models[v], eq).items()})
        return out

    rows = [{"step": 0, **{f"train_loss_{name}": 0.0 for name in models}, **measure(0, net)}]
    metrics = fit(
        net,
        data,
        max_steps=steps,
        step=step,
        optimizer=optim_config(opt_kind, lr, hp),
        param_groups=param_groups(net, lr, factors),
        batch_size=cfg.batch_size,
        drop_last=True,
        seed=seed + 1,
        threads=1,
        save_best=False,
        on_step=measure,
        every_n_steps=eval_every or steps,
        run_dir=run_dir,
        resume=resume,
    )
    rows += metrics["steps"]
    hist: dict[str, list] = {"step": [r["step"] for r in rows]}
    for name in models:
        hist[f"loss_{name}"] = [r[f"train_loss_{name}"] for r in rows]
        hist[f"acc_{name}"] = [r[f"acc_{name}"] for r in rows]
    for v in variants:
        for k in ("flips", "gap_M_mean", "gap_M_max", "gap_id_mean", "gap_id_max"):
            hist[f"{k}_{v}"] = [r[f"{k}_{v}"] for r in rows]
    hist["moved"] = [r["moved"] for r in rows]  # mean |w_custom(t) - w_custom(0)| / Δ
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
