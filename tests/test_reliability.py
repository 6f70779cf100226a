"""Reliability: a training process killed with SIGKILL mid-epoch resumes to the
same parameters, bit for bit, as a run that was never interrupted (CPU); the lock it
held does not block the resume."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

CONFIG = """
name = "kill9"
[data]
name = "digits"
batch_size = 16
[model]
name = "lenet5"
bits = 2
estimator = "clipped_relu"
[optim]
name = "sgd"
lr = 0.05
momentum = 0.9
[schedule]
name = "cosine"
[train]
epochs = 4
seed = 0
threads = 1
"""


def _train(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "stelab.cli", "train", *args, "--no-progress"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        **kw,
    )


def _params(run: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True, map_location="cpu")
    return ckpt["model"]


def test_kill_9_mid_epoch_then_resume_is_bit_identical(tmp_path):
    cfg = tmp_path / "kill9.toml"
    cfg.write_text(CONFIG)
    ref = _train([str(cfg), "--out", str(tmp_path / "ref")])
    assert ref.wait(timeout=600) == 0, ref.stdout.read()

    run = tmp_path / "killed"
    p = _train([str(cfg), "--out", str(run)])
    # wait until the first epoch's checkpoint exists, then kill in the middle of epoch 2
    deadline = time.time() + 300
    while not (run / "checkpoints" / "last.pt").exists():
        assert p.poll() is None, p.stdout.read()
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(p.pid, signal.SIGKILL)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL
    done = torch.load(run / "checkpoints" / "last.pt", weights_only=True)["epoch"]
    assert done < 4  # it really was interrupted
    # the killed run's lock file stays, naming it; the kernel dropped its flock
    assert (run / ".stelab.lock").read_text().split()[0] == str(p.pid)

    resumed = _train([str(cfg), "--out", str(run), "--resume"])
    out = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, out
    a, b = _params(tmp_path / "ref"), _params(run)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not list(run.rglob("*.tmp")) and not list(run.rglob(".tmp-*"))
    assert not (run / ".stelab.lock").exists()
