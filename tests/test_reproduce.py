"""`stelab reproduce`: parts run once, resume, and the report embeds everything."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from stelab.experiments import reproduce as rp
from stelab.experiments.display import Display
from stelab.experiments.spine import Claim, PartResult

sys.path.insert(0, str(Path(__file__).parent))
import fake_part  # noqa: E402


@pytest.fixture
def fake_registry(monkeypatch):
    papers = {k: {**v, "parts": {}} for k, v in rp.PAPERS.items()}
    papers["yin2019"]["parts"] = {"fake": "fake_part"}
    monkeypatch.setattr(rp, "PAPERS", papers)
    monkeypatch.setitem(sys.modules, "stelab.experiments.fake_part", fake_part)
    fake_part.CALLS.clear()
    return papers


def test_report_has_verdicts_and_self_contained_html(tmp_path, fake_registry):
    lines: list[str] = []
    path = rp.reproduce(["all"], tmp_path, quick=True, seed=3, log=lines.append)
    md = path.read_text()
    assert "| fake | (a) the sky \\| is blue | **reproduced** | seed 3 |" in md
    assert "![a curve](yin2019/fake/curve.png)" in md  # image path rewritten to the part
    assert "No reproduction part of this paper is available yet." in md  # psa2020 here
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and "curve.png" not in html
    assert any("yin2019/fake: 1 reproduced" in ln for ln in lines)


def test_finished_parts_are_reused_and_rerun_on_request(tmp_path, fake_registry):
    rp.reproduce(["yin2019"], tmp_path, quick=True, log=lambda s: None)
    rp.reproduce(["yin2019"], tmp_path, quick=True, log=lambda s: None)
    assert len(fake_part.CALLS) == 1
    rp.reproduce(["yin2019"], tmp_path, quick=False, log=lambda s: None)  # other mode
    assert len(fake_part.CALLS) == 2
    rp.reproduce(["yin2019"], tmp_path, quick=False, rerun=True, log=lambda s: None)
    assert len(fake_part.CALLS) == 3


def test_unknown_paper_and_unwritable_output(tmp_path, fake_registry):
    with pytest.raises(ValueError, match="did you mean 'yin2019'"):
        rp.reproduce(["yin2091"], tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a folder cannot be made under a file, even by root
    with pytest.raises(ValueError, match="not writable"):
        rp.reproduce(["yin2019"], blocker / "out")
    assert not fake_part.CALLS


def test_cifar_part_is_skipped_with_its_reason_and_tried_again(
    tmp_path, fake_registry, monkeypatch
):
    from stelab.experiments.yin2019 import table1_cifar as cifar

    fake_registry["yin2019"]["parts"]["table1-cifar10"] = "stelab.experiments.yin2019.table1_cifar"
    # no CIFAR-10 anywhere: an empty data folder and cache, no system copy
    monkeypatch.setenv("STELAB_DATA", str(tmp_path / "no-data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "no-cache"))
    calls = []
    real = cifar.t1.run
    monkeypatch.setattr(cifar.t1, "run", lambda *a, **k: calls.append(k) or real(*a, **k))
    for quick, why in [(True, "quick mode uses only bundled data"),
                       (False, "CIFAR-10 is not available: ")]:  # fmt: skip
        lines: list[str] = []
        md = rp.reproduce(["yin2019"], tmp_path / "out", quick=quick, log=lines.append)
        assert any(ln.startswith("yin2019/table1-cifar10: skipped (" + why) for ln in lines)
        assert f"Skipped: **table1-cifar10**: {why}" in md.read_text()
        assert not (tmp_path / "out" / "yin2019" / "table1-cifar10" / "done.json").exists()
    skipped = next(ln for ln in lines if "skipped" in ln)
    assert "d.download('cifar10')" in skipped  # says how to get it
    assert not calls  # nothing was trained
    assert len(fake_part.CALLS) == 2  # the other part ran in each mode


def test_cifar_part_runs_both_nets_when_cifar10_is_present(tmp_path, monkeypatch):
    from stelab.experiments.yin2019 import table1_cifar as cifar

    monkeypatch.setattr(cifar.t1, "pick_data", lambda net, **kw: ("cifar10", "found"))
    seen = []

    def fake_run(out_dir, *, quick, seed, progress, net, **kw):
        seen.append((net, quick, seed))
        out_dir.mkdir(parents=True)
        (out_dir / "report.md").write_text(f"# {net}\n\n![curves](table1_curves.png)\n")
        claim = Claim(id="ste-order", text="t", verdict="partly", evidence=net)
        return PartResult(name=net, claims=[claim], out_dir=out_dir)

    monkeypatch.setattr(cifar.t1, "run", fake_run)
    r = cifar.run(tmp_path, quick=False, seed=5, progress=False)
    assert seen == [("vgg11", False, 5), ("resnet20", False, 5)]
    assert [c.id for c in r.claims] == ["vgg11 ste-order", "resnet20 ste-order"]
    md = (tmp_path / "report.md").read_text()
    assert "](vgg11/table1_curves.png)" in md and "](resnet20/table1_curves.png)" in md


def _lines_of(tmp_path, papers=("yin2019",)):
    lines: list[str] = []
    path = rp.reproduce(list(papers), tmp_path, quick=True, seed=3, log=lines.append)
    return lines, path.read_text()


BAD_RECORDS = [
    ("truncated", b'{"mode": {"quick": true, "se', "not readable JSON"),
    ("binary", b"\xff\xfe\x00garbage", "not readable JSON"),
    ("a list", b"[1, 2, 3]", "holds a list, not an object"),
    ("no claims", b'{"mode": {"quick": true, "seed": 3}, "files": []}', "no list of claims"),
    (
        "claims not objects",
        b'{"mode": {"quick": true, "seed": 3}, "claims": ["a"], "files": []}',
        "no list of claims",
    ),
    (
        "files not a list",
        b'{"mode": {"quick": true, "seed": 3}, "claims": [], "files": "report.md"}',
        "'files' entry",
    ),
]


@pytest.mark.parametrize("name,data,why", BAD_RECORDS, ids=[b[0] for b in BAD_RECORDS])
def test_a_damaged_done_json_reruns_the_part_and_says_why(tmp_path, fake_registry, name, data, why):
    _lines_of(tmp_path)
    done = tmp_path / "yin2019" / "fake" / "done.json"
    done.write_bytes(data)
    lines, md = _lines_of(tmp_path)
    assert len(fake_part.CALLS) == 2  # ran again instead of a traceback or a silent reuse
    again = [ln for ln in lines if ln.startswith("yin2019/fake: running again: ")]
    assert len(again) == 1 and why in again[0], lines
    assert "| fake | (a) the sky \\| is blue | **reproduced** | seed 3 |" in md
    assert rp.check_finished(done.parent, {"quick": True, "seed": 3})[0] is not None
    _lines_of(tmp_path)
    assert len(fake_part.CALLS) == 2  # the rewritten record is reused


@pytest.mark.parametrize("lost,why", [("curve.png", "its figure curve.png is missing"),
                                      ("report.md", "its report.md is missing")])  # fmt: skip
@pytest.mark.parametrize("old_record", [False, True], ids=["record", "record-without-files"])
def test_a_lost_figure_or_report_reruns_the_part_and_its_section_is_back(
    tmp_path, fake_registry, lost, why, old_record
):
    import json

    _lines_of(tmp_path)
    part = tmp_path / "yin2019" / "fake"
    if old_record:  # done.json from before the file list: the needs come from report.md
        rec = json.loads((part / "done.json").read_text())
        assert rec.pop("files") == ["report.md", "curve.png"]
        (part / "done.json").write_text(json.dumps(rec))
    (part / lost).unlink()
    lines, md = _lines_of(tmp_path)
    assert len(fake_part.CALLS) == 2
    assert f"yin2019/fake: running again: {why}" in lines
    assert "### Fake part" in md and "![a curve](yin2019/fake/curve.png)" in md
    assert (part / "curve.png").is_file() and (part / "report.md").is_file()
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html


def test_another_mode_reruns_and_says_so(tmp_path, fake_registry):
    _lines_of(tmp_path)
    lines: list[str] = []
    rp.reproduce(["yin2019"], tmp_path, quick=False, seed=3, log=lines.append)
    assert "yin2019/fake: running again: it finished in quick mode, seed 3, this run is full " \
        "mode, seed 3" in lines  # fmt: skip
    assert len(fake_part.CALLS) == 2


def test_a_folder_where_done_json_goes_is_an_error_and_is_kept(tmp_path, fake_registry):
    (tmp_path / "yin2019" / "fake" / "done.json").mkdir(parents=True)
    with pytest.raises(ValueError, match="done.json' is not a file"):
        rp.reproduce(["yin2019"], tmp_path, quick=True, log=lambda s: None)
    assert (tmp_path / "yin2019" / "fake" / "done.json").is_dir() and not fake_part.CALLS


# --- what reproduce says while it runs ----------------------------------------------------


def test_not_a_terminal_one_line_per_part_start_and_end(tmp_path, fake_registry, monkeypatch):
    seen = []
    monkeypatch.setattr(fake_part, "run", _recording(fake_part.run, seen))
    lines: list[str] = []
    rp.reproduce(["yin2019"], tmp_path, quick=True, progress=True, log=lines.append)
    # pytest captures stderr, so no live bars: plain lines, the parts themselves silent
    assert lines[0] == "yin2019/fake: running (part 1 of 1)" and len(lines) == 2
    assert re.fullmatch(r"yin2019/fake: 1 reproduced \(\d+ s\)", lines[1])
    assert seen == [False]
    lines.clear()
    rp.reproduce(["yin2019"], tmp_path, quick=True, log=lines.append)
    assert lines == ["yin2019/fake: reused finished part (1 reproduced)"]


def test_quiet_says_nothing_and_verbose_lets_parts_talk(tmp_path, fake_registry, monkeypatch):
    seen = []
    monkeypatch.setattr(fake_part, "run", _recording(fake_part.run, seen))
    lines: list[str] = []
    rp.reproduce(["yin2019"], tmp_path, quick=True, quiet=True, log=lines.append)
    rp.reproduce(["yin2019"], tmp_path, quick=False, quiet=True, log=lines.append)  # reruns
    assert lines == [] and seen == [False, False]
    rp.reproduce(["yin2019"], tmp_path, quick=True, verbose=True, log=lines.append)
    assert seen == [False, False, True] and len(lines) == 3  # running again, start, end


def _recording(run, seen):
    def wrapped(d, *, quick=False, seed=0, progress=True):
        seen.append(progress)
        return run(d, quick=quick, seed=seed, progress=progress)

    return wrapped


def test_live_bars_follow_the_training_log():
    import io
    import logging

    from rich.console import Console

    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    log = logging.getLogger("stelab.train")
    prev = log.level
    log.setLevel(logging.INFO)
    lines: list[str] = []
    try:
        with Display(3, bars=True, log=lines.append, console=console) as show:
            p = show.progress
            show.start("yin2019/table1", 0)
            log.info("starting %s: lenet5 on digits, %d epochs", "relu-2bit", 8)
            log.info("epoch %d/%d: train loss %.4f, lr %.3g, %.1f s", 3, 8, 0.5, 0.1, 0.2)
            run = p.tasks[show.run]
            assert (run.description.strip(), run.completed, run.total) == ("run relu-2bit", 3, 8)
            log.info("finished %d epochs in %.1f s: test acc %s", 8, 1.0, "0.9")
            assert p.tasks[show.part].completed == 1 and p.tasks[show.part].visible
            show.end("yin2019/table1", "yin2019/table1: 1 partly (1 s)")
            assert p.tasks[show.all].completed == 1 and not p.tasks[show.run].visible
        assert not log.handlers or all(type(h).__name__ != "Handler" for h in log.handlers)
    finally:
        log.setLevel(prev)
    # on a terminal the start line is the bar, the end line is printed
    assert lines == ["yin2019/table1: 1 partly (1 s)"]


def test_demo_quiet_prints_only_results_and_verbose_each_epoch(capsys):
    from stelab.cli import main

    assert main(["demo", "--epochs", "2", "-e", "ste", "-q"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("LeNet-5, 2-bit activations, estimator")
    assert main(["demo", "--epochs", "2", "-e", "ste", "--verbose"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert [ln.split(":")[0] for ln in out[1:3]] == ["  ste epoch 1/2", "  ste epoch 2/2"]
    assert len(out) == 4 and out[0].startswith("Training LeNet-5")
    for cmd in (["demo"], ["reproduce"]):
        assert main([*cmd, "-q", "-v"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["stelab: error: --quiet and --verbose exclude each other; give one of them"]
