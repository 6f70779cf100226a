"""[S20] verdict rules, pinned at and around every threshold (no training, no sampling).

Each rule is a pure function of plain numbers (psa2020.gradeval_claims,
psa2020.training_claims); loosening or flipping a threshold fails one of these rows.
"""

from __future__ import annotations

import math

import pytest

from stelab.experiments.psa2020 import gradeval_claims as gc
from stelab.experiments.psa2020 import training_claims as tc

LO, HI = 1 - 1e-9, 1 + 1e-9  # just below / just above a threshold


def test_thresholds_are_the_documented_ones():
    assert gc.PARTLY_SHARE == 0.5
    assert gc.SMALL_M == (1, 10)
    assert (gc.PLATEAU_Z, gc.PLATEAU_BIAS_SHARE, gc.PLATEAU_NOISE_RATIO) == (5.0, 0.7, 3.0)
    assert gc.CATCH_UP_RANGE == (1e2, 1e4) and gc.CATCH_UP_LOOSE == (1e1, 1e5)
    assert gc.NOISY_FACTOR == 10.0
    assert tc.NEAR_BEST == 0.01 and tc.BEATS_AT_LEAST == 2


@pytest.mark.parametrize(
    ("ok", "cases", "verdict"),
    [
        (12, 12, "reproduced"),
        (11, 12, "partly"),
        (6, 12, "partly"),  # exactly half
        (5, 12, "not"),
        (3, 5, "partly"),  # 3 >= 2.5
        (2, 5, "not"),
        (1, 1, "reproduced"),
        (0, 1, "not"),
        (0, 0, "not"),  # no case, no evidence
    ],
)
def test_verdict_share(ok, cases, verdict):
    assert gc.verdict_share(ok, cases) == verdict


@pytest.mark.parametrize(
    ("psa", "others", "lowest"),
    [
        (0.5 * LO, {"dst": 0.5, "arm": 0.7}, True),
        (0.5, {"dst": 0.5, "arm": 0.7}, False),  # a tie is not "lowest"
        (0.5 * HI, {"dst": 0.5, "arm": 0.7}, False),
        (0.6, {"dst": 0.7, "arm": 0.5}, False),  # against the best other, not the first
        (0.6, {"dst": 0.7, "reinforce_loo": math.nan}, True),  # off-grid values ignored
        (math.nan, {"dst": 0.7}, False),
    ],
)
def test_psa_is_lowest(psa, others, lowest):
    assert gc.psa_is_lowest(psa, others) is lowest


# a clear plateau: z 10, bias = RMSE, RMSE 10x the noise-only value sqrt(1 / 100)
PLATEAU = {"bias_z": 10.0, "bias": 1.0, "rmse": 1.0, "rel_variance": 1.0, "m": 100}
# RMSE exactly 3x the noise-only value sqrt(4 / 4) = 1
AT_NOISE = {"bias_z": 10.0, "bias": 3.0, "rmse": 3.0, "rel_variance": 4.0, "m": 4}


@pytest.mark.parametrize(
    ("change", "plateau"),
    [
        ({}, True),
        ({"bias_z": 5.0}, False),  # z must exceed 5
        ({"bias_z": 5.0 * HI}, True),
        ({"bias_z": 5.0 * LO}, False),
        ({"bias": 0.7}, True),  # bias >= 70% of the RMSE
        ({"bias": 0.7 * LO}, False),
        ({"bias": 0.7 * HI}, True),
        ({**AT_NOISE}, True),
        ({**AT_NOISE, "rmse": 3.0 * LO}, False),
        ({**AT_NOISE, "rmse": 3.0 * HI}, True),
    ],
)
def test_is_plateau(change, plateau):
    assert gc.is_plateau(**{**PLATEAU, **change}) is plateau


