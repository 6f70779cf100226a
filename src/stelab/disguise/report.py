"""The text and plot behind ``stelab disguise`` [S24]."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .equivalence import F64, Equivalence, describe_r, equivalent_ste

__all__ = ["disguise_report"]


def disguise_report(
    estimator_name: str,
    step: float,
    params: Mapping[str, Any] | None = None,
    plot: Path | None = None,
) -> str:
    """The text of ``stelab disguise ESTIMATOR --step Δ [--plot FILE]``.

    α, where q̂' is smallest and largest within a bin, the map's largest displacement
    max |M(w) - w| in units of Δ, and how to train the equivalent STE. With ``plot``,
    draws q̂' (with α), M, and the estimator seen in the coordinates v = M(w), where
    it is the constant α (the STE with lr × α), to that file (PNG/PDF/SVG by suffix).
    """
    if plot is not None:
        from ..plots import check_plot_path

        plot = check_plot_path(plot)
    eq = equivalent_ste(estimator_name, step, params=params)
    est = eq.estimator
    s = eq.step
    r = torch.linspace(-0.5, 0.5, 4097, dtype=F64)
    i = int((eq._phi(r.clone()) - 0.5 - r).abs().argmax())
    shift_at = float(r[i])
    where_shift = f"±{abs(shift_at):.4f}" if eq.symmetric else f"{shift_at:+.4f}"
    lines = [
        f"estimator    {est!r}   q̂'(w) = {est.formula or '?'}",
        f"step         Δ = {s:g}",
        f"alpha        α = {eq.alpha:.8g}   (harmonic mean of q̂' over a bin)",
        f"q̂' min       {eq.g_min:.6g} at {describe_r(eq.r_min)}",
        f"q̂' max       {eq.g_max:.6g} at {describe_r(eq.r_max)}",
        f"M shift      max |M(w) - w| = {eq.max_shift:.6f} Δ  (at w = level {where_shift}·Δ)",
        f"equivalent   SGD / SGD+momentum: STE with lr × {eq.alpha:.6g} from weights M(w₀)",
        "             Adam/AdamW: [S24] says STE with the same lr and weights; measured to hold",
        "             only with a short window (β₂ ≈ 0.9, small lr), not at β₂ = 0.999",
        "reference    Schoenbauer et al. 2024, arXiv:2405.05171",
    ]
    lines += [f"note         {n}" for n in eq.notes]
    if plot is not None:
        _plot(eq, Path(plot))
        lines.append(f"plot         {plot}")
    return "\n".join(lines)


def _plot(eq: Equivalence, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..plots import save_figure

    s = eq.step
    w = torch.linspace(-1.5 * s, 1.5 * s, 3001, dtype=F64)
    g = eq.derivative(w)
    m = eq.M(w)
    # the estimator in the coordinates v = M(w): dv/dt = M'(w)·dw/dt ∝ M'(w)·q̂'(w)
    h = 1e-6 * s
    mp = (eq.M(w + h) - eq.M(w - h)) / (2 * h)
    wn, gn, mn, en = (t.numpy() / d for t, d in ((w, s), (g, 1), (m, s), (mp * g, 1)))
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.8), constrained_layout=True)
    for a in ax:
        for e in (-1.5, -0.5, 0.5, 1.5):
            a.axvline(e, color="0.85", lw=0.8, zorder=0)
        a.set_xlabel("w / Δ")
    ax[0].plot(wn, gn, lw=2, label=f"q̂'(w)  {eq.estimator!r}")
    ax[0].axhline(eq.alpha, color="C3", ls="--", label=f"α = {eq.alpha:.4f} (harmonic mean)")
    ax[0].axhline(1.0, color="0.5", ls=":", label="STE = 1")
    ax[0].set_title("custom estimator q̂'")
    top = 1.5 * max(float(gn.max()), 1.0)
    ax[0].set_ylim(0, top)
    ax[0].legend(fontsize=8, loc="upper center", ncol=2)
    ax[1].plot(wn, wn, color="0.6", ls=":", label="identity")
    ax[1].plot(wn, torch.round(w / s).numpy(), color="0.75", lw=1, label="Q(w)/Δ")
    ax[1].plot(wn, mn, lw=2, color="C2", label="M(w)/Δ")
    ax[1].set_title(f"map M (max |M(w) - w| = {eq.max_shift:.3f} Δ)")
    ax[1].legend(fontsize=8, loc="upper left")
    ax[2].plot(wn, gn, lw=1, color="C0", alpha=0.5, label="q̂'(w) (in w)")
    ax[2].plot(mn, en, lw=2, color="C3", label="M'(w)·q̂'(w) (in v = M(w))")
    ax[2].set_title(f"in v = M(w): STE with lr × {eq.alpha:.4f}")
    ax[2].set_xlabel("w / Δ  (v / Δ for the red curve)")
    ax[2].set_ylim(0, top)
    ax[2].legend(fontsize=8, loc="upper center", ncol=2)
    try:
        save_figure(fig, path)
    finally:
        plt.close(fig)
