"""docs/adding-a-paper.md done for real: its worked example, built from the page itself.

Every code block of the page headed by a file name is written into a temporary folder;
the example paper is registered the two documented ways (``stelab --import`` a module
that calls ``register_paper``; ``register_paper`` with the ``Paper``), ``stelab
reproduce`` runs it, and the page's own tests run on it. The page cannot drift from
what works.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import stelab
from stelab import cli
from stelab.experiments import reproduce

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

DOC = Path(__file__).resolve().parents[1] / "docs" / "adding-a-paper.md"
# a file: a line **`path.py`**, an empty line, then a python block
FILE = re.compile(r"^\*\*`([\w/.]+\.py)`\*\*\n\n```python\n(.*?)^```$", re.M | re.S)
FILES = {
    "mypaper/__init__.py",
    "mypaper/rounding.py",
    "mypaper/rounding_claims.py",
    "mypaper/rounding_report.py",
    "mypaper_plugin.py",
    "test_rounding_verdicts.py",
    "test_rounding.py",
}


def doc_files() -> dict[str, str]:
    return {m.group(1): m.group(2) for m in FILE.finditer(DOC.read_text(encoding="utf-8"))}


@pytest.fixture
def example(tmp_path, monkeypatch):
    """The page's files in ``tmp_path`` (on sys.path, the current directory), a private
    copy of the paper registry, and no trace of the example left behind."""
    for name, code in doc_files().items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(code, encoding="utf-8")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(reproduce, "PAPERS", dict(reproduce.PAPERS))
    monkeypatch.setenv("STELAB_IMPORT", "")  # --import exports here; restored afterwards
    yield tmp_path
    for mod in [m for m in sys.modules if m.split(".")[0] in ("mypaper", "mypaper_plugin")]:
        del sys.modules[mod]


def test_the_page_has_every_file_of_the_example():
    assert set(doc_files()) == FILES


def test_out_of_tree_with_import(example, capsys):
    out = example / "out"
    args = ["reproduce", "mypaper", "--quick", "--out", str(out), "--no-progress"]
    assert cli.main(args) == 2  # unknown until registered
    assert "unknown paper" in capsys.readouterr().err.lower()
    assert cli.main(["--import", "mypaper_plugin", *args]) == 0
    assert "mypaper/rounding: 1 reproduced" in capsys.readouterr().out
    assert reproduce.PAPERS["mypaper"]["parts"] == {"rounding": "mypaper.rounding"}

    part = out / "mypaper" / "rounding"
    assert {"results.json", "report.md", "bias.png", "done.json"} <= {
        p.name for p in part.iterdir()
    }
    res = json.loads((part / "results.json").read_text())
    (claim,) = res["claims"]
    assert claim["id"] == "unbiased" and claim["verdict"] == "reproduced"
    assert claim["checks"]["max_abs_z"] <= claim["checks"]["z_max"] == 4.0
    assert res["n"] == 20_000 and res["cache_reused"] is False
    assert json.loads((part / "done.json").read_text())["files"] == ["report.md", "bias.png"]
    report = (out / "report.md").read_text()
    assert "## A worked example: stochastic rounding" in report
    assert "| rounding | (unbiased) Stochastic rounding is unbiased" in report
    assert (
        "**reproduced**" in report
        and "![mean minus x at each point](mypaper/rounding/bias.png)" in report
    )
    assert "data:image/png;base64," in (out / "report.html").read_text()

    # a second run reuses the finished part
    assert cli.main(["--import", "mypaper_plugin", *args]) == 0
    assert "mypaper/rounding: reused finished part (1 reproduced)" in capsys.readouterr().out


def test_register_the_paper_object(example):
    from mypaper import PAPER

    reproduce.register_paper(PAPER)
    path = reproduce.reproduce(["mypaper"], example / "out", quick=True, progress=False, log=print)
    rows = [r for r in path.read_text().splitlines() if r.startswith("| rounding | (unbiased)")]
    assert len(rows) == 1 and "| **reproduced** |" in rows[0]


def test_the_pages_tests_pass_on_the_example(example):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(example), str(Path(stelab.__file__).parents[1])]),
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "test_rounding_verdicts.py", "test_rounding.py"],
        cwd=example, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "10 passed" in done.stdout
