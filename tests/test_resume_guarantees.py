"""Resume guarantees (#17): a run stopped and resumed equals one that never stopped in
EVERY field it carries, not only in its weights; checkpoints that do not fit are
refused; writes are durable.

Each test compares against an independent truth: the uninterrupted run of the same
config (bit for bit on CPU), or a hand-made checkpoint whose defect is known. Every
field of ``last.pt`` and ``best.pt`` is compared except the wall-clock ones
(``elapsed_s``, the ``*seconds`` of the history), and so are metrics.csv and
metrics.json (again without times).

The training with a custom step (an SBN's PSA surrogate loss through
:func:`stelab.train.fit`) draws from torch's, numpy's and Python's global RNGs and from
a named generator, so a resume that forgets any of them trains differently; its
``evaluate`` reports an accuracy that falls every epoch (1 / number of evaluations,
kept in a model buffer), so the best epoch is the first and a resume that forgets the
best-so-far writes a different best.pt.
"""

from __future__ import annotations

import json
import random
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from train_helpers import assert_same_tensors, ckpt, quick_cfg

import stelab.train.loop as loop
from stelab.config import OptimConfig, ScheduleConfig
from stelab.data import Split, Splits
from stelab.errors import ConfigError
from stelab.sbn import SBN, SBNLinear
from stelab.train import TrainingInterrupted, check_state, fit, load_checkpoint, train
from stelab.train.files import read_metrics_csv

TIME_KEYS = ("elapsed_s",)


def _without_times(obj):
    if isinstance(obj, dict):
        return {
            k: _without_times(v)
            for k, v in obj.items()
            if k not in TIME_KEYS and not str(k).endswith("seconds") and k != "wall_time_s"
        }
    if isinstance(obj, list):
        return [_without_times(v) for v in obj]
    return obj


def assert_same_run(ref, run) -> None:
    """Every resumable field of ``run`` equals the uninterrupted ``ref``."""
    for name in ("last.pt", "best.pt"):
        a, b = _without_times(ckpt(ref, name)), _without_times(ckpt(run, name))
        assert set(a) == set(b), name
        for key in a:  # one assertion per field, so a failure names it
            assert_same_tensors(a[key], b[key], f"{name}:{key}")
    assert _without_times(read_metrics_csv(ref / "metrics.csv")) == _without_times(
        read_metrics_csv(run / "metrics.csv")
    )
    ma = json.loads((ref / "metrics.json").read_text())
    mb = json.loads((run / "metrics.json").read_text())
    assert _without_times(ma) == _without_times(mb)


# --- the default classifier step (train(cfg)) -----------------------------------------

# lr 0.3, seed 1: validation accuracy peaks in epoch 2 of 4 (measured: 0.094, 0.117,
# 0.111, 0.089), so the best epoch lies before the interruption and the two epochs
# after it must not replace best.pt; the multistep schedule halves the lr after epoch 2
CLASSIFIER = ("optim.lr=0.3", "train.seed=1")
STEPS = 4  # 256 rows / batch 64


def test_classifier_resume_after_ctrl_c_restores_every_field(tmp_path, monkeypatch):
    ref, run = tmp_path / "a" / "run", tmp_path / "b" / "run"  # one name: metrics.json has it
    cfg = quick_cfg(*CLASSIFIER, "train.epochs=4")
    t0 = time.perf_counter()
    train(cfg, ref, progress=False)
    wall_ref = time.perf_counter() - t0
    calls, real_step = {"n": 0}, loop.optimizer_step

    def interrupting_step(*args):
        calls["n"] += 1
        if calls["n"] == 2 * STEPS + 2:  # the second step of epoch 3
            raise KeyboardInterrupt
        return real_step(*args)

    monkeypatch.setattr(loop, "optimizer_step", interrupting_step)
    t0 = time.perf_counter()
    with pytest.raises(TrainingInterrupted, match="epoch 3/4"):
        train(cfg, run, progress=False)
    assert ckpt(run)["epoch"] == 2
    before = ckpt(run)["elapsed_s"]
    monkeypatch.setattr(loop, "optimizer_step", real_step)
    train(cfg, run, resume=True, progress=False)
    wall_run = time.perf_counter() - t0
    # the wall-clock fields are not compared below, but they are bounded: a run's
    # elapsed_s is its own training time, and a resumed run adds to what it had
    assert 0 < ckpt(ref)["elapsed_s"] <= wall_ref
    assert 0 < before < ckpt(run)["elapsed_s"] <= wall_run
    c = ckpt(ref)
    assert c["best"]["epoch"] == 2 and c["global_step"] == 4 * STEPS  # the premise above
    assert [r["lr"] for r in c["history"]] == [0.3, 0.3, 0.15, 0.15]
    assert set(c["rng"]) >= {"torch", "shuffle", "augment", "numpy", "python"}
    assert_same_run(ref, run)


