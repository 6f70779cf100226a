"""Hostile input for every `stelab` subcommand: one table of bad command lines.

Each case runs in an empty sandbox folder (the working directory) holding only the
files its setup writes, and must give exit code 2, exactly one line on stderr,
starting ``stelab: error:`` and containing the case's words (the parameter, the
value, what is allowed), no traceback, and leave the sandbox's files and folders
as they were (apart from the paths a case lists in ``creates``).

To add a command's cases (train, gradcheck, export, ...), append ``Case`` rows to
``CASES``; a setup writes the input files it needs with the helpers below.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from stelab.cli import main

# --- sandbox files -------------------------------------------------------------------

CONFIG = 'name = "r"\n[model]\nname = "lenet5"\n[train]\nseed = 1\n'
METRICS = "epoch,train_loss,train_acc,val_loss,val_acc\n1,0.9,0.6,0.8,0.7\n2,0.5,0.8,0.6,0.8\n"


def files(**contents: str | bytes) -> Callable[[Path], None]:
    """A setup that writes ``{relative path: text or bytes}`` (``__`` in a name is ``/``)."""

    def setup(root: Path) -> None:
        for name, data in contents.items():
            p = root / name.replace("__", "/")
            p.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(data, bytes):
                p.write_bytes(data)
            else:
                p.write_text(data)

    return setup


def run_dir(**changes: str | bytes) -> Callable[[Path], None]:
    """A setup for a run directory ``run/`` (config.toml, metrics.csv) with ``changes``
    (file name -> content; content None is impossible: omit the file via ``drop``)."""
    base: dict[str, str | bytes] = {"run__config.toml": CONFIG, "run__metrics.csv": METRICS}
    base.update({f"run__{k.replace('_dot_', '.')}": v for k, v in changes.items()})
    return files(**base)


def folder(name: str) -> Callable[[Path], None]:
    def setup(root: Path) -> None:
        (root / name).mkdir(parents=True)

    return setup


# --- the table -----------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One bad command line: ``argv`` (relative paths: the sandbox is the working
    directory), the ``words`` its error line must contain, an optional ``setup`` that
    writes input files, and the paths it may ``create``."""

    id: str
    argv: tuple[str, ...]
    words: tuple[str, ...] = ()
    setup: Callable[[Path], None] | None = None
    creates: tuple[str, ...] = ()


def C(id: str, *argv: str, words: tuple[str, ...] | str = (), **kw) -> Case:  # noqa: N802
    return Case(id, tuple(argv), (words,) if isinstance(words, str) else tuple(words), **kw)


