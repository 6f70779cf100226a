"""The [S24] lockstep experiment end to end on a tiny configuration.

One run serves every test (module fixture): about 10 s on an idle 2-core CPU, most of it
matplotlib drawing the five figures; marked slow.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from stelab.experiments.disguise2024 import trajectories
from stelab.experiments.disguise2024.trajectories_claims import claims
from stelab.experiments.spine import PartResult

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

TINY = trajectories.Config(
    limit=256,
    steps=12,
    eval_every=6,
    sweep_lr_factors=(0.5, 1.0),
    sweep_steps0=8,
    adam_window_lrs=(1e-4,),
    adam_beta2s=(0.9, 0.999),
    adam_eps=(1e-8, 1e-1),
    adam_steps=6,
)


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("disguise2024")
    mp = pytest.MonkeyPatch()
    mp.setattr(trajectories, "preset", lambda quick: TINY)
    try:
        part = trajectories.run(out, quick=True, seed=0, progress=False)
    finally:
        mp.undo()
    return out, part, json.loads((out / "results.json").read_text())


def test_writes_every_file_atomically(result):
    out, part, res = result
    assert isinstance(part, PartResult) and part.out_dir == out and part.skipped is None
    names = {p.name for p in out.iterdir()}
    figures = [Path(f).name for f in part.figures]
    assert figures == res["figures"] and len(figures) == 5
    assert {"results.json", "report.md", *figures} <= names
    assert not [n for n in names if n.startswith(".")]  # no temp files left behind
    for f in part.figures:
        assert Path(f).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert res["experiment"] == "disguise2024" and res["seed"] == 0
    assert res["claims"] == [c.to_dict() for c in part.claims]


def test_alpha_and_the_start_of_training(result):
    _, _, res = result
    alphas = {r["estimator"]: r["alpha"] for r in res["main"]}
    assert alphas["cosine"] == pytest.approx(math.sqrt(1 - 0.5**2), abs=1e-8)
    k = 3.0
    assert alphas["dsq"] == pytest.approx(k / math.tanh(k / 2) / (1 + math.sinh(k) / k), abs=1e-8)
    assert len(res["main"]) == 6  # 2 estimators x 3 optimizers
    for r in res["main"]:
        h = r["history"]
        assert h["step"][0] == 0 and h["step"][-1] == TINY.steps
        # at step 0 every twin computes the same quantized weights; (iii) is M(w0) exactly,
        # (i) and (ii) start at w0, which M moves
        assert all(h[f"flips_{v}"][0] == 0 for v in ("i", "ii", "iii"))
        assert h["gap_M_mean_iii"][0] < 1e-12
        assert h["gap_M_mean_i"][0] > 1e-3 and h["gap_id_mean_i"][0] == 0
        assert 0 <= h["acc_custom"][-1] <= 1


def test_sgd_twin_iii_is_closest(result):
    _, _, res = result
    for r in res["main"]:
        if r["optimizer"] == "SGD":
            f = r["final"]
            assert f["gap_M_mean_iii"] < f["gap_M_mean_i"]
            assert f["gap_M_mean_iii"] < f["gap_M_mean_ii"]


def test_report_has_the_tables_and_the_statements(result):
    out, _, res = result
    text = (out / "report.md").read_text()
    assert text.count("| cosine |") == 9 and text.count("| dsq |") == 9
    assert "## Where the equivalence holds and where it fails" in text
    assert "## Learning-rate sweep" in text and "## Adam" in text
    assert len(res["summary"]["statements"]) >= 8
    assert {r["sweep"] for r in res["adam"]} == {"window", "eps"}
    assert set(res["summary"]["lr_slopes"]) == {"SGD"}


def test_claims_carry_verdicts_from_the_numbers(result):
    out, _, res = result
    verdicts = {c["id"]: c["verdict"] for c in res["claims"]}
    assert list(verdicts) == ["alpha", "sgd", "first-order", "adam"]
    # this tiny run is far inside every rule: (iii)'s gap is < 1/20 of the others', the
    # (iii) slope 1.11 and the (i) slope -0.01, the plain STE under Adam < 1/20 of the others
    assert set(verdicts.values()) == {"reproduced"}
    (sl,) = res["summary"]["lr_slopes"].values()
    assert 0.8 <= sl["iii"] <= 1.25 and abs(sl["i"]) < 0.3
    by_id = {c["id"]: c for c in res["claims"]}
    assert by_id["sgd"]["checks"] == {"held": 4, "runs": 4, "ratio": 0.5}
    assert by_id["alpha"]["checks"]["worst_abs_diff"] <= 1e-8
    text = (out / "report.md").read_text()
    assert "## Verdicts" in text and text.count("| **reproduced** |") == 4


def _fake(slope_iii: float, slope_i: float, gaps: tuple[float, float, float]) -> dict:
    g1, g2, g3 = gaps
    final = {
        "gap_M_mean_i": g1,
        "gap_M_mean_ii": g2,
        "gap_M_mean_iii": g3,
        "flips_i": 0.1,
        "flips_iii": 0.01,
        "gap_id_mean_i": 0.2,
        "gap_id_mean_ii": 0.1,
        "moved": 1.0,
    }
    main = [{"estimator": "cosine", "params": {"a": 0.5}, "alpha": math.sqrt(0.75),
             "optimizer": "SGD", "final": final}]  # fmt: skip
    slopes = {"SGD": {"iii": slope_iii, "i": slope_i}}
    return {"main": main, "adam": [], "summary": {"lr_slopes": slopes}}


@pytest.mark.parametrize(
    "slopes,gaps,want",
    [((1.0, 0.0), (0.2, 0.1, 0.01), ("reproduced", "reproduced")),
     ((0.5, 0.0), (0.2, 0.1, 0.08), ("partly", "not")),
     ((0.1, 0.1), (0.2, 0.1, 0.01), ("not", "reproduced"))],
)  # fmt: skip
def test_claim_verdict_rules(slopes, gaps, want):
    got = {c.id: c.verdict for c in claims(_fake(*slopes, gaps))}
    assert (got["first-order"], got["sgd"]) == want
    assert "adam" not in got  # no Adam runs: no verdict invented