# --- a custom step: an SBN trained with PSA through fit ------------------------------


def _ce(eta, y):
    return F.cross_entropy(eta, y, reduction="none")


def _sbn_problem():
    torch.manual_seed(0)
    model = SBN(SBNLinear(6, 8), SBNLinear(8, 8), output=torch.nn.Linear(8, 3))
    model.register_buffer("evals", torch.zeros((), dtype=torch.float64))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(112, 6, generator=g)
    y = torch.randint(0, 3, (112,), generator=g)
    data = Splits(
        name="random",
        train=Split(x[:80], y[:80]),
        val=Split(x[80:96], y[80:96]),
        test=Split(x[96:], y[96:]),
        num_classes=3,
        input_shape=(6,),
        source="generated: standard normal inputs, uniform labels",
    )
    return model, data


class _Step:
    """PSA surrogate loss on inputs jittered by torch's, numpy's and Python's RNGs,
    the SBN's noise from the named generator ``noise``; stops with Ctrl-C at call
    ``stop_at`` (counted from 1), if given."""

    def __init__(self, stop_at: int | None = None):
        self.noise = torch.Generator().manual_seed(2)
        self.calls, self.stop_at = 0, stop_at

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls == self.stop_at:
            raise KeyboardInterrupt
        x, y = batch
        x = x + 0.05 * torch.randn_like(x)
        x = x * (1.0 + 0.05 * float(np.random.rand())) + 0.05 * random.random()
        loss = model.surrogate_loss(x, y, _ce, estimator="psa", samples=2, generator=self.noise)
        return {"loss": loss, "jitter": torch.tensor(float(x.abs().mean()))}


@torch.no_grad()
def _evaluate(model, split):
    model.evals += 1
    loss = model.surrogate_loss(split.x, split.y, _ce, estimator="psa", generator=0)
    return {"loss": float(loss), "acc": 1.0 / float(model.evals)}


def _fit_sbn(run_dir, step, **kw):
    model, data = _sbn_problem()
    return fit(
        model,
        data,
        run_dir=run_dir,
        step=step,
        evaluate=_evaluate,
        generators={"noise": step.noise},
        optimizer=OptimConfig(name="adam", lr=0.01, weight_decay=1e-4),
        schedule=ScheduleConfig(name="multistep", milestones=(2,), gamma=0.5),
        epochs=4,
        batch_size=16,
        seed=3,
        threads=1,
        **kw,
    )


def test_sbn_custom_step_resume_after_ctrl_c_restores_every_field(tmp_path):
    ref, run = tmp_path / "a" / "run", tmp_path / "b" / "run"
    metrics = _fit_sbn(ref, _Step())
    steps = 80 // 16
    with pytest.raises(TrainingInterrupted, match=r"epoch 3/4.*fit\(.*resume=True\)"):
        _fit_sbn(run, _Step(stop_at=2 * steps + 2))  # the second step of epoch 3
    assert ckpt(run)["epoch"] == 2
    _fit_sbn(run, _Step(), resume=True)
    c = ckpt(ref)
    # the premises: best epoch 1, every generator kept, the custom metric logged
    assert c["best"] == {"val_acc": 1.0, "epoch": 1} and ckpt(ref, "best.pt")["epoch"] == 1
    assert set(c["rng"]["streams"]) == {"noise"} and "model_args" not in c
    assert c["global_step"] == 4 * steps and c["epoch"] == 4
    assert [r["lr"] for r in c["history"]] == [0.01, 0.01, 0.005, 0.005]
    rows = read_metrics_csv(ref / "metrics.csv")
    assert [r["train_jitter"] is not None for r in rows] == [True] * 4
    assert rows[-1]["train_acc"] is None and metrics["test_acc"] == 1.0 / 5  # 4 val + 1 test
    assert_same_run(ref, run)


