"""stelab.io: atomic writes and the numeric CSV reader that run directories use."""

from __future__ import annotations

import math
import os

import pytest

from stelab.errors import ConfigError
from stelab.io import atomic_open, atomic_write_text, read_numeric_csv, write_json


def test_atomic_open_replaces_only_on_success(tmp_path):
    p = tmp_path / "sub" / "f.txt"
    atomic_write_text(p, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_open(p) as f:
            f.write("half")
            raise RuntimeError("interrupted")
    assert p.read_text() == "old\n"
    assert sorted(os.listdir(p.parent)) == ["f.txt"]  # the temporary file is gone
    with atomic_open(p, "wb") as f:
        f.write(b"new")
    assert p.read_bytes() == b"new"
    mask = os.umask(0)
    os.umask(mask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~mask  # as open() would create it
    with pytest.raises(ValueError, match="mode"):
        with atomic_open(p, "a"):
            pass


def test_write_json_makes_non_finite_null_and_stringifies(tmp_path):
    p = write_json(tmp_path / "x.json", {"a": math.nan, "b": [1.5, math.inf], "c": tmp_path})
    assert p.read_text() == (
        '{\n  "a": null,\n  "b": [\n    1.5,\n    null\n  ],\n  "c": "' + str(tmp_path) + '"\n}\n'
    )


def test_read_numeric_csv(tmp_path):
    p = tmp_path / "m.csv"
    p.write_text("epoch,loss,acc\n1,0.5,\n2,0.25,0.75\n")
    assert read_numeric_csv(p, ("epoch",)) == [
        {"epoch": 1, "loss": 0.5, "acc": None},
        {"epoch": 2, "loss": 0.25, "acc": 0.75},
    ]
    p.write_text("epoch,loss\n1,oops\n")
    with pytest.raises(ConfigError, match="column 'loss' has a non-number 'oops'"):
        read_numeric_csv(p)


def test_atomic_open_fsyncs_the_file_then_its_folder(tmp_path, monkeypatch):
    """Durability: the data are on disk before the rename, and the rename (the folder
    entry) after it; a writer without either passes every content check above."""
    import stat

    synced = []
    real_fsync = os.fsync

    def spy(fd):
        st = os.fstat(fd)
        # the file's size as the system sees it: what an fsync now would make durable
        synced.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino, st.st_size))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    p = tmp_path / "sub" / "f.bin"
    with atomic_open(p, "wb") as f:
        f.write(b"data")  # stays in Python's buffer unless flushed before the fsync
    assert synced[0] == ("file", p.stat().st_ino, 4)
    assert synced[1][:2] == ("dir", p.parent.stat().st_ino) and len(synced) == 2
    synced.clear()
    with pytest.raises(RuntimeError):
        with atomic_open(p, "wb") as f:
            raise RuntimeError("interrupted")
    assert synced == []  # nothing was replaced, nothing to make durable


def test_interrupts_deferred_holds_ctrl_c_until_the_block_ends(tmp_path):
    import os
    import signal

    from stelab.io import interrupts_deferred

    # Python's own handler (a background shell starts its children with SIGINT ignored,
    # and then a deferred Ctrl-C is rightly ignored too: checked at the end)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _check_deferral(tmp_path, interrupts_deferred)
    finally:
        signal.signal(signal.SIGINT, before)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)


def _check_deferral(tmp_path, interrupts_deferred):
    import os
    import signal

    done = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            for name in ("a", "b"):  # both writes happen although Ctrl-C came first
                atomic_write_text(tmp_path / name, name)
                done.append(name)
    assert done == ["a", "b"] and (tmp_path / "b").read_text() == "b"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    with interrupts_deferred():  # no signal: nothing raised
        done.append("c")
    assert done[-1] == "c"


def test_interrupts_deferred_under_the_default_action(tmp_path):
    """With SIGINT at its default action (SIG_DFL, e.g. in embedding programs), a block
    without Ctrl-C ends normally; a Ctrl-C inside it lets the block finish and then
    takes the default action (the process ends by SIGINT). In a child process."""
    import signal
    import subprocess
    import sys

    code = """
import os, signal, sys
from stelab.io import interrupts_deferred
signal.signal(signal.SIGINT, signal.SIG_DFL)
with interrupts_deferred():
    pass
print("after a quiet block", flush=True)
with interrupts_deferred():
    os.kill(os.getpid(), signal.SIGINT)
    print("block finished", flush=True)
print("not reached", flush=True)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.stdout.splitlines() == ["after a quiet block", "block finished"]
    assert r.returncode == -signal.SIGINT


def test_remove_stale_temp_files_returns_what_it_removed(tmp_path):
    from stelab.io import remove_stale_temp_files

    stale = [tmp_path / ".last.pt.k1l2m3n4.tmp", tmp_path / ".metrics.csv.q1w2e3r4.tmp"]
    kept = [tmp_path / "last.pt", tmp_path / ".notes.tmp"]
    for p in stale + kept:
        p.write_bytes(b"x")
    removed = remove_stale_temp_files(tmp_path, ("last.pt", "metrics.csv"))
    assert sorted(removed) == sorted(stale)
    assert sorted(tmp_path.iterdir()) == sorted(kept)
    assert remove_stale_temp_files(tmp_path, ("last.pt",)) == []  # nothing left to remove
    assert remove_stale_temp_files(tmp_path / "absent", ("last.pt",)) == []
