"""`stelab train` with hostile input: every bad input is exit 2, one `stelab: error:` line
that names what is wrong, no traceback, and nothing in the working folder created,
changed or removed (the run folder is created only after set-up succeeded).

Runs `stelab.cli.main` in-process, in a sandbox folder that holds configs, a finished
run (``runs/prev``), a user's folder with a ``checkpoints/`` subfolder, and a file.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from train_helpers import quick_cfg

import stelab.train.loop as loop
from stelab.cli import main
from stelab.errors import DataError
from stelab.train import files, train

GOOD = "[data]\nlimit = 256\n[model]\nbits = 2\n[train]\nepochs = 1\nthreads = 1\n"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("prev") / "prev"
    train(quick_cfg("train.epochs=1"), run, progress=False)
    return run


@pytest.fixture
def sandbox(tmp_path, monkeypatch, finished_run):
    box = tmp_path / "box"
    box.mkdir()
    (box / "good.toml").write_text(GOOD)
    shutil.copytree(finished_run, box / "runs" / "prev")
    (box / "runs" / "prev" / "notes.md").write_text("my notes")
    mine = box / "mine"
    (mine / "checkpoints").mkdir(parents=True)
    (mine / "checkpoints" / "model.pt").write_bytes(b"user data")
    (mine / "notes.md").write_text("keep me")
    (box / "a-file").write_text("not a folder")
    monkeypatch.chdir(box)
    return box


def snapshot(root: Path) -> dict[str, tuple[str, int, int]]:
    """Every path under ``root`` with its kind, size and modification time."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            kind = "dir" if p.is_dir() else "file"
            out[str(p.relative_to(root))] = (
                kind,
                0 if kind == "dir" else st.st_size,
                st.st_mtime_ns,
            )
    return out


def write(name: str, text: str | bytes) -> str:
    p = Path(name)
    if isinstance(text, bytes):
        p.write_bytes(text)
    else:
        p.write_text(text, encoding="utf-8")
    return name


def _quick(*sets: str) -> list[str]:
    out = []
    for s in sets:
        out += ["--set", s]
    return out


# (id, files to write first, argv after "train", a word the message must contain)
CASES = [
    ("missing-config", {}, ["nope.toml"], "does not exist"),
    ("bad-toml", {"c.toml": "[data\nlimit = "}, ["c.toml"], "not valid TOML"),
    ("nested-arrays", {"c.toml": "x = " + "[" * 5000 + "]" * 5000}, ["c.toml"], "nested"),
    ("not-utf8", {"c.toml": b"name = '\xff\xfe'"}, ["c.toml"], "UTF-8"),
    ("unknown-section", {"c.toml": "[trian]\n"}, ["c.toml"], "did you mean 'train'"),
    ("unknown-key", {"c.toml": "[optim]\nlrr = 0.1\n"}, ["c.toml"], "lrr"),
    ("wrong-type", {"c.toml": '[train]\nepochs = "ten"\n'}, ["c.toml"], "train.epochs"),
    (
        "date-plus-set",
        {"c.toml": "[data]\nlimit = 1979-05-27\n"},
        ["c.toml", "--set", "train.seed=1"],
        "data.limit",
    ),
    ("set-no-equals", {}, ["good.toml", "--set", "optim.lr"], "KEY=VALUE"),
    ("set-bad-key", {}, ["good.toml", "--set", "optim lr=1"], "dotted names"),
    ("set-negative-lr", {}, ["good.toml", "--set", "optim.lr=-1"], "optim.lr"),
    ("huge-seed", {}, ["good.toml", "--set", "train.seed=" + "9" * 40], "train.seed"),
    ("seed-beyond-numpy", {}, ["good.toml", "--set", "train.seed=4294967296"], "4294967295"),
    ("huge-data-seed", {}, ["good.toml", "--set", "data.seed=" + str(2**64)], "data.seed"),
    (
        "set-nested-value",
        {},
        ["good.toml", "--set", "optim.betas=" + "[" * 3000 + "]" * 3000],
        "nested",
    ),
    ("lone-surrogate", {}, ["good.toml", "--set", "name=a\udcffb"], "Unicode"),
    ("unknown-model", {}, ["good.toml", "--set", "model.name=lenet6"], "lenet5"),
    ("limit-1-batch-norm", {}, ["good.toml", "--set", "data.limit=1"], "data.limit = 1"),
    ("val-size-too-big", {}, ["good.toml", "--set", "data.val_size=100000"], "val_size"),
    (
        "weights-unknown-key",
        {},
        ["good.toml", *_quick("model.weights.fn=sign", "model.weights.bogus=1")],
        "bogus",
    ),
    ("init-from-missing", {}, ["good.toml", "--set", "train.init_from=nowhere"], "train.init_from"),
    ("out-is-a-file", {}, ["good.toml", "--out", "a-file"], "not a directory"),
    ("out-under-a-file", {}, ["good.toml", "--out", "a-file/run"], "is a file"),
    ("existing-run-no-flag", {}, ["good.toml", "--out", "runs/prev"], "already exists"),
    ("overwrite-foreign", {}, ["good.toml", "--out", "mine", "--overwrite"], "did not mark"),
    ("resume-foreign", {}, ["good.toml", "--out", "mine", "--resume"], "not a stelab run"),
    (
        "resume-and-overwrite",
        {},
        ["good.toml", "--out", "runs/prev", "--resume", "--overwrite"],
        "not both",
    ),
    (
        "resume-changed-model",
        {},
        ["runs/prev", "--resume", "--set", "model.name=convnet"],
        "model.name",
    ),
    ("dir-without-config", {}, ["mine"], "without config.toml"),
    ("devices-zero", {}, ["good.toml", "--devices", "0"], "devices"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(case, sandbox, capsys):
    _, to_write, argv, word = case
    for name, text in to_write.items():
        write(name, text)
    before = snapshot(sandbox)
    rc = main(["train", *argv, "--no-progress"])
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert rc == 2, (rc, out, err)
    assert len(lines) == 1 and lines[0].startswith("stelab: error: "), err
    assert "Traceback" not in out + err
    assert word in lines[0], lines[0]
    assert snapshot(sandbox) == before


def test_failed_download_leaves_no_run_folder(sandbox, capsys, monkeypatch):
    def failed(*args, **kwargs):
        raise DataError("could not download train-images-idx3-ubyte.gz of 'mnist'")

    monkeypatch.setattr(loop, "load_data", failed)
    before = snapshot(sandbox)
    assert main(["train", "good.toml", "--out", "runs/new", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "could not download" in err[0] and "data.name" in err[0]
    assert snapshot(sandbox) == before


def test_run_folder_held_by_another_process_is_one_line_naming_pid(sandbox, capsys):
    lock = files.RunLock.acquire(sandbox / "runs" / "prev")
    try:
        before = snapshot(sandbox)
        for flag in ("--resume", "--overwrite"):
            rc = main(["train", "good.toml", "--out", "runs/prev", flag, "--no-progress"])
            err = capsys.readouterr().err.strip().splitlines()
            assert rc == 2 and len(err) == 1, err
            assert "runs/prev" in err[0] and f"pid {os.getpid()}" in err[0]
        assert snapshot(sandbox) == before
    finally:
        lock.release()