@pytest.mark.parametrize(
    ("arm", "reinforce", "verdict"),
    [
        (1e3, 1e3, "reproduced"),
        (1e2, 1e4, "reproduced"),  # the range is inclusive
        (1e4, 1e2, "reproduced"),
        (1e2 * LO, 1e3, "partly"),  # one median in range
        (1e3, 1e4 * HI, "partly"),
        (1e2 * LO, 1e4 * HI, "partly"),  # neither in range, both in [10, 1e5]
        (1e1, 1e5, "partly"),
        (1e1 * LO, 1e4 * HI, "not"),
        (1e2 * LO, 1e5 * HI, "not"),
        (1.0, 1e6, "not"),
        (math.nan, math.nan, "not"),
    ],
)
def test_verdict_catch_up(arm, reinforce, verdict):
    assert gc.verdict_catch_up(arm, reinforce) == verdict


@pytest.mark.parametrize(
    ("c01", "psa", "c1", "noisy"),
    [
        (10.0, 1.0, 5.0, True),  # exactly 10x PSA's
        (10.0 * LO, 1.0, 5.0, False),
        (10.0 * HI, 1.0, 5.0, True),
        (10.0, 1.0, 10.0, False),  # must be strictly above Concrete(1)'s
        (10.0, 1.0, 10.0 * LO, True),
        (100.0, 1.0, 200.0, False),
    ],
)
def test_is_very_noisy(c01, psa, c1, noisy):
    assert gc.is_very_noisy(c01, psa, c1) is noisy


@pytest.mark.parametrize(
    ("target", "m", "extrapolated"),
    [
        (5.0, 1.0, False),  # already at M = 1
        (4.0, 1.0, False),
        (2.0, 10.0, False),  # on a grid point
        (math.sqrt(2.0), 10**1.5, False),  # log-log halfway between 10 and 100
        (1.0, 100.0, False),
        (0.5, 400.0, True),  # M^-1/2 beyond the grid
    ],
)
def test_samples_to_reach_curve(target, m, extrapolated):
    got, ext = gc.samples_to_reach_curve([1, 10, 100, 1000], [4.0, 2.0, 1.0, math.nan], target)
    assert got == pytest.approx(m, rel=1e-12) and ext is extrapolated


def _acc(psa, dst, concrete, reinforce):
    return {"psa": psa, "dst": dst, "concrete:tau=0.1": concrete, "reinforce": reinforce}


@pytest.mark.parametrize(
    ("acc", "verdict"),
    [
        (_acc(0.9, 0.9, 0.5, 0.5), "reproduced"),  # a tie with the best counts
        (_acc(0.9 * LO, 0.9, 0.5, 0.5), "partly"),  # within a point, and above two
        # within one point of the best and above only one baseline
        (_acc(0.95 - 0.01, 0.9, 0.95, 0.95), "partly"),
        (_acc((0.95 - 0.01) * LO, 0.9, 0.95, 0.95), "not"),
        # far from the best but above two baselines
        (_acc(0.5, 0.2, 0.3, 0.9), "partly"),
        (_acc(0.5, 0.2, 0.5, 0.9), "not"),  # "above" is strict
        (_acc(0.1, 0.2, 0.3, 0.9), "not"),
        (_acc(math.nan, 0.2, 0.3, 0.4), "not"),  # PSA diverged
        (_acc(0.5, math.nan, 0.4, math.nan), "reproduced"),  # diverged baselines drop out
        (_acc(0.5, math.nan, math.nan, math.nan), "not"),  # nothing to compare with
        ({"dst": 0.5, "reinforce": 0.4}, "not"),  # no PSA run
    ],
)
def test_verdict_training(acc, verdict):
    assert tc.verdict_training(acc) == verdict


def _row(lr, acc, diverged=False):
    return {"lr": lr, "val_acc_avg": acc, "diverged": diverged}


@pytest.mark.parametrize(
    ("rows", "lr"),
    [
        ([_row(0.3, 0.5), _row(0.1, 0.6), _row(0.03, 0.4)], 0.1),
        ([_row(0.3, 0.9, diverged=True), _row(0.1, 0.6)], 0.1),  # a diverged run never wins
        ([_row(0.3, math.nan), _row(0.1, 0.2)], 0.1),
        ([_row(0.3, 0.6), _row(0.1, 0.6)], 0.3),  # the first of equals
        ([_row(0.3, math.nan), _row(0.01, 0.5, diverged=True)], 0.01),  # none: the smallest
    ],
)
def test_choose_lr(rows, lr):
    assert tc.choose_lr(rows) == lr


