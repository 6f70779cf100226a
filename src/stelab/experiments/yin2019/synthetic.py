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
``report.md`` into ``out_dir`` (atomically) and returns a summary dict.

Choices (not fixed by the paper): m = 5, n = 20; v* ~ N(0, I_m) drawn until
(1^T v*)^2 < (m+1)/2 |v*|^2 (so the spurious point is a local minimum and saddles
exist) and |1^T v*| >= 0.5 (so claim (b) is not degenerate); w* uniform on the sphere;
learning rate 0.1 (stable: the v-part has Lipschitz constant (m+1)/4).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from stelab.errors import StelabTypeError, check_int
from stelab.experiments.verdicts import verdict_table
from stelab.io import atomic_write_bytes
from stelab.plots import save_figure
from stelab.theory import two_layer as tl

NAME = "yin2019-synthetic"
STE_COLORS = {"identity": "tab:blue", "relu": "tab:orange", "clipped_relu": "tab:green"}
STE_STYLES = {"identity": "-", "relu": "--", "clipped_relu": "-."}
BATCH_SIZES = (10, 50, 1000)
LR = 0.1
M, N = 5, 20

# tolerances for classifying where a run ended and for the verdicts
_TOL_THETA = 1e-2  # final theta within this of 0 or pi ...
_TOL_LOSS = 1e-4  # ... and final loss within this of the critical value
_TOL_SETTLE = 1e-9  # a loss increase above this late in a run: oscillating
_W_COLLAPSE = 0.05  # |w| below this somewhere in a run: "collapsed" towards w = 0
_TOL_MONO = 1e-12
_TOL_COS = -1e-6


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


# --------------------------------------------------------------------------- output helpers


def _atomic_write(path: Path, data: bytes) -> None:
    atomic_write_bytes(path, data)


_DPI = {"quick": 80, "full": 110}


def _save_fig(fig: Any, path: Path, dpi: int = _DPI["full"]) -> None:
    save_figure(fig, path, dpi=dpi)