HUGE = "99999999999999999999999"
GE = "greater than or equal to"
LE = "less than or equal to"
# fmt: off
CASES: list[Case] = [
    # generic: the command line itself
    C("unknown command", "nope", words="No such command"),
    C("unknown option", "--bogus", words="--bogus"),
    C("unknown short option", "-x", words="-x"),
    C("flag given a value", "--version=1", words=("--version", "does not take a value")),
    C("extra argument", "estimators", "extra", words="extra"),
    C("missing option value", "estimators", "--plot", words=("--plot", "requires an argument")),
    # estimators
    C("estimators plot suffix", "estimators", "--plot", "p.txt", words=("p.txt", ".png")),
    C("estimators plot no suffix", "estimators", "--plot", "p", words=("'p'", ".png")),
    C("estimators plot empty", "estimators", "--plot", "", words=".png"),
    C("estimators plot is a folder", "estimators", "--plot", "d.png",
      words=("d.png", "folder"), setup=folder("d.png")),
    C("estimators plot under a file", "estimators", "--plot", "f/p.png",
      words=("'f'", "is a file"), setup=files(f="")),
    # summary
    C("summary unknown model", "summary", "lenet6", words=("lenet6", "did you mean 'lenet5'")),
    C("summary empty model", "summary", "", words=("unknown model ''", "lenet5")),
    C("summary missing model", "summary", words="Missing argument"),
    C("summary num-classes negative", "summary", "lenet5", "--num-classes", "-5",
      words=("--num-classes", "-5", f"{GE} 1")),
    C("summary num-classes zero", "summary", "lenet5", "--num-classes", "0",
      words=("--num-classes", "'0'", f"{GE} 1")),
    C("summary num-classes text", "summary", "lenet5", "--num-classes", "ten",
      words=("--num-classes", "'ten'", "integer")),
    C("summary num-classes huge", "summary", "vgg11", "--num-classes", "99999999999",
      words=("--num-classes", "99999999999")),
    C("summary bits zero", "summary", "lenet5", "--bits", "0", words=("--bits", "'0'", f"{GE} 1")),
    C("summary bits 17", "summary", "lenet5", "--bits", "17", words=("--bits", "'17'", f"{LE} 16")),
    C("summary bits float", "summary", "lenet5", "--bits", "2.5", words=("--bits", "'2.5'")),
    C("summary weight-bits 1", "summary", "lenet5", "--weight-bits", "1",
      words=("--weight-bits", "'1'", "greater than or equal to 2")),
    C("summary weight-bits 0", "summary", "lenet5", "--weight-bits", "0",
      words=("--weight-bits", "'0'")),
    C("summary weight-bits -1", "summary", "lenet5", "--weight-bits", "-1",
      words=("--weight-bits", "'-1'")),
    C("summary weight-bits 17", "summary", "lenet5", "--weight-bits", "17",
      words=("--weight-bits", f"{LE} 16")),
    C("summary shape too big", "summary", "lenet5", "--input-shape", "1,100000,100000",
      words=("--input-shape", "(1, 100000, 100000)", "memory")),
    C("summary shape astronomic", "summary", "resnet20", "--input-shape", f"3,{HUGE},{HUGE}",
      words=("--input-shape", "memory")),
    C("summary shape two dims", "summary", "lenet5", "--input-shape", "1,28",
      words=("--input-shape", "'1,28'", "C,H,W")),
    C("summary shape four dims", "summary", "lenet5", "--input-shape", "1,28,28,28",
      words=("--input-shape", "C,H,W")),
    C("summary shape zero", "summary", "lenet5", "--input-shape", "0,28,28",
      words=("--input-shape", "positive")),
    C("summary shape text", "summary", "lenet5", "--input-shape", "a,b,c",
      words=("--input-shape", "'a,b,c'")),
    C("summary shape empty", "summary", "lenet5", "--input-shape", "", words="--input-shape"),
    C("summary shape too small", "summary", "lenet5", "--input-shape", "1,4,4",
      words=("--input-shape", ">= 8", "4x4")),
    C("summary unknown estimator", "summary", "lenet5", "--estimator", "reluu",
      words=("reluu", "did you mean 'relu'")),
    # demo (every case fails before any training)
    C("demo epochs zero", "demo", "--epochs", "0", words=("--epochs", "'0'", f"{GE} 1")),
    C("demo epochs negative", "demo", "--epochs", "-3", words=("--epochs", "'-3'")),
    C("demo epochs text", "demo", "--epochs", "x", words=("--epochs", "'x'")),
    C("demo bits zero", "demo", "--bits", "0", words=("--bits", "'0'")),
    C("demo bits 17", "demo", "--bits", "17", words=("--bits", f"{LE} 16")),
    C("demo unknown estimator", "demo", "-e", "bogus", words="unknown estimator 'bogus'"),
    C("demo empty estimator", "demo", "-e", "", words="unknown estimator ''"),
    C("demo seed negative", "demo", "--seed", "-1", words=("--seed", "'-1'", f"{GE} 0")),
    C("demo seed huge", "demo", "--seed", HUGE, words=("--seed", HUGE)),
    # disguise
    C("disguise unknown", "disguise", "cosin", words=("cosin", "did you mean 'cosine'")),
    C("disguise empty", "disguise", "", words="unknown estimator ''"),
    C("disguise missing", "disguise", words="Missing argument"),
    C("disguise step zero", "disguise", "cosine", "--step", "0", words=("step", "> 0")),
    C("disguise step negative", "disguise", "cosine", "--step", "-1", words=("step", "-1")),
    C("disguise step nan", "disguise", "cosine", "--step", "nan", words=("step", "nan")),
    C("disguise step inf", "disguise", "cosine", "--step", "inf", words=("step", "inf")),
    C("disguise step text", "disguise", "cosine", "--step", "abc", words=("--step", "'abc'")),
    C("disguise param no =", "disguise", "cosine", "-p", "a", words=("--param", "'a'")),
    C("disguise param no name", "disguise", "cosine", "-p", "=1", words=("--param", "'=1'")),
    C("disguise param text", "disguise", "cosine", "-p", "a=x",
      words=("a must be a number", "'x'")),
    C("disguise param unknown", "disguise", "cosine", "-p", "b=1", words=("['b']", "allowed: a")),
    C("disguise param nan", "disguise", "cosine", "-p", "a=nan", words=("a must be", "nan")),
    C("disguise param degenerate", "disguise", "cosine", "-p", "a=1.5", words="cosine(a=1.5)"),
    C("disguise plot suffix", "disguise", "cosine", "--plot", "x.txt", words=("x.txt", ".png")),
    C("disguise plot under a file", "disguise", "cosine", "--plot", "f/m.png",
      words=("'f'", "is a file"), setup=files(f="")),
    # reproduce (every case fails before any part runs)
    C("reproduce unknown paper", "reproduce", "yin2020", words=("yin2020", "did you mean")),
    C("reproduce empty paper", "reproduce", "", words="unknown paper ''"),
    C("reproduce two papers", "reproduce", "yin2019", "psa2020", words="psa2020"),
    C("reproduce seed negative", "reproduce", "--seed", "-1", words=("--seed", "'-1'")),
    C("reproduce seed huge", "reproduce", "--seed", HUGE, words=("--seed", HUGE)),
    C("reproduce seed past 32 bits", "reproduce", "--seed", "4294967296", words=("--seed",)),
    C("reproduce seed text", "reproduce", "--seed", "x", words=("--seed", "'x'")),
    C("reproduce flag value", "reproduce", "--quick=1", words=("--quick", "does not take")),
    C("reproduce out is a file", "reproduce", "yin2019", "--out", "f",
      words=("'f'", "it is a file"), setup=files(f="")),
    C("reproduce out under a file", "reproduce", "yin2019", "--out", "f/o",
      words=("'f/o'", "not writable"), setup=files(f="")),
    # report
    C("report missing argument", "report", words="Missing argument"),
    C("report no such folder", "report", "nope", words=("'nope'", "not a stelab run directory")),
    C("report a file", "report", "f", words=("'f'", "not a directory"), setup=files(f="")),
    C("report empty folder", "report", "d",
      words=("no config.toml or metrics.csv"), setup=folder("d")),
    C("report binary metrics.csv", "report", "run",
      words=("run/metrics.csv", "not UTF-8"),
      setup=run_dir(metrics_dot_csv=bytes(range(128, 256)) * 4)),
    C("report NUL in metrics.csv", "report", "run",
      words=("run/metrics.csv", "'train_loss'"),
      setup=run_dir(metrics_dot_csv="epoch,train_loss\n1,0.\x005\n")),
    C("report empty metrics.csv", "report", "run",
      words=("run/metrics.csv", "empty"), setup=run_dir(metrics_dot_csv="")),
    C("report huge field", "report", "run",
      words=("run/metrics.csv", "field"),
      setup=run_dir(metrics_dot_csv="epoch,a\n1," + "9" * 200_000 + "\n")),
    C("report non-number", "report", "run",
      words=("run/metrics.csv", "'val_acc'", "'high'"),
      setup=run_dir(metrics_dot_csv="epoch,val_acc\n1,high\n")),
    C("report fractional epoch", "report", "run",
      words=("'epoch'", "'1.5'"), setup=run_dir(metrics_dot_csv="epoch,val_acc\n1.5,0.5\n")),
    C("report metrics.json list", "report", "run",
      words=("run/metrics.json", "list"), setup=run_dir(metrics_dot_json="[1, 2]")),
    C("report metrics.json text value", "report", "run",
      words=("'test_acc'", "'abc'"), setup=run_dir(metrics_dot_json='{"test_acc": "abc"}')),
    C("report metrics.json truncated", "report", "run",
      words=("run/metrics.json", "JSON"), setup=run_dir(metrics_dot_json='{"test_acc": 0.')),
    C("report config.toml garbled", "report", "run",
      words=("run/config.toml", "TOML"), setup=run_dir(config_dot_toml="name = [")),
    C("report config.toml binary", "report", "run",
      words=("run/config.toml", "TOML"), setup=run_dir(config_dot_toml=b"\xff\xfe\x00")),
    C("report train not a table", "report", "run",
      words=("[train]", "table"), setup=run_dir(config_dot_toml="train = 5\n")),
    C("report out is a file", "report", "run", "--out", "f",
      words=("'f'", "it is a file"), setup=lambda root: (run_dir()(root), files(f="")(root))),
    C("report out under a file", "report", "run", "--out", "f/r",
      words=("'f/r'"), setup=lambda root: (run_dir()(root), files(f="")(root))),
]
# fmt: on


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) + ("/" if p.is_dir() else "") for p in root.rglob("*")}


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    root = tmp_path / "sandbox"
    root.mkdir()
    monkeypatch.chdir(root)
    # data and caches, if anything looked for them, go outside the sandbox
    monkeypatch.setenv("STELAB_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return root


def test_the_table_is_big_and_covers_every_command():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)
    covered = {c.argv[0] for c in CASES if c.argv}
    assert {"estimators", "summary", "demo", "disguise", "reproduce", "report"} <= covered


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, sandbox: Path, capsys):
    if case.setup is not None:
        case.setup(sandbox)
    before = _tree(sandbox)
    code = main(list(case.argv))
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, (code, out, err)
    assert len(lines) == 1 and lines[0].startswith("stelab: error: "), err
    for w in case.words:
        assert w in lines[0], (w, lines[0])
    assert "Traceback" not in out + err
    after = _tree(sandbox)
    assert after - before <= set(case.creates), f"created: {sorted(after - before)}"
    assert before <= after, f"removed: {sorted(before - after)}"


