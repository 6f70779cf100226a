"""Figures, tables and report.md of [Y19] Table 1, and the views of a long run.

:func:`plot_curves` (training curves), :func:`table_rows` / :func:`table_markdown` (ours
beside the paper's), :func:`report_md`, :func:`status_table` (where a long run stands,
training nothing) and :func:`write_docs` (a finished run's report into ``docs/``). The
numbers come from :mod:`.table1`, the claims from :mod:`.table1_claims`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from ...io import atomic_write_bytes, atomic_write_text
from ...plots import save_figure
from ..spine import Claim
from .table1 import (
    Protocol,
    cell_name,
    float_config,
    protocol,
    read_history,
    runs_dir,
)
from .table1_claims import (
    DATA_LABELS,
    LABELS,
    NET_LABELS,
    PUBLISHED,
    PUBLISHED_DATA,
    cell_numbers,
    fmt_loss,
)

__all__ = [
    "COLORS",
    "alpha_markdown",
    "hms",
    "plot_curves",
    "report_md",
    "status_table",
    "table_markdown",
    "table_rows",
    "write_docs",
]

COLORS = {"ste": "tab:blue", "relu": "tab:orange", "clipped_relu": "tab:green"}


def plot_curves(p: Protocol, table: dict[str, Any], path: Path, dpi: int = 110) -> Path:
    """Training loss (log scale) and validation accuracy per epoch: one row per bit
    width, one line per STE, the float pre-training dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fhist = table["float"]["history"]
    fig, axes = plt.subplots(
        len(p.bits), 2, figsize=(11, 3.4 * len(p.bits)), squeeze=False, sharex=True
    )
    for row, b in enumerate(p.bits):
        ax_l, ax_a = axes[row]
        for ax, key, ylabel in (
            (ax_l, "train_loss", "training loss"),
            (ax_a, "val_acc", "validation accuracy (%)"),
        ):
            scale = 100.0 if key == "val_acc" else 1.0
            fx = [r["epoch"] for r in fhist if r.get(key) is not None]
            fy = [scale * float(r[key]) for r in fhist if r.get(key) is not None]
            ax.plot(fx, fy, color="0.45", ls="--", lw=1.2, label="float (ReLU) pre-training")
            for est in p.estimators:
                rec = table["cells"].get(f"a{b}-{est}")
                if rec is None:
                    continue
                h = rec["history"]
                xs = [r["epoch"] for r in h if r.get(key) is not None]
                ys = [scale * float(r[key]) for r in h if r.get(key) is not None]
                lab = LABELS[est] + (" (diverged)" if rec["status"] == "diverged" else "")
                ax.plot(xs, ys, color=COLORS[est], lw=1.6, label=lab)
            for m in p.milestones:
                if m < p.epochs:
                    ax.axvline(m + 0.5, color="0.8", lw=0.8, ls=":", zorder=0)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        ax_l.set_yscale("log")
        ax_l.set_title(f"{NET_LABELS[p.net]}, {b}-bit activations: training loss")
        ax_a.set_title(f"{NET_LABELS[p.net]}, {b}-bit activations: validation accuracy")
        accs = [
            100.0 * float(r["val_acc"])
            for rec in [table["float"], *table["cells"].values()]
            for r in rec["history"]
            if r.get("val_acc") is not None
        ]
        if accs:  # zoom on the interesting range (the first epochs may be far lower)
            top = max(accs)
            lo = min(sorted(accs)[len(accs) // 20], top - 1.0)
            ax_a.set_ylim(max(0.0, lo - 0.5), min(100.0, top + 0.5))
    axes[0][0].legend(fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    fig.suptitle(
        f"[Y19] Table 1 protocol on {DATA_LABELS.get(p.data, p.data)}: {NET_LABELS[p.net]}, "
        "three STEs (dotted: learning-rate drops)",
        y=1.0,
    )
    fig.tight_layout()
    out = save_figure(fig, path, dpi=dpi)
    plt.close(fig)
    return out


def table_rows(p: Protocol, table: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per bit width: ours and published (loss, accuracy %) per estimator."""
    rows = []
    for b in p.bits:
        row: dict[str, Any] = {"net": p.net, "bits": int(b), "ours": {}, "published": {}}
        for est in p.estimators:
            rec = table["cells"].get(f"a{b}-{est}")
            x = cell_numbers(rec)
            row["ours"][est] = None if x is None else {"train_loss": x[0], "accuracy": x[1]}
            pub = PUBLISHED.get((p.net, int(b), est))
            row["published"][est] = (
                None if pub is None else {"train_loss": pub[0], "accuracy": pub[1]}
            )
        rows.append(row)
    return rows


def table_markdown(p: Protocol, rows: list[dict[str, Any]]) -> str:
    """The table in the paper's layout, ours beside the published numbers."""
    data = DATA_LABELS.get(p.data, p.data) + (f" ({p.limit} rows)" if p.limit else "")
    head = "| data | net | bits | | " + " | ".join(LABELS[e] for e in p.estimators) + " |"
    lines = [head, "|---|---|---|---|" + "---|" * len(p.estimators)]
    for r in rows:
        ours = [
            "diverged" if r["ours"][e] is None else
            f"{fmt_loss(r['ours'][e]['train_loss'])} / {r['ours'][e]['accuracy']:.2f}"
            for e in p.estimators
        ]  # fmt: skip
        pub = [
            "–" if r["published"][e] is None else
            f"{fmt_loss(r['published'][e]['train_loss'])} / {r['published'][e]['accuracy']:.2f}"
            for e in p.estimators
        ]  # fmt: skip
        net = NET_LABELS[p.net]
        lines.append(f"| {data} | {net} | {r['bits']} | **ours** | " + " | ".join(ours) + " |")
        lines.append(
            f"| {PUBLISHED_DATA[p.net]} | {net} | {r['bits']} | paper | " + " | ".join(pub) + " |"
        )
    return "\n".join(lines)


def alpha_markdown(alphas: dict[int, dict[str, float]]) -> str:
    lines = [
        "| bits | α (MSE-optimal, used) | MSE at it | α (Lloyd fixed point) | MSE at it | "
        "top level (2^b−1)α |",
        "|---|---|---|---|---|---|",
    ]
    for b, a in alphas.items():
        lines.append(
            f"| {b} | {a['alpha_mse']:.6f} | {a['mse_at_alpha_mse']:.6f} | "
            f"{a['alpha_lloyd']:.6f} | {a['mse_at_alpha_lloyd']:.6f} | {a['top_level']:.4f} |"
        )
    return "\n".join(lines)


def hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600} h {s % 3600 // 60:02d} min" if s >= 3600 else f"{s // 60} min {s % 60} s"


def report_md(
    p: Protocol,
    res: Mapping[str, Any],
    claims: Sequence[Claim],
    fig: str,
    quick: bool,
) -> str:
    """The part's report.md: data, protocol, the table beside the paper's, α values,
    curves and the claims."""
    fl = res["table"]["float"]["metrics"] or {}
    cells = res["table"]["cells"]
    statuses = {k: v["status"] for k, v in cells.items()}
    wall = res["wall_time_s"]
    data = DATA_LABELS.get(p.data, p.data)
    L = [
        f"# [Y19] Table 1: the three STEs on {NET_LABELS[p.net]} ({'quick' if quick else 'full'})",
        "",
        f"Data: **{data}**"
        + (f" ({p.limit} training rows)" if p.limit else "")
        + ". "
        + (res["data_note"] + " " if res.get("data_note") else "")
        + f"Source: {res['data_source']}.",
        "",
        f"Protocol ([Y19] §4, docs/papers/yin2019.md): {NET_LABELS[p.net]} with float weights, "
        "a batch norm "
        "without scale and shift before every quantized activation σ_α, α fixed to the "
        "MSE-optimal value for a half-Gaussian; every quantized cell initialised from the "
        f"trained full-precision ReLU model (`{Path(res['table']['float']['run_dir']).name}`, "
        f"test accuracy {100 * (fl.get('test_acc') or 0):.2f}%); SGD, momentum {p.momentum}, "
        f"{p.epochs} epochs, batch {p.batch_size}, lr {p.lr} ×{p.gamma} after epochs "
        f"{', '.join(map(str, p.milestones))}, weight decay {p.weight_decay}, augmentation "
        f"{p.augment}; seed {res['seed']}. The float model is pre-trained with the same "
        "schedule (choice: the paper does not give its recipe).",
        "",
        "## Table (training loss / test accuracy %)",
        "",
        table_markdown(p, res["rows"]),
        "",
        "Training loss: mean mini-batch cross-entropy of the last epoch (train-mode batch "
        "norm). Accuracy: the official test split (the paper calls it validation accuracy); "
        "the held-out validation accuracies are in `results.json`. One seed: differences "
        "of a few tenths of a point are within seed-to-seed noise.",
        "",
        f"Wall time: {hms(wall)} for the whole table (float pre-training + "
        f"{len(cells)} cells, summed over every session of each run). Cells this call: "
        + ", ".join(f"{k} {v}" for k, v in statuses.items())
        + ".",
        "",
        "## α values",
        "",
        alpha_markdown(res["alphas"]),
        "",
        "α (used) minimises the closed-form MSE E[(σ_α(X) − X)²], X ~ |N(0,1)|, of the "
        "ceil-based quantizer (golden-section search, `stelab.quantizers.halfnormal_alpha`). "
        "The Lloyd-style fixed point α ← E[k(X)X]/E[k(X)²] (k the level index under the "
        "current α) is shown for comparison; it is not a minimiser of this MSE for b ≥ 2 "
        "because moving α moves mass across the edges where the ceil quantizer's error jumps. "
        "At 1 bit both equal E[X] = sqrt(2/π).",
        "",
        "## Curves",
        "",
        f"![Table-1 training curves]({fig})",
        "",
        "## Claims",
        "",
    ]
    for c in claims:
        L.append(f"- **{c.verdict}**: {c.text}. {c.evidence}.")
    if quick:
        L += [
            "",
            "Quick mode trains on scikit-learn's 8×8 digits (1437 training rows) with a "
            f"{p.epochs}-epoch schedule: it checks the code path and shows whether the "
            "STE ordering appears at this size; its accuracies (360 test images, 0.28 points "
            "per image) are too coarse to separate the STEs.",
        ]
    return "\n".join(L) + "\n"


def status_table(
    out_dir: Path,
    *,
    quick: bool = False,
    seed: int = 0,
    net: str = "lenet5",
    data: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> str:
    """A markdown table of where each run of ``out_dir`` stands (trains nothing).

    Finished cells show training loss / test accuracy %; unfinished ones the epoch
    reached and its training loss / validation accuracy %; missing ones "not started".
    """
    p = protocol(net, quick=quick, data=data, **dict(overrides or {}))
    root = runs_dir(Path(out_dir), quick=quick, seed=seed)

    def state(d: Path, epochs: int) -> str:
        mfile = d / "metrics.json"
        if (d / "diverged.json").is_file():
            return "diverged"
        if mfile.is_file():
            m = json.loads(mfile.read_text(encoding="utf-8"))
            if int(m.get("epochs") or 0) == epochs:
                acc = m.get("test_acc") if m.get("test_acc") is not None else m["final_val_acc"]
                return f"{fmt_loss(m['final_train_loss'])} / {100 * acc:.2f} (done)"
        h = read_history(d)
        if not h:
            return "not started"
        r = h[-1]
        va = "–" if r.get("val_acc") is None else f"{100 * float(r['val_acc']):.2f}"
        return f"epoch {r['epoch']}/{epochs}: {fmt_loss(float(r['train_loss']))} / {va} (val)"

    fcfg = float_config(p, seed=seed)
    lines = [
        f"Float pre-training (`{cell_name(p.net, None)}`): "
        + state(root / cell_name(p.net, None), fcfg.train.epochs),
        "",
        "| bits | " + " | ".join(LABELS[e] for e in p.estimators) + " |",
        "|---|" + "---|" * len(p.estimators),
    ]
    for b in p.bits:
        cells = [state(root / cell_name(p.net, b, e), p.epochs) for e in p.estimators]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_docs(
    out_dir: Path, docs_dir: Path = Path("docs"), *, stem: str = "yin2019_table1"
) -> Path:
    """Copy a finished run's report into the docs: ``docs_dir/<stem>.md`` and the curves
    as ``docs_dir/<stem>_curves.png`` (both written atomically). Returns the .md path."""
    out_dir, docs_dir = Path(out_dir), Path(docs_dir)
    report, png = out_dir / "report.md", out_dir / "table1_curves.png"
    if not (report.is_file() and png.is_file()):
        raise ConfigError(
            f"out_dir={str(out_dir)!r} has no finished report (report.md and table1_curves.png); "
            "run stelab.experiments.yin2019.table1.run(out_dir) to the end first"
        )
    atomic_write_bytes(docs_dir / f"{stem}_curves.png", png.read_bytes())
    text = report.read_text(encoding="utf-8").replace("(table1_curves.png)", f"({stem}_curves.png)")
    try:
        res = json.loads((out_dir / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        res = {}
    args = f"'{out_dir}'" + (", quick=True" if res.get("quick") else "")
    args += f", seed={res['seed']}" if res.get("seed") else ""
    text += (
        "\n## How this was produced\n\n"
        "```\n"
        'python -c "from stelab.experiments.yin2019.table1 import run; '
        f'run({args}, threads=1)"\n'
        "```\n\n"
        "The run is resumable (rerunning reuses finished cells and resumes an interrupted one). "
        "Regenerate this page with `yin2019.table1_report.write_docs(out_dir, 'docs')`.\n"
    )
    return atomic_write_text(docs_dir / f"{stem}.md", text)