def test_claim_e_reports_the_rule_and_the_numbers():
    def run(acc, diverged=False):
        return {"test": {"acc_avg": acc, "acc1": acc - 0.1}, "diverged": diverged}

    results = {
        "psa": run(0.9),
        "dst": run(0.8),
        "concrete:tau=0.1": run(0.7),
        "reinforce": run(math.nan, True),
    }
    c = tc.claim_e(results)
    assert c.id == "e" and c.verdict == "reproduced"
    assert c.checks["acc_avg"]["psa"] == 0.9
    assert "psa 90.0% (1 sample 80.0%)" in c.evidence and "diverged: reinforce" in c.evidence
    results["psa"] = run(0.5)
    assert tc.claim_e(results).verdict == "not"


# --------------------------------------------------------------------------- the claims
# read off fidelity reports: a hand-made report whose every number is chosen here, so the
# cases, counts, medians and the evidence text are known without running anything


def _layer(rmse, *, rel_variance=1.0, bias=0.0, bias_z=0.0, sizes=(1, 10, 100)):
    from stelab.analysis.fidelity_report import LayerFidelity

    n = len(sizes)
    return LayerFidelity(
        layer="hidden.0", label="", params=1, ref_norm=1.0, sample_sizes=list(sizes),
        groups=[1] * n, rmse=list(rmse), rmse_se=[0.0] * n, cos_mean=[1.0] * n,
        cos_lo=[1.0] * n, cos_hi=[1.0] * n, bias=bias, bias_raw=bias, bias_floor=0.0,
        bias_z=bias_z, variance=rel_variance, rel_variance=rel_variance, snr=1.0,
    )  # fmt: skip


def _report(psa_at_10=0.5):
    from stelab.analysis.fidelity_report import EstimatorFidelity, FidelityReport

    layers = {
        "psa": _layer([1.0, psa_at_10, 0.3], rel_variance=2.0),
        "dst": _layer([1.2, 0.9, 0.85], bias=0.8, bias_z=10.0),
        "arm": _layer([4.0, 1.3, 0.4]),
        "arm_shared": _layer([4.0, 1.3, 0.4]),  # reported beside ARM, not judged
        "reinforce": _layer([10.0, 3.2, 1.0]),
        "concrete(tau=0.1)": _layer([2.0, 0.8, 0.6], rel_variance=50.0),
        "concrete(tau=1)": _layer([1.5, 0.7, 0.5], rel_variance=5.0),
        "tanh_mf": _layer([1.5], sizes=(1,)),
    }
    ests = {
        lab: EstimatorFidelity(
            label=lab,
            name=lab,
            kind="deterministic" if lab == "tanh_mf" else "stochastic",
            engine="",
            draws=1,
            seconds_per_draw=None,
            forward_equivalents=None,
            wall_seconds=0.0,
            layers={"hidden.0": lf},
        )  # fmt: skip
        for lab, lf in layers.items()
    }
    return FidelityReport(
        layers=["hidden.0", "output"], reference=None, estimators=ests, draws=1,
        sample_sizes=[1, 10, 100], examples=1,
    )  # fmt: skip


