"""The [S24] verdict rules, pinned at and just around each threshold.

Each rule is a pure function of plain numbers (stelab.experiments.disguise2024.
trajectories_claims); the thresholds are the ones stated in docs/papers/disguise2024.md
section 5, written out here as literals so that changing a constant fails a test.
"""

from __future__ import annotations

import math

import pytest

from stelab.experiments.disguise2024 import trajectories_claims as tc

LO, HI = 1 - 1e-9, 1 + 1e-9  # just below / just above a threshold, relatively


def test_thresholds_are_the_documented_ones():
    assert tc.ALPHA_TOL == 1e-8
    assert tc.TWIN_RATIO == 0.5
    assert (tc.SLOPE_LO, tc.SLOPE_HI) == (0.8, 1.25)
    assert tc.PLAIN_SLOPE_MAX == 0.3 and tc.SHRINK_SLOPE_MIN == 0.3
    assert tc.ADAM_REL_GAP == 0.05


@pytest.mark.parametrize(
    "err,want",
    [
        (0.0, "reproduced"),
        (1e-8 * LO, "reproduced"),
        (1e-8, "reproduced"),
        (1e-8 * HI, "not"),
        (1e-3, "not"),
        (math.nan, "not"),
    ],
)
def test_alpha(err, want):
    assert tc.verdict_alpha(err) == want


@pytest.mark.parametrize(
    "gap,others,want",
    [
        (0.5 * LO, (1.0, 2.0), True),
        (0.5, (1.0, 2.0), False),  # strictly below half
        (0.5 * HI, (1.0, 2.0), False),
        (0.5 * LO, (2.0, 1.0), True),  # the smaller of the others counts
        (0.9, (2.0, 1.0), False),
        (0.0, (1e-12, 1.0), True),
    ],
)
def test_closest_twin(gap, others, want):
    assert tc.closest_twin(gap, *others) is want


@pytest.mark.parametrize(
    "held,want",
    [
        ([True, True, True, True], "reproduced"),
        ([True, True, True, False], "partly"),  # 3 of 4 is not every run
        ([False, True], "partly"),
        ([False, False], "not"),
        ([], "not"),  # no runs: nothing reproduced
    ],
)
def test_sgd(held, want):
    assert tc.verdict_sgd(held) == want


@pytest.mark.parametrize(
    "s3,s1,want",
    [
        (0.8 * LO, 0.0, False),
        (0.8, 0.0, True),
        (1.0, 0.0, True),
        (1.25, 0.0, True),
        (1.25 * HI, 0.0, False),
        (1.0, 0.3 * LO, True),
        (1.0, 0.3, False),  # |slope of (i)| strictly below 0.3
        (1.0, -0.3 * LO, True),
        (1.0, -0.3, False),
        (1.0, -0.3 * HI, False),
    ],
)
def test_first_order(s3, s1, want):
    assert tc.first_order(s3, s1) is want


@pytest.mark.parametrize(
    "slopes,want",
    [
        ([(1.0, 0.0), (0.9, 0.1)], "reproduced"),
        ([(1.0, 0.0), (0.5, 0.0)], "partly"),  # first order for one optimizer only
        ([(1.0, 0.5)], "partly"),  # (i) shrinks too, but (iii) shrinks (slope > 0.3)
        ([(0.3 * HI, 0.0), (0.5, 0.0)], "partly"),  # every (iii) slope above 0.3
        ([(0.3, 0.0), (0.5, 0.0)], "not"),  # 0.3 itself is not > 0.3
        ([(0.3 * LO, 0.0)], "not"),
        ([(-1.0, 0.0)], "not"),
        ([], "not"),
    ],
)
def test_verdict_first_order(slopes, want):
    assert tc.verdict_first_order(slopes) == want


