"""[S24] Custom weight-gradient estimators are STEs in disguise: the lockstep experiment.

Schoenbauer, Moro, Lew, Howard 2024, arXiv:2405.05171 (docs/papers/disguise2024.md).

A small conv net with 4-bit weights (signed uniform quantizer, a fixed step per layer,
Δ_l = bound_l/6 with bound_l = 1/sqrt(fan_in) the default init range, so the initial
weights sit inside levels -6..6 of -8..7) is trained with a cyclical custom estimator
(``cosine`` a = 0.5 and ``dsq`` k = 3) and, on identical batches, three STE models:

    (i)   STE, same initial weights w₀, same learning rate η;
    (ii)  STE, same w₀, learning rate α·η on the quantized weights;
    (iii) STE from M(w₀) with α·η: the [S24] equivalent (``stelab.disguise.to_ste``).

The STE is ``clipped`` (1 inside the quantizer's range, 0 outside, where the cyclical
estimators vanish too). Each step records, for each pair, the fraction of quantized
weights that differ, the latent gap |M(w_custom) - w_STE| / Δ (and |w_custom - w_STE|/Δ,
the gap that matters for Adam, whose equivalent is the plain STE), train loss and test
accuracy. Optimizers: SGD, SGD + momentum 0.9, Adam. Then two sweeps:

* learning rate at a fixed horizon η·T (SGD, SGD + momentum): the theorem predicts the
  final gap of (iii) ∝ η, while (i) stays O(1);
* Adam: the pair (custom, plain STE) for ε and for the ratio of the distance a weight
  travels in Adam's second-moment window, η/(1 - β₂), to the step Δ.

Output in ``out_dir``: ``results.json``, ``report.md`` (a table per condition at the end
of training and a plain statement of where the equivalence fails), ``gap_vs_step.png``,
``flips_vs_step.png``, ``loss_acc.png``, ``lr_sweep.png``, ``adam.png``.
``quick=True``: the bundled digits (8×8) for ~1 minute on a laptop CPU; otherwise
Fashion-MNIST (28×28).

This module runs the experiment; the presets are in :mod:`.config`, the network in
:mod:`.model`, the training of the twins in :mod:`.lockstep`, the verdict rules in
:mod:`.trajectories_claims` and the figures and markdown in :mod:`.trajectories_report`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from ..spine import PartResult, write_part
from .config import VARIANTS, Config, preset
from .lockstep import lockstep
from .metrics import log_slope
from .model import build, weight_layers
from .trajectories_claims import claims
from .trajectories_report import plots, report, statements

__all__ = ["VARIANTS", "Config", "preset", "run"]


def run(out_dir: Path, *, quick: bool = False, seed: int = 0, progress: bool = True) -> PartResult:
    """Run the [S24] lockstep experiment; write PNGs, results.json, report.md to ``out_dir``.

    ``quick``: digits, a few hundred steps (about a minute on a laptop CPU); otherwise
    Fashion-MNIST (a 20k-row training subset). results.json holds the config,
    per-condition histories and final values, the sweeps, a summary with the fitted
    log-log slopes and the plain statements of the report, and the claims.
    """
    threads = torch.get_num_threads()
    # tiny models: one thread is fastest, and avoids OpenMP spinning on a busy machine
    torch.set_num_threads(1)
    try:
        return _run(Path(out_dir), preset(quick), quick, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _data(cfg: Config, seed: int, progress: bool) -> tuple[Any, Any]:
    """``(splits, data)``: the loaded splits, and a copy for training: train and test in
    the run's dtype (test rows cut to ``cfg.test_limit``), no validation rows."""
    from ... import data as _data

    dt = getattr(torch, cfg.dtype)
    splits = _data.load(cfg.dataset, seed=seed, limit=cfg.limit, progress=progress)
    test_x, test_y = splits.test.x, splits.test.y
    if cfg.test_limit is not None:
        test_x, test_y = test_x[: cfg.test_limit], test_y[: cfg.test_limit]
    x = splits.train.x.to(dt)
    data = replace(
        splits,
        train=_data.Split(x, splits.train.y),
        val=_data.Split(x[:0], splits.train.y[:0]),
        test=_data.Split(test_x.to(dt), test_y),
    )
    return splits, data