def _jsonable(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    return x


def _fmt(x: float, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return str(x)
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e4):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


# --------------------------------------------------------------------------- setup


def _teacher(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    for _ in range(10_000):
        vs = torch.randn(M, generator=gen, dtype=torch.float64)
        s, nrm = float(vs.sum()) ** 2, float(vs @ vs)
        if s < (M + 1) / 2 * nrm and math.sqrt(s) >= 0.5:
            break
    ws = torch.randn(N, generator=gen, dtype=torch.float64)
    return vs, ws / ws.norm()


def _outcome(theta: float, loss: float, rise: float, f_sp: float) -> str:
    """Where a run ended: "global", "spurious", "oscillating" or "other" (still moving).

    ``rise`` is the largest loss increase between records over the last 10% of them.
    """
    if rise > _TOL_SETTLE:
        return "oscillating"
    if theta < _TOL_THETA and loss < _TOL_LOSS:
        return "global"
    if theta > math.pi - _TOL_THETA and abs(loss - f_sp) < _TOL_LOSS:
        return "spurious"
    return "other"


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
                    _outcome(float(a), float(b), float(c), f_sp)
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


# --------------------------------------------------------------------------- verdicts


def _verdict_a(a: dict[str, Any]) -> dict[str, Any]:
    ok_mono, ok_mono_regular, ok_cos, ok_crit = True, True, True, True
    collapsed_runs: list[str] = []
    for fam in ("gaussian", "basin"):
        for ste in ("relu", "clipped_relu"):
            r = a[fam][ste]
            mono = r["max_loss_increase_per_run"] <= _TOL_MONO
            coll = r["min_w_norm_per_run"] < _W_COLLAPSE
            ok_mono &= bool(mono.all())
            ok_mono_regular &= bool((mono | coll).all())
            collapsed_runs += [f"{fam}/{ste}#{i}" for i in coll.nonzero().flatten().tolist()]
            ok_cos &= r["min_cosine"] >= _TOL_COS
            ok_crit &= all(o in ("global", "spurious") for o in r["outcome"])
    lines = []
    basin_all_global = all(
        all(o == "global" for o in a["basin"][ste]["outcome"]) for ste in tl.STES
    )
    for fam in ("gaussian", "basin"):
        for ste in tl.STES:
            r = a[fam][ste]
            n_glob = sum(o == "global" for o in r["outcome"])
            n_sp = sum(o == "spurious" for o in r["outcome"])
            lines.append(
                f"{fam}/{ste}: {n_glob}/{len(r['outcome'])} global, {n_sp} spurious, "
                f"max final theta among global {_fmt(_max_where(r, 'global'))}, "
                f"max loss increase {_fmt(r['max_loss_increase'])}, min cos {_fmt(r['min_cosine'])}"
            )
    if collapsed_runs:
        lines.append(
            f"|w| collapsed below {_W_COLLAPSE} in {', '.join(collapsed_runs)} (the ReLU coarse "
            "gradient does not shrink with |w|; crossing w = 0 flips theta and f jumps)"
            + ("" if ok_mono_regular else "; f also rose in runs where |w| stayed away from 0")
        )
    if ok_mono and ok_cos and ok_crit and basin_all_global:
        verdict = "reproduced"
    elif ok_mono_regular and ok_cos and ok_crit:
        verdict = "partly"
    else:
        verdict = "not"
    return {
        "id": "a",
        "text": (
            "ReLU and clipped-ReLU expected coarse gradients correlate positively with the "
            "true gradient; population coarse gradient descent decreases f monotonically for "
            "small lr and converges to a critical point (the global minimum from "
            "initialisations in its basin)."
        ),
        "verdict": verdict,
        "evidence": "; ".join(lines),
        "checks": {
            "relu_crelu_monotone": ok_mono,
            "relu_crelu_monotone_while_w_away_from_0": ok_mono_regular,
            "relu_crelu_cos_nonneg": ok_cos,
            "relu_crelu_end_at_critical_point": ok_crit,
            "basin_inits_all_global_all_stes": basin_all_global,
        },
    }


def _max_where(r: dict[str, Any], kind: str) -> float:
    vals = [float(t) for t, o in zip(r["final_theta"], r["outcome"], strict=True) if o == kind]
    return max(vals) if vals else math.nan


def _verdict_b(b: dict[str, Any]) -> dict[str, Any]:
    f_sp = b["f_spurious"]
    ident = b["identity"]
    norm_ok = (
        abs(b["at_spurious"]["identity"]["norm_Eg_w"] - b["identity_norm_formula"])
        <= 1e-10 * max(1.0, b["identity_norm_formula"])
        and b["identity_norm_formula"] > 0
    )
    relu_zero = all(b["at_spurious"][s]["norm_Eg_w"] < 1e-12 for s in ("relu", "clipped_relu"))
    settle = all(
        abs(b[s]["tail_mean_loss"] - f_sp) < _TOL_LOSS
        and b[s]["final_theta"] > math.pi - _TOL_THETA
        for s in ("relu", "clipped_relu")
    )
    leaves = ident["tail_mean_loss"] - f_sp > 1e-3 and ident["max_loss"] > b["start_loss"]
    slope = b["ratio"]["identity"]["loglog_slope_small_t"]
    r_id = b["ratio"]["identity"]["ratio"]
    blowup = slope < -0.8 and float(r_id[0]) > 1e3 * float(r_id[-1])
    n_ok = sum([norm_ok, relu_zero, settle, leaves, blowup])
    verdict = "reproduced" if n_ok == 5 else ("partly" if n_ok >= 3 else "not")
    ev = (
        f"|E g_id| at the spurious minimizer {_fmt(b['at_spurious']['identity']['norm_Eg_w'], 6)} "
        f"vs formula {_fmt(b['identity_norm_formula'], 6)}; |E g_relu|, |E g_crelu| there "
        f"{_fmt(b['at_spurious']['relu']['norm_Eg_w'])}, "
        f"{_fmt(b['at_spurious']['clipped_relu']['norm_Eg_w'])}. Started at distance 0.05 "
        f"(f = {_fmt(b['start_loss'], 5)}, f_spurious = {_fmt(f_sp, 6)}): ReLU mean loss over "
        f"the last quarter {_fmt(b['relu']['tail_mean_loss'], 8)}, clipped ReLU "
        f"{_fmt(b['clipped_relu']['tail_mean_loss'], 8)}; "
        f"identity {_fmt(ident['tail_mean_loss'], 5)} "
        f"(max {_fmt(ident['max_loss'], 4)}, final |w| {_fmt(ident['final_w_norm'])}). "
        f"Ratio |E g_id|^2/(|df/dv|^2+⟨E g_id, df/dw⟩) grows like t^{_fmt(slope)} as the "
        f"distance t -> 0 (from {_fmt(float(r_id[-1]))} at t={_fmt(float(b['ratio']['t'][-1]))} "
        f"to {_fmt(float(r_id[0]))} at t={_fmt(float(b['ratio']['t'][0]))})."
    )
    return {
        "id": "b",
        "text": (
            "At the spurious minimizer the identity STE's expected coarse gradient is nonzero "
            "(|E g_id| = 2(m-1)/(sqrt(2 pi)(m+1)^2) (1^T v*)^2): identity cannot stay there and "
            "its descent ratio blows up, while ReLU and clipped ReLU settle at it."
        ),
        "verdict": verdict,
        "evidence": ev,
        "checks": {
            "identity_norm_matches_formula": norm_ok,
            "relu_crelu_zero_at_spurious": relu_zero,
            "relu_crelu_settle": settle,
            "identity_leaves_and_loss_rises": leaves,
            "ratio_blows_up": blowup,
        },
    }


def _verdict_c(c: dict[str, Any]) -> dict[str, Any]:
    lrs = c["lrs"]
    small = int((lrs <= 1e-2).nonzero()[-1, 0])  # the largest lr <= 1e-2
    checks: dict[str, bool] = {}
    lines = []
    for ste in tl.STES:
        r = c[ste]
        p10 = float(r["10"]["p_decrease_pop"][small])
        p1000 = float(r["1000"]["p_decrease_pop"][small])
        mean_ok = all(float(r[str(b)]["mean_df_pop"][small]) < 0 for b in BATCH_SIZES)
        firsts = [r[str(b)]["median_first_flip_lr"] for b in BATCH_SIZES]
        checks[f"{ste}_mean_descent_small_lr"] = mean_ok
        checks[f"{ste}_p_decrease_grows_with_batch"] = p10 < p1000 and p1000 >= 0.95
        checks[f"{ste}_coarser_scale_for_small_batch"] = firsts[0] > firsts[-1]
        lines.append(
            f"{ste}: at lr {_fmt(float(lrs[small]))} P(f decreases) = {p10:.2f} (B=10), "
            f"{float(r['50']['p_decrease_pop'][small]):.2f} (B=50), {p1000:.2f} (B=1000); "
            "median smallest lr that flips an activation on the batch "
            f"{', '.join(_fmt(x) for x in firsts)} "
            f"for B = 10, 50, 1000"
        )
    n_ok = sum(checks.values())
    verdict = (
        "reproduced" if n_ok == len(checks) else ("partly" if n_ok >= len(checks) / 2 else "not")
    )
    return {
        "id": "c",
        "text": (
            "With few samples per step (sampled coarse gradients) descent holds only on a "
            "coarse scale: the batch loss is piecewise constant in the step size and a single "
            "step decreases f only with some probability, approaching 1 as the batch grows."
        ),
        "verdict": verdict,
        "evidence": "; ".join(lines),
        "checks": checks,
    }


# --------------------------------------------------------------------------- figures


def _fig_part_a(a: dict[str, Any], cps: tl.CriticalPoints, path: Path, dpi: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(17, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 4)
    titles = {
        "gaussian": "Gaussian",
        "basin": "$w_0^Tw^*>0,\\ v_0^Tv^*>0$",
    }
    for row, fam in enumerate(("gaussian", "basin")):
        for ste in tl.STES:
            tr = a[fam][ste]["trajectory"]
            x = tr.step.numpy()
            kw = {"color": STE_COLORS[ste], "ls": STE_STYLES[ste], "alpha": 0.6, "lw": 1.1}
            axes[row, 0].plot(x, tr.loss.clamp_min(1e-16).numpy(), **kw)
            axes[row, 1].plot(x, tr.theta.numpy(), **kw)
            axes[row, 2].plot(x, tr.w_norm.numpy(), **kw)
            axes[row, 3].plot(x, tr.cosine.numpy(), **kw)
        ax = axes[row, 0]
        ax.set_yscale("log")
        ax.axhline(cps.spurious_min.loss, color="k", ls=":", lw=1)
        ax.set_ylabel("population loss f (log)")
        ax.set_title(f"{titles[fam]} init: loss (dotted: spurious min)")
        ax = axes[row, 1]
        ax.axhline(math.pi, color="k", ls=":", lw=1)
        if cps.saddle is not None:
            ax.axhline(cps.saddle.theta, color="gray", ls="--", lw=1)
        ax.set_ylabel("θ(w, w*) [rad]")
        ax.set_title("angle θ (dashed: saddle θ, dotted: π)")
        axes[row, 2].set_yscale("log")
        axes[row, 2].set_ylabel("‖w‖ (log)")
        axes[row, 2].set_title("‖w‖")
        axes[row, 3].set_ylim(-1.05, 1.05)
        axes[row, 3].set_ylabel("cos(E g_μ, ∂f/∂w)")
        axes[row, 3].set_title("cos(E g_μ, ∂f/∂w): coarse vs true w-gradient")
        for ax in axes[row]:
            ax.set_xlabel("coarse gradient descent step (lr = 0.1)")
            ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=STE_COLORS[s], ls=STE_STYLES[s], label=s) for s in tl.STES]
    axes[0, 0].legend(handles=handles, loc="lower left")
    fig.suptitle(
        "[Y19] population coarse gradient descent, m=5, n=20: random initialisations "
        "(each line one init)"
    )
    _save_fig(fig, path, dpi)


def _fig_part_b(b: dict[str, Any], path: Path, dpi: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(17, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 3)
    f_sp = b["f_spurious"]
    for ste in tl.STES:
        tr = b[ste]["trajectory"]
        x = tr.step.numpy()
        kw = {"color": STE_COLORS[ste], "ls": STE_STYLES[ste], "lw": 1.3, "label": ste}
        # every step is plotted: identity's spikes last one step and would vanish otherwise
        axes[0, 0].plot(x, (tr.loss - f_sp).clamp_min(1e-16).numpy(), **kw)
        axes[0, 1].plot(x, (math.pi - tr.theta).clamp_min(1e-16).numpy(), **kw)
        axes[0, 2].plot(x, tr.w_norm.numpy(), **kw)
        axes[1, 0].plot(x, tr.cosine.numpy(), **kw)
    ax = axes[0, 0]
    ax.set_yscale("log")
    ax.set_ylabel("f − f(spurious min)  (log, floor 1e-16)")
    ax.set_title(f"loss above the spurious minimum f = {f_sp:.4f}, started 0.05 away")
    ax.legend()
    axes[0, 1].set_yscale("log")
    axes[0, 1].set_ylabel("π − θ (log)")
    axes[0, 1].set_title("distance of θ from π")
    axes[0, 2].set_yscale("log")
    axes[0, 2].set_ylabel("‖w‖ (log)")
    axes[0, 2].set_title("‖w‖ (identity drives w towards 0 and through it)")
    axes[1, 0].set_ylabel("cos(E g_μ, ∂f/∂w)")
    axes[1, 0].set_ylim(-1.05, 1.05)
    axes[1, 0].set_title("cos(E g_μ, ∂f/∂w) (undefined once θ = π exactly)")
    for ax in (axes[0, 0], axes[0, 1], axes[0, 2], axes[1, 0]):
        ax.set_xlabel("coarse gradient descent step (lr = 0.1)")
        ax.grid(alpha=0.3)
    r = b["ratio"]
    t = r["t"].numpy()
    for ste in tl.STES:
        kw = {"color": STE_COLORS[ste], "ls": STE_STYLES[ste], "lw": 1.5}
        axes[1, 1].loglog(t, r[ste]["ratio"].numpy(), label=ste, **kw)
        axes[1, 2].loglog(t, r[ste]["norm_Eg_w"].clamp_min(1e-300).numpy(), label=ste, **kw)
    axes[1, 1].loglog(t, 1e-1 / t, "k:", lw=1, label="∝ 1/t")
    axes[1, 1].set_xlabel("distance t from the spurious minimizer (|Δv| = π − θ = t)")
    axes[1, 1].set_ylabel("|E g|² / (|∂f/∂v|² + ⟨E g, ∂f/∂w⟩)")
    axes[1, 1].set_title("claim (b): descent ratio near the spurious min")
    axes[1, 1].legend()
    axes[1, 2].axhline(
        b["identity_norm_formula"], color="k", ls=":", lw=1.2, label="2(m−1)(1ᵀv*)²/(√(2π)(m+1)²)"
    )
    axes[1, 2].set_xlabel("distance t from the spurious minimizer")
    axes[1, 2].set_ylabel("‖E g_μ‖ (w-part)")
    axes[1, 2].set_title("expected coarse gradient norm near the spurious min")
    axes[1, 2].legend()
    for ax in (axes[1, 1], axes[1, 2]):
        ax.grid(alpha=0.3, which="both")
    fig.suptitle("[Y19] claim (b): identity vs ReLU / clipped-ReLU STE at the spurious minimizer")
    _save_fig(fig, path, dpi)


def _fig_part_c(c: dict[str, Any], path: Path, dpi: int) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(17, 12), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 3)
    lrs, fine = c["lrs"].numpy(), c["fine_lrs"].numpy()
    colors = {10: "tab:red", 50: "tab:purple", 1000: "tab:cyan"}
    for row, ste in enumerate(tl.STES):
        r = c[ste]
        for b in BATCH_SIZES:
            rb = r[str(b)]
            axes[row, 0].semilogx(
                fine, rb["example_batch_loss_ratio"].numpy(), drawstyle="steps-post",
                color=colors[b], label=f"B={b}",
            )  # fmt: skip
            axes[row, 1].semilogx(
                lrs, rb["p_decrease_pop"].numpy(), color=colors[b], label=f"B={b}"
            )
            m, se = rb["mean_df_pop"].numpy(), rb["se_df_pop"].numpy()
            axes[row, 2].semilogx(lrs, m, color=colors[b], label=f"B={b}")
            axes[row, 2].fill_between(lrs, m - 2 * se, m + 2 * se, color=colors[b], alpha=0.2)
        axes[row, 2].semilogx(lrs, r["expected_step_df"].numpy(), "k--", lw=1, label="B=∞ (E g)")
        axes[row, 2].set_yscale("symlog", linthresh=1e-4)
        axes[row, 0].axhline(1.0, color="k", ls=":", lw=1)
        axes[row, 0].set_ylabel("batch loss after step / before")
        axes[row, 0].set_title(f"{ste}: one batch, loss on that batch vs lr")
        axes[row, 1].set_ylabel("P(f decreases)")
        axes[row, 1].set_ylim(-0.02, 1.02)
        axes[row, 1].set_title(f"{ste}: fraction of steps that decrease f")
        axes[row, 2].set_ylabel("mean Δf (symlog), ±2 SE")
        axes[row, 2].set_title(f"{ste}: mean change of the population loss")
        for ax in axes[row]:
            ax.set_xlabel("learning rate η (one step w ← w − η g_μ)")
            ax.grid(alpha=0.3, which="both")
            ax.legend(fontsize=8)
    fig.suptitle(
        "[Y19] claim (c): one sampled coarse-gradient step from θ = π/3, |w| = 1 "
        f"(f0 = {c['f0']:.3f}); batch sizes 10, 50, 1000"
    )
    _save_fig(fig, path, dpi)


# --------------------------------------------------------------------------- report


def _report_md(res: dict[str, Any], claims: list[dict[str, Any]], figs: dict[str, str]) -> str:
    a, b, c = res["part_a"], res["part_b"], res["part_c"]
    cp = res["critical_points"]
    L = [
        "## yin2019-synthetic: [Y19] two-linear-layer model (Yin et al., ICLR 2019)",
        "",
        f"Setup: m = {M}, n = {N}, teacher v* = {[round(x, 3) for x in res['v_star'].tolist()]} "
        f"(1ᵀv* = {res['sum_v_star']:.3f}), |w*| = 1; spurious minimizer loss "
        f"{_fmt(cp['spurious_min']['loss'], 6)}, saddle at θ = "
        f"{_fmt(cp['saddle']['theta'] if cp['saddle'] else math.nan, 4)} "
        f"(loss {_fmt(cp['saddle']['loss'] if cp['saddle'] else math.nan, 4)}); "
        f"lr = {LR}; {res['config']['steps']} steps; mode {'quick' if res['quick'] else 'full'}, "
        f"seed {res['seed']}. Expectations are exact (closed forms of Lemma 1/2 and the "
        "expected coarse gradients); sampled gradients use autograd through "
        "`Quantizer('heaviside', estimator=...)`.",
        "",
        f"### Figure: `{figs['a']}`",
        "",
        f"![coarse gradient descent from random inits]({figs['a']})",
        "",
    ]
    counts = []
    for fam in ("gaussian", "basin"):
        for ste in tl.STES:
            o = a[fam][ste]["outcome"]
            counts.append(
                f"{fam}/{ste} {sum(x == 'global' for x in o)}/{len(o)} global, "
                f"{sum(x == 'spurious' for x in o)} spurious"
            )
    ga = a["gaussian"]
    mono_lines = []
    for ste in tl.STES:
        n_runs = n_up = n_coll = n_up_regular = 0
        for fam in ("gaussian", "basin"):
            r = a[fam][ste]
            up = r["max_loss_increase_per_run"] > _TOL_MONO
            coll = r["min_w_norm_per_run"] < _W_COLLAPSE
            n_runs += up.numel()
            n_up += int(up.sum())
            n_coll += int(coll.sum())
            n_up_regular += int((up & ~coll).sum())
        mono_lines.append(
            f"{ste}: f rose in {n_up}/{n_runs} runs, |w| fell below {_W_COLLAPSE} in {n_coll}, "
            f"f rose with |w| away from 0 in {n_up_regular}"
        )
    min_cos = min(a[f][s]["min_cosine"] for f in a for s in ("relu", "clipped_relu"))
    L.append(
        "Population coarse gradient descent (lr 0.1) from "
        f"{len(ga['identity']['outcome'])} Gaussian initialisations (top) and the same draws "
        "sign-flipped into w₀ᵀw* > 0, v₀ᵀv* > 0 (bottom). The cosine between the ReLU / "
        f"clipped-ReLU expected coarse gradient and the true gradient stays ≥ 0 (min "
        f"{_fmt(min_cos)}), as the paper proves. Monotone decrease, checked at every step: "
        + "; ".join(mono_lines)
        + ". The ReLU (and identity) coarse gradient does not shrink with ‖w‖, so from "
        "initialisations with large h = ‖v‖² + (1ᵀv)² − (1ᵀv)(1ᵀv*) + vᵀv* it can drive ‖w‖ "
        "to ≈0 before v adapts; the iterate then crosses w = 0, θ flips and f jumps, for any "
        "lr (a descent bound f(x − ηg) ≤ f(x) − cη⟨g, ∇f⟩ needs the Lipschitz constant of "
        "∂f/∂w ∝ 1/‖w‖ to stay bounded, i.e. ‖w‖ bounded below). Every run ends at a "
        "critical point, not always the global one: " + "; ".join(counts) + ". The paper "
        "guarantees convergence to a critical point; runs that start beyond the saddle "
        "(θ₀ large or v₀ᵀv* < 0) end at the spurious minimizer θ = π (identity then keeps "
        "oscillating near it, see claim b)."
    )
    L += ["", f"### Figure: `{figs['b']}`", "", f"![near the spurious minimizer]({figs['b']})", ""]
    L.append(
        "Started 0.05 away from the spurious minimizer, ReLU and clipped ReLU descend "
        "monotonically to it (mean loss over the last quarter "
        f"{_fmt(b['relu']['tail_mean_loss'], 9)} "
        f"and {_fmt(b['clipped_relu']['tail_mean_loss'], 9)} vs f = {_fmt(b['f_spurious'], 9)}), "
        "while the identity STE is pushed off: its w shrinks through 0, θ jumps between ≈0 and "
        f"≈π and the loss spikes to {_fmt(b['identity']['max_loss'], 3)} (mean over the last "
        f"quarter {_fmt(b['identity']['tail_mean_loss'], 4)}). At the minimizer "
        f"‖E g_id‖ = {_fmt(b['at_spurious']['identity']['norm_Eg_w'], 8)}, equal to the "
        f"formula 2(m−1)(1ᵀv*)²/(√(2π)(m+1)²) = {_fmt(b['identity_norm_formula'], 8)}, and "
        "the ratio ‖E g_id‖²/(‖∂f/∂v‖² + ⟨E g_id, ∂f/∂w⟩) grows like t^"
        f"{_fmt(b['ratio']['identity']['loglog_slope_small_t'])} as the distance t → 0, while "
        "for ReLU/clipped ReLU it goes to 0 (their expected coarse gradient vanishes there)."
    )
    L += [
        "",
        f"### Figure: `{figs['c']}`",
        "",
        f"![sampled coarse gradient steps]({figs['c']})",
        "",
    ]
    lrs = c["lrs"]
    small = int((lrs <= 1e-2).nonzero()[-1, 0])
    rr = c["relu"]
    L.append(
        "One step along a sampled coarse gradient (w only) from θ = π/3. Left: the loss on "
        "the batch itself is piecewise constant in the learning rate and changes only beyond "
        "a threshold that shrinks with the batch (median smallest lr that flips an "
        "activation, ReLU: "
        + ", ".join(_fmt(rr[str(bb)]["median_first_flip_lr"]) for bb in BATCH_SIZES)
        + " for B = 10, 50, 1000) — descent on a coarse scale, the idea of the paper's Fig. 1. "
        f"Middle/right: at lr = {_fmt(float(lrs[small]))} a ReLU step decreases the population "
        f"loss with probability {float(rr['10']['p_decrease_pop'][small]):.2f} (B=10), "
        f"{float(rr['50']['p_decrease_pop'][small]):.2f} (B=50), "
        f"{float(rr['1000']['p_decrease_pop'][small]):.2f} (B=1000); the mean change is "
        "negative for every batch size at small lr (the expected coarse gradient is a descent "
        "direction), and small batches turn ascent at a smaller lr than the expected step."
    )
    L += ["", "### Verdicts", "", *verdict_table(claims), ""]
    return "\n".join(L)


# --------------------------------------------------------------------------- entry point


def run(out_dir: Path, *, quick: bool = False, seed: int = 0, progress: bool = True) -> dict:
    """Run the [Y19] synthetic experiment and write figures, results.json and report.md.

    Args:
        out_dir: directory to write into (created if missing).
        quick: small configuration (well under a minute on 2 CPU cores).
        seed: seed of every random draw (teacher, initialisations, batches).
        progress: show a tqdm progress bar.

    Returns:
        ``{"name", "claims": [{"id", "text", "verdict", "evidence", "checks"}, ...],
        "figures": [paths], "results": path, "report": path, "seconds"}``.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    if not isinstance(out_dir, (str, os.PathLike)):
        raise StelabTypeError(f"out_dir must be a path, got {out_dir!r}")
    seed = check_int("seed", seed, 0, 2**63 - 1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
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
        claims = [_verdict_a(a), _verdict_b(b), _verdict_c(c)]
        figs = {
            "a": "y19_cgd_random_init.png",
            "b": "y19_spurious_minimizer.png",
            "c": "y19_sampled_steps.png",
        }
        dpi = _DPI["quick" if quick else "full"]
        _fig_part_a(a, cps, out_dir / figs["a"], dpi)
        _fig_part_b(b, out_dir / figs["b"], dpi)
        _fig_part_c(c, out_dir / figs["c"], dpi)
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
    report = _report_md(res, claims, figs)
    res = _jsonable(res)
    seconds = time.perf_counter() - t0
    res["claims"] = _jsonable(claims)
    res["seconds"] = seconds
    _atomic_write(out_dir / "results.json", json.dumps(res, indent=1).encode())
    _atomic_write(out_dir / "report.md", report.encode())
    return {
        "name": NAME,
        "claims": _jsonable(claims),
        "figures": [str(out_dir / f) for f in figs.values()],
        "results": str(out_dir / "results.json"),
        "report": str(out_dir / "report.md"),
        "seconds": seconds,
    }
