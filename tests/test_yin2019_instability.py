"""[Y19] instability on ResNet-20: the verdict rules at their thresholds, the quick
protocol being the full one at a smaller size, and the quick code path end to end
(small, CPU, ~15 s)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from stelab.errors import ConfigError
from stelab.experiments.yin2019 import instability as y19i
from stelab.experiments.yin2019 import instability_report as y19ir
from stelab.experiments.yin2019 import table1 as t1

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


# --------------------------------------------------------------------------- verdict rules


def _ends(acc: float, loss: float, c_acc: float = 0.9, c_loss: float = 0.2) -> tuple:
    return {"val_acc": acc, "train_loss": loss}, {"val_acc": c_acc, "train_loss": c_loss}


@pytest.mark.parametrize(
    ("acc", "loss", "shows"),
    [
        (0.9 - 0.0101, 0.2 * 1.51, True),  # just past both thresholds
        (0.9 - 0.0099, 0.2 * 1.51, False),  # accuracy drop just under 1 point
        (0.9 - 0.0101, 0.2 * 1.49, False),  # loss ratio just under 1.5
        (0.9 - 0.5, 0.2 * 1.0, False),  # a large drop alone is not enough
        (0.9 + 0.05, 0.2 * 10.0, False),  # nor a loss rise alone
        (0.1, 5.0, True),
    ],
)
def test_effect_thresholds(acc: float, loss: float, shows: bool) -> None:
    end, ctrl = _ends(acc, loss)
    e = y19i.effect(end, ctrl)
    assert e["shows"] is shows
    assert e["acc_below_control_pts"] == pytest.approx(100 * (0.9 - acc))
    assert e["loss_over_control"] == pytest.approx(loss / 0.2)


def test_effect_at_exact_thresholds_does_not_show() -> None:
    # values whose drop and ratio are exactly 1 point and 1.5 in floating point
    e = y19i.effect({"val_acc": 0.25, "train_loss": 3.0}, {"val_acc": 0.26, "train_loss": 2.0})
    assert e["loss_over_control"] == 1.5 and e["shows"] is False  # ratio == 1.5: not > 1.5
    e = y19i.effect({"val_acc": 0.0, "train_loss": 3.0}, {"val_acc": 0.01, "train_loss": 1.0})
    assert e["acc_below_control_pts"] == 1.0 and e["shows"] is False  # drop == 1: not > 1


@pytest.mark.parametrize(
    ("shows", "verdict"),
    [
        ((), "not"),
        (("1e-05",), "reproduced"),
        (("0.001",), "partly"),
        (("1e-05", "0.001"), "reproduced"),
    ],
)
def test_verdict_rule(shows: tuple[str, ...], verdict: str) -> None:
    assert y19i.verdict_for(shows, "1e-05") == verdict


# --------------------------------------------------------------------------- protocol


def test_quick_is_the_full_resnet20_protocol_at_a_smaller_size() -> None:
    full = y19i.protocol_for("resnet20", quick=False, overrides={"data": "digits"})
    quick = y19i.protocol_for("resnet20", quick=True)
    assert (full.net, quick.net) == ("resnet20", "resnet20") and quick.data == "digits"
    differ = {
        f.name
        for f in dataclasses.fields(t1.Protocol)
        if getattr(full, f.name) != getattr(quick, f.name)
    }
    assert differ <= {"limit", "val_size", "threads"}  # data and size only
    # [Y19] Table 2's optimiser for ResNet-20, 4-bit activations, the paper's lr 1e-5
    assert (full.lr, full.batch_size, full.momentum, full.bits) == (0.01, 128, 0.9, (4,))
    assert y19i.final_lr(full) == pytest.approx(1e-4)
    assert y19i.default_lrs(full, quick=False) == y19i.default_lrs(quick, quick=True)
    assert y19i.default_lrs(full, quick=False) == (1e-5, 1e-3)
    full_fm = y19i.protocol_for("resnet20", quick=False)
    assert (full_fm.data, full_fm.limit, full_fm.val_size) == ("fashion-mnist", 1200, 500)
    with pytest.raises(ConfigError, match="alexnet"):
        y19i.protocol_for("alexnet", quick=True)
    with pytest.raises(ConfigError, match="net"):
        y19i.run("/nonexistent/never-created", net="vgg11")
    assert not Path("/nonexistent/never-created").exists()


# --------------------------------------------------------------------------- quick path

TINY = {"limit": 64, "float_epochs": 1, "epochs": 1, "milestones": ()}


def test_resnet20_quick_path_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "instability"
    kw = {"quick": True, "progress": False, "overrides": TINY, "epochs": 1, "lrs": (1e-3,)}
    r = y19i.run(out, sources=("clipped_relu",), **kw)  # the relu source: the same code
    res = json.loads((out / "results.json").read_text())
    assert (res["net"], res["data"], res["bits"]) == ("resnet20", "digits", [4])
    assert res["sources"]["clipped_relu-a4"]["from"] == "trained here (trained)"
    runs = out / "runs-quick"
    assert (runs / "resnet20-float" / "metrics.json").is_file()
    per = res["continuations"]["clipped_relu-a4"]["0.001"]
    assert set(per) == set(y19i.CONTINUE["resnet20"]["clipped_relu"]) == {"ste", "clipped_relu"}
    for est, rr in per.items():
        cfg = (Path(rr["run_dir"]) / "config.toml").read_text()
        assert 'name = "resnet20"' in cfg and f'estimator = "{est}"' in cfg
        assert 'name = "constant"' in cfg and "resnet20-a4-clipped_relu" in cfg  # the source
        assert rr["end"]["val_acc"] == pytest.approx(rr["metrics"]["final_val_acc"])
    # the stored effect is the rule applied to the stored numbers, the verdict its verdict
    eff = per["ste"]["effect"]
    assert eff == y19i.effect(per["ste"]["end"], per["clipped_relu"]["end"])
    # lr 1e-3 is the base here (lr 0.01 without drops: final lr 0.01, ×0.1)
    assert res["paper_scaled_lr"] == pytest.approx(1e-3)
    [claim] = r.claims
    assert claim.id == "ste-leaves-clipped_relu-a4"
    assert claim.verdict == ("reproduced" if eff["shows"] else "not")
    assert res["claims"] == [claim.to_dict()]
    report = (out / "report.md").read_text()
    assert "ResNet-20 (quick)" in report and "## Departures from the paper" in report
    assert "(instability_from_clipped_relu.png)" in report
    assert (out / "instability_from_clipped_relu.png").read_bytes()[:4] == b"\x89PNG"
    assert res["wall_time_s"] > 0
    md = y19ir.write_docs(out, tmp_path / "docs")
    assert (tmp_path / "docs" / "instability_from_clipped_relu.png").is_file()
    body = md.read_text()
    assert body.startswith(report) and "## How this was produced" in body and "quick=True" in body
    with pytest.raises(ConfigError, match="out_dir"):
        y19ir.write_docs(tmp_path / "nothing", tmp_path / "docs2")
    with pytest.raises(ConfigError, match="source"):
        y19i.run(out, sources=("identity",), **kw)
