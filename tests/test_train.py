"""Tests of stelab.train: resume bit-identity, Ctrl-C, divergence, checkpoints, run dirs, DDP.

Runs are tiny (256 digits rows, LeNet-5, 4 steps per epoch). Numbers are checked
against independent computations: a run resumed from a checkpoint against one that
was never stopped, metrics.csv against the accuracy recomputed from the saved weights
by a model built directly with stelab.models, a 2-process DDP run against a
1-process run of the same global batches.
"""

from __future__ import annotations

import argparse
import json
import math
import os

import pytest
import torch
from train_helpers import (
    accuracy_and_loss,
    assert_same_tensors,
    ckpt,
    model_from_state,
    quick_cfg,
)

import stelab.train.loop as loop
from stelab import data, models
from stelab.cli import main
from stelab.config import config_to_dict
from stelab.errors import ConfigError, DataError, StelabError, StelabTypeError
from stelab.train import (
    TrainingDiverged,
    TrainingInterrupted,
    load_checkpoint,
    load_model,
    lr_factor,
    train,
)
from stelab.train.files import read_metrics_csv

STEPS = 4  # 256 rows / batch 64


def _rows_without_time(run_dir):
    return [
        {k: v for k, v in r.items() if not k.endswith("seconds")}
        for r in read_metrics_csv(run_dir / "metrics.csv")
    ]


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """Three uninterrupted epochs: the reference for every resume test."""
    run = tmp_path_factory.mktemp("full") / "run"
    metrics = train(quick_cfg(), run, progress=False)
    return run, metrics


def test_run_dir_layout_and_weights_only_checkpoint(full_run):
    run, metrics = full_run
    for name in ("config.toml", "env.json", "metrics.csv", "metrics.json", "train.log"):
        assert (run / name).is_file(), name
    c = ckpt(run)  # weights_only=True
    assert c["epoch"] == 3 and c["global_step"] == 3 * STEPS
    assert c["config"] == config_to_dict(quick_cfg())
    assert set(c["rng"]) >= {"torch", "shuffle", "augment"}
    assert len(c["history"]) == 3
    env = json.loads((run / "env.json").read_text())
    assert env["seed"] == 0 and env["device"] == "cpu" and env["torch"] == torch.__version__
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["epochs"] == 3 and saved == json.loads(json.dumps(metrics))
    # the schedule: lr halves after 2 epochs (multistep, milestones [2], gamma 0.5)
    assert [r["lr"] for r in read_metrics_csv(run / "metrics.csv")] == [0.05, 0.05, 0.025]


def test_metrics_equal_recomputation_from_checkpoint(full_run):
    run, metrics = full_run
    cfg = quick_cfg()
    d = data.load("digits", seed=0, limit=256, progress=False)
    c = ckpt(run)
    model = model_from_state(cfg, c["model"], d.input_shape, d.num_classes)
    val_acc, val_loss = accuracy_and_loss(model, d.val.x, d.val.y)
    test_acc, test_loss = accuracy_and_loss(model, d.test.x, d.test.y)
    last = read_metrics_csv(run / "metrics.csv")[-1]
    assert last["val_acc"] == val_acc  # exact: a count over 180 rows
    assert math.isclose(last["val_loss"], val_loss, rel_tol=1e-5)
    assert metrics["test_acc"] == test_acc
    assert math.isclose(metrics["test_loss"], test_loss, rel_tol=1e-5)
    assert metrics["final_val_acc"] == val_acc
    # best.pt holds the best validation epoch
    best = ckpt(run, "best.pt")
    vals = [r["val_acc"] for r in read_metrics_csv(run / "metrics.csv")]
    assert best["epoch"] == metrics["best_epoch"] == 1 + vals.index(max(vals))
    # load_model rebuilds the model from the checkpoint alone
    again = load_model(run)
    assert accuracy_and_loss(again, d.val.x, d.val.y)[0] == val_acc


def test_resume_is_bit_identical(full_run, tmp_path):
    ref, _ = full_run
    run = tmp_path / "run"
    train(quick_cfg("train.epochs=2"), run, progress=False)
    assert ckpt(run)["epoch"] == 2
    train(quick_cfg(), run, resume=True, progress=False)
    a, b = ckpt(ref), ckpt(run)
    assert_same_tensors(a["model"], b["model"], "model")
    assert_same_tensors(a["optimizer"], b["optimizer"], "optimizer")
    assert_same_tensors(a["rng"], b["rng"], "rng")
    assert a["scheduler"] == b["scheduler"]
    assert _rows_without_time(ref) == _rows_without_time(run)
    env = json.loads((run / "env.json").read_text())
    assert env["resumed_from_epoch"] == 2 and len(env["sessions"]) == 1


