"""Reports from run directories: a Markdown summary with tables and PNG plots.

:func:`write_report` reads only what :func:`stelab.train.train` wrote
(``config.toml``, ``metrics.csv``, ``metrics.json``) and writes into ``out_dir``:

* ``report.md``: a comparison table (runs whose configs differ only by
  ``train.seed`` form one row: mean ± sample standard deviation over the seeds),
  a table per run, and the plots;
* ``val-accuracy.png``: validation accuracy per epoch, one line per group
  (mean over seeds, band from the lowest to the highest seed);
* ``curves-<run>.png``: per run, loss and accuracy per epoch (train and val);
* ``summary.csv``: the comparison table with full-precision numbers;
* ``report.html``: the same as a web page (comparison first, then the runs and
  their curves; the PNGs are linked, so keep them next to it).

Every file is written atomically (temporary file, then ``os.replace``). It needs
neither torch nor the training code: a report can be made anywhere the run
directories were copied.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .io import atomic_write_text, read_numeric_csv

__all__ = ["Run", "load_run", "group_runs", "write_report"]

# keys that do not change what is trained; runs differing only in these (and the
# seed) are repeats of one experiment
IGNORED_KEYS = frozenset(
    {
        "name",
        "train.seed",
        "data.data_dir",
        "data.download",
        "data.eval_batch_size",
        "train.threads",
        "train.save_best",
        "train.eval_every",
        "train.accelerator",
    }
)


@dataclass
class Run:
    """One run directory as read back: config (plain dict), per-epoch rows, final metrics."""

    path: Path
    config: dict[str, Any]
    rows: list[dict[str, float | None]]
    metrics: dict[str, Any] | None
    label: str = ""

    @property
    def seed(self) -> int | None:
        return self.config.get("train", {}).get("seed")

    @property
    def name(self) -> str:
        return str(self.config.get("name") or self.path.name)

    def final(self, key: str) -> float | None:
        """A final number: from metrics.json when the run finished, else from metrics.csv."""
        if self.metrics is not None and self.metrics.get(key) is not None:
            return float(self.metrics[key])
        col = {
            "final_train_loss": "train_loss",
            "final_train_acc": "train_acc",
            "final_val_acc": "val_acc",
            "final_val_loss": "val_loss",
        }.get(key)
        if col is not None:
            vals = [r[col] for r in self.rows if r.get(col) is not None]
            return float(vals[-1]) if vals else None
        if key == "best_val_acc":
            vals = [r["val_acc"] for r in self.rows if r.get("val_acc") is not None]
            return max(vals) if vals else None
        if key == "epochs":
            return float(len(self.rows))
        return None


@dataclass
class Group:
    """Runs whose configs differ only by seed (and :data:`IGNORED_KEYS`)."""

    label: str
    runs: list[Run] = field(default_factory=list)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        import tomllib
    except ModuleNotFoundError:  # pragma: no cover - Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{str(path)!r} is not a valid TOML file: {e}") from None


def load_run(path: str | os.PathLike[str]) -> Run:
    """Read a run directory; a ConfigError names ``path`` if it is not one."""
    p = Path(path)
    if not p.is_dir():
        raise ConfigError(f"{str(p)!r} is not a stelab run directory (it is not a directory)")
    missing = [n for n in ("config.toml", "metrics.csv") if not (p / n).is_file()]
    if missing:
        raise ConfigError(
            f"{str(p)!r} is not a stelab run directory (no {' or '.join(missing)}; a run "
            "writes them after its first epoch)"
        )
    metrics = None
    if (p / "metrics.json").is_file():
        try:
            metrics = json.loads((p / "metrics.json").read_text(encoding="utf-8"))
        except ValueError as e:  # UnicodeDecodeError is one as well
            raise ConfigError(f"{str(p / 'metrics.json')!r} is not valid JSON: {e}") from None
        _check_metrics(p / "metrics.json", metrics)
    config = _read_toml(p / "config.toml")
    train = config.get("train", {})
    if not isinstance(train, dict):
        raise ConfigError(
            f"{str(p / 'config.toml')!r}: [train] must be a table, got {type(train).__name__}"
        )
    return Run(p, config, read_numeric_csv(p / "metrics.csv", ("epoch",)), metrics)


# the numbers a report reads from metrics.json (Run.final)
_METRIC_KEYS = (
    "final_train_loss",
    "final_train_acc",
    "final_val_acc",
    "final_val_loss",
    "best_val_acc",
    "test_acc",
    "wall_time_s",
    "epochs",
)


def _check_metrics(path: Path, metrics: Any) -> None:
    """A ConfigError naming ``path`` unless it holds a JSON object whose report
    numbers are numbers (or null)."""
    if not isinstance(metrics, dict):
        raise ConfigError(f"{str(path)!r} must hold a JSON object, got a {type(metrics).__name__}")
    for k in _METRIC_KEYS:
        v = metrics.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise ConfigError(f"{str(path)!r}: {k!r} must be a number or null, got {v!r}")


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = json.dumps(v, sort_keys=True) if isinstance(v, (list, dict)) else v
    return out


def _fmt_value(v: Any) -> str:
    return str(v).lower() if isinstance(v, bool) else str(v)


def group_runs(runs: Sequence[Run]) -> list[Group]:
    """Group runs whose configs are equal apart from the seed (and :data:`IGNORED_KEYS`).

    A group's label lists the config keys that tell it apart from the other groups
    (e.g. ``model.estimator=relu``); with a single group, its runs' name.
    """
    keyed: dict[str, Group] = {}
    flats: dict[str, dict[str, Any]] = {}
    for r in runs:
        flat = {k: v for k, v in _flatten(r.config).items() if k not in IGNORED_KEYS}
        key = json.dumps(flat, sort_keys=True, default=str)
        if key not in keyed:
            keyed[key] = Group("")
            flats[key] = flat
        keyed[key].runs.append(r)
    groups = list(keyed.values())
    all_keys = sorted({k for f in flats.values() for k in f})
    varying = [k for k in all_keys if len({repr(f.get(k)) for f in flats.values()}) > 1]
    for key, g in keyed.items():
        parts = [f"{k}={_fmt_value(flats[key].get(k, '-'))}" for k in varying]
        g.label = ", ".join(parts) if parts else g.runs[0].name
    return groups


# --- numbers ------------------------------------------------------------------------


def mean_std(values: Iterable[float | None]) -> tuple[float | None, float | None, int]:
    """Mean and sample standard deviation (n - 1) of the values that are not None."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None), len(xs)


