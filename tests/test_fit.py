"""stelab.train.fit: the trainer with a caller's model, data and training step.

``fit`` and ``train(cfg)`` share one epoch loop: the same model, data, optimizer and
seed give the same weights bit for bit, which is checked against ``train``. Also the
module structure of stelab.train (no import loop, no private names across modules).
"""

from __future__ import annotations

import pytest
import torch
from train_helpers import assert_same_tensors, ckpt, quick_cfg

from stelab import data
from stelab.config import OptimConfig, ScheduleConfig
from stelab.errors import ConfigError, StelabTypeError
from stelab.train import build_model, fit, train
from stelab.train.files import read_metrics_csv


def _rows(run_dir):
    return [
        {k: v for k, v in r.items() if not k.endswith("seconds")}
        for r in read_metrics_csv(run_dir / "metrics.csv")
    ]


def test_fit_with_the_default_step_equals_train_of_the_same_config(tmp_path):
    cfg = quick_cfg()
    ref = tmp_path / "a" / "run"
    train(cfg, ref, progress=False)
    d = data.load("digits", seed=0, limit=256, progress=False)
    torch.manual_seed(cfg.train.seed)  # as train seeds before it builds the model
    model = build_model(cfg.model, d.num_classes, d.input_shape)
    seen = []
    run = tmp_path / "b" / "run"
    metrics = fit(
        model,
        d,
        run_dir=run,
        epochs=cfg.train.epochs,
        optimizer=cfg.optim,
        schedule=cfg.schedule,
        batch_size=cfg.data.batch_size,
        augment=cfg.data.augment,
        seed=cfg.train.seed,
        threads=1,
        on_epoch=seen.append,
    )
    a, b = ckpt(ref), ckpt(run)
    for key in ("model", "optimizer", "scheduler", "global_step", "best"):
        assert_same_tensors(a[key], b[key], key)
    # every RNG but torch's global one, which train drew the model's init from after
    # seeding and fit (the model given) did not
    for key in ("shuffle", "augment", "numpy", "python"):
        assert_same_tensors(a["rng"][key], b["rng"][key], f"rng.{key}")
    assert _rows(ref) == _rows(run)
    assert [r["epoch"] for r in seen] == [1, 2, 3] and seen[-1]["lr"] == 0.025
    ref_metrics = __import__("json").loads((ref / "metrics.json").read_text())
    assert metrics["test_acc"] == ref_metrics["test_acc"]
    assert "model_args" not in b and (run / "config.toml").is_file()
    # the trained weights are the caller's module
    assert_same_tensors({k: v for k, v in model.state_dict().items()}, b["model"], "module")


def test_fit_without_run_dir_uses_and_removes_a_temporary_folder(tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    d = data.load("digits", seed=0, limit=128, progress=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    m = fit(model, d, epochs=2, optimizer=OptimConfig(lr=0.1), threads=1)
    assert m["epochs"] == 2 and 0.0 <= m["test_acc"] <= 1.0
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ConfigError, match="resume=True needs the run_dir"):
        fit(model, d, epochs=2, resume=True)


def test_fit_bad_arguments_name_what_is_wrong(tmp_path):
    d = data.load("digits", seed=0, limit=64, progress=False)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with pytest.raises(StelabTypeError, match="model must be a torch.nn.Module"):
        fit("lenet5", d, epochs=1)
    with pytest.raises(StelabTypeError, match="data must be a stelab.data.Splits"):
        fit(model, (d.train.x, d.train.y), epochs=1)
    with pytest.raises(StelabTypeError, match="optimizer must be a stelab.config.OptimConfig"):
        fit(model, d, epochs=1, optimizer={"lr": 0.1})
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        fit(model, d, epochs=1, optimizer=OptimConfig(lr=-1.0))
    with pytest.raises(ConfigError, match=r"schedule\.name"):
        fit(model, d, epochs=1, schedule=ScheduleConfig(name="linear"))
    with pytest.raises(StelabTypeError, match="generators must map names"):
        fit(model, d, epochs=1, generators={"g": 3})
    with pytest.raises(StelabTypeError, match="dict without 'loss'"):
        fit(model, d, epochs=1, threads=1, step=lambda m, b: {"error": m(b[0]).sum()})
    with pytest.raises(StelabTypeError, match=r"scalar loss tensor.*shape \(64, 10\)"):
        fit(model, d, epochs=1, threads=1, step=lambda m, b: m(b[0]))


def test_fit_param_groups_each_take_their_learning_rate(tmp_path):
    """Groups as torch takes them: a group with lr 0 stays where it was; the other
    moves; the schedule scales each group's own lr (closed form of lr_factor)."""
    d = data.load("digits", seed=0, limit=128, progress=False)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Flatten(), torch.nn.Linear(64, 16), torch.nn.Linear(16, 10)
    )
    frozen = {k: v.clone() for k, v in model[1].state_dict().items()}
    moving = {k: v.clone() for k, v in model[2].state_dict().items()}
    fit(
        model,
        d,
        run_dir=tmp_path / "run",
        epochs=2,
        threads=1,
        optimizer=OptimConfig(lr=0.1, momentum=0.0),
        schedule=ScheduleConfig(name="multistep", milestones=(1,), gamma=0.5),
        param_groups=[
            {"params": model[1].parameters(), "lr": 0.0},
            {"params": model[2].parameters()},
        ],
    )
    assert_same_tensors(frozen, model[1].state_dict(), "frozen group")
    assert all(not torch.equal(moving[k], v) for k, v in model[2].state_dict().items())
    groups = ckpt(tmp_path / "run")["optimizer"]["param_groups"]
    assert [g["lr"] for g in groups] == [0.0, 0.05]  # after epoch 2: 0.1 * 0.5
    with pytest.raises(StelabTypeError, match="param_groups must be a list of dicts"):
        fit(model, d, epochs=1, param_groups=[model.parameters()])


