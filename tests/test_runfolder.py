"""Run folders (stelab.train.files): what stelab deletes, the lock, no half-made folders,
stale temporary files, configs that resume, a full disk.

Each class of failure is tested through the mechanism that fixes it: the marker
(only files stelab wrote in a folder it marked are removed), the flock lock (a second
writer fails naming the holder; a killed holder blocks nothing), set-up before the
folder is made, the temp-file naming shared by the writer and the cleaner, the config
round trip, and write errors turned into one line.
"""

from __future__ import annotations

import collections
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomllib
import torch
from train_helpers import ckpt, quick_cfg

from stelab.cli import main
from stelab.config import parse_config
from stelab.errors import ConfigError
from stelab.io import atomic_open
from stelab.train import files, train
from stelab.train.files import read_metrics_csv


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under ``root``: size (0 for folders) and modification time."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            out[str(p.relative_to(root))] = (0 if p.is_dir() else st.st_size, st.st_mtime_ns)
    return out


def one_error_line(capsys) -> str:
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stelab: error: "), err
    assert "Traceback" not in out + err
    return lines[0]


@pytest.fixture(scope="module")
def one_epoch(tmp_path_factory):
    run = tmp_path_factory.mktemp("one") / "run"
    train(quick_cfg("train.epochs=1"), run, progress=False)
    return run


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# --- 1. data loss: only files stelab wrote, only in a folder it marked, only after set-up ---


def test_failed_setup_deletes_nothing_with_or_without_overwrite(one_epoch, tmp_path):
    run = copy_run(one_epoch, tmp_path / "run")
    (run / "notes.md").write_text("mine")
    (run / "sub").mkdir()
    (run / "sub" / "x.txt").write_text("mine too")
    unstarted = tmp_path / "unstarted"  # a run that never finished an epoch, plus user files
    unstarted.mkdir()
    (unstarted / "config.toml").write_text("[train]\nepochs = 1\n")
    (unstarted / "notes.md").write_text("mine")
    before = snapshot(tmp_path)
    bad = quick_cfg("train.init_from='missing-run'")  # fails in set-up
    for target, kw in [(run, {"overwrite": True}), (run, {}), (unstarted, {})]:
        with pytest.raises(ConfigError):
            train(bad, target, progress=False, **kw)
    assert snapshot(tmp_path) == before


def test_overwrite_removes_exactly_the_files_stelab_wrote(one_epoch, tmp_path):
    run = copy_run(one_epoch, tmp_path / "run")
    user = {
        "notes.md": "notes",
        "sub/data.txt": "data",
        "checkpoints/mine.pt": "my checkpoint",
        "tensorboard/mine.txt": "mine",
    }
    for rel, text in user.items():
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text(text)
    (run / "tensorboard" / "events.out.tfevents.1.host").write_text("stelab's")
    old = snapshot(run)
    removed = files.remove_own_files(run)
    stelab_wrote = {
        "config.toml",
        "env.json",
        "metrics.csv",
        "metrics.json",
        "train.log",
        ".stelab-run.json",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "tensorboard/events.out.tfevents.1.host",
    }
    assert {str(p.relative_to(run)) for p in removed} == stelab_wrote
    assert set(snapshot(run)) == set(old) - stelab_wrote
    for rel, text in user.items():
        assert (run / rel).read_text() == text

    # end to end: --overwrite keeps the user's files and the new run is complete
    run2 = copy_run(one_epoch, tmp_path / "run2")
    for rel, text in user.items():
        (run2 / rel).parent.mkdir(parents=True, exist_ok=True)
        (run2 / rel).write_text(text)
    train(quick_cfg("train.epochs=1", "train.seed=3"), run2, overwrite=True, progress=False)
    assert ckpt(run2)["config"]["train"]["seed"] == 3
    assert tomllib.loads((run2 / "config.toml").read_text())["train"]["seed"] == 3
    for rel, text in user.items():
        assert (run2 / rel).read_text() == text


def test_overwrite_refuses_a_folder_stelab_did_not_mark(one_epoch, tmp_path):
    # a user's folder with checkpoints/ (and even a config.toml): not stelab's to delete
    mine = tmp_path / "mine"
    (mine / "checkpoints").mkdir(parents=True)
    (mine / "checkpoints" / "last.pt").write_bytes(b"my weights")
    (mine / "config.toml").write_text("[train]\nepochs = 1\n")
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"refusing to overwrite .*mine.*no \.stelab-run\.json"):
        train(quick_cfg("train.epochs=1"), mine, overwrite=True, progress=False)
    assert snapshot(tmp_path) == before


# --- 2. the lock -----------------------------------------------------------------------

# a run that cannot finish while the test runs (a loaded CI machine did 1000 epochs in
# 93 s, before the second writers had failed): Ctrl-C ends it
CLI_CONFIG = (
    "[data]\nlimit = 256\nbatch_size = 16\n[model]\nbits = 2\n"
    "[train]\nepochs = 1000000\nthreads = 1\n"
)