def test_checkpoint_every_skips_checkpoints_and_resume_still_matches(tmp_path):
    """``checkpoint_every=3`` of 4 epochs: last.pt after epoch 1 (best.pt is written
    there, and last.pt with it), not after epoch 2, then after 3 and the last; a run
    stopped in epoch 3 resumes from epoch 1 and ends as the run that checkpointed every
    epoch, in every field."""
    ref, run = tmp_path / "a" / "run", tmp_path / "b" / "run"
    _fit_sbn(ref, _Step())
    steps, saved = 80 // 16, []

    def on_epoch(row):
        saved.append((row["epoch"], ckpt(run)["epoch"]))

    with pytest.raises(TrainingInterrupted, match=r"epoch 3/4; the last checkpoint \(epoch 1\)"):
        _fit_sbn(run, _Step(stop_at=2 * steps + 2), checkpoint_every=3, on_epoch=on_epoch)
    assert saved == [(1, 1), (2, 1)]
    _fit_sbn(run, _Step(), resume=True, checkpoint_every=3, on_epoch=on_epoch)
    assert saved[2:] == [(2, 1), (3, 3), (4, 4)]  # epoch 2 is trained again
    assert_same_run(ref, run)
    with pytest.raises(ConfigError, match=r"checkpoint_every must be an integer in \[1, .*got 0"):
        _fit_sbn(tmp_path / "c", _Step(), checkpoint_every=0)


def test_fit_resume_needs_the_same_generators(tmp_path):
    run = tmp_path / "run"
    model, data = _sbn_problem()
    fit(model, data, run_dir=run, epochs=1, threads=1, batch_size=40)
    model, data = _sbn_problem()
    with pytest.raises(ConfigError, match="no state of the generator 'noise'"):
        fit(
            model,
            data,
            run_dir=run,
            epochs=2,
            threads=1,
            batch_size=40,
            generators={"noise": torch.Generator()},
            resume=True,
        )


# --- checkpoints that do not fit ------------------------------------------------------


def test_same_keys_other_shapes_are_refused_naming_key_and_shapes():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["1.weight"] = torch.zeros(2, 5)  # same keys, one shape differs
    with pytest.raises(ConfigError) as e:
        check_state(model, state, "ck.pt")
    msg = str(e.value)
    assert "shape mismatch" in msg and "1.weight (2, 5) vs (2, 3)" in msg and "'ck.pt'" in msg
    assert "missing" not in msg and "unexpected" not in msg
    check_state(model, model.state_dict())  # the model's own state passes


def test_resume_from_a_checkpoint_with_other_shapes_is_refused(tmp_path):
    run = tmp_path / "run"
    model, data = _sbn_problem()
    fit(model, data, run_dir=run, epochs=1, threads=1, batch_size=40)
    c = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    c["model"]["output.bias"] = torch.zeros(4)  # keys unchanged
    torch.save(c, run / "checkpoints" / "last.pt")
    model, data = _sbn_problem()
    with pytest.raises(ConfigError, match=r"shape mismatch.*output\.bias \(4,\) vs \(3,\)"):
        fit(model, data, run_dir=run, epochs=2, threads=1, batch_size=40, resume=True)


def test_a_dict_with_a_non_tensor_value_is_not_a_bare_state_dict(tmp_path):
    mixed = tmp_path / "mixed.pt"
    torch.save({"weight": torch.ones(2), "epoch": 3}, mixed)
    with pytest.raises(ConfigError, match=r"neither a stelab checkpoint nor a state_dict"):
        load_checkpoint(mixed)
    bare = tmp_path / "bare.pt"
    torch.save({"weight": torch.ones(2), "bias": torch.zeros(1)}, bare)
    assert set(load_checkpoint(bare)) == {"model"}
    empty = tmp_path / "empty.pt"
    torch.save({}, empty)
    with pytest.raises(ConfigError, match="neither"):
        load_checkpoint(empty)


# --- the [S20] SBN training (train_sbn) through fit ---------------------------------


def _random_images():
    g = torch.Generator().manual_seed(4)

    def split(n):
        return Split(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g))

    return Splits("images", split(48), split(12), split(12), 3, (1, 8, 8), "random 8x8 images")