@pytest.mark.parametrize(
    "gap,moved,want",
    [(0.05, 1.0, 0.05), (0.1, 2.0, 0.05), (1e-13, 0.0, 0.1), (0.0, 0.0, 0.0)],
)
def test_relative_gap(gap, moved, want):
    # the distance moved is floored at 1e-12 Δ: no division by zero
    assert tc.relative_gap(gap, moved) == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(
    "closest,rels,want",
    [
        ([True, True], [0.05 * LO], "reproduced"),
        ([True, True], [0.05], "reproduced"),  # within 5%, the bound included
        ([True, True], [0.05 * HI], "partly"),
        ([True, True], [0.5, 0.01], "reproduced"),  # some short-window run suffices
        ([True, False], [0.01], "partly"),  # closest in every main run, not just one
        ([False, False], [0.01], "partly"),
        ([True], [], "partly"),
        ([False], [0.05 * HI], "not"),
        ([], [0.01], "partly"),  # no main Adam run: never reproduced
        ([], [], "not"),
    ],
)
def test_adam(closest, rels, want):
    assert tc.verdict_adam(closest, rels) == want


# DSQ, k = 3: k·coth(k/2)/(1 + sinh(k)/k), written with exp only
E3 = math.e**3
DSQ3 = 3 * (E3 + 1) / (E3 - 1) / (1 + (E3 - 1 / E3) / 6)


@pytest.mark.parametrize(
    "est,params,want",
    [
        ("cosine", {"a": 0.5}, math.sqrt(0.75)),
        ("cosine", {"a": 0.0}, 1.0),
        ("dsq", {"k": 3.0}, DSQ3),
        ("clipped", {}, None),
    ],
)  # fmt: skip
def test_closed_form_alpha(est, params, want):
    got = tc.closed_form_alpha(est, params)
    assert got == (None if want is None else pytest.approx(want, rel=1e-14))


# ---------------------------------------------------------------- claims() reads the numbers


def _run(est: str, opt: str, **final: float) -> dict:
    base = {"gap_M_mean_i": 1.0, "gap_M_mean_ii": 1.0, "gap_M_mean_iii": 1.0,
            "gap_id_mean_i": 1.0, "gap_id_mean_ii": 1.0, "flips_i": 0.1, "flips_iii": 0.1,
            "moved": 1.0}  # fmt: skip
    params = {"a": 0.5} if est == "cosine" else {"k": 3.0}
    return {"estimator": est, "params": params, "alpha": tc.closed_form_alpha(est, params),
            "optimizer": opt, "hp": {}, "final": {**base, **final}}  # fmt: skip


def _window(gap: float, moved: float) -> dict:
    return {"sweep": "window", "lr": 1e-4, "hp": {"betas": (0.9, 0.9)}, "travel": 0.1,
            "final": {"gap_id_mean_i": gap, "moved": moved}}  # fmt: skip


def _res(main, adam=(), slopes=None) -> dict:
    return {"main": list(main), "adam": list(adam), "summary": {"lr_slopes": slopes or {}}}


def _verdicts(res: dict) -> dict[str, str]:
    return {c.id: c.verdict for c in tc.claims(res)}


def test_claims_alpha_compares_each_estimator_once():
    good = _run("cosine", "SGD")
    bad = {**_run("dsq", "SGD"), "alpha": tc.closed_form_alpha("dsq", {"k": 3.0}) + 2e-8}
    assert _verdicts(_res([good, good]))["alpha"] == "reproduced"
    assert _verdicts(_res([good, bad]))["alpha"] == "not"  # the worst estimator decides


def test_claims_sgd_uses_the_M_gap_and_ignores_adam_runs():
    held = _run("cosine", "SGD", gap_M_mean_iii=0.1, gap_id_mean_i=10.0)
    failed = _run("dsq", "SGD+momentum", gap_M_mean_iii=0.9, gap_id_mean_iii=0.0)
    adam = _run("cosine", "Adam", gap_M_mean_iii=5.0)
    assert _verdicts(_res([held, adam]))["sgd"] == "reproduced"
    assert _verdicts(_res([held, failed, adam]))["sgd"] == "partly"
    assert _verdicts(_res([failed]))["sgd"] == "not"
    assert "sgd" not in _verdicts(_res([adam]))  # no SGD run: no verdict invented


