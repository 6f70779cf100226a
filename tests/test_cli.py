"""The CLI: commands run, bad input gives one line on stderr and exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from stelab.cli import main


def run(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("stelab 0.")


def test_estimators_lists_every_estimator_with_formula(capsys):
    import stelab

    code, out, _ = run(capsys, "estimators")
    assert code == 0
    for name in stelab.estimator_names():
        assert name in out
    assert "max(0, 2 - 2|x|)" in out


def test_estimators_plot_writes_png(capsys, tmp_path):
    path = tmp_path / "est.png"
    code, out, _ = run(capsys, "estimators", "--plot", str(path))
    assert code == 0 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(tmp_path.glob(".tmp-*"))  # atomic write left no temp file


def test_summary_of_zoo_model(capsys):
    code, out, _ = run(capsys, "summary", "lenet5", "--bits", "2", "--weight-bits", "4")
    assert code == 0 and "Compression" in out and "clipped_relu" in out


@pytest.mark.parametrize(
    "args,needle",
    [
        (["summary", "lenet6"], "did you mean 'lenet5'"),
        (["summary", "lenet5", "--input-shape", "1,x"], "--input-shape"),
        (["summary", "lenet5", "--bits", "x"], "--bits"),
        (["summary", "lenet5", "--bits", "0"], "bits"),
        (["summary", "lenet5", "--estimator", "reluu"], "did you mean 'relu'"),
        (["summary"], "Missing argument"),
        (["nope"], "No such command"),
        (["estimators", "--plot", "x.txt"], ".png"),
        (["demo", "--estimator", "bogus"], "unknown estimator 'bogus'"),
        (["demo", "--epochs", "0"], "--epochs"),
    ],
)
def test_bad_input_is_one_line_exit_2(capsys, args, needle):
    code, out, err = run(capsys, *args)
    assert code == 2
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("stelab: error:"), err
    assert needle in lines[0]
    assert "Traceback" not in err + out


def test_console_script_exit_code_and_no_traceback():
    p = subprocess.run(
        [sys.executable, "-m", "stelab.cli", "summary", "lenet6"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().startswith("stelab: error: unknown model")