def test_fit_max_steps_drop_last_and_on_step_rows(tmp_path):
    """Step-based training in the one loop: ``max_steps`` stops inside an epoch,
    ``drop_last`` drops the short batch, ``on_step`` rows hold the mean of the step
    metrics since the previous row. Truth: the batch order drawn here from a generator
    seeded like fit's (a fresh permutation per epoch, full batches only), and the losses
    the step itself saw."""
    d = data.load("digits", seed=0, limit=200, progress=False)
    n, b = len(d.train), 48
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    seen, losses, calls = [], [], []

    def step(m, batch):
        seen.append(batch[0].clone())
        loss = torch.nn.functional.cross_entropy(m(batch[0]), batch[1])
        losses.append(float(loss.detach()))
        return loss

    def on_step(t, m):
        calls.append(t)
        assert m is model
        return {"w": float(m[1].weight.detach().abs().sum())}

    kw = dict(step=step, batch_size=b, drop_last=True, seed=5, threads=1, on_step=on_step)
    kw.update(every_n_steps=3, optimizer=OptimConfig(lr=0.1, momentum=0.0))
    metrics = fit(model, d, run_dir=tmp_path / "run", max_steps=10, **kw)
    per_epoch = n // b
    g = torch.Generator().manual_seed(5)
    order = []
    for _ in range(3):
        perm = torch.randperm(n, generator=g)
        order += [perm[i * b : (i + 1) * b] for i in range(per_epoch)]
    assert len(seen) == 10 and all(
        torch.equal(x, d.train.x[i]) for x, i in zip(seen, order[:10], strict=True)
    )
    assert calls == [3, 6, 9, 10]
    rows = metrics["steps"]
    assert [(r["step"], r["epoch"]) for r in rows] == [(3, 1), (6, 2), (9, 3), (10, 3)]
    for r, (lo, hi) in zip(rows, [(0, 3), (3, 6), (6, 9), (9, 10)], strict=True):
        window = losses[lo:hi]
        assert r["train_loss"] == sum(window) / len(window)
    assert rows[-1]["w"] == float(model[1].weight.detach().abs().sum())
    c = ckpt(tmp_path / "run")
    assert c["global_step"] == 10 and c["epoch"] == 3 and metrics["epochs"] == 3
    assert [len(c["history"]), c["step_history"]] == [3, rows]
    assert c["config"]["train"]["max_steps"] == 10 and c["config"]["data"]["drop_last"]
    with pytest.raises(ConfigError, match=r"train\.max_steps"):  # a new order from here
        fit(model, d, run_dir=tmp_path / "run", max_steps=12, resume=True, **kw)
    plain = fit(model, d, epochs=1, threads=1, batch_size=b)
    assert "steps" not in plain


def test_train_config_max_steps_stops_inside_an_epoch(tmp_path):
    metrics = train(quick_cfg("train.max_steps=6"), tmp_path / "run", progress=False)
    c = ckpt(tmp_path / "run")  # 4 steps per epoch: epoch 2 stops after 2 of its 4
    assert c["global_step"] == 6 and c["epoch"] == 2 and metrics["epochs"] == 2
    assert len(_rows(tmp_path / "run")) == 2 and metrics["final_val_acc"] is not None


def test_fit_step_options_bad_values_name_what_is_wrong():
    d = data.load("digits", seed=0, limit=64, progress=False)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with pytest.raises(ConfigError, match=r"train\.max_steps.*0"):
        fit(model, d, epochs=1, max_steps=0)
    with pytest.raises(ConfigError, match="needs epochs, or max_steps"):
        fit(model, d)
    with pytest.raises(ConfigError, match=r"every_n_steps must be an integer >= 1, got 0"):
        fit(model, d, max_steps=2, on_step=lambda t, m: None, every_n_steps=0)
    with pytest.raises(ConfigError, match=r"data\.batch_size = 1000.*drop_last = True"):
        fit(model, d, max_steps=2, batch_size=1000, drop_last=True, threads=1)
    with pytest.raises(StelabTypeError, match="on_step must return None or a dict.*list"):
        fit(model, d, max_steps=2, threads=1, on_step=lambda t, m: [1.0])
    with pytest.raises(StelabTypeError, match="on_step must be callable"):
        fit(model, d, max_steps=2, on_step=3)