def test_claims_read_off_the_reports():
    # epoch 2: PSA at M = 10 (0.75) is above Concrete(1)'s 0.7, so 3 of 4 cases hold
    a, b, c, d = gc.claims({1: _report(), 2: _report(psa_at_10=0.75)})
    assert (a.id, a.verdict, a.checks) == ("a", "partly", {"cases": 4, "psa_lowest": 3})
    assert "epoch 1 layer 1: PSA 1 vs best other dst 1.2;" in a.evidence
    assert a.evidence.startswith(
        "PSA lowest in 3/4 (checkpoint, hidden layer, M in {1, 10}) cases among the "
        "stochastic estimators. RMSE at M=1: epoch 1 layer 1: PSA 1 vs best other dst 1.2"
    )
    tanh = ". Against the zero-variance tanh mean-field: e1 layer 1: PSA lower, e2 layer 1: "
    assert a.evidence.endswith(tanh + "PSA lower.")  # tanh_mf: 1.5
    # dst: z 10 > 5, bias 0.8 >= 0.7 * 0.85, 0.85 >= 3 sqrt(1 / 100)
    assert (b.id, b.verdict, b.checks) == ("b", "reproduced", {"cases": 2, "plateaus": 2})
    # ARM reaches PSA's one-sample RMSE 1.0 between M = 10 (1.3) and 100 (0.4), log-log;
    # REINFORCE exactly at M = 100
    t = math.log(1.3) / (math.log(1.3) - math.log(0.4))
    arm = 10.0 * 10.0**t
    assert c.id == "c" and c.verdict == "partly"  # ARM's 16.7 is below 10^2
    assert c.checks["median_arm"] == pytest.approx(arm, rel=1e-12)
    assert c.checks["median_reinforce"] == pytest.approx(100.0, rel=1e-12)
    assert c.checks["median_arm_shared"] == pytest.approx(arm, rel=1e-12)
    assert f"ARM {arm:.3g}, REINFORCE 100, ARM with shared noise {arm:.3g};" in c.evidence
    # to ST's plateau 0.85 (dst's last RMSE): ARM log-log between M = 10 and 100,
    # REINFORCE beyond the grid, 100 (1 / 0.85)^2, marked *
    t2 = (math.log(1.3) - math.log(0.85)) / (math.log(1.3) - math.log(0.4))
    line = (
        f"epoch 2 layer 1: arm {arm:.3g} (to ST's plateau {10.0 * 10.0**t2:.3g}), "
        f"reinforce 100 (to ST's plateau {100 / 0.85**2:.3g}*), "
        f"arm_shared {arm:.3g} (to ST's plateau {10.0 * 10.0**t2:.3g})"
    )
    assert c.evidence.endswith(line + ".")
    assert (d.id, d.verdict, d.checks) == ("d", "reproduced", {"cases": 2, "noisy": 2})
    assert d.evidence.endswith("epoch 2 layer 1: rel.var 50 vs PSA 2, Concrete(1) 5.")
    assert a.evidence.endswith("e2 layer 1: PSA lower.")
    assert b.evidence.endswith(
        "epoch 2 dst layer 1: RMSE 1.2 (M=1) -> 0.85 (M=100), bias 0.8 (z=10), noise alone 0.1."
    )


def test_claims_b_c_d_evidence_in_full():
    """The whole evidence of claims (b)-(d) on the hand-made reports above (dst's RMSE
    1.2 -> 0.85, bias 0.8 at z 10, rel. variance 1: noise alone sqrt(1/100) = 0.1;
    Concrete(0.1) 50 vs PSA 2 and Concrete(1) 5), written out."""
    _, b, c, d = gc.claims({1: _report(), 2: _report(psa_at_10=0.75)})
    dst = "dst layer 1: RMSE 1.2 (M=1) -> 0.85 (M=100), bias 0.8 (z=10), noise alone 0.1"
    assert b.evidence == (
        "plateau (bias z > 5, bias >= 70% of the RMSE at the largest M, and that RMSE >= 3x "
        "the noise-only value sqrt(rel.var/M)) in 2/2 cases (dst = the paper's ST with F' "
        f"backward, hard_st = hardtanh'): epoch 1 {dst}; epoch 2 {dst}."
    )
    per = (
        "layer 1: arm 16.7 (to ST's plateau 22.9), reinforce 100 (to ST's plateau 138*), "
        "arm_shared 16.7 (to ST's plateau 22.9)"
    )
    assert c.evidence == (
        "samples M needed to reach PSA's one-sample RMSE (median over checkpoints and hidden "
        "layers: ARM 16.7, REINFORCE 100, ARM with shared noise 16.7; 'reproduced' if both "
        "medians lie in [10^2, 10^4]; * = extrapolated beyond the M grid with M^-1/2): "
        f"epoch 1 {per}; epoch 2 {per}."
    )
    noisy = "layer 1: rel.var 50 vs PSA 2, Concrete(1) 5"
    assert d.evidence == (
        "one-draw relative variance tr Cov / ||g||^2 of Concrete(0.1) >= 10x PSA's and above "
        f"Concrete(1)'s in 2/2 cases: epoch 1 {noisy}; epoch 2 {noisy}."
    )
