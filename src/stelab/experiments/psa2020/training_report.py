"""The report of ``training``: its figure and its markdown (numbers in, files out)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..spine import Claim
from ..verdicts import verdict_table
from .training import (
    CIFAR10_COMMAND,
    FULL_SEARCH_NOTE,
    NAME,
    QUICK_LR_SEARCH,
    SBN_CIFAR10_MACS,
    STEP_COST,
    cifar10_gpu_hours,
)

__all__ = ["fig_training", "label", "report_md"]


def fig_training(results: dict[str, dict[str, Any]], path: Path, dpi: int) -> None:
    from ...analysis.plots import estimator_style, panels
    from ...plots import save_figure

    style = estimator_style([label(s) for s in results])
    fig, (ax, ax2) = panels(2, legend=False, title=False)
    fig.set_size_inches(10, 3.6)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.14, top=0.95, wspace=0.22)
    for spec, r in results.items():
        lab = label(spec)
        ep = [h["epoch"] for h in r["history"]]
        ax.plot(
            ep, [h["train_loss"] for h in r["history"]], marker="o", ms=3, label=lab, **style[lab]
        )
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(_integer_locator())
    ax.set_ylabel("training loss (sampled, epoch mean)")
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(_plain_formatter())
    ax.yaxis.set_minor_formatter(_plain_formatter())
    ax.grid(alpha=0.3, lw=0.5, which="both")
    ax.legend(fontsize=9)
    specs = list(results)
    xs = range(len(specs))
    a1 = [100 * results[s]["test"]["acc1"] for s in specs]
    a10 = [100 * results[s]["test"]["acc_avg"] for s in specs]
    ax2.bar([i - 0.2 for i in xs], a1, 0.4, label="1 sample", color="0.6")
    ax2.bar([i + 0.2 for i in xs], a10, 0.4, label="10-sample average", color="tab:blue")
    for i, (u, v) in enumerate(zip(a1, a10, strict=True)):
        if math.isfinite(u):
            ax2.text(i - 0.2, u + 0.5, f"{u:.1f}", ha="center", fontsize=8)
        if math.isfinite(v):
            ax2.text(i + 0.2, v + 0.5, f"{v:.1f}", ha="center", fontsize=8)
    ax2.set_xticks(list(xs), [label(s) for s in specs], fontsize=9)
    ax2.set_ylabel("test accuracy (%)")
    ax2.set_ylim(0, 105)
    ax2.legend(fontsize=9, loc="upper right")
    save_figure(fig, path, dpi, tight=False, close=True)


def _integer_locator() -> Any:
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)


def _plain_formatter() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _pos: f"{v:g}")


def label(spec: str) -> str:
    from ...analysis import parse_estimator

    return parse_estimator(spec).label


def report_md(
    res: dict[str, Any],
    results: dict[str, dict[str, Any]],
    searches: dict[str, Any],
    claim: Claim,
    fig: str,
) -> str:
    base = res["base_config"]
    r0 = next(iter(results.values()))
    L = [
        f"# {NAME}: training a conv SBN with PSA, DST, Concrete and REINFORCE",
        "",
        "The [S20] learning protocol (docs/papers/psa2020.md) on a machine without a GPU: "
        "the 8-conv SBN "
        f"(kernels/strides as in the paper) with channels {tuple(base['channels'])} instead of "
        f"(96, 192), padding {base['padding']}, on {base['dataset']} ({r0['train_rows']} "
        f"training rows, {res['val_rows']} validation, {res['test_rows']} test); SGD with "
        f"Nesterov momentum {base['momentum']}, batch {base['batch_size']}, one noise sample "
        f"per example, gradient clamp +-{base['grad_clamp']:g}, data-dependent init, "
        f"{base['epochs']} epochs, {base['schedule']} learning rate. Evaluation by sampling: "
        "1-sample accuracy and the accuracy of the 10-sample averaged prediction.",
        "",
        (
            f"Learning rates: a {res['config'].get('search_epochs')}-epoch search on the first "
            f"{res['config'].get('search_rows')} training rows (validation accuracy of the "
            "averaged prediction, 4 samples)."
            if searches
            else "Learning rates: fixed (`QUICK_LR`), the best of a short search on digits "
            "(10 epochs, validation accuracy of the 10-sample averaged prediction; it also "
            "chose Concrete's temperature): "
            + "; ".join(
                f"{k}: " + ", ".join(f"{lr:g} -> {100 * a:.0f}%" for lr, a in v.items())
                for k, v in QUICK_LR_SEARCH.items()
            )
            + "."
            + ("" if res["quick"] else " " + FULL_SEARCH_NOTE)
        ),
        "",
        "| estimator | lr | epochs | final train loss | val acc (1 / 10-avg) | "
        "test acc 1 sample | test acc 10-avg | test NLL 10-avg | train time | s/epoch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for spec, r in results.items():
        h = r["history"]
        ep = len(h)
        tr = h[-1]["train_loss"] if h else math.nan
        v, t = r["val"], r["test"]
        L.append(
            f"| {label(spec)} | {r['config']['lr']:g} | {ep} | {tr:.4f} | "
            f"{100 * v['acc1']:.1f}% / {100 * v['acc_avg']:.1f}% | {100 * t['acc1']:.1f}% | "
            f"{100 * t['acc_avg']:.1f}% | {t['nll_avg']:.3f} | {r['train_seconds']:.0f} s | "
            f"{r['train_seconds'] / max(ep, 1):.1f} |" + (" (diverged)" if r["diverged"] else "")
        )
    L += ["", f"![training]({fig})", ""]
    if searches:
        L += [
            "Learning-rate search (validation accuracy of the averaged prediction):",
            "",
            "| estimator | " + " | ".join("lr / val acc" for _ in range(3)) + " | chosen |",
            "|---|---|---|---|---|",
        ]
        for spec, (best, rows) in searches.items():
            cells = [
                f"{r['lr']:g}: "
                + ("diverged" if r["diverged"] else f"{100 * r['val_acc_avg']:.1f}%")
                for r in rows
            ]
            L.append(f"| {label(spec)} | " + " | ".join(cells) + f" | {best:g} |")
        L.append("")
    lo, hi = cifar10_gpu_hours()
    on_cifar = base["dataset"] == "cifar10"
    L += [
        "## Running the paper's CIFAR-10 configuration",
        "",
        (
            "This run used the `cifar10` preset"
            + (
                " scaled down ("
                + ", ".join(f"{k} = {v!r}" for k, v in res.get("overrides", {}).items())
                + ")"
                if res.get("overrides")
                else ""
            )
            + ". "
            if on_cifar
            else ""
        )
        + "The paper's CIFAR-10 configuration is `PRESETS['cifar10']` (channels (96, 192), "
        "flip + crop, 45k/5k split, 300 epochs, cosine schedule). With CIFAR-10 and a GPU:",
        "",
        "```",
        CIFAR10_COMMAND,
        "```",
        "",
        f"Expected time on one GPU: {lo:.1f}-{hi:.1f} h for the four estimators (estimated, "
        "not measured: "
        f"{SBN_CIFAR10_MACS / 1e6:.0f} M forward MACs per image, a training step costing 3 "
        "forward passes for DST and the measured CPU cost ratios for the others (PSA "
        f"{STEP_COST['psa']:g}×), at an assumed 10-20 TFLOP/s sustained, +30%).",
        "",
        "## Verdict",
        "",
        *verdict_table([claim.to_dict()]),
        "",
        f"Wall time of this run: {res['seconds']:.0f} s (finished runs are cached in runs/ and "
        "reused; the training time of each run is in the table).",
        "",
    ]
    return "\n".join(L)