def test_claims_adam_uses_the_plain_gap_against_ii_and_the_M_gap_of_iii():
    # plain STE (i): |w_c - w| 0.1 vs (ii) |w_c - w| 1.0 and (iii) |M(w_c) - w| 1.0
    closest = _run("cosine", "Adam", gap_id_mean_i=0.1)
    # (iii)'s M-gap is small: (i) is not the closest twin, whatever its M-gap
    not_closest = _run("cosine", "Adam", gap_id_mean_i=0.1, gap_M_mean_iii=0.15, gap_M_mean_i=0.0)
    short, long_ = _window(0.05, 1.0), _window(0.051, 1.0)
    assert _verdicts(_res([closest], [short]))["adam"] == "reproduced"
    assert _verdicts(_res([closest], [long_]))["adam"] == "partly"
    assert _verdicts(_res([not_closest], [long_]))["adam"] == "not"
    assert _verdicts(_res([not_closest], [short, long_]))["adam"] == "partly"
    eps = {**short, "sweep": "eps"}  # the eps sweep never counts as a short window
    assert _verdicts(_res([not_closest], [eps]))["adam"] == "not"
    assert "adam" not in _verdicts(_res([_run("cosine", "SGD")]))


def test_claims_first_order_reads_each_optimizers_slopes():
    both = {"SGD": {"iii": 1.0, "i": 0.0}, "SGD+momentum": {"iii": 0.9, "i": -0.1}}
    one = {"SGD": {"iii": 1.0, "i": 0.0}, "SGD+momentum": {"iii": 0.2, "i": 0.0}}
    assert _verdicts(_res([], slopes=both))["first-order"] == "reproduced"
    assert _verdicts(_res([], slopes=one))["first-order"] == "partly"
    assert "first-order" not in _verdicts(_res([]))


def test_claims_evidence_in_full():
    """The whole evidence text of every claim on hand-made runs, written out (a dropped
    or altered part of it fails here)."""
    held = _run("cosine", "SGD", gap_M_mean_iii=0.1, gap_id_mean_i=10.0)
    failed = _run("dsq", "SGD+momentum", gap_M_mean_iii=0.9, gap_id_mean_iii=0.0)
    adam = _run("cosine", "Adam", gap_M_mean_iii=5.0)
    closest = _run("cosine", "Adam", gap_id_mean_i=0.1)
    slopes = {"SGD": {"iii": 1.0, "i": 0.0}, "SGD+momentum": {"iii": 0.9, "i": -0.1}}
    res = _res([held, failed, adam, closest], [_window(0.05, 1.0)], slopes=slopes)
    ev = {c.id: c.evidence for c in tc.claims(res)}
    assert ev["alpha"] == (
        "cosine {'a': 0.5}: quadrature 0.8660254038 vs closed form 0.8660254038 (|diff| "
        "0.0e+00); dsq {'k': 3.0}: quadrature 0.7638053517 vs closed form 0.7638053517 "
        "(|diff| 0.0e+00)"
    )
    assert ev["sgd"] == (
        "(iii) gap below half of both (i) and (ii) in 1/2 runs: cosine/SGD: (iii) 0.1000 Δ "
        "(10.0% differ) vs (i) 1.000 Δ (10.0%), (ii) 1.000 Δ; dsq/SGD+momentum: (iii) "
        "0.9000 Δ (10.0% differ) vs (i) 1.000 Δ (10.0%), (ii) 1.000 Δ"
    )
    assert ev["first-order"] == (
        "SGD: log-log slope of the (iii) gap against η 1.00 (theory 1), of the (i) gap 0.00 "
        "(theory 0); SGD+momentum: log-log slope of the (iii) gap against η 0.90 (theory 1), "
        "of the (i) gap -0.10 (theory 0)"
    )
    assert ev["adam"] == (
        "main runs (β₂ = 0.999): plain-STE gap 1.000 Δ vs (ii) 1.000 Δ, (iii) 5.000 Δ "
        "(cosine); main runs (β₂ = 0.999): plain-STE gap 0.100 Δ vs (ii) 1.000 Δ, (iii) "
        "1.000 Δ (cosine); lr 0.0001, β₂ 0.9 (travel η/((1-β₂)Δ) = 0.1): gap 0.0500 Δ = "
        "5.0% of the distance moved. Verdict rule: plain STE the closest twin in every main "
        "run, and a gap within 5% of the distance moved at a short window."
    )