def fmt_pct(values: Iterable[float | None]) -> str:
    """Accuracies (fractions) as ``"mean ± std"`` in percent with two decimals."""
    m, s, n = mean_std(values)
    if m is None:
        return "–"
    return f"{100 * m:.2f}" + (f" ± {100 * s:.2f}" if s is not None else "")


def fmt_num(values: Iterable[float | None], spec: str = ".3g") -> str:
    """Numbers (losses, seconds) as ``"mean ± std"`` with ``spec``."""
    m, s, n = mean_std(values)
    if m is None:
        return "–"
    return format(m, spec) + (f" ± {format(s, spec)}" if s is not None else "")


_COLUMNS: list[tuple[str, str, Callable[[list[float | None]], str]]] = [
    ("final train loss", "final_train_loss", fmt_num),
    ("final val acc (%)", "final_val_acc", fmt_pct),
    ("best val acc (%)", "best_val_acc", fmt_pct),
    ("test acc (%)", "test_acc", fmt_pct),
    ("wall time (s)", "wall_time_s", lambda v: fmt_num(v, ".1f")),
]


# --- files --------------------------------------------------------------------------


def _save_png(fig: Any, path: Path) -> None:
    from .plots import save_figure  # imports torch; `stelab report` does not need it

    save_figure(fig, path, dpi=110)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-.") or "run"


def _epochs(
    rows: Sequence[Mapping[str, float | None]], key: str
) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for r in rows:
        if r.get(key) is not None and r.get("epoch") is not None:
            xs.append(float(r["epoch"]))  # type: ignore[arg-type]
            ys.append(float(r[key]))  # type: ignore[arg-type]
    return xs, ys