@pytest.mark.parametrize(
    "argv,setup,words",
    [
        (["summary", "lenet5", "--num-classes", "0"], None, "--num-classes"),
        (["report", "run"], run_dir(metrics_dot_csv=b"\x89PNG\r\n\x1a\n\xff\xff"), "not UTF-8"),
    ],
    ids=["num-classes zero", "binary metrics.csv"],
)
def test_hostile_input_through_the_console_entry_point(sandbox, argv, setup, words):
    if setup is not None:
        setup(sandbox)
    before = _tree(sandbox)
    p = subprocess.run(
        [sys.executable, "-m", "stelab.cli", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr
    assert len(lines) == 1 and lines[0].startswith("stelab: error: ") and words in lines[0]
    assert "Traceback" not in p.stdout + p.stderr
    assert _tree(sandbox) == before


def test_an_unexpected_exception_is_one_internal_error_line_with_exit_1(
    sandbox, capsys, monkeypatch
):
    """A bug (not bad input) is not dressed up as a user error: exit 1, one line saying
    it is a bug, and STELAB_TRACEBACK=1 shows the traceback."""
    import stelab.estimators as est

    def broken() -> list:
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(est, "describe", broken)
    code = main(["estimators"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert err.startswith("stelab: internal error: ZeroDivisionError: boom") and "bug" in err
    monkeypatch.setenv("STELAB_TRACEBACK", "1")
    with pytest.raises(ZeroDivisionError):
        main(["estimators"])


def test_running_out_of_memory_is_a_user_error(sandbox, capsys, monkeypatch):
    import stelab.estimators as est

    def hungry() -> list:
        raise MemoryError("cannot allocate 5 TiB")

    monkeypatch.setattr(est, "describe", hungry)
    code = main(["estimators"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("stelab: error: not enough memory") and "5 TiB" in err


def test_cli_seed_range_is_the_config_seed_range():
    """`--seed` is checked by Typer against a literal (so --help stays cheap): it must be
    exactly the range train.seed accepts, or reproduce would fail after creating folders."""
    from stelab import cli, config

    assert cli._SEED_MAX == config.SEED_MAX
