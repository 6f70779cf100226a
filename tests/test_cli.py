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


def test_help_shows_no_type_on_flags(capsys):
    for args in (["--help"], ["reproduce", "--help"], ["estimators", "--help"]):
        code, out, _ = run(capsys, *args)
        assert code == 0 and "--help" in out
        assert "<bool>" not in out, args
    code, out, _ = run(capsys, "summary", "--help")
    assert "<str>" in out and "[1<=x<=16]" in out  # valued options keep type and range


def test_estimators_plot_has_a_legend_for_every_panel_and_says_it_made_a_folder(
    capsys, tmp_path, monkeypatch
):
    import stelab.plots as plots

    figs = []
    real = plots.save_figure
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, **kw: figs.append(fig) or
                        real(fig, path, **kw))  # fmt: skip
    path = tmp_path / "new" / "deeper" / "est.png"
    code, out, _ = run(capsys, "estimators", "--plot", str(path))
    assert code == 0 and path.is_file()
    assert f"created folder {tmp_path / 'new'}" in out.splitlines()
    (fig,) = figs
    panels = [ax for ax in fig.axes if ax.lines]
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None] + fig.legends
    assert len(legends) == 1  # one legend, stated to hold for every panel:
    assert legends[0] in fig.legends or not legends[0].axes.lines  # not inside one panel
    texts = [t.get_text() for t in legends[0].get_texts()]
    for ax in panels:  # it names every curve drawn in each panel
        assert sorted(ln.get_label() for ln in ax.lines if not ln.get_label().startswith("_")) \
            == sorted(texts)  # fmt: skip
    code, out, _ = run(capsys, "estimators", "--plot", str(path))
    assert "created folder" not in out  # the folder exists now


def test_check_fits_counts_parameters_and_refuses_at_the_budget():
    import torch

    from stelab import models

    shape = (1, 28, 28)
    need = models.check_fits("lenet5", in_shape=shape, budget=None)
    p = sum(t.numel() for t in models.build("lenet5", in_shape=shape).parameters())
    widest = max(m.out_channels for m in models.build("lenet5").modules()
                 if isinstance(m, torch.nn.Conv2d))  # fmt: skip
    assert need == 8 * p + 12 * widest * 32 * 32  # 4 bytes · (2P + 3·widest·(H+4)(W+4))
    assert models.check_fits("lenet5", in_shape=shape, budget=need) == need
    # over the bound: the forward pass on `meta` gives the exact largest tensor
    exact = models.check_fits("lenet5", in_shape=shape, budget=need - 1)
    assert exact == 8 * p + 12 * 6 * 28 * 28  # conv1's output 6x28x28 is the largest
    with pytest.raises(ValueError, match=r"in_shape \(1, 28, 28\).*more than the 1 KiB"):
        models.check_fits("lenet5", in_shape=shape, budget=1024)


def test_summary_prints_the_export_size_beside_the_float_size(capsys):
    """The line agrees with stelab.export.exported_size (itself checked against the bytes
    of a real exported file in test_export.py)."""
    from stelab import models
    from stelab.export import exported_size

    code, out, _ = run(capsys, "summary", "lenet5", "--bits", "2", "--weight-bits", "4")
    assert code == 0
    m = models.build(
        "lenet5", act={"bits": 2}, weights={"fn": "uniform", "bits": 4, "step": "auto"}
    )
    es = exported_size(m)
    line = next(ln for ln in out.splitlines() if ln.startswith("ONNX export"))
    assert f"{es.exported_bytes / 1024:.1f} KiB" in line
    assert f"{es.float_bytes / 1024:.1f} KiB float32" in line
    assert es.quantized_weights == 5 and es.compression > 3.5
