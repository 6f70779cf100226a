"""Figures and report.md of the ``synthetic`` part ([Y19]'s two-linear-layer model).

The numbers come from :mod:`.synthetic`, the claims from :mod:`.synthetic_claims`.
matplotlib is imported only when a figure is drawn.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...plots import save_figure
from ...theory import two_layer as tl
from ..spine import Claim
from ..verdicts import verdict_table
from .synthetic import BATCH_SIZES, LR, M, N
from .synthetic_claims import TOL_MONO, W_COLLAPSE, fmt, small_lr_index

__all__ = ["STE_COLORS", "STE_STYLES", "fig_part_a", "fig_part_b", "fig_part_c", "report_md"]

STE_COLORS = {"identity": "tab:blue", "relu": "tab:orange", "clipped_relu": "tab:green"}
STE_STYLES = {"identity": "-", "relu": "--", "clipped_relu": "-."}


def fig_part_a(a: dict[str, Any], cps: tl.CriticalPoints, path: Path, dpi: int) -> None:
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
    save_figure(fig, path, dpi=dpi)


def fig_part_b(b: dict[str, Any], path: Path, dpi: int) -> None:
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
    save_figure(fig, path, dpi=dpi)


def fig_part_c(c: dict[str, Any], path: Path, dpi: int) -> None:
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
    save_figure(fig, path, dpi=dpi)


# --------------------------------------------------------------------------- report


def report_md(res: Mapping[str, Any], claims: Sequence[Claim], figs: Mapping[str, str]) -> str:
    """The part's report.md: setup, one section per figure, the claims table."""
    a, b, c = res["part_a"], res["part_b"], res["part_c"]
    cp = res["critical_points"]
    L = [
        "## yin2019-synthetic: [Y19] two-linear-layer model (Yin et al., ICLR 2019)",
        "",
        f"Setup: m = {M}, n = {N}, teacher v* = {[round(x, 3) for x in res['v_star'].tolist()]} "
        f"(1ᵀv* = {res['sum_v_star']:.3f}), |w*| = 1; spurious minimizer loss "
        f"{fmt(cp['spurious_min']['loss'], 6)}, saddle at θ = "
        f"{fmt(cp['saddle']['theta'] if cp['saddle'] else math.nan, 4)} "
        f"(loss {fmt(cp['saddle']['loss'] if cp['saddle'] else math.nan, 4)}); "
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
            up = r["max_loss_increase_per_run"] > TOL_MONO
            coll = r["min_w_norm_per_run"] < W_COLLAPSE
            n_runs += up.numel()
            n_up += int(up.sum())
            n_coll += int(coll.sum())
            n_up_regular += int((up & ~coll).sum())
        mono_lines.append(
            f"{ste}: f rose in {n_up}/{n_runs} runs, |w| fell below {W_COLLAPSE} in {n_coll}, "
            f"f rose with |w| away from 0 in {n_up_regular}"
        )
    min_cos = min(a[f][s]["min_cosine"] for f in a for s in ("relu", "clipped_relu"))
    L.append(
        "Population coarse gradient descent (lr 0.1) from "
        f"{len(ga['identity']['outcome'])} Gaussian initialisations (top) and the same draws "
        "sign-flipped into w₀ᵀw* > 0, v₀ᵀv* > 0 (bottom). The cosine between the ReLU / "
        f"clipped-ReLU expected coarse gradient and the true gradient stays ≥ 0 (min "
        f"{fmt(min_cos)}), as the paper proves. Monotone decrease, checked at every step: "
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
        f"{fmt(b['relu']['tail_mean_loss'], 9)} "
        f"and {fmt(b['clipped_relu']['tail_mean_loss'], 9)} vs f = {fmt(b['f_spurious'], 9)}), "
        "while the identity STE is pushed off: its w shrinks through 0, θ jumps between ≈0 and "
        f"≈π and the loss spikes to {fmt(b['identity']['max_loss'], 3)} (mean over the last "
        f"quarter {fmt(b['identity']['tail_mean_loss'], 4)}). At the minimizer "
        f"‖E g_id‖ = {fmt(b['at_spurious']['identity']['norm_Eg_w'], 8)}, equal to the "
        f"formula 2(m−1)(1ᵀv*)²/(√(2π)(m+1)²) = {fmt(b['identity_norm_formula'], 8)}, and "
        "the ratio ‖E g_id‖²/(‖∂f/∂v‖² + ⟨E g_id, ∂f/∂w⟩) grows like t^"
        f"{fmt(b['ratio']['identity']['loglog_slope_small_t'])} as the distance t → 0, while "
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
    small = small_lr_index(lrs)
    rr = c["relu"]
    L.append(
        "One step along a sampled coarse gradient (w only) from θ = π/3. Left: the loss on "
        "the batch itself is piecewise constant in the learning rate and changes only beyond "
        "a threshold that shrinks with the batch (median smallest lr that flips an "
        "activation, ReLU: "
        + ", ".join(fmt(rr[str(bb)]["median_first_flip_lr"]) for bb in BATCH_SIZES)
        + " for B = 10, 50, 1000) — descent on a coarse scale, the idea of the paper's Fig. 1. "
        f"Middle/right: at lr = {fmt(float(lrs[small]))} a ReLU step decreases the population "
        f"loss with probability {float(rr['10']['p_decrease_pop'][small]):.2f} (B=10), "
        f"{float(rr['50']['p_decrease_pop'][small]):.2f} (B=50), "
        f"{float(rr['1000']['p_decrease_pop'][small]):.2f} (B=1000); the mean change is "
        "negative for every batch size at small lr (the expected coarse gradient is a descent "
        "direction), and small batches turn ascent at a smaller lr than the expected step."
    )
    L += ["", "### Verdicts", "", *verdict_table([c.to_dict() for c in claims]), ""]
    return "\n".join(L)
