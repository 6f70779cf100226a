"""The yin2019-synthetic experiment in quick mode: files, numbers and verdicts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from stelab.errors import ConfigError
from stelab.experiments.yin2019 import synthetic as y19
from stelab.experiments.yin2019 import synthetic_claims as rules


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("y19")
    return out, y19.run(out, quick=True, progress=False)


pytestmark = pytest.mark.slow


def test_files_written(quick_run):
    out, res = quick_run
    assert len(res.figures) == 3
    for f in res.figures:
        data = Path(f).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    report = (out / "report.md").read_text()
    for f in res.figures:
        assert Path(f).name in report
    assert (
        report.count("**reproduced**") + report.count("**partly**") + report.count("**not**") == 3
    )
    data = json.loads((out / "results.json").read_text())  # strict JSON (no NaN)
    assert data["name"] == "yin2019-synthetic" and data["quick"] is True
    assert not list(out.glob(".*tmp"))  # no temp files left behind
    assert res.seconds > 0 and [c.id for c in res.claims] == ["a", "b", "c"]
    assert data["claims"] == [c.to_dict() for c in res.claims]


def test_claim_a_descent_and_global_minimum(quick_run):
    out, res = quick_run
    claim = next(c for c in res.claims if c.id == "a")
    # seed 0, quick: |w| collapses towards 0 in a ReLU run (see coarse_gradient_descent),
    # so f is not monotone there and the claim holds only partly
    assert claim.verdict == "partly", claim
    assert not claim.checks["relu_crelu_monotone"]
    assert claim.checks["relu_crelu_monotone_while_w_away_from_0"]
    assert claim.checks["relu_crelu_cos_nonneg"]
    assert claim.checks["relu_crelu_end_at_critical_point"]
    assert claim.checks["basin_inits_all_global_all_stes"]
    assert "collapsed below 0.05" in claim.evidence
    a = json.loads((out / "results.json").read_text())["part_a"]
    for ste in ("identity", "relu", "clipped_relu"):
        basin = a["basin"][ste]
        # from inits with w0^T w* > 0, v0^T v* > 0 every STE reaches the global minimum
        assert max(basin["final_theta"]) < 1e-6
        assert max(basin["final_loss"]) < 1e-8
    for fam in ("gaussian", "basin"):
        for ste in ("relu", "clipped_relu"):
            r = a[fam][ste]
            for inc, wmin in zip(
                r["max_loss_increase_per_run"], r["min_w_norm_per_run"], strict=True
            ):
                assert inc <= 1e-12 or wmin < 0.05  # monotone unless |w| collapsed
            assert r["min_cosine"] >= -1e-6  # positive correlation with the true gradient
            assert set(r["outcome"]) <= {"global", "spurious"}


def test_claim_b_identity_leaves_spurious_minimizer(quick_run):
    out, res = quick_run
    claim = next(c for c in res.claims if c.id == "b")
    assert claim.verdict == "reproduced" and all(claim.checks.values()), claim
    b = json.loads((out / "results.json").read_text())["part_b"]
    f_sp = b["f_spurious"]
    for ste in ("relu", "clipped_relu"):
        assert abs(b[ste]["tail_mean_loss"] - f_sp) < 1e-6
        assert b[ste]["final_theta"] > math.pi - 1e-3
    assert b["identity"]["tail_mean_loss"] > f_sp + 1e-3
    assert b["identity"]["max_loss"] > b["start_loss"]
    assert b["at_spurious"]["identity"]["norm_Eg_w"] == pytest.approx(
        b["identity_norm_formula"], rel=1e-10
    )
    assert b["ratio"]["identity"]["loglog_slope_small_t"] == pytest.approx(-1.0, abs=0.1)
    assert b["ratio"]["relu"]["ratio"][0] < 1e-3  # ReLU's ratio goes to 0 instead


def test_claim_c_reported(quick_run):
    out, res = quick_run
    claim = next(c for c in res.claims if c.id == "c")
    assert claim.verdict == "reproduced" and len(claim.checks) == 9, claim
    c = json.loads((out / "results.json").read_text())["part_c"]
    small = max(i for i, lr in enumerate(c["lrs"]) if lr <= 1e-2)
    for ste in ("identity", "relu", "clipped_relu"):
        firsts = [c[ste][str(b)]["median_first_flip_lr"] for b in (10, 50, 1000)]
        assert firsts[0] > firsts[-1]  # small batches change the batch loss only at coarse lr
        p = [c[ste][str(b)]["p_decrease_pop"][small] for b in (10, 50, 1000)]
        assert p[0] < p[2] and p[2] >= 0.95  # a single step descends more often as B grows
        assert all(c[ste][str(b)]["mean_df_pop"][small] < 0 for b in (10, 50, 1000))


def test_claims_are_their_rules_applied_to_the_stored_numbers(quick_run):
    out, res = quick_run
    data = json.loads((out / "results.json").read_text())
    # the rules applied to results.json (lists, not tensors) give the same claims
    again = [rules.claim_a(data["part_a"]), rules.claim_b(data["part_b"])]
    again.append(rules.claim_c(data["part_c"]))
    assert [c.to_dict() for c in again] == data["claims"]
    a = res.claims[0].checks
    assert res.claims[0].verdict == rules.verdict_a(
        monotone=a["relu_crelu_monotone"],
        monotone_while_w_away=a["relu_crelu_monotone_while_w_away_from_0"],
        cos_nonneg=a["relu_crelu_cos_nonneg"],
        at_critical_point=a["relu_crelu_end_at_critical_point"],
        basin_all_global=a["basin_inits_all_global_all_stes"],
    )


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="seed"):
        y19.run(tmp_path, quick=True, seed=-1, progress=False)
