"""Figures of a :class:`~stelab.analysis.fidelity.FidelityReport`, one panel per layer.

* :func:`plot_rmse`: relative RMSE vs the number of samples M (log-log), one line
  per estimator; deterministic estimators are dashed horizontal lines; a
  Monte-Carlo reference draws its noise floor. ([S20] Fig. 3, top.)
* :func:`plot_cosine`: cosine similarity to the true gradient vs M with the
  15-85% band of the groups. ([S20] Fig. 3, bottom.)
* :func:`plot_budget`: relative RMSE vs the time budget M x seconds-per-draw: the
  compute-adjusted comparison.

matplotlib is imported lazily (Agg backend); files are written atomically.
"""

from __future__ import annotations

import io
import itertools
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..io import atomic_write_bytes
from ..plots import check_plot_path
from .fidelity import FidelityReport

__all__ = ["plot_rmse", "plot_cosine", "plot_budget", "estimator_style", "panels", "save"]

_COLORS = {
    "psa": "tab:red",
    "dst": "tab:blue",
    "hard_st": "tab:cyan",
    "arm": "tab:green",
    "reinforce": "tab:purple",
    "reinforce_loo": "tab:pink",
    "concrete(tau=0.1)": "tab:orange",
    "concrete(tau=1)": "tab:brown",
    "concrete": "tab:orange",
    "gumbel_st": "tab:olive",
    "gumbel_st(tau=1)": "tab:olive",
    "tanh_mf": "black",
}
_EXTRA = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"]


def estimator_style(labels: Sequence[str]) -> dict[str, dict[str, Any]]:
    """A fixed color (and width) per estimator label, the same in every figure."""
    extra = itertools.cycle(_EXTRA)
    out = {}
    for lab in labels:
        color = _COLORS.get(lab) or _COLORS.get(lab.split("(")[0]) or next(extra)
        out[lab] = {"color": color, "lw": 2.2 if lab == "psa" else 1.5}
    return out


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _layers(report: FidelityReport, layers: Sequence[str] | None) -> list[str]:
    return list(layers) if layers is not None else list(report.layers)


def panels(n: int, *, legend: bool = True, title: bool = True) -> tuple[Any, Any]:
    """A figure with ``n`` panels in a row and room on the right for a shared legend.

    The layout is fixed (no ``tight_layout`` / ``bbox_inches="tight"``, which cost
    seconds per figure on a busy CPU); the margins are in inches, so they do not
    depend on ``n``.
    """
    plt = _plt()
    right_in = 2.1 if legend else 0.2
    width = 3.5 * n + 0.7 + right_in
    height = 3.5 if title else 3.2
    fig, axes = plt.subplots(1, n, figsize=(width, height), squeeze=False)
    fig.subplots_adjust(
        left=0.7 / width,
        right=1 - right_in / width,
        bottom=0.5 / height,
        top=1 - (0.55 if title else 0.3) / height,
        wspace=0.28,
    )
    return fig, axes[0]


