"""Experiment ``yin2019-synthetic``: [Y19]'s two-linear-layer model, population and sampled.

Reproduces the claims of Yin et al., *Understanding Straight-Through Estimator in
Training Activation Quantized Neural Nets*, ICLR 2019 (arXiv:1903.05662), restated in
docs/papers/yin2019.md, with the closed forms of :mod:`stelab.theory.two_layer`:

(a) the ReLU and clipped-ReLU expected coarse gradients correlate positively with the
    true gradient, and population coarse gradient descent (Algorithm 1 with exact
    expectations) decreases f monotonically and converges to a critical point;
(b) at the spurious minimizer (theta = pi, v = (I+J)^{-1}(J-I)v*, 1^T v* != 0, m > 1)
    the identity STE's expected coarse gradient has norm
    2(m-1)/(sqrt(2 pi)(m+1)^2) (1^T v*)^2 > 0: identity cannot stay there, and the
    ratio |E g_id|^2 / (|df/dv|^2 + <E g_id, df/dw>) -> infinity near it; ReLU and
    clipped ReLU settle there;
(c) with sampled coarse gradients (batches of 10, 50, 1000) descent holds only "on a
    coarse scale" (the paper's Fig. 1 idea).

Public entry point: :func:`run`. It writes PNG figures, ``results.json`` and
``report.md`` into ``out_dir`` (atomically) and returns a
:class:`~stelab.experiments.spine.PartResult`. This module computes the numbers; the
claims and their verdict rules are in :mod:`.synthetic_claims`, the figures and the
markdown in :mod:`.synthetic_report`.

Choices (not fixed by the paper): m = 5, n = 20; v* ~ N(0, I_m) drawn until
(1^T v*)^2 < (m+1)/2 |v*|^2 (so the spurious point is a local minimum and saddles
exist) and |1^T v*| >= 0.5 (so claim (b) is not degenerate); w* uniform on the sphere;
learning rate 0.1 (stable: the v-part has Lipschitz constant (m+1)/4).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from ...theory import two_layer as tl
from ..spine import PartResult, part_dir, write_part
from .synthetic_claims import claim_a, claim_b, claim_c, outcome

__all__ = ["BATCH_SIZES", "LR", "M", "N", "NAME", "run"]

NAME = "yin2019-synthetic"
BATCH_SIZES = (10, 50, 1000)
LR = 0.1
M, N = 5, 20
DPI = {"quick": 80, "full": 110}


def _config(quick: bool) -> dict[str, Any]:
    if quick:
        return {
            "inits": 6,
            "steps": 1500,
            "spurious_steps": 1500,
            "record_every": 5,
            "ratio_points": 25,
            "lrs": 31,
            "repeats": 60,
        }
    return {
        "inits": 16,
        "steps": 5000,
        "spurious_steps": 5000,
        "record_every": 5,
        "ratio_points": 60,
        "lrs": 61,
        "repeats": 400,
    }


# --------------------------------------------------------------------------- setup


def _teacher(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    for _ in range(10_000):
        vs = torch.randn(M, generator=gen, dtype=torch.float64)
        s, nrm = float(vs.sum()) ** 2, float(vs @ vs)
        if s < (M + 1) / 2 * nrm and math.sqrt(s) >= 0.5:
            break
    ws = torch.randn(N, generator=gen, dtype=torch.float64)
    return vs, ws / ws.norm()


# --------------------------------------------------------------------------- part A


def _part_a(
    vs: torch.Tensor,
    ws: torch.Tensor,
    cps: tl.CriticalPoints,
    cfg: dict[str, Any],
    gen: torch.Generator,
    bar: Any,
) -> dict[str, Any]:
    k = cfg["inits"]
    v0 = torch.randn(k, M, generator=gen, dtype=torch.float64)
    w0 = torch.randn(k, N, generator=gen, dtype=torch.float64)
    # "basin" family: the same draws with signs flipped so that w0^T w* > 0, v0^T v* > 0
    w0b = torch.where((w0 @ ws).unsqueeze(-1) < 0, -w0, w0)
    v0b = torch.where((v0 @ vs).unsqueeze(-1) < 0, -v0, v0)
    f_sp = cps.spurious_min.loss
    out: dict[str, Any] = {}
    for fam, (vi, wi) in {"gaussian": (v0, w0), "basin": (v0b, w0b)}.items():
        fam_out: dict[str, Any] = {
            "theta0": tl.theta(wi, ws),
            "v0_dot_vstar": vi @ vs,
            "w0_norm": wi.norm(dim=-1),
        }
        for ste in tl.STES:
            tr = tl.coarse_gradient_descent(
                vi, wi, vs, ws, ste, LR, cfg["steps"], record_every=cfg["record_every"]
            )
            # monotonicity and min |w| over every step (the record is a subsample)
            inc = float(tr.max_increase.max())
            cos = tr.cosine[torch.isfinite(tr.cosine)]
            fl, ft = tr.loss[-1], tr.theta[-1]
            tail = tr.loss[-max(2, tr.loss.shape[0] // 10) :]
            rise = tail.diff(dim=0).max(0).values
            fam_out[ste] = {
                "trajectory": tr,
                "final_loss": fl,
                "final_theta": ft,
                "final_w_norm": tr.w_norm[-1],
                "outcome": [
                    outcome(float(a), float(b), float(c), f_sp)
                    for a, b, c in zip(ft, fl, rise, strict=True)
                ],
                "max_loss_increase": inc,
                "max_loss_increase_per_run": tr.max_increase,
                "min_w_norm_per_run": tr.min_w_norm,
                "min_cosine": float(cos.min()) if cos.numel() else math.nan,
                "min_inner": float(tr.inner.min()),
            }
            bar.update(1)
        out[fam] = fam_out
    return out


# --------------------------------------------------------------------------- part B


def _part_b(
    vs: torch.Tensor,
    ws: torch.Tensor,
    cps: tl.CriticalPoints,
    cfg: dict[str, Any],
    gen: torch.Generator,
    bar: Any,
) -> dict[str, Any]:
    sp = cps.spurious_min
    eps = 0.05
    v0 = sp.v + eps * torch.randn(M, generator=gen, dtype=torch.float64)
    w0 = tl.w_at_angle(ws, math.pi - eps, generator=gen)
    out: dict[str, Any] = {
        "f_spurious": sp.loss,
        "start_loss": float(tl.population_loss(v0, w0, vs, ws)),
    }
    # exact values at the spurious minimizer (any w with theta = pi; take w = -w*)
    s1 = float(vs.sum())
    formula = 2 * (M - 1) / (math.sqrt(2 * math.pi) * (M + 1) ** 2) * s1**2
    at_sp = {}
    for ste in tl.STES:
        gv, gw = tl.expected_coarse_grad(sp.v, -ws, vs, ws, ste)
        at_sp[ste] = {"norm_Eg_w": float(gw.norm()), "norm_Eg_v": float(gv.norm())}
    out["at_spurious"] = at_sp
    out["identity_norm_formula"] = formula
    tail = max(1, cfg["spurious_steps"] // 4)
    for ste in tl.STES:
        tr = tl.coarse_gradient_descent(v0, w0, vs, ws, ste, LR, cfg["spurious_steps"])
        L = tr.loss
        out[ste] = {
            "trajectory": tr,
            "final_loss": float(L[-1]),
            "tail_mean_loss": float(L[-tail:].mean()),
            "tail_min_loss": float(L[-tail:].min()),
            "max_loss": float(L.max()),
            "final_theta": float(tr.theta[-1]),
            "final_w_norm": float(tr.w_norm[-1]),
            "final_v_dist": float((tr.v - sp.v).norm()),
            "max_loss_increase": float(L.diff().max()),
        }
        bar.update(1)
    # the descent ratio along a path into the spurious minimizer
    ts = torch.logspace(-6, -0.5, cfg["ratio_points"], dtype=torch.float64)
    dv = torch.randn(M, generator=gen, dtype=torch.float64)
    dv = dv / dv.norm()
    dw = torch.randn(N, generator=gen, dtype=torch.float64)
    vpath = sp.v + ts.unsqueeze(-1) * dv
    wpath = torch.stack([tl.w_at_angle(ws, math.pi - float(t), direction=dw) for t in ts])
    ratio: dict[str, Any] = {"t": ts}
    for ste in tl.STES:
        r = tl.coarse_descent_ratio(vpath, wpath, vs, ws, ste)
        _, gw = tl.expected_coarse_grad(vpath, wpath, vs, ws, ste)
        lt, lr_ = torch.log(ts[:10]), torch.log(r[:10])
        slope = float(((lt - lt.mean()) * (lr_ - lr_.mean())).sum() / ((lt - lt.mean()) ** 2).sum())
        ratio[ste] = {"ratio": r, "norm_Eg_w": gw.norm(dim=-1), "loglog_slope_small_t": slope}
    out["ratio"] = ratio
    bar.update(1)
    return out


# --------------------------------------------------------------------------- part C


def _part_c(
    vs: torch.Tensor, ws: torch.Tensor, cfg: dict[str, Any], gen: torch.Generator, bar: Any
) -> dict[str, Any]:
    v = vs + 0.5 * torch.randn(M, generator=gen, dtype=torch.float64)
    w = tl.w_at_angle(ws, math.pi / 3, generator=gen)
    f0 = float(tl.population_loss(v, w, vs, ws))
    lrs = torch.logspace(-5, 1, cfg["lrs"], dtype=torch.float64)
    fine = torch.logspace(-5, 1, 600, dtype=torch.float64)
    out: dict[str, Any] = {
        "lrs": lrs,
        "fine_lrs": fine,
        "f0": f0,
        "theta0": math.pi / 3,
        "w_norm0": 1.0,
    }
    for ste in tl.STES:
        _, ew = tl.expected_coarse_grad(v, w, vs, ws, ste)
        d_exp = tl.population_loss(v, w - lrs.unsqueeze(-1) * ew, vs, ws) - f0
        res: dict[str, Any] = {"expected_step_df": d_exp}
        for b in BATCH_SIZES:
            dpop, dbatch, first, example = [], [], [], None
            for r in range(cfg["repeats"]):
                z = torch.randn(b, M, N, generator=gen, dtype=torch.float64)
                _, _, gw = tl.coarse_grad_on_batch(z, v, w, vs, ws, ste)
                wn = w - lrs.unsqueeze(-1) * gw  # w-only step: the STE acts on w
                dpop.append(tl.population_loss(v, wn, vs, ws) - f0)
                bl = tl.batch_loss(z, v, wn, vs, ws)
                l0 = tl.batch_loss(z, v, w, vs, ws)
                db_r = bl - l0
                dbatch.append(torch.where(db_r.abs() <= 1e-12, 0.0, db_r))  # rounding
                # smallest step at which some sign of Z_b w flips: min positive (Z w)/(Z g)
                lam = (z @ w) / (z @ gw)
                lam = lam[lam > 0]
                first.append(float(lam.min()) if lam.numel() else math.inf)
                if r == 0:  # one batch on a fine lr grid, for the Fig.-1-style panel
                    wf = w - fine.unsqueeze(-1) * gw
                    example = tl.batch_loss(z, v, wf, vs, ws) / l0
            dp, db = torch.stack(dpop), torch.stack(dbatch)
            res[str(b)] = {
                "p_decrease_pop": (dp < 0).double().mean(0),
                "mean_df_pop": dp.mean(0),
                "se_df_pop": dp.std(0) / math.sqrt(dp.shape[0]),
                "p_decrease_batch": (db < 0).double().mean(0),
                "p_unchanged_batch": (db == 0).double().mean(0),
                "median_first_flip_lr": float(torch.tensor(first).median()),
                "example_batch_loss_ratio": example,
            }
            bar.update(1)
        out[ste] = res
    return out


# --------------------------------------------------------------------------- entry point


def run(out_dir: Path, *, quick: bool = False, seed: int = 0, progress: bool = True) -> PartResult:
    """Run the [Y19] synthetic experiment and write figures, results.json and report.md.

    Args:
        out_dir: directory to write into (created if missing).
        quick: small configuration (well under a minute on 2 CPU cores).
        seed: seed of every random draw (teacher, initialisations, batches).
        progress: show a tqdm progress bar.

    Returns:
        the :class:`~stelab.experiments.spine.PartResult`: claims ``a``, ``b``, ``c``
        (with their ``checks``) and the three figures.
    """
    from tqdm.auto import tqdm

    from .synthetic_report import fig_part_a, fig_part_b, fig_part_c, report_md

    t0 = time.perf_counter()
    out_dir, seed = part_dir(out_dir, seed, seed_max=2**63 - 1)
    cfg = _config(bool(quick))
    gens = [torch.Generator().manual_seed(seed * 7919 + k) for k in range(4)]

    vs, ws = _teacher(gens[0])
    cps = tl.critical_points(vs)
    total = 2 * len(tl.STES) + len(tl.STES) + 1 + len(tl.STES) * len(BATCH_SIZES) + 1
    # every tensor here is tiny: intra-op threads only add overhead (and thrash on a
    # shared machine), so run single-threaded and restore the setting afterwards
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    bar = tqdm(total=total, desc=NAME, disable=not progress, leave=False)
    try:
        a = _part_a(vs, ws, cps, cfg, gens[1], bar)
        b = _part_b(vs, ws, cps, cfg, gens[2], bar)
        c = _part_c(vs, ws, cfg, gens[3], bar)
        claims = [claim_a(a), claim_b(b), claim_c(c)]
        figs = {
            "a": "y19_cgd_random_init.png",
            "b": "y19_spurious_minimizer.png",
            "c": "y19_sampled_steps.png",
        }
        dpi = DPI["quick" if quick else "full"]
        fig_part_a(a, cps, out_dir / figs["a"], dpi)
        fig_part_b(b, out_dir / figs["b"], dpi)
        fig_part_c(c, out_dir / figs["c"], dpi)
        bar.update(1)
    finally:
        bar.close()
        torch.set_num_threads(threads)

    def cp_dict(p: Any) -> dict[str, Any] | None:
        return None if p is None else {"theta": p.theta, "v": p.v, "loss": p.loss}

    def strip(d: Any) -> Any:  # drop Trajectory objects, keep their summaries
        if isinstance(d, dict):
            return {k: strip(v) for k, v in d.items() if k != "trajectory"}
        return d

    res = {
        "name": NAME,
        "paper": "Yin et al., ICLR 2019, arXiv:1903.05662",
        "quick": bool(quick),
        "seed": seed,
        "config": {**cfg, "m": M, "n": N, "lr": LR, "batch_sizes": list(BATCH_SIZES)},
        "v_star": vs,
        "w_star": ws,
        "sum_v_star": float(vs.sum()),
        "critical_points": {
            "global_min": cp_dict(cps.global_min),
            "spurious_min": cp_dict(cps.spurious_min),
            "saddle": cp_dict(cps.saddle),
            "spurious_is_local_min": cps.spurious_is_local_min,
        },
        "part_a": strip(a),
        "part_b": strip(b),
        "part_c": strip(c),
    }
    return write_part(
        out_dir,
        name=NAME,
        claims=claims,
        results=res,
        report=report_md(res, claims, figs),
        figures=list(figs.values()),
        started=t0,
    )