def test_ctrl_c_mid_epoch_keeps_checkpoint_and_resume_matches(full_run, tmp_path, monkeypatch):
    ref, _ = full_run
    run = tmp_path / "run"
    calls = {"n": 0}
    real_step = loop.optimizer_step

    def interrupting_step(*args):
        calls["n"] += 1
        if calls["n"] == STEPS + 2:  # the second step of epoch 2
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(loop, "optimizer_step", interrupting_step)
    with pytest.raises(TrainingInterrupted) as e:
        train(quick_cfg(), run, progress=False)
    msg = str(e.value)
    assert "epoch 2/3" in msg and "(epoch 1)" in msg and "--resume" in msg and str(run) in msg
    assert isinstance(e.value, KeyboardInterrupt)
    kept = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert kept["epoch"] == 1
    assert not list((run / "checkpoints").glob("*.tmp"))
    monkeypatch.setattr(loop, "optimizer_step", real_step)
    train(quick_cfg(), run, resume=True, progress=False)
    assert_same_tensors(ckpt(ref)["model"], ckpt(run)["model"], "model")
    assert_same_tensors(ckpt(ref)["optimizer"], ckpt(run)["optimizer"], "optimizer")


def test_divergence_raises_and_keeps_last_good_checkpoint(tmp_path):
    # convnet has no batch norm, so lr 5e6 from epoch 3 on overflows to nan
    cfg = quick_cfg("model.name='convnet'", "model.bits='float'", "schedule.gamma=1e8")
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged) as e:
        train(cfg, run, progress=False)
    msg = str(e.value)
    assert "diverged" in msg and "epoch 3/3" in msg and "epoch 2" in msg and "last.pt" in msg
    assert isinstance(e.value, StelabError)
    c = ckpt(run)
    assert c["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in c["model"].values() if v.is_floating_point())
    assert len(read_metrics_csv(run / "metrics.csv")) == 2
    assert not (run / "metrics.json").exists()


def test_checkpoint_of_another_model_is_a_clear_error(full_run, tmp_path):
    run, _ = full_run
    other = models.build("convnet", num_classes=10, in_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match=r"does not match the model.*missing keys.*features"):
        load_model(run, other)
    wider = models.build("lenet5", num_classes=7, in_shape=(1, 8, 8))
    with pytest.raises(ConfigError, match=r"shape mismatch.*classifier\.\d+\.weight"):
        load_model(run, wider)
    # resuming with a different model names the changed keys
    copy = tmp_path / "copy"
    train(quick_cfg("train.epochs=1"), copy, progress=False)
    with pytest.raises(ConfigError, match=r"model\.name: 'lenet5' -> 'convnet'"):
        train(quick_cfg("model.name='convnet'"), copy, resume=True, progress=False)


def test_existing_run_dir_refused_overwrite_and_unwritable(tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(quick_cfg("train.epochs=1"), run, progress=False)
    with pytest.raises(ConfigError, match="already exists.*--resume.*--overwrite"):
        train(quick_cfg("train.epochs=1"), run, progress=False)
    with pytest.raises(ConfigError, match="not both"):
        train(quick_cfg(), run, resume=True, overwrite=True, progress=False)
    m = train(quick_cfg("train.epochs=1", "train.seed=3"), run, overwrite=True, progress=False)
    assert m["epochs"] == 1 and ckpt(run)["config"]["train"]["seed"] == 3
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="did not mark it as a run directory of its own"):
        train(quick_cfg(), foreign, overwrite=True, progress=False)
    assert (foreign / "notes.txt").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match="cannot write to the run directory"):
        train(quick_cfg(), blocker / "run", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"cannot set up train\.accelerator = 'cuda'"):
            train(quick_cfg("train.accelerator='cuda'"), tmp_path / "gpu", progress=False)
        assert not (tmp_path / "gpu").exists()

    # a run that fails in set-up (here: missing data) creates nothing
    def no_data(*args, **kwargs):
        raise DataError("no data here")

    with monkeypatch.context() as mp:
        mp.setattr(loop, "load_data", no_data)
        for _ in range(2):
            with pytest.raises(DataError, match="no data here"):
                train(quick_cfg(), tmp_path / "nodata", progress=False)
    assert not (tmp_path / "nodata").exists()
    with pytest.raises(StelabTypeError, match="TrainConfig"):
        train({"train": {}}, tmp_path / "x")  # type: ignore[arg-type]


def test_init_from_copies_float_weights(tmp_path):
    float_run = tmp_path / "float"
    train(quick_cfg("model.bits='float'", "train.epochs=1"), float_run, progress=False)
    src = ckpt(float_run)["model"]
    q = quick_cfg(f"train.init_from='{float_run}'", "train.epochs=1", "optim.lr=1e-12")
    train(q, tmp_path / "quant", progress=False)
    got = ckpt(tmp_path / "quant")["model"]
    params = [k for k in src if k.endswith(("weight", "bias"))]
    assert params
    for k in params:  # lr 1e-12: the trained weights are the copied ones
        assert torch.allclose(got[k], src[k], atol=1e-8), k
    torch.manual_seed(0)
    fresh = models.build("lenet5", num_classes=10, in_shape=(1, 8, 8), act={"bits": 2})
    assert not torch.allclose(fresh.state_dict()[params[0]], src[params[0]])