def test_train_sbn_interrupted_and_resumed_equals_an_uninterrupted_run(tmp_path, monkeypatch):
    """train_sbn's own path (its step, noise, augmentation and evaluation generators,
    cosine schedule, element-wise clamp): Ctrl-C in epoch 2, resume, and every field of
    the run folder and of the returned result equals the run that never stopped."""
    import stelab.sbn as sbn
    from stelab.experiments.psa2020.sbn_training import SBNTrainConfig, train_sbn

    cfg = SBNTrainConfig(
        channels=(2, 4), padding=1, epochs=3, batch_size=16, lr=0.3, augment=True,
        schedule="cosine", eval_samples=2, init_rows=32, device="cpu",
    )  # fmt: skip
    ref_dir, run_dir = tmp_path / "a" / "run", tmp_path / "b" / "run"
    ref = train_sbn(cfg, _random_images(), run_dir=ref_dir)
    real, calls = sbn.surrogate_loss, [0]

    def stop_in_epoch_2(*a, **k):
        calls[0] += 1
        if calls[0] == 5:  # 3 steps per epoch: the second step of epoch 2
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sbn, "surrogate_loss", stop_in_epoch_2)
    with pytest.raises(TrainingInterrupted, match="epoch 2/3"):
        train_sbn(cfg, _random_images(), run_dir=run_dir)
    monkeypatch.setattr(sbn, "surrogate_loss", real)
    assert ckpt(run_dir)["epoch"] == 1
    got = train_sbn(cfg, _random_images(), run_dir=run_dir, resume=True)
    c = ckpt(ref_dir)
    # the premises: every generator of the protocol checkpointed, val after the last epoch
    assert set(c["rng"]["streams"]) == {"noise", "eval"} and c["global_step"] == 9
    assert [r["val_acc"] is not None for r in c["history"]] == [False, False, True]
    a, b = _without_times(c), _without_times(ckpt(run_dir))
    assert set(a) == set(b)
    for key in a:
        assert_same_tensors(a[key], b[key], f"last.pt:{key}")
    assert _without_times(read_metrics_csv(ref_dir / "metrics.csv")) == _without_times(
        read_metrics_csv(run_dir / "metrics.csv")
    )
    ref_model, got_model = ref.pop("model"), got.pop("model")
    assert _without_times(ref) == _without_times(got)
    assert_same_tensors(ref_model.state_dict(), got_model.state_dict(), "model")
    assert ref["steps"] == 9 and not ref["diverged"] and 0 <= ref["test"]["acc1"] <= 1


# --- survivors of a mutation sample (docs/testing.md)


def test_numpy_and_python_rng_states_round_trip_with_a_cached_gaussian():
    """numpy's MT19937 state [pos, has_gauss, gauss, *key] and random's [version,
    has_gauss, gauss, *words] come back exactly, including the cached second normal of a
    pair (then the next normal drawn is that cached value)."""
    from stelab.train.checkpoint import (
        numpy_rng_state,
        python_rng_state,
        set_numpy_rng_state,
        set_python_rng_state,
    )

    np.random.seed(5)
    np.random.standard_normal()  # leaves the pair's second value cached
    assert np.random.get_state()[3] == 1
    state = numpy_rng_state()
    want = np.random.standard_normal(4)
    np.random.seed(6)
    set_numpy_rng_state(state)
    assert np.array_equal(np.random.standard_normal(4), want)

    random.seed(7)
    version, words, gauss = random.getstate()
    assert gauss is None
    st = python_rng_state()  # no cached gaussian: written as 0, not NaN
    assert torch.equal(st, torch.tensor([version, 0.0, 0.0, *words], dtype=torch.float64))
    random.gauss(0.0, 1.0)
    st = python_rng_state()
    want = [random.gauss(0.0, 1.0) for _ in range(3)]
    random.seed(8)
    set_python_rng_state(st)
    assert [random.gauss(0.0, 1.0) for _ in range(3)] == want
    # a cached gaussian of exactly 0.0 is a cached value, not "none cached"
    random.setstate((version, words, 0.0))
    st = python_rng_state()
    random.seed(9)
    set_python_rng_state(st)
    assert random.getstate() == (version, words, 0.0)


