"""The [S24] lockstep through :func:`stelab.train.fit` (one ModuleDict, summed losses,
one optimizer with a group per model) against its independent truth: each model trained
by its own plain torch optimizer on the same batches, in a hand-written step loop.

Equal bit for bit, because no two models share a parameter (the summed loss gives each
parameter its own model's gradient; its coefficient is exactly 1) and torch's SGD and
Adam keep their state per parameter. The batches cross epoch boundaries (256 rows,
batch 48: 5 full batches per epoch, 16 rows dropped) and training stops inside an
epoch (``max_steps``). A lockstep stopped by Ctrl-C and resumed equals the one that
never stopped in every field of its result and its checkpoint.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from train_helpers import assert_same_tensors, ckpt

from stelab.disguise import equivalent_ste, to_ste
from stelab.experiments.disguise2024 import trajectories
from stelab.experiments.disguise2024.lockstep import lockstep
from stelab.experiments.disguise2024.metrics import accuracy, compare
from stelab.experiments.disguise2024.model import build, weight_layers
from stelab.train import TrainingInterrupted

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = trajectories.Config(limit=256, batch_size=48)
EST, PARAMS = "cosine", {"a": 0.5}
STEPS, EVERY = 13, 4  # records at 0, 4, 8, 12, 13; epoch 3 is cut after 3 of its 5 steps
SEED = 0


@pytest.fixture(scope="module")
def data():
    return trajectories._data(CFG, SEED, progress=False)[1]


def reference(data, kind, lr, hp, variants):
    """The lockstep as separate models, optimizers and a step loop (no stelab.train)."""
    custom = build(CFG, data, EST, PARAMS, SEED)
    eq = equivalent_ste(EST, 1.0, params=PARAMS, bits=CFG.bits)
    models = {"custom": custom}
    factors = {"custom": 1.0}
    for v in variants:
        models[v] = to_ste(custom, map_weights=(v == "iii")).model
        factors[v] = 1.0 if v == "i" else eq.alpha
    opts = {}
    for name, m in models.items():
        qw = [layer.weight for layer in weight_layers(m)]
        rest = [p for p in m.parameters() if all(p is not q for q in qw)]
        groups = [{"params": qw, "lr": lr * factors[name]}, {"params": rest}]
        opts[name] = getattr(torch.optim, kind)(groups, lr=lr, **hp)
    w0 = [layer.weight.detach().clone() for layer in weight_layers(custom)]
    hist: dict[str, list] = {"step": []}
    sums = {name: 0.0 for name in models}
    count = 0

    def record(t):
        hist["step"].append(t)
        for name, m in models.items():
            hist.setdefault(f"loss_{name}", []).append(sums[name] / max(count, 1))
            hist.setdefault(f"acc_{name}", []).append(accuracy(m, data.test.x, data.test.y))
        for v in variants:
            for k, val in compare(custom, models[v], eq).items():
                hist.setdefault(f"{k}_{v}", []).append(val)
        with torch.no_grad():
            moved = [
                ((layer.weight - w).abs() / layer.weight_quantizer.step).flatten()
                for layer, w in zip(weight_layers(custom), w0, strict=True)
            ]
        hist.setdefault("moved", []).append(float(torch.cat(moved).mean()))

    x, y = data.train.x, data.train.y
    n, b = len(y), CFG.batch_size
    g = torch.Generator().manual_seed(SEED + 1)
    order: list[torch.Tensor] = []
    while len(order) < STEPS:
        perm = torch.randperm(n, generator=g)
        order += [perm[i : i + b] for i in range(0, n - b + 1, b)]
    record(0)
    for t in range(1, STEPS + 1):
        idx = order[t - 1]
        for name, m in models.items():
            opts[name].zero_grad()
            loss = F.cross_entropy(m(x[idx]), y[idx])
            loss.backward()
            opts[name].step()
            sums[name] += float(loss.detach())
        count += 1
        if t % EVERY == 0 or t == STEPS:
            record(t)
            sums, count = {name: 0.0 for name in models}, 0
    return hist


CASES = {
    "sgd+momentum+wd": ("SGD", 0.01, {"momentum": 0.9, "weight_decay": 1e-3}),
    "adam": ("Adam", 3e-3, {"betas": (0.9, 0.99), "eps": 1e-6, "weight_decay": 1e-4}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_lockstep_through_fit_equals_separate_torch_optimizers(data, case):
    kind, lr, hp = CASES[case]
    variants = ("i", "ii", "iii")
    got = lockstep(CFG, data, EST, PARAMS, kind, lr, hp, STEPS, variants, SEED, EVERY)
    want = reference(data, kind, lr, hp, variants)
    assert got["history"]["step"] == [0, 4, 8, 12, 13]
    assert list(got["history"]) == list(want)
    for k in want:  # bit for bit: one assertion per series, so a failure names it
        assert got["history"][k] == want[k], k
    # the premise: the models moved apart, so an equality of trajectories means something
    assert got["final"]["flips_i"] > 0 and got["final"]["moved"] > 0.01
    assert len({want["loss_custom"][-1], want["loss_i"][-1], want["loss_iii"][-1]}) == 3


class _StopAt:
    """A progress bar whose ``update`` (once per training step) raises Ctrl-C at call
    ``k``."""

    def __init__(self, k):
        self.k, self.calls = k, 0

    def update(self, n):
        self.calls += 1
        if self.calls == self.k:
            raise KeyboardInterrupt


def _without_times(obj):
    if isinstance(obj, dict):
        return {
            k: _without_times(v)
            for k, v in obj.items()
            if k not in ("elapsed_s", "wall_time_s") and not str(k).endswith("seconds")
        }
    if isinstance(obj, list):
        return [_without_times(v) for v in obj]
    return obj


def test_resumed_lockstep_equals_the_uninterrupted_one_in_every_field(data, tmp_path):
    ref, run = tmp_path / "a" / "run", tmp_path / "b" / "run"
    args = (CFG, data, EST, PARAMS, "SGD", 0.01, {"momentum": 0.9}, STEPS, ("i", "iii"), SEED)
    want = lockstep(*args, EVERY, run_dir=ref)
    with pytest.raises(TrainingInterrupted):  # step 12: epoch 3, after the record at 8
        lockstep(*args, EVERY, _StopAt(12), run_dir=run)
    assert ckpt(run)["epoch"] == 2 and ckpt(run)["global_step"] == 10
    assert ckpt(run)["step_seen"] == 2  # steps 9 and 10 await the next record
    got = lockstep(*args, EVERY, run_dir=run, resume=True)
    assert_same_tensors(got, want, "result")
    a, b = _without_times(ckpt(ref)), _without_times(ckpt(run))
    assert a["global_step"] == STEPS and a["epoch"] == 3
    for key in a:
        assert_same_tensors(b[key], a[key], f"last.pt:{key}")
    ma = json.loads((ref / "metrics.json").read_text())
    mb = json.loads((run / "metrics.json").read_text())
    assert _without_times(ma) == _without_times(mb)
    assert [r["step"] for r in ma["steps"]] == [4, 8, 12, 13]


def test_lockstep_rejects_hyperparameters_it_would_ignore(data):
    with pytest.raises(Exception, match=r"'betas'.*SGD"):
        lockstep(CFG, data, EST, PARAMS, "SGD", 0.01, {"betas": (0.9, 0.9)}, 2, ("i",), 0, None)
    with pytest.raises(Exception, match=r"kind.*'RMSprop'"):
        lockstep(CFG, data, EST, PARAMS, "RMSprop", 0.01, {}, 2, ("i",), 0, None)


def test_the_data_for_fit_are_splits_in_the_run_dtype(data):
    assert data.train.x.dtype == torch.float64 and len(data.val) == 0
    assert len(data.train) == 256 and dataclasses.is_dataclass(data)