def save(fig: Any, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    """Render ``fig`` to PNG/PDF/SVG in memory and write it atomically; closes the figure."""
    path = check_plot_path(path)
    buf = io.BytesIO()
    fig.savefig(buf, format=path.suffix.lower().lstrip("."), dpi=dpi)
    _plt().close(fig)
    return atomic_write_bytes(path, buf.getvalue())


def finish_figure(
    fig: Any, axes: Any, path: str | os.PathLike[str], title: str | None, dpi: int
) -> Path:
    handles, labels = axes[0].get_legend_handles_labels()
    right = fig.subplotpars.right
    fig.legend(
        handles,
        labels,
        loc="center left",
        bbox_to_anchor=(right + 0.01, 0.5),
        fontsize=9,
        frameon=False,
    )
    if title:
        fig.suptitle(title, fontsize=11)
    return save(fig, path, dpi)


def plot_rmse(
    report: FidelityReport,
    path: str | os.PathLike[str],
    *,
    layers: Sequence[str] | None = None,
    title: str | None = None,
    dpi: int = 110,
) -> Path:
    """Relative RMSE ``sqrt(mean ||g_M - g||^2) / ||g||`` vs M, log-log, one panel per layer."""
    keys = _layers(report, layers)
    style = estimator_style(list(report.estimators))
    fig, axes = panels(len(keys), title=bool(title))
    labels = report.layer_labels()
    for ax, key in zip(axes, keys, strict=True):
        for lab, ef in report.estimators.items():
            lf = ef.layers[key]
            st = style[lab]
            pts = [
                (m, r)
                for m, r in zip(lf.sample_sizes, lf.rmse, strict=True)
                if r > 0 and math.isfinite(r)
            ]
            if not pts:
                continue
            ms, rs = zip(*pts, strict=True)
            if ef.kind == "deterministic":
                ax.plot(ms, rs, ls="--", label=lab, **st)
            else:
                ax.plot(ms, rs, label=lab, **st)
        floor = report.reference.noise_floor(key)
        if floor > 0 and math.isfinite(floor):
            ax.axhline(floor, color="0.5", ls=":", lw=1, label="reference noise floor")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("samples M")
        ax.set_title(labels[key])
        ax.grid(alpha=0.3, which="major", lw=0.5)
    axes[0].set_ylabel("relative RMSE")
    return finish_figure(fig, axes, path, title, dpi)


def plot_cosine(
    report: FidelityReport,
    path: str | os.PathLike[str],
    *,
    layers: Sequence[str] | None = None,
    title: str | None = None,
    dpi: int = 110,
) -> Path:
    """Mean cosine similarity to the true gradient vs M (log x) with the 15-85% band."""
    keys = _layers(report, layers)
    style = estimator_style(list(report.estimators))
    fig, axes = panels(len(keys), title=bool(title))
    labels = report.layer_labels()
    for ax, key in zip(axes, keys, strict=True):
        for lab, ef in report.estimators.items():
            lf = ef.layers[key]
            st = style[lab]
            idx = [i for i, c in enumerate(lf.cos_mean) if math.isfinite(c)]
            if not idx:
                continue
            ms = [lf.sample_sizes[i] for i in idx]
            ax.plot(
                ms,
                [lf.cos_mean[i] for i in idx],
                ls="--" if ef.kind == "deterministic" else "-",
                label=lab,
                **st,
            )
            if ef.kind != "deterministic":
                ax.fill_between(
                    ms,
                    [lf.cos_lo[i] for i in idx],
                    [lf.cos_hi[i] for i in idx],
                    color=st["color"],
                    alpha=0.12,
                    lw=0,
                )
        lows = [c for ef in report.estimators.values() for c in ef.layers[key].cos_mean
                if math.isfinite(c)]  # fmt: skip
        ax.set_xscale("log")
        ax.set_ylim(max(-1.02, min([-0.2, *lows]) - 0.05), 1.02)
        ax.set_xlabel("samples M")
        ax.set_title(labels[key])
        ax.grid(alpha=0.3, which="major", lw=0.5)
    axes[0].set_ylabel("cosine similarity (mean, 15-85%)")
    return finish_figure(fig, axes, path, title, dpi)


def plot_budget(
    report: FidelityReport,
    path: str | os.PathLike[str],
    *,
    layers: Sequence[str] | None = None,
    title: str | None = None,
    dpi: int = 110,
) -> Path:
    """Relative RMSE vs the time budget ``M x seconds_per_draw`` (log-log): error at equal time."""
    keys = _layers(report, layers)
    style = estimator_style(list(report.estimators))
    fig, axes = panels(len(keys), title=bool(title))
    labels = report.layer_labels()
    for ax, key in zip(axes, keys, strict=True):
        for lab, ef in report.estimators.items():
            t = ef.seconds_per_draw
            if not t or ef.kind == "deterministic":
                continue
            lf = ef.layers[key]
            pts = [
                (m * t, r)
                for m, r in zip(lf.sample_sizes, lf.rmse, strict=True)
                if r > 0 and math.isfinite(r)
            ]
            if pts:
                xs, rs = zip(*pts, strict=True)
                ax.plot(xs, rs, label=lab, **style[lab])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("time budget (s) = M x s/draw")
        ax.set_title(labels[key])
        ax.grid(alpha=0.3, which="major", lw=0.5)
    axes[0].set_ylabel("relative RMSE")
    return finish_figure(fig, axes, path, title, dpi)