def test_grad_clip_bounds_every_update(tmp_path):
    # plain SGD (no momentum): each step moves a weight by at most lr * clip
    lr, clip = 0.5, 1e-4
    cfg = quick_cfg(
        "train.epochs=1", "optim.momentum=0.0", f"optim.lr={lr}", f"train.grad_clip={clip}"
    )
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    torch.manual_seed(0)  # the trainer seeds torch with train.seed before building the model
    init = models.build("lenet5", num_classes=10, in_shape=(1, 8, 8), act={"bits": 2})
    end = ckpt(run)["model"]
    moved = max(float((end[k] - v.detach()).abs().max()) for k, v in init.named_parameters())
    # (+1e-6: float32 rounding of weights of size ~0.5)
    assert STEPS * lr * clip / 2 < moved <= STEPS * lr * clip + 1e-6


def test_lr_factor_closed_forms():
    c = quick_cfg("schedule.name='cosine'", "schedule.min_lr=0.01", "optim.lr=0.1")
    assert lr_factor(c.schedule, 10, 0, 0.1) == 1.0
    assert math.isclose(lr_factor(c.schedule, 10, 5, 0.1), 0.1 + 0.9 * 0.5)
    m = quick_cfg("schedule.milestones=[20, 40]", "schedule.gamma=0.1").schedule
    assert [lr_factor(m, 50, e, 0.1) for e in (0, 19, 20, 39, 40)] == [1, 1, 0.1, 0.1, 0.1**2]


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(ConfigError, match="without checkpoints/last.pt"):
        load_checkpoint(tmp_path)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="cannot load checkpoint"):
        load_checkpoint(garbage)
    pickled = tmp_path / "pickled.pt"  # an arbitrary object: refused by weights_only
    torch.save({"args": argparse.Namespace(lr=0.1)}, pickled)
    with pytest.raises(ConfigError, match="weights_only=True"):
        load_checkpoint(pickled)


# --- CLI ----------------------------------------------------------------------------


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stelab: error: "), err
    return err[0]


def test_cli_train_then_errors(tmp_path, capsys):
    cfg_file = tmp_path / "tiny.toml"
    cfg_file.write_text(
        'name = "tiny"\n[data]\nlimit = 128\n[model]\nbits = 2\n[train]\nepochs = 1\n'
    )
    out = tmp_path / "runs" / "tiny"
    assert main(["train", str(cfg_file), "--out", str(out), "--no-progress"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert (out / "metrics.json").is_file()

    assert main(["train", str(cfg_file), "--out", str(out), "--no-progress"]) == 2
    assert "already exists" in _one_error_line(capsys)
    assert main(["train", str(cfg_file), "--set", "optim.lr=-1", "--out", str(tmp_path / "x")]) == 2
    line = _one_error_line(capsys)
    assert "optim.lr" in line and "-1" in line and "> 0" in line
    assert main(["train", str(cfg_file), "--set", "optim.lrr=0.1"]) == 2
    assert "did you mean 'lr'" in _one_error_line(capsys)
    assert main(["train", str(tmp_path / "missing.toml")]) == 2
    assert "does not exist" in _one_error_line(capsys)
    # a run directory as CONFIG resumes it in place, here for one more epoch
    assert main(["train", str(out), "--resume", "--no-progress", "--set", "train.epochs=2"]) == 0
    assert len(read_metrics_csv(out / "metrics.csv")) == 2


# --- DDP ----------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tmp_path):
    """2 processes (gloo) take halves of the same global batches; without batch norm
    the averaged gradient is the 1-process gradient, so the weights agree to rounding."""
    over = (
        "data.limit=512",
        "data.augment='none'",
        "model.name='convnet'",
        "model.bits='float'",
        "train.epochs=2",
    )
    one = train(quick_cfg(*over), tmp_path / "one", progress=False)
    two = train(quick_cfg(*over, "train.devices=2"), tmp_path / "two", progress=False)
    assert two["world_size"] == 2 and two["epochs"] == 2
    assert two["ranks_in_sync"] is True  # every parameter torch.equal across the ranks
    a, b = ckpt(tmp_path / "one")["model"], ckpt(tmp_path / "two")["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), k
    assert abs(one["final_train_loss"] - two["final_train_loss"]) < 1e-4
    assert len(ckpt(tmp_path / "two")["rng"]["torch"]) == 2


# --- train.threads ----------------------------------------------------------------


def test_step_macs_matches_the_closed_form():
    from stelab.threads import step_macs

    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1, groups=2),
        torch.nn.ReLU(),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * 8 * 8, 10),
    )
    # conv: 4·8·8 outputs, each (2/2)·3·3 MACs; linear: 256·10
    assert step_macs(net, (2, 8, 8)) == 4 * 8 * 8 * 9 + 256 * 10
    # LeNet-5 on 8x8 with BN and quantizers: the same count as a hand-built float twin,
    # and the model's RNG stream and buffers are left alone
    q = models.build("lenet5", num_classes=10, in_shape=(1, 8, 8), act={"bits": 2})
    before = {k: v.clone() for k, v in q.state_dict().items()}
    rng = torch.get_rng_state()
    lenet = step_macs(q, (1, 8, 8))
    assert torch.equal(rng, torch.get_rng_state())
    assert_same_tensors(before, q.state_dict())
    assert lenet == sum(r.macs for r in __import__("stelab").summary(q, (1, 8, 8)).rows)