# A shell runs background jobs (CI may be one) with SIGINT ignored and a child inherits
# that, so Ctrl-C would never reach the run: the child puts Python's handler back first.
_MAIN = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'stelab'; runpy.run_module('stelab.cli', run_name='__main__')"
)


def _cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", _MAIN, "train", *args, "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


@pytest.mark.slow
def test_second_writer_fails_naming_folder_and_pid_and_the_run_stays_consistent(tmp_path):
    cfg = tmp_path / "long.toml"
    cfg.write_text(CLI_CONFIG)
    run = tmp_path / "run"
    first = _cli(str(cfg), "--out", str(run))
    try:
        deadline = time.time() + 300
        while not (run / "checkpoints" / "last.pt").exists():
            assert first.poll() is None, first.communicate()
            assert time.time() < deadline
            time.sleep(0.05)
        seconds = [
            _cli(str(cfg), "--out", str(run), flag, "--set", "train.seed=7")
            for flag in ("--overwrite", "--resume")
        ]
        for second in seconds:  # started together: both must fail
            out, err = second.communicate(timeout=300)
            lines = err.strip().splitlines()
            assert second.returncode == 2, (out, err)
            assert len(lines) == 1 and lines[0].startswith("stelab: error: "), err
            assert str(run) in lines[0] and f"pid {first.pid}" in lines[0], lines[0]
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.send_signal(signal.SIGINT)  # Ctrl-C: keeps the last checkpoint, exit 130
        try:
            out, err = first.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            first.kill()  # never leave the run behind
            raise
    assert first.returncode == 130, (out[-2000:], err[-2000:])
    state = ckpt(run)
    stored = tomllib.loads((run / "config.toml").read_text())
    assert parse_config(stored) == parse_config(state["config"])
    assert stored["train"]["seed"] == 0
    assert len(read_metrics_csv(run / "metrics.csv")) == state["epoch"] >= 1
    assert not (run / files.LOCK).exists()  # released on the way out