def test_need_bytes_counts_checkpoint_copies_and_optimizer_slots():
    """last.pt (and best.pt) of model + optimizer slots (Adam 2, SGD with momentum 1,
    plain SGD 0), one more copy while a file is replaced, plus 1 MiB."""
    from types import SimpleNamespace

    from stelab.train.state import need_bytes

    model = torch.nn.Linear(10, 3)  # 33 float32 numbers: 132 bytes

    def s(name, momentum, save_best):
        optim = SimpleNamespace(name=name, momentum=momentum)
        cfg = SimpleNamespace(optim=optim, train=SimpleNamespace(save_best=save_best))
        return SimpleNamespace(raw_model=model, cfg=cfg)

    assert need_bytes(s("adam", 0.0, True)) == 132 * 3 * 3 + 2**20
    assert need_bytes(s("adamw", 0.0, False)) == 132 * 3 * 2 + 2**20
    assert need_bytes(s("sgd", 0.9, True)) == 132 * 2 * 3 + 2**20
    assert need_bytes(s("sgd", 0.0, False)) == 132 * 1 * 2 + 2**20


def _bare_session():
    return SimpleNamespace(
        best={}, resume_from="ckpt", shuffle_gen=torch.Generator(), generators={}, world=1,
        rank=0, aug_gen=torch.Generator(), fabric=None, main=True,
    )  # fmt: skip


def test_restore_of_a_minimal_checkpoint_starts_the_counters_at_zero(monkeypatch):
    """A checkpoint with only its epoch (an older writer): step counters at 0, empty
    histories; a CUDA generator state is set only where CUDA is available."""
    from stelab.train.state import restore

    s = _bare_session()
    restore(s, {"epoch": 3})
    assert (s.epoch, s.saved_epoch, s.global_step, s.step_seen) == (3, 3, 0, 0)
    assert s.step_history == [] and s.history == [] and s.step_sums == {}

    def no_cuda(*args, **kwargs):
        raise AssertionError("CUDA generator set without CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_rng_state", no_cuda)
    restore(s, {"epoch": 1, "rng": {"cuda": [torch.zeros(16, dtype=torch.uint8)]}})
    assert s.epoch == 1
    # where CUDA is available, this rank's state goes to the session's device (faked
    # here: the call is recorded, so the branch is checked without a GPU)
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda st, dev: calls.append((st, dev)))
    s.fabric = SimpleNamespace(device="cuda:1")
    s.rank = 1
    states = [torch.zeros(16, dtype=torch.uint8), torch.ones(16, dtype=torch.uint8)]
    restore(s, {"epoch": 2, "rng": {"cuda": states}})
    assert len(calls) == 1 and calls[0][1] == "cuda:1" and torch.equal(calls[0][0], states[1])


def test_an_unreadable_checkpoint_names_the_first_line_of_the_error(tmp_path):
    bad = tmp_path / "last.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception) as raw:  # torch's own error: several lines
        torch.load(bad, map_location="cpu", weights_only=True)
    first = str(raw.value).strip().splitlines()[0]
    with pytest.raises(ConfigError) as e:
        load_checkpoint(bad)
    assert str(e.value).endswith(f"weights_only=True: {first}") and "\n" not in str(e.value)


def test_a_checkpoint_without_world_size_is_from_one_process(tmp_path):
    """Checkpoints written before the world size was stored count as one process's: their
    RNG states are restored, so the resumed run still ends as the uninterrupted one."""
    ref, run = tmp_path / "a" / "run", tmp_path / "b" / "run"
    _fit_sbn(ref, _Step())
    with pytest.raises(TrainingInterrupted):
        _fit_sbn(run, _Step(stop_at=2 * (80 // 16) + 2))
    path = run / "checkpoints" / "last.pt"
    state = torch.load(path, weights_only=True)
    assert state.pop("world_size") == 1
    torch.save(state, path)
    _fit_sbn(run, _Step(), resume=True)
    a, b = ckpt(ref), ckpt(run)
    assert torch.equal(a["rng"]["torch"][0], b["rng"]["torch"][0])
    assert [r["train_loss"] for r in a["history"]] == [r["train_loss"] for r in b["history"]]
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_a_mismatch_lists_at_most_six_keys_and_counts_them_all():
    model = torch.nn.Sequential(*[torch.nn.Linear(1, 1) for _ in range(4)])  # 8 keys
    keys = list(model.state_dict())
    sd = model.state_dict()
    with pytest.raises(ConfigError) as err:
        check_state(model, {keys[0]: sd[keys[0]]})  # 7 missing: six shown, then "..."
    assert f"missing keys [{', '.join(keys[1:7])}, ...] (7 in all)" in str(err.value)
    with pytest.raises(ConfigError) as err:
        check_state(model, {k: sd[k] for k in keys[:2]})  # exactly six: all shown
    assert f"missing keys [{', '.join(keys[2:])}] (6 in all)" in str(err.value)