def test_resolve_threads_auto_int_and_environment(monkeypatch):
    from stelab import threads

    for v in threads.ENV_VARS:
        monkeypatch.delenv(v, raising=False)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert threads.resolve_threads("auto", threads.AUTO_THRESHOLD / 2) == 1
        cores = len(os.sched_getaffinity(0))
        monkeypatch.setattr(os, "getloadavg", lambda: (1.0, 1.0, 1.0))  # only this process
        assert threads.resolve_threads("auto", threads.AUTO_THRESHOLD * 2) == min(2, cores)
        monkeypatch.setattr(os, "getloadavg", lambda: (cores + 3.0, 0.0, 0.0))  # all taken
        assert threads.resolve_threads("auto", threads.AUTO_THRESHOLD * 2) == 1
        assert threads.resolve_threads(3, 0.0) == 3  # an integer always wins
        monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user chose: keep torch's setting
        assert threads.resolve_threads("auto", 0.0) == 2
    finally:
        torch.set_num_threads(prev)
    for bad in ("four", 0, -1):
        with pytest.raises(ValueError, match="threads must be a positive integer or 'auto'"):
            threads.resolve_threads(bad, 0.0)


def test_auto_threads_trains_the_digits_model_on_one_thread(tmp_path, monkeypatch):
    for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(v, raising=False)
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        train(quick_cfg("train.threads='auto'", "train.epochs=1"), tmp_path / "r", progress=False)
        assert torch.get_num_threads() == 2  # restored afterwards
    finally:
        torch.set_num_threads(prev)
    assert ckpt(tmp_path / "r")["threads"] == 1
    assert json.loads((tmp_path / "r" / "env.json").read_text())["torch_threads"] == 1


def test_auto_threads_resume_keeps_the_checkpoint_count(tmp_path, monkeypatch):
    """The thread count changes float sums on CPU: a run trained on 2 threads and resumed
    where "auto" would now pick 1 must still continue on 2, bit for bit."""
    import stelab.threads as threads

    monkeypatch.setattr(threads, "auto_threads", lambda work: 2)
    ref, run, one = tmp_path / "ref", tmp_path / "run", tmp_path / "one"
    train(quick_cfg("train.threads='auto'", "train.epochs=2"), ref, progress=False)
    train(quick_cfg("train.threads=1", "train.epochs=2"), one, progress=False)
    train(quick_cfg("train.threads='auto'", "train.epochs=1"), run, progress=False)
    assert ckpt(run)["threads"] == 2
    monkeypatch.setattr(threads, "auto_threads", lambda work: 1)
    train(quick_cfg("train.threads='auto'", "train.epochs=2"), run, resume=True, progress=False)
    a, b = ckpt(ref), ckpt(run)
    # the thread count matters here (else this test could not fail) ...
    assert any(not torch.equal(a["model"][k], ckpt(one)["model"][k]) for k in a["model"])
    # ... and the resumed run used the checkpoint's 2 threads
    assert b["threads"] == 2
    assert_same_tensors(a["model"], b["model"], "model")
    assert_same_tensors(a["optimizer"], b["optimizer"], "optimizer")


def test_demo_trains_on_one_thread_and_restores_torch_setting(monkeypatch):
    from stelab.experiments.demo import train_digits

    for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(v, raising=False)
    seen = []
    prev = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        train_digits("ste", epochs=1, on_epoch=lambda e, loss: seen.append(torch.get_num_threads()))
        assert seen == [1] and torch.get_num_threads() == 2
        seen.clear()
        train_digits(
            "ste",
            epochs=1,
            threads=2,
            on_epoch=lambda e, loss: seen.append(torch.get_num_threads()),
        )
        assert seen == [2]
    finally:
        torch.set_num_threads(prev)