def _run(out: Path, cfg: Config, quick: bool, seed: int, progress: bool) -> PartResult:
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    splits, data = _data(cfg, seed, progress)
    ests = [(e, dict(p)) for e, p in cfg.estimators]
    opts = [(n, k, lr, dict(hp)) for n, k, lr, hp in cfg.optimizers]
    sgd = [o for o in opts if o[0] in cfg.sweep_optimizers]
    adam = next((o for o in opts if o[1] == "Adam"), None)
    total = 4 * cfg.steps * len(ests) * len(opts)
    total += 3 * len(sgd) * sum(round(cfg.sweep_steps0 / f) for f in cfg.sweep_lr_factors)
    n_adam = len(cfg.adam_window_lrs) * len(cfg.adam_beta2s) + len(cfg.adam_eps)
    total += 2 * cfg.adam_steps * n_adam if adam else 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="disguise2024", unit="model-step", leave=False)
    try:
        main = [
            lockstep(cfg, data, e, p, k, lr, hp, cfg.steps, VARIANTS, seed, cfg.eval_every, bar)
            for e, p in ests
            for _, k, lr, hp in opts
        ]
        e0, p0 = ests[0]
        sweep = []
        for _, k, lr0, hp in sgd:
            for f in cfg.sweep_lr_factors:
                steps = round(cfg.sweep_steps0 / f)
                sweep.append(
                    lockstep(
                        cfg, data, e0, p0, k, lr0 * f, hp, steps, ("i", "iii"), seed, None, bar
                    )  # fmt: skip
                )
        adam_runs = _adam_sweeps(cfg, data, e0, p0, adam, main[0], seed, bar)
    finally:
        if bar is not None:
            bar.close()

    slopes = {}
    for kind in dict.fromkeys(r["optimizer"] for r in sweep):
        rows = sorted((r for r in sweep if r["optimizer"] == kind), key=lambda r: r["lr"])
        lrs = [r["lr"] for r in rows]
        slopes[kind] = {
            v: log_slope(lrs, [r["final"][f"gap_M_mean_{v}"] for r in rows]) for v in ("i", "iii")
        }
    res: dict[str, Any] = {
        "experiment": "disguise2024",
        "reference": "Schoenbauer, Moro, Lew, Howard 2024, arXiv:2405.05171",
        "config": asdict(cfg),
        "quick": quick,
        "seed": seed,
        "data": {"name": splits.name, "train": len(splits.train), "test": len(data.test.y)},
        "weights": sum(m.weight.numel() for m in weight_layers(build(cfg, data, e0, p0, seed))),
        "main": main,
        "lr_sweep": sweep,
        "adam": adam_runs,
        "summary": {"lr_slopes": slopes},
    }
    res["summary"]["statements"] = statements(res)
    found = claims(res)
    res["figures"] = plots(out, res)
    text = report(res, found, res["figures"], time.perf_counter() - t0)
    return write_part(
        out,
        name="trajectories",
        claims=found,
        results=res,
        report=text,
        figures=res["figures"],
        started=t0,
    )


def _adam_sweeps(
    cfg: Config, data: Any, est: str, params: dict, adam: Any, first: dict, seed: int, bar: Any
) -> list[dict[str, Any]]:
    """Custom vs plain STE under Adam: the second-moment window sweep (lr × β₂) and the ε
    sweep; a run both sweeps share is trained once. ``first`` is a main run (for the
    layers' steps Δ that ``travel`` is measured in)."""
    if adam is None:
        return []
    _, k, _, hp = adam
    steps_min = min(first["steps_per_layer"])
    steps_med = sorted(first["steps_per_layer"])[len(first["steps_per_layer"]) // 2]
    conds = [
        ("window", lr, (0.9, b2), 1e-8) for lr in cfg.adam_window_lrs for b2 in cfg.adam_beta2s
    ] + [("eps", cfg.adam_eps_lr, (0.9, cfg.adam_eps_beta2), e) for e in cfg.adam_eps]
    runs = []
    done: dict[tuple, dict] = {}
    for sweep_name, lr, betas, eps in conds:
        key = (lr, betas, eps)
        if key in done:  # the same run serves both sweeps
            r = dict(done[key])
        else:
            r = lockstep(cfg, data, est, params, k, lr, {**hp, "betas": betas, "eps": eps},
                         cfg.adam_steps, ("i",), seed, None, bar)  # fmt: skip
            done[key] = r
        r["sweep"] = sweep_name
        r["travel"] = lr / ((1 - betas[1]) * steps_med)
        r["travel_min_step"] = lr / ((1 - betas[1]) * steps_min)
        runs.append(r)
    return runs