def test_lock_of_a_killed_process_does_not_block_resume(one_epoch, tmp_path):
    run = copy_run(one_epoch, tmp_path / "run")
    code = (
        "import os, signal, sys; from pathlib import Path; from stelab.train import files; "
        "files.RunLock.acquire(Path(sys.argv[1])); os.kill(os.getpid(), signal.SIGKILL)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code, str(run)])
    assert holder.wait(timeout=300) == -signal.SIGKILL
    assert (run / files.LOCK).read_text().split()[0] == str(holder.pid)  # a stale lock file
    assert files.RunLock.held(run) is None  # the kernel dropped the flock with the process
    m = train(quick_cfg("train.epochs=2"), run, resume=True, progress=False)
    assert m["epochs"] == 2 and not (run / files.LOCK).exists()


def test_two_runs_planned_together_only_the_first_commit_wins(one_epoch, tmp_path):
    cfg = quick_cfg("train.epochs=1")
    run = tmp_path / "run"
    first = files.plan_run(run, cfg, resume=False, overwrite=False)
    second = files.plan_run(run, cfg, resume=False, overwrite=False)  # both saw no folder
    lock = files.commit(first, cfg)
    try:
        held = rf"in use by another stelab train \(pid {os.getpid()} "
        with pytest.raises(ConfigError, match=held):
            files.commit(second, cfg)
        (run / "checkpoints" / "last.pt").write_bytes(b"an epoch finished")
    finally:
        lock.release()
    # the plan is checked again under the lock: the first run's epoch is not overwritten
    with pytest.raises(ConfigError, match="already exists"):
        files.commit(second, cfg)
    assert (run / "checkpoints" / "last.pt").read_bytes() == b"an epoch finished"

    # a resume planned from a checkpoint that another run then replaced is refused
    run2 = copy_run(one_epoch, tmp_path / "run2")
    plan = files.plan_run(run2, cfg, resume=True, overwrite=False)
    os.utime(run2 / "checkpoints" / "last.pt", ns=(1, 1))  # as if rewritten meanwhile
    with pytest.raises(ConfigError, match="changed while this run was being set up"):
        files.commit(plan, cfg)
    assert not (run2 / files.LOCK).exists()


# --- 3. no half-made run folders --------------------------------------------------------


@pytest.mark.parametrize(
    "override",
    [
        "model.weights={fn = 'sign', bogus = 1}",
        "data.val_size=100000",
        "train.init_from='no-such-run'",
        "data.limit=1",
    ],
)
def test_failed_setup_creates_no_folder_not_even_parents(override, tmp_path):
    with pytest.raises(ConfigError):
        train(quick_cfg(override), tmp_path / "a" / "b" / "run", progress=False)
    assert list(tmp_path.iterdir()) == []


# --- 4. temporary files ------------------------------------------------------------------


def test_temp_name_pattern_matches_what_atomic_open_creates(tmp_path):
    from stelab.io import is_temp_of

    target = tmp_path / "last.pt"
    with atomic_open(target, "wb") as f:
        f.write(b"x")
        (tmp,) = [p.name for p in tmp_path.iterdir()]
    assert is_temp_of(tmp, "last.pt") and not is_temp_of(tmp, "best.pt")
    for other in (
        "last.pt",
        ".last.pt.tmp",
        "last.pt.abc.tmp",
        ".last.pt.a/b.tmp",
        ".last.ptx.tmp",
    ):
        assert not is_temp_of(other, "last.pt"), other


def test_resume_removes_stale_temp_files_of_its_own_naming_only(one_epoch, tmp_path):
    run = copy_run(one_epoch, tmp_path / "run")
    ours = [
        "checkpoints/.last.pt.k1l2m3n4.tmp",  # what a SIGKILL during torch.save leaves
        "checkpoints/.best.pt.abcd_123.tmp",
        ".config.toml.zz9y8x7w.tmp",
        ".metrics.csv.q1w2e3r4.tmp",
    ]
    users = ["checkpoints/.notes.tmp", ".last.pt.tmp", "notes.tmp", "sub/.last.pt.k1l2m3n4.tmp"]
    for rel in ours + users:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_bytes(b"partial")
    train(quick_cfg("train.epochs=2"), run, resume=True, progress=False)
    assert [r for r in ours if (run / r).exists()] == []
    assert [r for r in users if not (run / r).exists()] == []


# --- 5. whatever stelab train accepts, it can read back -----------------------------------


@pytest.mark.parametrize("name", ["a\x7fb", "tab\there\x00\x1f", "\U0001f600 run"])
def test_run_with_control_or_non_bmp_characters_in_values_resumes(name, tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[data]\nlimit = 128\n[model]\nbits = 2\n[train]\nepochs = 1\nthreads = 1\n")
    run = tmp_path / "run"
    literal = '"' + "".join(f"\\u{ord(c):04X}" if ord(c) < 0x10000 else c for c in name) + '"'
    assert (
        main(["train", str(cfg), "--out", str(run), "--set", f"name={literal}", "--no-progress"])
        == 0
    )
    assert tomllib.loads((run / "config.toml").read_text(encoding="utf-8"))["name"] == name
    rc = main(["train", str(run), "--resume", "--set", "train.epochs=2", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert ckpt(run)["epoch"] == 2 and ckpt(run)["config"]["name"] == name


# --- 7. a full disk -----------------------------------------------------------------------


def test_too_little_free_space_at_start_is_one_line_and_creates_nothing(
    tmp_path, monkeypatch, capsys
):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(files.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 8192, 8192))
    cfg = tmp_path / "c.toml"
    cfg.write_text("[data]\nlimit = 128\n[train]\nepochs = 1\n")
    before = snapshot(tmp_path)
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert "not enough free space" in line and "8.0 KiB free" in line and "--out" in line
    assert snapshot(tmp_path) == before


def test_disk_full_while_writing_a_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    def full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    cfg = tmp_path / "c.toml"
    cfg.write_text("[data]\nlimit = 128\n[train]\nepochs = 1\nthreads = 1\n")
    run = tmp_path / "run"
    assert main(["train", str(cfg), "--out", str(run), "--no-progress"]) == 2
    line = one_error_line(capsys)
    assert "No space left on device" in line and str(run) in line and "--out" in line
    assert list(run.rglob("*.tmp")) == [] and not (run / files.LOCK).exists()


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_train_log_on_a_full_device_is_one_line(one_epoch, tmp_path, capsys):
    run = copy_run(one_epoch, tmp_path / "run")
    (run / "train.log").unlink()
    (run / "train.log").symlink_to("/dev/full")  # every write: ENOSPC from the kernel
    rc = main(["train", str(run), "--resume", "--set", "train.epochs=2", "--no-progress"])
    assert rc == 2
    line = one_error_line(capsys)
    assert "train.log" in line and "No space left on device" in line


# --- 7. a batch of one row with batch norm is a config error, found before the folder -----


def test_last_batch_of_one_row_with_batch_norm_is_a_config_error(tmp_path):
    # 65 training rows, batch 64: the second batch has one row; LeNet-5 has BatchNorm1d
    pattern = r"65 training rows \(data\.limit = 65\).*batch_size = 64"
    with pytest.raises(ConfigError, match=pattern):
        train(quick_cfg("data.limit=65", "train.epochs=1"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    # torch agrees: the same model refuses a one-row batch in training mode
    from stelab import models

    m = models.build("lenet5", num_classes=10, in_shape=(1, 8, 8), act={"bits": 2}).train()
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.zeros(1, 1, 8, 8))
    # no batch of one row (66 rows), or a model without batch norm: the run trains
    assert train(quick_cfg("data.limit=66", "train.epochs=1"), tmp_path / "a", progress=False)
    m = train(
        quick_cfg("data.limit=65", "train.epochs=1", "model.name='convnet'"),
        tmp_path / "b",
        progress=False,
    )
    assert m["epochs"] == 1
