"""Figures of a :class:`~stelab.analysis.deterministic.DeterministicReport`.

* :func:`plot_descent`: P(loss decreases) vs the step size eta (log x), training and
  held-out batch, one line per estimator with its standard error as a band.
* :func:`plot_descent_change`: the mean loss change vs eta (symlog y) with bands.
* :func:`plot_bias`: relative bias and cosine to the relaxed reference, per layer.

Built on the panel/legend/save helpers of :mod:`stelab.analysis.plots` (matplotlib
imported lazily, files written atomically).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from .deterministic import DeterministicReport
from .plots import estimator_style, finish_figure, panels

__all__ = ["plot_descent", "plot_descent_change", "plot_bias"]


def _curves(report: DeterministicReport, group: str):  # noqa: ANN202
    return {lab: d[group] for lab, d in report.descent.items() if group in d}


def plot_descent(
    report: DeterministicReport,
    path: str | os.PathLike[str],
    *,
    group: str = "all",
    title: str | None = None,
    dpi: int = 110,
) -> Path:
    """P(loss decreases) after a step -eta*g vs eta, training and held-out batch."""
    style = estimator_style(report.estimators)
    fig, axes = panels(2, title=bool(title))
    for ax, which in zip(axes, ("train", "held"), strict=True):
        for lab, c in _curves(report, group).items():
            p = getattr(c, f"p_{which}")
            se = getattr(c, f"p_{which}_se")
            ax.plot(c.etas, p, marker="o", ms=3, label=lab, **style[lab])
            lo = [max(0.0, a - b) for a, b in zip(p, se, strict=True)]
            hi = [min(1.0, a + b) for a, b in zip(p, se, strict=True)]
            ax.fill_between(c.etas, lo, hi, color=style[lab]["color"], alpha=0.15, lw=0)
        ax.axhline(0.5, color="0.6", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_ylim(-0.03, 1.03)
        ax.set_xlabel("step size eta")
        ax.set_title("training batch" if which == "train" else "held-out batch")
        ax.grid(alpha=0.3, lw=0.5)
    axes[0].set_ylabel("P(loss decreases)")
    return finish_figure(fig, axes, path, title, dpi)


def plot_descent_change(
    report: DeterministicReport,
    path: str | os.PathLike[str],
    *,
    group: str = "all",
    title: str | None = None,
    dpi: int = 110,
) -> Path:
    """Mean loss change after a step -eta*g vs eta (symlog), with ± one standard error."""
    style = estimator_style(report.estimators)
    fig, axes = panels(2, title=bool(title))
    w = fig.get_size_inches()[0]
    fig.subplots_adjust(left=1.0 / w, wspace=0.4)  # room for symlog tick labels
    for ax, which in zip(axes, ("train", "held"), strict=True):
        small, big = math.inf, 0.0
        for lab, c in _curves(report, group).items():
            d = getattr(c, f"d_{which}")
            se = getattr(c, f"d_{which}_se")
            ax.plot(c.etas, d, marker="o", ms=3, label=lab, **style[lab])
            ax.fill_between(
                c.etas,
                [a - b for a, b in zip(d, se, strict=True)],
                [a + b for a, b in zip(d, se, strict=True)],
                color=style[lab]["color"],
                alpha=0.15,
                lw=0,
            )
            finite = [abs(v) for v in d if v != 0 and math.isfinite(v)]
            small = min([small, *finite])
            big = max([big, *finite])
        ax.axhline(0.0, color="0.6", ls=":", lw=1)
        ax.set_xscale("log")
        thresh = max(small, 1e-3 * big) if math.isfinite(small) else 1e-6
        ax.set_yscale("symlog", linthresh=thresh)
        ax.tick_params(axis="y", labelsize=8)
        ax.set_xlabel("step size eta")
        ax.set_title("training batch" if which == "train" else "held-out batch")
        ax.grid(alpha=0.3, lw=0.5)
    axes[0].set_ylabel("mean loss change")
    return finish_figure(fig, axes, path, title, dpi)


def plot_bias(
    report: DeterministicReport,
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    dpi: int = 110,
) -> Path:
    """Per layer: relative bias to the relaxed reference (log y, with its noise floor)
    and cosine similarity, one line per estimator."""
    style = estimator_style(report.estimators)
    fig, axes = panels(2, title=bool(title))
    w, h = fig.get_size_inches()  # room below for the rotated layer names
    top = fig.subplotpars.top * h
    fig.set_size_inches(w, h + 1.0)
    fig.subplots_adjust(bottom=1.5 / (h + 1.0), top=(top + 1.0) / (h + 1.0))
    xs = list(range(len(report.layers)))
    first = report.bias[report.estimators[0]]
    floor = [first[k].bias_floor for k in report.layers]
    for lab in report.estimators:
        b = report.bias[lab]
        axes[0].plot(xs, [b[k].bias_raw for k in report.layers], marker="o", ms=3, label=lab,
                     **style[lab])  # fmt: skip
        axes[1].plot(xs, [b[k].cosine for k in report.layers], marker="o", ms=3, **style[lab])
    if any(f > 0 and math.isfinite(f) for f in floor):
        axes[0].plot(xs, floor, color="0.5", ls=":", lw=1, label="reference noise floor")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("||g_est - g_ref|| / ||g_ref||")
    axes[1].set_ylabel("cosine to the reference")
    axes[1].set_ylim(-1.05, 1.05)
    for ax in axes:
        ax.set_xticks(xs)
        ax.set_xticklabels(report.layers, rotation=60, ha="right", fontsize=7)
        ax.grid(alpha=0.3, lw=0.5)
    return finish_figure(fig, axes, path, title, dpi)
