"""The report of ``gradeval``: its figures and its markdown (numbers in, files out).

:func:`write_figures` draws every figure of a run, :func:`report_md` writes the report
from the run's results, the analysed checkpoints and the judged claims.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...analysis import FidelityReport, layer_label
from ..spine import Claim
from ..verdicts import verdict_table
from .gradeval import NAME, STE_SPECS
from .gradeval_claims import hidden_layers, rmse_at, stochastic

__all__ = ["fig_through", "fig_training", "report_md", "write_figures"]


def fig_training(curve: list[list[float]], marks: list[int], path: Path, dpi: int) -> None:
    from ...analysis.plots import panels
    from ...plots import save_figure

    ep = [c[0] for c in curve]
    fig, (ax,) = panels(1, legend=False)
    fig.set_size_inches(6.4, 3.5)
    fig.subplots_adjust(left=0.12, right=0.86, bottom=0.15, top=0.88)
    ax.plot(ep, [c[1] for c in curve], color="tab:blue")
    for e in marks:
        ax.axvline(e, color="0.8", lw=0.8, zorder=0)
    ax.set_xlabel("epoch")
    ax.set_ylabel("expected logistic loss (exact)", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(ep, [c[2] for c in curve], color="tab:orange", lw=1)
    ax2.set_ylabel("expected accuracy (exact)", color="tab:orange")
    ax.set_title("toy SBN 2-5-5-5-1 trained with REINFORCE (checkpoints: grey lines)", fontsize=10)
    save_figure(fig, path, dpi, tight=False, close=True)


def fig_through(summary: dict[int, FidelityReport], path: Path, dpi: int) -> None:
    from ...analysis.plots import estimator_style, panels
    from ...plots import save_figure

    epochs = sorted(summary)
    rep0 = summary[epochs[0]]
    keys = list(rep0.layers)
    style = estimator_style(list(rep0.estimators))
    fig, axes = panels(len(keys))
    for ax, key in zip(axes, keys, strict=True):
        for lab in rep0.estimators:
            m = 2 if rep0.estimators[lab].kind == "coupled" else 1
            vals = [rmse_at(summary[e], lab, key, m) for e in epochs]
            ax.plot(
                epochs,
                vals,
                marker="o",
                ms=3,
                label=lab + (" (M=2)" if m == 2 else ""),
                ls="--" if rep0.estimators[lab].kind == "deterministic" else "-",
                **style[lab],
            )
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlabel("training epoch")
        ax.set_title(layer_label(key))
        ax.grid(alpha=0.3, lw=0.5)
    axes[0].set_ylabel("relative RMSE at M = 1")
    h, lab = axes[0].get_legend_handles_labels()
    fig.legend(
        h,
        lab,
        loc="center left",
        bbox_to_anchor=(fig.subplotpars.right + 0.01, 0.5),
        fontsize=9,
        frameon=False,
    )
    fig.suptitle("one-sample error through training", fontsize=11)
    save_figure(fig, path, dpi, tight=False, close=True)


def _table(rep: FidelityReport, key: str) -> list[str]:
    ms = [m for m in (1, 10, 100, 1000, 9000) if m in rep.sample_sizes]
    head = (
        "| estimator | "
        + " | ".join(f"RMSE M={m}" for m in ms)
        + " | cos M=1 | bias | bias z | rel. var | us/draw | fwd-eq |"
    )
    lines = [head, "|" + "---|" * (len(ms) + 7)]
    for lab, ef in rep.estimators.items():
        lf = ef.layers[key]
        cells = [_f(lf.rmse[lf.at(m)]) for m in ms]
        z = "exact" if math.isinf(lf.bias_z) else _f(lf.bias_z, 2)
        us = "-" if ef.seconds_per_draw is None else f"{ef.seconds_per_draw * 1e6:.0f}"
        fe = "-" if ef.forward_equivalents is None else f"{ef.forward_equivalents:.2f}"
        lines.append(
            f"| {lab} | "
            + " | ".join(cells)
            + f" | {_f(lf.cos_mean[0])} | {_f(lf.bias)} | {z} | {_f(lf.rel_variance)} | "
            f"{us} | {fe} |"
        )
    return lines


def _f(v: float, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{v:.{digits}g}"


def _ste_table(stes: dict[int, FidelityReport]) -> list[str]:
    epochs = sorted(stes)
    keys = stes[epochs[0]].layers
    head = (
        "| estimator | " + " | ".join(f"e{e} {layer_label(k)}" for e in epochs for k in keys) + " |"
    )
    lines = [head, "|" + "---|" * (1 + len(epochs) * len(keys))]
    for lab in STE_SPECS:
        cells = []
        for e in epochs:
            for k in keys:
                lf = stes[e].estimators[lab].layers[k]
                cells.append(f"{lf.rmse[0]:.3g} ({lf.cos_mean[0]:+.2f})")
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return lines


def _budget_table(rep: FidelityReport) -> list[str]:
    t_psa = rep.estimators["psa"].seconds_per_draw or math.nan
    budget = 100 * t_psa
    keys = list(rep.layers)
    lines = [
        f"Error at an equal time budget: {budget * 1e3:.1f} ms = the time of 100 PSA draws "
        "on this machine (RMSE at M = budget / seconds per draw, log-log interpolated; "
        "'-' = outside the M grid).",
        "",
        "| estimator | us/draw | M affordable | " + " | ".join(layer_label(k) for k in keys) + " |",
        "|" + "---|" * (3 + len(keys)),
    ]
    for lab, ef in rep.estimators.items():
        if ef.kind == "deterministic" or not ef.seconds_per_draw:
            continue
        m = budget / ef.seconds_per_draw
        vals = [_f(rep.error_at_budget(lab, k, budget)) for k in keys]
        lines.append(
            f"| {lab} | {ef.seconds_per_draw * 1e6:.0f} | {m:.0f} | " + " | ".join(vals) + " |"
        )
    return lines


def report_md(
    res: dict[str, Any],
    reps: dict[int, FidelityReport],
    summary: dict[int, FidelityReport],
    claims: Sequence[Claim],
    figs: dict[str, str],
    stes: dict[int, FidelityReport] | None = None,
) -> str:
    cfg = res["config"]
    tr = res["training"]
    L = [
        f"# {NAME}: gradient accuracy of SBN estimators ([S20] §5)",
        "",
        "Protocol (docs/papers/psa2020.md): psa-toy data (seed 1, float64, 200 points), "
        "SBN 2-5-5-5-1 with "
        "logistic noise and hidden states in {0, 1} (the paper's parametrisation), logistic "
        "loss; trained with REINFORCE (1 sample), SGD lr 0.03, "
        f"momentum 0.9, batch 10, {cfg['epochs']} epochs; checkpoints after epochs "
        f"{', '.join(map(str, cfg['checkpoints']))}. True gradient by exact enumeration of "
        f"all 2^15 hidden states. {cfg['draws']} draws per estimator (one draw = the full-batch "
        "estimate with independent noise per point), averaged in consecutive groups of M; "
        "relative RMSE sqrt(mean ||g_M - g||^2 / ||g||^2) and cosine similarity per layer "
        "(weights and bias together), for the three hidden layers and the output layer.",
        "",
        "Where this differs from the paper's protocol: the 200 training points are "
        "stelab's `psa-toy` generator (seed 1), not the paper's own sample of the "
        "problem; the init seed and the order of the training draws are stelab's "
        "(`seed`); everything runs in float64; the M grid stops at 9000 (20,000 draws); "
        "`reinforce_loo` is capped at 2,000 draws per M; `arm_shared` is not in the "
        "paper. The hidden states are in {0, 1} as in the paper; in {-1, +1} (stelab's "
        "default) the per-layer relative errors of layers 2, 3 and the output differ, "
        "because the same function has other weights and other gradients.",
        "",
        f"Training: {tr['seconds']:.0f} s{' (reused cached checkpoints)' if tr['reused'] else ''}"
        f"; exact expected loss {tr['curve'][0][1]:.3f} at init -> {tr['curve'][-1][1]:.3f} "
        f"after {tr['curve'][-1][0]} epochs.",
        "",
        f"![training]({figs['training']})",
        "",
        "Choices: `dst` is the paper's ST (sample forward, 2F'(a) backward); `hard_st` uses "
        "hardtanh'. `reinforce_loo` couples its M samples (shared leave-one-out baseline), so "
        f"it is run once per group with at most {cfg['coupled_draws']} draws per M (no M = 1). "
        "`arm` is the paper's layer-wise ARM (Yin & Zhou 2019): per hidden layer, the two "
        "continuations from x1 and x2 each get independent noise above, and the path "
        "continues along x1; `arm_shared` lets the two continuations share their noise "
        "(common random numbers, an unbiased variance-reduced variant, not the paper's). "
        "`tanh_mf` (deterministic mean field) is the zero-variance reference. Bias is the "
        "debiased ||E g_1 - g|| / ||g|| from all draws; bias z ~ N(0, 1) for an unbiased "
        "estimator. us/draw is measured on this (shared) CPU with 64 samples per call (for "
        "the deterministic tanh_mf: the time of one call).",
        "",
    ]
    for epoch, rep in reps.items():
        L += [
            f"## Checkpoint: epoch {epoch}",
            "",
            f"![rmse]({figs[f'rmse_{epoch}']})",
            "",
            f"![cosine]({figs[f'cos_{epoch}']})",
            "",
        ]
        for key in list(rep.layers):
            L += [
                f"**{layer_label(key)}** (|g| = {rep.estimators['psa'].layers[key].ref_norm:.3g})",
                "",
                *_table(rep, key),
                "",
            ]
    obs = []
    for epoch, rep in reps.items():
        cells = []
        for key in hidden_layers(rep):
            p_, d_ = rep.estimators["psa"].layers[key], rep.estimators["dst"].layers[key]
            z = "exact" if math.isinf(p_.bias_z) else f"{p_.bias_z:.1f}"
            cells.append(f"{layer_label(key)} {p_.bias:.3g} (z {z}) vs DST {d_.bias:.3g}")
        obs.append(f"- epoch {epoch}: " + "; ".join(cells))
    L += [
        "## PSA's own bias",
        "",
        "[S20] §3: PSA is unbiased for the last hidden layer; the layers below get a bias from "
        "linearising through the layers above. Debiased relative bias of PSA (its z-score) "
        "and of DST per hidden layer:",
        "",
        *obs,
        "",
    ]
    last = list(reps)[-1]
    L += [
        "## Cost and error at equal time",
        "",
        f"![budget]({figs['budget']})",
        "",
        *_budget_table(reps[last]),
        "",
    ]
    if summary:
        L += [
            "## Through training",
            "",
            f"One-sample relative RMSE at every checkpoint ({cfg['summary_draws']} draws at "
            "the checkpoints not plotted above).",
            "",
            f"![through]({figs['through']})",
            "",
        ]
        keys = list(next(iter(summary.values())).layers)
        L.append(
            "| epoch | " + " | ".join(f"PSA lowest at M=1 ({layer_label(k)})" for k in keys) + " |"
        )
        L.append("|" + "---|" * (1 + len(keys)))
        for e, rep in sorted(summary.items()):
            cells = []
            for k in keys:
                vals = {lab: rmse_at(rep, lab, k, 1) for lab in stochastic(rep)}
                vals = {a: b for a, b in vals.items() if math.isfinite(b)}
                best = min(vals, key=vals.get)  # type: ignore[arg-type]
                cells.append(
                    "yes" if best == "psa" else f"no ({best} {vals[best]:.3g} < {vals['psa']:.3g})"
                )
            L.append(f"| {e} | " + " | ".join(cells) + " |")
        L.append("")
    if stes:
        L += [
            "## How biased is a sign network with an STE?",
            "",
            "The deterministic sign network x = sign(a) with a quantizer STE in the backward "
            "(`stelab gradcheck --estimators det:NAME`), same weights, as an estimator of the "
            "gradient of the SBN's expected loss: relative error ||g_STE - g|| / ||g|| and "
            "(cosine) per layer. Zero variance, so this is all bias.",
            "",
            *_ste_table(stes),
            "",
        ]
    L += ["## Verdicts", "", *verdict_table(c.to_dict() for c in claims)]
    L += [
        "",
        f"Wall time of this run: {res['seconds']:.0f} s; computing it from scratch took "
        f"{res['compute_seconds']:.0f} s (training {tr['seconds']:.0f} s + analyses; cached "
        "checkpoints and analyses are reused by reruns).",
        "",
    ]
    return "\n".join(L)


def write_figures(
    out_dir: Path,
    curve: list[list[float]],
    cfg: dict[str, Any],
    reps: dict[int, FidelityReport],
    summary: dict[int, FidelityReport],
) -> dict[str, str]:
    """Draw the figures of a run into ``out_dir``; returns ``{role: file name}``."""
    from ...analysis.plots import plot_budget, plot_cosine, plot_rmse

    dpi = cfg["dpi"]
    figs = {"training": "gradeval_training.png"}
    fig_training(curve, cfg["checkpoints"], out_dir / figs["training"], dpi)
    for e, rep in reps.items():
        hid = list(rep.layers)
        figs[f"rmse_{e}"] = f"gradeval_rmse_epoch{e}.png"
        figs[f"cos_{e}"] = f"gradeval_cosine_epoch{e}.png"
        title = f"toy SBN after {e} epoch{'s' if e > 1 else ''}: relative RMSE vs samples M"
        plot_rmse(rep, out_dir / figs[f"rmse_{e}"], layers=hid, title=title, dpi=dpi)
        plot_cosine(
            rep,
            out_dir / figs[f"cos_{e}"],
            layers=hid,
            dpi=dpi,
            title=f"epoch {e}: cosine similarity to the true gradient",
        )
    last = cfg["plot_epochs"][-1]
    figs["budget"] = f"gradeval_budget_epoch{last}.png"
    plot_budget(
        reps[last],
        out_dir / figs["budget"],
        layers=list(reps[last].layers),
        dpi=dpi,
        title=f"epoch {last}: error vs time budget (M x measured seconds per draw)",
    )
    if summary:
        figs["through"] = "gradeval_through_training.png"
        fig_through(summary, out_dir / figs["through"], dpi)
    return figs
