"""Tests of stelab.report: files, grouping by seed, table numbers against the run dirs."""

from __future__ import annotations

import csv
import json
import shutil
import statistics

import pytest
from train_helpers import quick_cfg

from stelab.cli import main
from stelab.errors import ConfigError
from stelab.report import group_runs, load_run, write_report
from stelab.train import train

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two seeds of one config and one run with another estimator (2 tiny epochs each)."""
    root = tmp_path_factory.mktemp("runs")
    base = ("data.limit=128", "train.epochs=2", "data.augment='none'")
    dirs = {
        "crelu-s0": quick_cfg(*base, "train.seed=0", "name='crelu-s0'"),
        "crelu-s1": quick_cfg(*base, "train.seed=1", "name='crelu-s1'"),
        "ste-s0": quick_cfg(*base, "train.seed=0", "model.estimator='ste'", "name='ste-s0'"),
    }
    for name, cfg in dirs.items():
        train(cfg, root / name, progress=False)
    return [root / n for n in dirs]


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    """The report of the three runs (written once for the tests below)."""
    return write_report(runs, tmp_path_factory.mktemp("report") / "out")


def _metrics(d):
    return json.loads((d / "metrics.json").read_text())


def _row(md: str, label: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] == label:
            return cells
    raise AssertionError(f"no table row {label!r} in report.md")


def test_report_files_and_grouping(runs, report):
    out = report.parent
    path = report
    assert path.name == "report.md"
    md = path.read_text()
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == [
        "curves-crelu-s0.png",
        "curves-crelu-s1.png",
        "curves-ste-s0.png",
        "val-accuracy.png",
    ]
    for p in out.glob("*.png"):
        assert p.read_bytes()[:8] == PNG and p.stat().st_size > 10_000
        assert f"]({p.name})" in md  # every plot is shown in the report
    assert not list(out.glob(".*tmp"))
    groups = group_runs([load_run(r) for r in runs])
    assert [len(g.runs) for g in groups] == [2, 1]
    assert [g.label for g in groups] == ["model.estimator=clipped_relu", "model.estimator=ste"]


def test_table_numbers_equal_run_metrics(runs, report):
    md = report.read_text()
    seeds = [_metrics(d) for d in runs[:2]]
    # independent: mean and sample std over the two seeds' metrics.json
    for col, key in ((6, "test_acc"), (4, "final_val_acc"), (5, "best_val_acc")):
        vals = [100 * m[key] for m in seeds]
        want = f"{statistics.mean(vals):.2f} ± {statistics.stdev(vals):.2f}"
        assert _row(md, "model.estimator=clipped_relu")[col] == want, key
    loss = [m["final_train_loss"] for m in seeds]
    assert _row(md, "model.estimator=clipped_relu")[3] == (
        f"{statistics.mean(loss):.3g} ± {statistics.stdev(loss):.3g}"
    )
    assert _row(md, "model.estimator=clipped_relu")[1] == "2 (0, 1)"
    single = _metrics(runs[2])
    assert _row(md, "model.estimator=ste")[6] == f"{100 * single['test_acc']:.2f}"  # no ± for n=1
    # summary.csv holds the same numbers at full precision
    with open(report.parent / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    a = rows[0]
    assert float(a["test_acc_mean"]) == statistics.fmean(m["test_acc"] for m in seeds)
    assert float(a["test_acc_std"]) == statistics.stdev(m["test_acc"] for m in seeds)
    assert a["runs"] == "2" and rows[1]["test_acc_std"] == ""
    # per-run rows: the final val accuracy is the last row of that run's metrics.csv
    last = list(csv.DictReader(open(runs[2] / "metrics.csv")))[-1]
    assert _row(md, str(runs[2]))[5] == f"{100 * float(last['val_acc']):.2f}"


def test_unfinished_run_and_bad_paths(runs, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(runs[0], partial)
    (partial / "metrics.json").unlink()
    md = write_report([partial], tmp_path / "r").read_text()
    row = _row(md, str(partial))
    assert row[-1] == "not finished" and row[7] == "–"  # no test accuracy yet
    with pytest.raises(ConfigError, match=r"'.*nowhere' is not a stelab run directory"):
        write_report([runs[0], tmp_path / "nowhere"], tmp_path / "r2")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match=r"empty' is not a stelab run directory \(no config"):
        write_report([empty], tmp_path / "r2")
    with pytest.raises(ConfigError, match="at least one"):
        write_report([], tmp_path / "r2")


def test_cli_report(runs, tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["report", str(runs[2]), "--out", str(out)]) == 0
    assert "report.md" in capsys.readouterr().out and (out / "report.md").is_file()
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stelab: error: ") and "missing" in err[0]
