"""Experiment ``psa2020-gradeval``: the gradient-accuracy protocol of [S20] on the toy SBN.

Reproduces Shekhovtsov, Yanush, Flach, *Path Sample-Analytic Gradient Estimators for
Stochastic Binary Networks*, NeurIPS 2020 (arXiv:2006.03143), §5 "gradient estimation
accuracy", as restated in docs/papers/psa2020.md:

* data: ``psa-toy`` (seed 1, float64), 100 + 100 points; logistic loss
  ``log(1 + exp(-eta t))`` averaged over the 200 points;
* network 2 -> 5 -> 5 -> 5 stochastic binary units (logistic noise) -> 1 linear output,
  hidden states in {0, 1} as in the paper (``states="01"``; relative errors per layer
  depend on the parametrisation, so {-1, +1} would not be comparable beyond layer 1);
* trained with REINFORCE (1 sample), SGD lr 0.03, momentum 0.9, batch 10, 2000 epochs;
  checkpoints after epochs 1, 100, 200, 500, 1000, 1500, 2000 (cached in
  ``out_dir/checkpoints``, reused by reruns);
* the true gradient by exact enumeration of all 2^15 hidden states; per estimator
  20,000 draws (one draw = the full-batch estimate with independent noise per
  point), averaged in consecutive groups of M in {1..9, 10..90, 100..900, 1000..9000};
  relative RMSE and cosine similarity (mean, 15-85% band) per layer, weights and bias
  together, for the three hidden layers and the output layer (:mod:`stelab.analysis`);
* estimators: those of the paper's figure (``arm`` = the paper's layer-wise ARM with
  independent continuations) plus ``arm_shared`` (ARM with shared continuation noise).

Claims checked (each gets a verdict with the numbers): (a) PSA has the lowest error at
small M in every hidden layer; (b) ST plateaus from its bias; (c) ARM and REINFORCE
need ~10^3 samples to catch up; (d) Concrete(tau=0.1) is very noisy.

Choices (not fixed by the paper, stated in the report): the model init seed and the
order of the training draws come from ``seed``; ``reinforce_loo`` (coupled: M samples
share a baseline, so it is run once per group) gets at most 2,000 draws per M, so its
curve stops at M = 1000; "catch up" is measured as the M at which ARM / REINFORCE reach
PSA's one-sample RMSE. ``quick=True``: 100 training epochs, checkpoints 1 and 100,
2,000 draws (about a minute on 2 CPU cores).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ...analysis import PAPER_ESTIMATORS, PAPER_SAMPLE_SIZES, FidelityReport, gradient_fidelity
from ..spine import PartResult, cached, part_dir, write_part
from .gradeval_claims import ST_NAMES, claims, rmse_at, samples_to_reach
from .toy import TRAIN, data, load_checkpoint, train_toy

__all__ = [
    "CHECKPOINTS",
    "GRADEVAL_ESTIMATORS",
    "NAME",
    "STE_SPECS",
    "ST_NAMES",
    "TRAIN",
    "analyse",
    "config",
    "load_checkpoint",
    "run",
    "samples_to_reach",
    "ste_reports",
    "train_toy",
]

NAME = "psa2020-gradeval"
CHECKPOINTS = (1, 100, 200, 500, 1000, 1500, 2000)
#: the estimators of the paper's figure, plus the shared-noise ARM variant after ``arm``
GRADEVAL_ESTIMATORS: tuple[str, ...] = tuple(
    x for e in PAPER_ESTIMATORS for x in ((e, "arm_shared") if e == "arm" else (e,))
)
#: deterministic sign networks with a quantizer STE, seen as estimators of the SBN gradient
STE_SPECS = (
    "det:ste",
    "det:clipped",
    "det:approx_sign",
    "det:swish_sign",
    "det:logistic",
    "tanh_mf",
)


def config(quick: bool) -> dict[str, Any]:
    """The settings of a run: ``quick`` (minutes) or full (the paper's protocol)."""
    if quick:
        return {
            "epochs": 100,
            "checkpoints": [1, 100],
            "plot_epochs": [1, 100],
            "draws": 2000,
            "summary_draws": 0,
            "coupled_draws": 1000,
            "curve_every": 5,
            "dpi": 90,
        }
    return {
        "epochs": 2000,
        "checkpoints": list(CHECKPOINTS),
        "plot_epochs": [100, 2000],
        "draws": 20000,
        "summary_draws": 2000,
        "coupled_draws": 2000,
        "curve_every": 10,
        "dpi": 110,
    }


def analyse(
    out_dir: Path, epoch: int, draws: int, cfg: dict[str, Any], seed: int, progress: bool
) -> FidelityReport:
    """Fidelity of every paper estimator at one checkpoint (cached as JSON in out_dir/cache)."""
    from ...sbn import logistic_loss

    sizes = [m for m in PAPER_SAMPLE_SIZES if m <= draws]
    key = {
        "epoch": epoch,
        "draws": draws,
        "sizes": sizes,
        "estimators": list(GRADEVAL_ESTIMATORS),
        "coupled_draws": cfg["coupled_draws"],
        "seed": seed,
        "train": {**TRAIN, "seed": seed},
    }

    def compute() -> FidelityReport:
        x, y = data()
        return gradient_fidelity(
            load_checkpoint(out_dir, epoch, seed),
            x,
            y,
            logistic_loss,
            list(GRADEVAL_ESTIMATORS),
            draws=draws,
            sample_sizes=sizes,
            reference="exact",
            generator=seed * 100_003 + epoch,
            coupled_draws=cfg["coupled_draws"],
            timing=True,
            timing_samples=cfg.get("timing_samples", 64),
            progress=progress,
        )

    rep, _ = cached(
        out_dir / "cache" / f"fidelity_epoch{epoch:04d}_{draws}.json",
        key,
        compute,
        dump=lambda r: r.to_dict(),
        load=FidelityReport.from_dict,
    )
    return rep


def ste_reports(out_dir: Path, epochs: list[int], seed: int) -> dict[int, FidelityReport]:
    """ "How biased is my STE?": each sign+STE net (same weights, no noise) against the exact
    gradient of the SBN's expected loss, at the given checkpoints (deterministic: cheap)."""
    from ...sbn import logistic_loss

    x, y = data()
    out = {}
    for e in epochs:
        model = load_checkpoint(out_dir, e, seed)
        out[e] = gradient_fidelity(
            model,
            x,
            y,
            logistic_loss,
            list(STE_SPECS),
            draws=1,
            sample_sizes=[1],
            reference="exact",
            timing=False,
        )
    return out


# --------------------------------------------------------------------------- entry point


def run(out_dir: Path, *, quick: bool = False, seed: int = 0, progress: bool = True) -> PartResult:
    """Run the [S20] gradient-accuracy protocol and write figures, results.json, report.md.

    Args:
        out_dir: output folder (created); trained checkpoints are cached in
            ``out_dir/checkpoints`` and per-checkpoint results in ``out_dir/cache``,
            so a rerun only redoes what changed.
        quick: 100 epochs, checkpoints 1 and 100, 2000 draws (about a minute).
        seed: seed of the init, the training draws and every estimator draw.
        progress: progress bars.

    Returns:
        the part's :class:`~stelab.experiments.spine.PartResult`: claims (a)-(d) judged
        by :mod:`.gradeval_claims`, the figures, the paths of results.json and report.md.
    """
    from . import gradeval_report as report

    t0 = time.perf_counter()
    out_dir, seed = part_dir(out_dir, seed, seed_max=2**31 - 1)
    cfg = config(bool(quick))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tr = train_toy(
            out_dir,
            epochs=cfg["epochs"],
            checkpoints=cfg["checkpoints"],
            seed=seed,
            curve_every=cfg["curve_every"],
            progress=progress,
        )
        reps = {
            e: analyse(out_dir, e, cfg["draws"], cfg, seed, progress) for e in cfg["plot_epochs"]
        }
        summary: dict[int, FidelityReport] = {}
        if cfg["summary_draws"]:
            for e in cfg["checkpoints"]:
                summary[e] = (
                    reps[e]
                    if e in reps
                    else analyse(out_dir, e, cfg["summary_draws"], cfg, seed, progress)
                )
        stes = ste_reports(out_dir, cfg["plot_epochs"], seed)
    finally:
        torch.set_num_threads(threads)
    judged = claims(reps)
    figs = report.write_figures(out_dir, tr["curve"], cfg, reps, summary)
    analyses = {
        **{("s", e): r for e, r in summary.items()},
        **{("p", e): r for e, r in reps.items()},
    }
    compute = tr["seconds"] + sum(
        r.reference.seconds + sum(ef.wall_seconds for ef in r.estimators.values())
        for r in {id(r): r for r in analyses.values()}.values()
    )
    res: dict[str, Any] = {
        "name": NAME,
        "paper": "Shekhovtsov, Yanush, Flach, NeurIPS 2020, arXiv:2006.03143",
        "quick": bool(quick),
        "seed": seed,
        "config": {**cfg, "train": TRAIN, "estimators": list(PAPER_ESTIMATORS)},
        "training": {k: tr[k] for k in ("curve", "seconds", "reused", "epochs_done")},
        "checkpoints": {str(e): rep.to_dict() for e, rep in reps.items()},
        "summary_rmse_m1": {
            str(e): {
                lab: {k: rmse_at(rep, lab, k, 1) for k in rep.layers} for lab in rep.estimators
            }
            for e, rep in summary.items()
        },
        "ste_as_estimator": {
            str(e): {
                lab: {
                    k: {"rel_error": lf.rmse[0], "cosine": lf.cos_mean[0]}
                    for k, lf in ef.layers.items()
                }
                for lab, ef in r.estimators.items()
            }
            for e, r in stes.items()
        },
        "compute_seconds": compute,
    }
    md = report.report_md(
        {**res, "seconds": time.perf_counter() - t0}, reps, summary, judged, figs, stes
    )
    return write_part(
        out_dir,
        name=NAME,
        claims=judged,
        results=res,
        report=md,
        figures=list(figs.values()),
        started=t0,
    )
