"""[S20] experiments: gradeval (toy protocol) and conv-SBN training, on tiny settings."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import pytest
import torch

from stelab.data import Split, Splits
from stelab.errors import ConfigError
from stelab.experiments.psa2020 import gradeval, gradeval_report, toy, training

pytestmark = pytest.mark.usefixtures("one_thread")

PNG = b"\x89PNG\r\n\x1a\n"  # the signature is all _check_part looks at


def _check_part(out, r, ids):
    """The part wrote its claims (verdicts are validated by ``Claim``; the rules are pinned
    in test_psa2020_verdicts), a report whose figures exist, and results.json."""
    assert [c.id for c in r.claims] == list(ids)
    for c in r.claims:
        assert c.text and c.evidence and c.checks
    md = (out / "report.md").read_text()
    figs = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert figs
    for f in figs:
        assert "/" not in f and (out / f).read_bytes()[:4] == b"\x89PNG"
    res = json.loads((out / "results.json").read_text())
    assert [c["verdict"] for c in res["claims"]] == [c.verdict for c in r.claims]
    for c in r.claims:
        assert f"({c.id}) " in md and f"**{c.verdict}**" in md


def test_gradeval_tiny_run_writes_files_verdicts_and_reuses_checkpoints(tmp_path, monkeypatch):
    tiny = {
        "epochs": 3,
        "checkpoints": [1, 3],
        "plot_epochs": [1, 3],
        "draws": 60,
        "summary_draws": 30,
        "coupled_draws": 30,
        "curve_every": 1,
        "dpi": 40,
        "timing_samples": 2,
    }
    monkeypatch.setattr(gradeval, "config", lambda quick: dict(tiny))
    # the multi-panel figures are tested in test_analysis; here a stub keeps the test fast
    import stelab.analysis.plots as aplots

    def stub(*args, **kwargs):
        path = args[1] if len(args) > 1 else args[-1]
        path.write_bytes(PNG)
        return path

    for name in ("plot_rmse", "plot_cosine", "plot_budget"):
        monkeypatch.setattr(aplots, name, stub)
    monkeypatch.setattr(gradeval_report, "fig_through", lambda summary, path, dpi: stub(None, path))
    r = gradeval.run(tmp_path, quick=True, seed=0, progress=False)
    _check_part(tmp_path, r, "abcd")
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["training"]["reused"] is False
    assert (tmp_path / "checkpoints" / "epoch_0003.pt").is_file()
    rep = res["checkpoints"]["3"]
    assert rep["reference"]["kind"] == "exact"
    assert set(rep["layers"]) == {"hidden.0", "hidden.1", "hidden.2", "output"}
    assert "psa" in rep["estimators"] and "concrete(tau=0.1)" in rep["estimators"]
    # a rerun reuses the trained checkpoints and the cached analyses
    r2 = gradeval.run(tmp_path, quick=True, seed=0, progress=False)
    res2 = json.loads((tmp_path / "results.json").read_text())
    assert res2["training"]["reused"] is True
    assert r2.claims == r.claims  # the same numbers from the cache
    # the cached checkpoint loads and gives the recorded exact loss
    from stelab.sbn import exact_expected_loss, logistic_loss

    model = gradeval.load_checkpoint(tmp_path, 3)
    x, y = toy.data()
    with torch.no_grad():
        loss = float(exact_expected_loss(model, x, y, logistic_loss))
    assert loss == pytest.approx([c for c in res["training"]["curve"] if c[0] == 3][0][1])


def test_gradeval_training_follows_the_protocol(tmp_path):
    """REINFORCE, SGD(0.03, momentum 0.9), batch 10: 20 steps per epoch on 200 points."""
    tr = gradeval.train_toy(tmp_path, epochs=2, checkpoints=[1, 2], seed=0, curve_every=1)
    assert [c[0] for c in tr["curve"]] == [0, 1, 2]
    s0 = torch.load(tmp_path / "checkpoints" / "epoch_0000.pt", weights_only=True)
    s1 = torch.load(tmp_path / "checkpoints" / "epoch_0001.pt", weights_only=True)
    assert s0["hidden.0.weight"].dtype == torch.float64
    assert not torch.equal(s0["hidden.0.weight"], s1["hidden.0.weight"])
    assert gradeval.TRAIN["lr"] == 0.03 and gradeval.TRAIN["batch_size"] == 10
    assert tr["reused"] is False
    again = gradeval.train_toy(tmp_path, epochs=2, checkpoints=[1, 2], seed=0, curve_every=1)
    assert again["reused"] is True and again["curve"] == tr["curve"]
    (tmp_path / "checkpoints" / "epoch_0002.pt").unlink()  # a lost checkpoint: train again
    again = gradeval.train_toy(tmp_path, epochs=2, checkpoints=[1, 2], seed=0, curve_every=1)
    assert again["reused"] is False and again["curve"] == tr["curve"]
    assert (tmp_path / "checkpoints" / "epoch_0002.pt").is_file()


def test_samples_to_reach_interpolates_and_extrapolates():
    from stelab.analysis import FidelityReport

    d = {
        "layers": {"hidden.0": "layer 1"},
        "draws": 100,
        "sample_sizes": [1, 10, 100],
        "examples": 1,
        "reference": {"kind": "exact", "value": 0.0, "noise_floor": {"hidden.0": 0.0}},
        "estimators": {
            "arm": {
                "label": "arm",
                "name": "arm",
                "kind": "stochastic",
                "engine": "vectorised",
                "draws": 100,
                "seconds_per_draw": None,
                "forward_equivalents": None,
                "wall_seconds": 0.0,
                "note": "",
                "layers": {
                    "hidden.0": {
                        "layer": "hidden.0",
                        "label": "layer 1",
                        "params": 3,
                        "ref_norm": 1.0,
                        "sample_sizes": [1, 10, 100],
                        "groups": [100, 10, 1],
                        "rmse": [4.0, 2.0, 1.0],
                        "rmse_se": [0, 0, 0],
                        "cos_mean": [0, 0, 0],
                        "cos_lo": [0, 0, 0],
                        "cos_hi": [0, 0, 0],
                        "bias": 0.0,
                        "bias_raw": 0.0,
                        "bias_floor": 0.0,
                        "bias_z": 0.0,
                        "variance": 1.0,
                        "rel_variance": 1.0,
                        "snr": 1.0,
                    }
                },
            }
        },
    }
    rep = FidelityReport.from_dict(d)
    m, ext = gradeval.samples_to_reach(rep, "arm", "hidden.0", 2.0)
    assert m == pytest.approx(10) and not ext
    m, ext = gradeval.samples_to_reach(rep, "arm", "hidden.0", math.sqrt(2.0))
    assert m == pytest.approx(10**1.5) and not ext
    m, ext = gradeval.samples_to_reach(rep, "arm", "hidden.0", 0.5)
    assert m == pytest.approx(400) and ext  # M^-1/2 beyond the grid


# --------------------------------------------------------------------------- training


def _random_cifar(n_train=16, n_eval=8):
    g = torch.Generator().manual_seed(0)

    def split(n):
        return Split(
            torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
        )

    return Splits(
        "cifar10-random",
        split(n_train),
        split(n_eval),
        split(n_eval),
        10,
        (3, 32, 32),
        "random tensors shaped like CIFAR-10",
    )


def test_cifar10_preset_runs_on_random_cifar_shaped_data():
    cfg = replace(
        training.PRESETS["cifar10"],
        estimator="dst",
        batch_size=8,
        epochs=1,  # 16 rows: 2 steps
        eval_samples=2,
        init_rows=16,
        device="cpu",
    )
    assert cfg.channels == (96, 192) and cfg.padding == 0 and cfg.augment
    r = training.train_sbn(cfg, _random_cifar())
    model = r["model"]
    assert model.output.in_features == 768 and len(model.hidden) == 8  # Linear(768, 10)
    assert r["steps"] == 2 and not r["diverged"]
    assert 0 <= r["test"]["acc1"] <= 1 and 0 <= r["test"]["acc_avg"] <= 1
    # PSA through the same code path (narrow, one step)
    r = training.train_sbn(
        replace(cfg, estimator="psa", channels=(4, 8), max_steps=1), _random_cifar()
    )
    assert r["steps"] == 1 and math.isfinite(r["history"][0]["train_loss"])


def test_train_sbn_on_digits_and_the_gradient_clamp():
    cfg = training.SBNTrainConfig(
        dataset="digits",
        channels=(4, 8),
        padding=1,
        epochs=1,
        limit=64,  # one batch: one step
        lr=0.5,
        grad_clamp=1e-3,
        eval_samples=3,
        init_rows=64,
        estimator="reinforce",
    )
    r0 = training.train_sbn(replace(cfg, lr=1e-15), evaluate_test=False)  # ~ the init
    r = training.train_sbn(cfg)
    # same seed -> same init and batch; one Nesterov step moves a weight by
    # lr (1 + mu) clamp(g) and REINFORCE has gradient entries beyond the clamp
    before = r0["model"].state_dict()
    after = r["model"].state_dict()
    step = max(float((after[k].double() - before[k].double()).abs().max()) for k in after)
    assert step == pytest.approx(0.5 * 1.9 * 1e-3, rel=1e-3)
    assert r["steps"] == 1 and set(r["test"]) == {"acc1", "acc_avg", "nll_avg"}


def test_evaluate_sbn_by_sampling():
    from stelab.sbn import SBN, SBNLinear

    model = SBN(SBNLinear(2, 3), output=torch.nn.Linear(3, 2))
    with torch.no_grad():
        model.hidden[0].weight.zero_()
        model.hidden[0].bias.fill_(50.0)  # every state +1: deterministic
        model.output.weight.copy_(torch.tensor([[1.0, 1, 1], [-1, -1, -1]]))
        model.output.bias.zero_()
    x = torch.zeros(6, 2)
    y = torch.tensor([0, 0, 0, 1, 0, 1])
    r = training.evaluate_sbn(model, x, y, samples=4, batch=4)
    assert r["acc1"] == pytest.approx(4 / 6) and r["acc_avg"] == pytest.approx(4 / 6)
    p0 = torch.softmax(torch.tensor([3.0, -3.0]), 0)
    expect = -(4 * math.log(p0[0]) + 2 * math.log(p0[1])) / 6
    assert r["nll_avg"] == pytest.approx(expect, rel=1e-5)


def test_training_config_validation():
    with pytest.raises(ConfigError, match="did you mean 'psa'"):
        training.SBNTrainConfig(estimator="pas")
    with pytest.raises(ConfigError, match="lr"):
        training.SBNTrainConfig(lr=-1)
    with pytest.raises(ConfigError, match="channels"):
        training.SBNTrainConfig(channels=(8,))
    with pytest.raises(ConfigError, match="schedule"):
        training.SBNTrainConfig(schedule="step")
    with pytest.raises(ConfigError, match="image classification"):
        training.train_sbn(
            training.SBNTrainConfig(),
            Splits(
                "t",
                Split(torch.zeros(2, 2), torch.zeros(2)),
                Split(torch.zeros(0, 2), torch.zeros(0)),
                Split(torch.zeros(0, 2), torch.zeros(0)),
                None,
                (2,),
                "x",
            ),
        )


def test_training_part_tiny_run(tmp_path, monkeypatch):
    tiny = training.SBNTrainConfig(
        dataset="digits",
        channels=(4, 8),
        padding=1,
        epochs=1,
        limit=128,  # two steps
        eval_samples=2,
        init_rows=64,
    )
    monkeypatch.setitem(training.PRESETS, "digits-quick", tiny)
    r = training.run(tmp_path, quick=True, progress=False)
    _check_part(tmp_path, r, "e")
    res = json.loads((tmp_path / "results.json").read_text())
    assert set(res["runs"]) == set(training.ESTIMATORS)
    assert (tmp_path / "runs" / "psa" / "model.pt").is_file()
    r2 = training.run(tmp_path, quick=True, progress=False)  # cached runs
    assert r2.claims == r.claims
    assert res["runs"]["psa"]["reused"] is False
    res2 = json.loads((tmp_path / "results.json").read_text())
    assert all(run["reused"] for run in res2["runs"].values())


@pytest.mark.parametrize(("epochs", "max_steps", "rows"), [(2, 3, 1), (2, 6, 2), (2, 50, 2)])
def test_train_sbn_max_steps_limits_the_steps(monkeypatch, epochs, max_steps, rows):
    """16 rows in batches of 4: 4 steps per epoch; training ends at ``epochs`` or
    ``max_steps``, whichever comes first (counted: the surrogate losses computed)."""
    import stelab.sbn as sbn

    real, calls = sbn.surrogate_loss, [0]

    def counted(*a, **k):
        calls[0] += 1
        return real(*a, **k)

    monkeypatch.setattr(sbn, "surrogate_loss", counted)
    cfg = training.SBNTrainConfig(
        channels=(2, 4), padding=1, epochs=epochs, batch_size=4, eval_samples=2,
        device="cpu", max_steps=max_steps,
    )  # fmt: skip
    r = training.train_sbn(cfg, _random_cifar(n_train=16))
    assert calls[0] == r["steps"] == min(max_steps, 4 * epochs)
    assert [h["epoch"] for h in r["history"]] == list(range(1, rows + 1))
    assert not r["diverged"] and 0 <= r["val"]["acc_avg"] <= 1  # validated at the end


def test_train_sbn_reports_a_nan_parameter_as_divergence(monkeypatch):
    # a NaN weight of a hidden layer need not make the sampled loss NaN (a NaN
    # pre-activation is never above the threshold), so train_sbn checks the parameters
    import stelab.sbn as sbn

    real, calls = sbn.surrogate_loss, [0]

    def poison_second_step(model, *a, **k):
        calls[0] += 1
        loss = real(model, *a, **k)
        if calls[0] == 2:  # after the (finite) loss; .data: unseen by autograd
            model.hidden[0].weight.data.view(-1)[0] = math.nan
        assert math.isfinite(float(loss.detach()))
        return loss

    monkeypatch.setattr(sbn, "surrogate_loss", poison_second_step)
    cfg = training.SBNTrainConfig(
        channels=(2, 4), padding=1, epochs=2, batch_size=4, eval_samples=2, device="cpu"
    )
    data = _random_cifar(n_train=16)  # 4 steps per epoch
    r = training.train_sbn(cfg, data)
    assert r["diverged"] and calls[0] == 2  # stopped before a third step's loss
    assert r["steps"] == 1 and r["history"] == []  # step 2 made the parameter NaN
    assert all(math.isnan(v) for v in (*r["val"].values(), *r["test"].values()))


def test_a_diverged_run_reads_back_from_the_cache_and_is_reported(tmp_path, monkeypatch):
    """The last estimator's loss turns NaN at its third step; a rerun reads the diverged
    run from results.json (NaN accuracies stored as null) and reports it the same way."""
    import stelab.sbn as sbn

    tiny = training.SBNTrainConfig(
        dataset="digits", channels=(2, 4), padding=1, epochs=2, limit=128,
        eval_samples=2, init_rows=64,
    )  # fmt: skip
    monkeypatch.setitem(training.PRESETS, "digits-quick", tiny)
    assert training.ESTIMATORS[-1] == "reinforce"
    real, calls = sbn.surrogate_loss, [0]
    nan_at = 4 * (len(training.ESTIMATORS) - 1) + 3  # 4 steps per run; the last run's 3rd

    def nan_loss(*a, **k):
        calls[0] += 1
        loss = real(*a, **k)
        return loss * math.nan if calls[0] == nan_at else loss

    monkeypatch.setattr(sbn, "surrogate_loss", nan_loss)
    r = training.run(tmp_path, quick=True, progress=False)
    res = json.loads((tmp_path / "results.json").read_text())
    bad = res["runs"]["reinforce"]
    assert bad["diverged"] and bad["steps"] == 2 and len(bad["history"]) == 1
    assert bad["test"]["acc_avg"] is None and bad["val"]["acc1"] is None  # NaN in JSON
    assert not any(res["runs"][s]["diverged"] for s in training.ESTIMATORS[:-1])
    report = (tmp_path / "report.md").read_text()
    assert report.count("(diverged)") == 1 and "diverged: reinforce" in report
    monkeypatch.setattr(sbn, "surrogate_loss", real)
    r2 = training.run(tmp_path, quick=True, progress=False)  # every run from the cache
    res2 = json.loads((tmp_path / "results.json").read_text())
    assert all(run["reused"] for run in res2["runs"].values())
    assert r2.claims == r.claims
    assert (tmp_path / "report.md").read_text().count("(diverged)") == 1