def _figure(size: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def _epoch_axis(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _run_title(run: Run, group: Group) -> str:
    seed = f", seed {run.seed}" if run.seed is not None else ""
    return f"{run.path.name} ({group.label}{seed})"


def plot_run(run: Run, group: Group, path: Path) -> None:
    """Loss and accuracy per epoch of one run, train and val, side by side."""
    fig = _figure((10, 3.8))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, (tr, va), ylabel in (
        (ax_loss, ("train_loss", "val_loss"), "cross-entropy loss"),
        (ax_acc, ("train_acc", "val_acc"), "accuracy (%)"),
    ):
        scale = 100.0 if ylabel.startswith("accuracy") else 1.0
        for key, style, label in ((tr, "-o", "train"), (va, "--s", "validation")):
            xs, ys = _epochs(run.rows, key)
            if xs:
                ax.plot(xs, [scale * y for y in ys], style, ms=3, lw=1.5, label=label)
        _epoch_axis(ax)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # a run without epochs has no curves
            ax.legend(loc="best", fontsize=9)
    losses = [y for k in ("train_loss", "val_loss") for y in _epochs(run.rows, k)[1]]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 30:
        ax_loss.set_yscale("log")
        ax_loss.set_ylabel("cross-entropy loss (log scale)")
    ax_loss.set_title("loss per epoch")
    ax_acc.set_title("accuracy per epoch")
    test = run.final("test_acc")
    sub = f"; test accuracy {100 * test:.2f}%" if test is not None else "; not finished"
    fig.suptitle(_run_title(run, group) + sub, fontsize=11)
    fig.tight_layout()
    _save_png(fig, path)


def plot_groups(groups: Sequence[Group], path: Path) -> None:
    """Validation accuracy per epoch: one line per group (mean over seeds), min-max band."""
    fig = _figure((8, 4.8))
    ax = fig.subplots()
    for i, g in enumerate(groups):
        per_epoch: dict[float, list[float]] = {}
        for r in g.runs:
            for x, y in zip(*_epochs(r.rows, "val_acc"), strict=True):
                per_epoch.setdefault(x, []).append(100 * y)
        if not per_epoch:
            continue
        xs = sorted(per_epoch)
        mean = [statistics.fmean(per_epoch[x]) for x in xs]
        color = f"C{i % 10}"
        n = len(g.runs)
        label = f"{g.label} ({n} run{'s' if n > 1 else ''})"
        ax.plot(xs, mean, "-o", ms=3, color=color, label=label)
        if n > 1:
            lo = [min(per_epoch[x]) for x in xs]
            hi = [max(per_epoch[x]) for x in xs]
            ax.fill_between(xs, lo, hi, color=color, alpha=0.18, lw=0)
    _epoch_axis(ax)
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Validation accuracy per epoch (line: mean over seeds; band: min to max)")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _save_png(fig, path)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def esc(s: str) -> str:
        return s.replace("|", "\\|")

    out = ["| " + " | ".join(map(esc, header)) + " |"]
    out.append("|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|")
    out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return out


def _summary_rows(groups: Sequence[Group]) -> list[dict[str, Any]]:
    rows = []
    for g in groups:
        rec: dict[str, Any] = {"group": g.label, "runs": len(g.runs)}
        rec["seeds"] = " ".join(str(r.seed) for r in g.runs)
        for _, key, _ in _COLUMNS:
            m, s, n = mean_std(r.final(key) for r in g.runs)
            rec[f"{key}_mean"] = m
            rec[f"{key}_std"] = s
            rec[f"{key}_n"] = n
        rows.append(rec)
    return rows


def write_report(
    run_dirs: Sequence[str | os.PathLike[str]], out_dir: str | os.PathLike[str]
) -> Path:
    """Write ``report.md``, ``report.html``, ``summary.csv`` and PNG plots into ``out_dir``.

    Runs whose configs differ only by ``train.seed`` are one row of the comparison
    table, as mean ± sample standard deviation over the seeds. Returns the path of
    ``report.md``. A path that is not a run directory raises a ConfigError naming it.
    """
    if isinstance(run_dirs, (str, os.PathLike)):
        run_dirs = [run_dirs]
    if not run_dirs:
        raise ConfigError("write_report needs at least one run directory")
    seen: set[Path] = set()
    runs = []
    for d in run_dirs:
        r = load_run(d)
        key = r.path.resolve()
        if key not in seen:
            seen.add(key)
            runs.append(r)
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        why = "it is a file" if out.is_file() else e.strerror
        raise ConfigError(f"cannot create the report directory {str(out)!r}: {why}") from None
    groups = group_runs(runs)
    for g in groups:
        for r in g.runs:
            r.label = g.label

    # plots
    names: dict[Path, str] = {}
    used: set[str] = set()
    for r in runs:
        base = f"curves-{_slug(r.path.name)}"
        name, i = base, 1
        while name in used:
            i += 1
            name = f"{base}-{i}"
        used.add(name)
        names[r.path] = name + ".png"
    for g in groups:
        for r in g.runs:
            plot_run(r, g, out / names[r.path])
    plot_groups(groups, out / "val-accuracy.png")

    # summary.csv
    summary = _summary_rows(groups)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(summary[0]), lineterminator="\n")
    w.writeheader()
    for rec in summary:
        w.writerow({k: ("" if v is None else v) for k, v in rec.items()})
    atomic_write_text(out / "summary.csv", buf.getvalue())

    # report.md
    lines = ["# stelab report", ""]
    lines.append(
        f"{len(runs)} run(s) in {len(groups)} group(s). Runs whose configs differ only by "
        "`train.seed` form one group; numbers are mean ± sample standard deviation "
        "(n − 1) over its runs. Accuracies in percent; *final* is the last epoch, *best* "
        "the best validation epoch; test accuracy is of the final model."
    )
    lines += ["", "## Comparison", ""]
    header = ["group", "runs (seeds)", "epochs", *[c[0] for c in _COLUMNS]]
    rows = []
    for g in groups:
        seeds = ", ".join(str(r.seed) for r in g.runs)
        epochs = sorted({int(r.final("epochs") or 0) for r in g.runs})
        row = [g.label, f"{len(g.runs)} ({seeds})", "/".join(map(str, epochs))]
        row += [fmt(list(r.final(key) for r in g.runs)) for _, key, fmt in _COLUMNS]
        rows.append(row)
    lines += _md_table(header, rows)
    lines += ["", "![validation accuracy per epoch](val-accuracy.png)", ""]
    lines += ["## Runs", ""]
    header = ["run", "group", "seed", "epochs", *[c[0] for c in _COLUMNS], "status"]
    rows = []
    for r in runs:
        row = [str(r.path), r.label, str(r.seed), str(int(r.final("epochs") or 0))]
        row += [fmt([r.final(key)]) for _, key, fmt in _COLUMNS]
        row.append("finished" if r.metrics is not None else "not finished")
        rows.append(row)
    lines += _md_table(header, rows)
    lines += ["", "## Curves", ""]
    for r in runs:
        lines += [
            f"### {r.path.name}",
            "",
            f"![loss and accuracy of {r.path.name}]({names[r.path]})",
            "",
        ]
    atomic_write_text(out / "report.md", "\n".join(lines))
    atomic_write_text(out / "report.html", _report_html(runs, groups, names))
    return out / "report.md"


def _report_html(runs: Sequence[Run], groups: Sequence[Group], names: Mapping[Path, str]) -> str:
    """``report.html``: the comparison table (best test accuracy in bold), the validation
    curves, a table of every run linking to its curves, and the curves (relative links to
    the PNGs next to the page)."""
    from .report_html import Anchors, esc, page

    anchor = Anchors()
    run_id = {r.path: anchor("run", r.path.name) for r in runs}
    test = [mean_std(r.final("test_acc") for r in g.runs)[0] for g in groups]
    best = max((t for t in test if t is not None), default=None)

    def table(header: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(row) + "</tr>" for row in rows)
        return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'

    h = [
        "<h1>stelab report</h1>",
        f'<p class="muted">{len(runs)} run(s) in {len(groups)} group(s). Runs whose configs '
        "differ only by <code>train.seed</code> form one group; numbers are mean ± sample "
        "standard deviation (n − 1) over its runs. Accuracies in percent; <em>final</em> is "
        "the last epoch, <em>best</em> the best validation epoch; test accuracy is of the "
        "final model.</p>",
        '<section id="summary"><h2>Comparison</h2>',
    ]
    rows = []
    for g, t in zip(groups, test, strict=True):
        seeds = ", ".join(str(r.seed) for r in g.runs)
        epochs = sorted({int(r.final("epochs") or 0) for r in g.runs})
        cls = ' class="best"' if best is not None and t == best and len(groups) > 1 else ""
        row = [f"<td{cls}>{esc(g.label)}</td>", f"<td>{len(g.runs)} ({esc(seeds)})</td>"]
        row.append(f'<td class="num">{"/".join(map(str, epochs))}</td>')
        row += [
            f'<td class="num">{esc(fmt([r.final(key) for r in g.runs]))}</td>'
            for _, key, fmt in _COLUMNS
        ]
        rows.append(row)
    header = ["group", "runs (seeds)", "epochs", *[c[0] for c in _COLUMNS]]
    h.append(table(header, rows, "grid"))
    h.append('<p><img src="val-accuracy.png" alt="validation accuracy per epoch"></p></section>')
    h.append('<section id="runs"><h2>Runs</h2>')
    rows = []
    for r in runs:
        status = "finished" if r.metrics is not None else "not finished"
        row = [
            f'<td><a href="#{run_id[r.path]}">{esc(r.path.name)}</a></td>',
            f"<td>{esc(r.label)}</td><td>{esc(r.seed)}</td>",
            f'<td class="num">{int(r.final("epochs") or 0)}</td>',
        ]
        row += [f'<td class="num">{esc(fmt([r.final(key)]))}</td>' for _, key, fmt in _COLUMNS]
        row.append(f"<td>{status}</td>")
        rows.append(row)
    h.append(table(["run", "group", "seed", "epochs", *[c[0] for c in _COLUMNS], "status"], rows))
    h.append('</section><section id="curves"><h2>Curves</h2>')
    for r in runs:
        h.append(
            f'<h3 id="{run_id[r.path]}">{esc(r.path.name)}</h3><p class="muted">{esc(r.path)}'
            f'</p><p><img src="{esc(names[r.path])}" alt="loss and accuracy of '
            f'{esc(r.path.name)}"></p>'
        )
    h.append("</section>")
    return page("stelab report", "\n".join(h))
