"""[Y19] verdict rules, each pinned at and just around its thresholds.

Every rule is a pure function of plain numbers (``yin2019.synthetic_claims``,
``table1_claims``, ``instability_claims``). "Just around" a threshold t is t·(1 ∓ 1e-9)
where floating point resolves it, else the neighbouring float (``math.nextafter``);
the values "at" a threshold are built so that the compared quantity equals the constant
exactly (differences taken from 0, products of exact powers of two).
"""

from __future__ import annotations

import math

import pytest

from stelab.errors import ConfigError
from stelab.experiments.yin2019 import instability_claims as ic
from stelab.experiments.yin2019 import synthetic_claims as sc
from stelab.experiments.yin2019 import table1_claims as tc
from stelab.experiments.yin2019.table1 import Protocol

UP, DOWN = 1 + 1e-9, 1 - 1e-9


def test_thresholds_are_the_documented_ones() -> None:
    # docs/papers/yin2019.md §5 states these numbers; a change must change the docs too
    assert (sc.TOL_THETA, sc.TOL_LOSS, sc.TOL_SETTLE) == (1e-2, 1e-4, 1e-9)
    assert (sc.W_COLLAPSE, sc.TOL_MONO, sc.TOL_COS) == (0.05, 1e-12, -1e-6)
    assert (sc.NORM_RTOL, sc.ZERO_NORM, sc.LEAVE_MARGIN) == (1e-10, 1e-12, 1e-3)
    assert (sc.SLOPE_MAX, sc.BLOWUP_FACTOR, sc.B_PARTLY_MIN) == (-0.8, 1e3, 3)
    assert sc.P_DECREASE_MIN == 0.95
    assert tc.ABS_TOL_PTS == 0.5
    assert (ic.ACC_DROP, ic.LOSS_RATIO, ic.LOSS_FLOOR) == (1.0, 1.5, 1e-12)


# --------------------------------------------------------------------------- synthetic (a)


@pytest.mark.parametrize(
    ("theta", "loss", "rise", "f_sp", "expected"),
    [
        (0.0, 0.0, sc.TOL_SETTLE * UP, 0.0, "oscillating"),  # rise just above: oscillating
        (0.0, 0.0, sc.TOL_SETTLE, 0.0, "global"),  # rise at the threshold: settled
        (sc.TOL_THETA * DOWN, sc.TOL_LOSS * DOWN, 0.0, 1.0, "global"),
        (sc.TOL_THETA, sc.TOL_LOSS * DOWN, 0.0, 1.0, "other"),  # theta at the bound
        (sc.TOL_THETA * DOWN, sc.TOL_LOSS, 0.0, 1.0, "other"),  # loss at the bound
        (math.nextafter(math.pi - sc.TOL_THETA, 4.0), 0.0, 0.0, 0.0, "spurious"),
        (math.pi - sc.TOL_THETA, 0.0, 0.0, 0.0, "other"),  # theta at pi - tol: not > it
        (math.pi, sc.TOL_LOSS * DOWN, 0.0, 0.0, "spurious"),  # |f - f_sp| just inside
        (math.pi, sc.TOL_LOSS, 0.0, 0.0, "other"),  # |f - f_sp| at the bound
        (1.0, 0.3, 0.0, 0.2, "other"),  # still moving
        (math.pi, 0.3 + sc.TOL_LOSS * DOWN, 0.0, 0.3, "spurious"),  # at a nonzero f_sp
        (math.pi, 0.0, 0.0, 0.3, "other"),  # theta at pi but f far from f_sp
    ],
)
def test_outcome(theta: float, loss: float, rise: float, f_sp: float, expected: str) -> None:
    assert sc.outcome(theta, loss, rise, f_sp) == expected


@pytest.mark.parametrize(
    ("rule", "tol", "below", "at", "above"),
    [
        (sc.monotone, sc.TOL_MONO, True, True, False),  # increase <= 1e-12
        (sc.collapsed, sc.W_COLLAPSE, True, False, False),  # min |w| < 0.05
        (sc.vanishes, sc.ZERO_NORM, True, False, False),  # |E g| < 1e-12
    ],
)
def test_one_sided_rules_at_their_threshold(rule, tol, below, at, above) -> None:
    assert (rule(tol * DOWN), rule(tol), rule(tol * UP)) == (below, at, above)


def test_cos_nonneg_at_its_negative_threshold() -> None:
    assert sc.cos_nonneg(sc.TOL_COS * DOWN)  # -1e-6·(1-1e-9) > -1e-6
    assert sc.cos_nonneg(sc.TOL_COS)
    assert not sc.cos_nonneg(sc.TOL_COS * UP)  # more negative


@pytest.mark.parametrize(
    ("flags", "verdict"),
    [
        ((1, 1, 1, 1, 1), "reproduced"),
        ((0, 1, 1, 1, 1), "partly"),  # f rose only where |w| collapsed
        ((1, 1, 1, 1, 0), "partly"),  # a basin run missed the global minimum
        ((0, 1, 1, 1, 0), "partly"),
        ((0, 0, 1, 1, 1), "not"),  # f rose with |w| away from 0
        ((1, 1, 0, 1, 1), "not"),  # negative correlation somewhere
        ((1, 1, 1, 0, 1), "not"),  # a run not at a critical point
    ],
)
def test_verdict_a(flags: tuple[int, ...], verdict: str) -> None:
    mono, regular, cos, crit, basin = map(bool, flags)
    got = sc.verdict_a(
        monotone=mono,
        monotone_while_w_away=regular,
        cos_nonneg=cos,
        at_critical_point=crit,
        basin_all_global=basin,
    )
    assert got == verdict


# --------------------------------------------------------------------------- synthetic (b)


def test_norm_matches_formula_at_its_tolerance() -> None:
    f = sc.NORM_RTOL  # formula < 1: the tolerance is absolute, NORM_RTOL
    at = 2 * sc.NORM_RTOL
    assert at - f == sc.NORM_RTOL  # exactly at the tolerance
    assert sc.norm_matches_formula(at, f)
    assert sc.norm_matches_formula(math.nextafter(at, 0.0), f)
    assert not sc.norm_matches_formula(math.nextafter(at, 1.0), f)
    # above 1 the tolerance is relative: 3·(1 + 1e-10·(1 ∓ 1e-3))
    assert sc.norm_matches_formula(3.0 * (1 + sc.NORM_RTOL * (1 - 1e-3)), 3.0)
    assert not sc.norm_matches_formula(3.0 * (1 + sc.NORM_RTOL * (1 + 1e-3)), 3.0)
    assert not sc.norm_matches_formula(0.0, 0.0)  # the formula must be > 0


@pytest.mark.parametrize(
    ("tail", "theta", "settled"),
    [
        (sc.TOL_LOSS * DOWN, math.pi, True),
        (sc.TOL_LOSS, math.pi, False),  # |mean - f_sp| at the bound
        (-sc.TOL_LOSS * DOWN, math.pi, True),  # from below too
        (0.0, math.nextafter(math.pi - sc.TOL_THETA, 4.0), True),
        (0.0, math.pi - sc.TOL_THETA, False),  # theta at pi - tol
    ],
)
def test_settles(tail: float, theta: float, settled: bool) -> None:
    assert sc.settles(tail, theta, 0.0) is settled


@pytest.mark.parametrize(
    ("tail", "max_loss", "left"),
    [
        (sc.LEAVE_MARGIN * UP, 2.0, True),
        (sc.LEAVE_MARGIN, 2.0, False),  # mean exactly LEAVE_MARGIN above f_sp
        (sc.LEAVE_MARGIN * UP, 1.0, False),  # the loss never rose above its start
    ],
)
def test_leaves(tail: float, max_loss: float, left: bool) -> None:
    assert sc.leaves(tail, max_loss, 1.0, 0.0) is left


def test_leaves_measures_the_rise_above_a_nonzero_f_spurious() -> None:
    f_sp = 0.5
    assert sc.leaves(f_sp + sc.LEAVE_MARGIN * UP, 2.0, 1.0, f_sp)
    assert not sc.leaves(f_sp + sc.LEAVE_MARGIN * DOWN, 2.0, 1.0, f_sp)
    assert not sc.leaves(0.9 * f_sp, 2.0, 1.0, f_sp)  # below f_sp: above LEAVE_MARGIN only


@pytest.mark.parametrize(
    ("slope", "near", "blows_up"),
    [
        (sc.SLOPE_MAX * UP, sc.BLOWUP_FACTOR * UP, True),  # slope just below -0.8
        (sc.SLOPE_MAX, sc.BLOWUP_FACTOR * UP, False),  # slope at the bound
        (sc.SLOPE_MAX * DOWN, sc.BLOWUP_FACTOR * UP, False),  # just above it
        (sc.SLOPE_MAX * UP, sc.BLOWUP_FACTOR, False),  # growth exactly 1000×
        (sc.SLOPE_MAX * UP, sc.BLOWUP_FACTOR * DOWN, False),
    ],
)
def test_ratio_blows_up(slope: float, near: float, blows_up: bool) -> None:
    assert sc.ratio_blows_up(slope, near, 1.0) is blows_up


@pytest.mark.parametrize(
    ("n_true", "verdict"), [(5, "reproduced"), (4, "partly"), (3, "partly"), (2, "not"), (0, "not")]
)
def test_verdict_b_counts_its_five_checks(n_true: int, verdict: str) -> None:
    assert sc.verdict_b([True] * n_true + [False] * (5 - n_true)) == verdict
    assert sc.verdict_b([False] * (5 - n_true) + [True] * n_true) == verdict  # order-free


def test_verdict_b_needs_five_checks() -> None:
    with pytest.raises(ValueError, match="5"):
        sc.verdict_b([True] * 4)


# --------------------------------------------------------------------------- synthetic (c)


@pytest.mark.parametrize(
    ("p_small", "p_large", "grows"),
    [
        (0.5, sc.P_DECREASE_MIN, True),  # at the bound: >= 0.95
        (0.5, sc.P_DECREASE_MIN * DOWN, False),
        (0.5, sc.P_DECREASE_MIN * UP, True),
        (1.0, 1.0, False),  # no growth
        (0.99, 0.98, False),
    ],
)
def test_p_decrease_grows(p_small: float, p_large: float, grows: bool) -> None:
    assert sc.p_decrease_grows(p_small, p_large) is grows


def test_coarser_for_small_batch_is_strict() -> None:
    assert sc.coarser_for_small_batch(1e-3 * UP, 1e-3)
    assert not sc.coarser_for_small_batch(1e-3, 1e-3)
    assert not sc.coarser_for_small_batch(1e-3 * DOWN, 1e-3)


@pytest.mark.parametrize(
    ("n_true", "n", "verdict"),
    [
        (9, 9, "reproduced"),
        (8, 9, "partly"),
        (5, 9, "partly"),  # 5 >= 4.5
        (4, 9, "not"),
        (2, 4, "partly"),  # exactly half counts
        (1, 4, "not"),
        (0, 9, "not"),
    ],
)
def test_verdict_c_wins_at_least_half(n_true: int, n: int, verdict: str) -> None:
    assert sc.verdict_c([True] * n_true + [False] * (n - n_true)) == verdict


def test_small_lr_index_is_the_largest_lr_at_most_1e_2() -> None:
    assert sc.small_lr_index([1e-5, 1e-3, 1e-2, 1e-1]) == 2
    assert sc.small_lr_index([1e-5, 1e-2 * DOWN, 1e-2 * UP]) == 1


# --------------------------------------------------------------------------- table1


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ((0.1, 90.0), (0.2, 80.0), (True, True)),
        ((0.2, 90.0), (0.2, 80.0), (False, True)),  # equal loss is not lower
        ((0.1, 80.0), (0.2, 80.0), (True, False)),  # equal accuracy is not higher
        ((0.3, 70.0), (0.2, 80.0), (False, False)),
        (None, (0.2, 80.0), (False, False)),  # a diverged cell loses
        ((9.0, 10.0), None, (True, True)),  # ... to anything
        (None, None, (False, False)),
    ],
)
def test_better(a, b, expected) -> None:
    assert tc.better(a, b) == expected


@pytest.mark.parametrize(
    ("hits", "total", "verdict"),
    [(8, 8, "reproduced"), (7, 8, "partly"), (1, 8, "partly"), (0, 8, "not"), (1, 1, "reproduced")],
)
def test_verdict_count(hits: int, total: int, verdict: str) -> None:
    assert tc.verdict_count(hits, total) == verdict


@pytest.mark.parametrize(
    ("hits", "total", "name"), [(0, 0, "total"), (3, 2, "hits"), (-1, 2, "hits")]
)
def test_verdict_count_rejects_impossible_counts(hits: int, total: int, name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        tc.verdict_count(hits, total)


def test_within_published_is_strict_at_half_a_point() -> None:
    assert 99.0 - 98.5 == tc.ABS_TOL_PTS  # exactly at the tolerance
    assert not tc.within_published(99.0, 98.5)
    assert not tc.within_published(98.0, 98.5)  # from below too
    assert tc.within_published(98.5 + tc.ABS_TOL_PTS * DOWN, 98.5)
    assert not tc.within_published(98.5 + tc.ABS_TOL_PTS * UP, 98.5)


def _cell(loss: float | None, acc: float | None = None, val: float = 0.5) -> dict:
    if loss is None:
        return {"metrics": None}
    return {"metrics": {"final_train_loss": loss, "test_acc": acc, "final_val_acc": val}}


def test_cell_numbers_use_the_test_accuracy_then_the_validation_one() -> None:
    assert tc.cell_numbers(_cell(0.1, 0.9, 0.5)) == (0.1, 90.0)
    assert tc.cell_numbers(_cell(0.1, None, 0.5)) == (0.1, 50.0)
    assert tc.cell_numbers(_cell(None)) is None and tc.cell_numbers(None) is None


def _table(cells: dict[str, tuple[float, float] | None]) -> dict:
    return {"cells": {k: _cell(*v) if v else _cell(None) for k, v in cells.items()}}


GOOD = {  # ReLU / clipped ReLU beat identity, 4 bits beat 2 bits: every comparison holds
    "a2-ste": (0.5, 0.80),
    "a2-relu": (0.3, 0.85),
    "a2-clipped_relu": (0.2, 0.86),
    "a4-ste": (0.4, 0.82),
    "a4-relu": (0.2, 0.87),
    "a4-clipped_relu": (0.1, 0.88),
}


@pytest.mark.parametrize(
    ("change", "ste_order", "bits_order"),
    [
        ({}, "reproduced", "reproduced"),
        ({"a2-ste": (0.25, 0.80)}, "partly", "partly"),  # identity's 2-bit loss beats ReLU's
        ({"a4-ste": None}, "reproduced", "partly"),  # a diverged cell loses every comparison
        (
            {"a2-ste": (0.01, 0.99), "a4-ste": (0.01, 0.99)},
            "not",
            "partly",
        ),  # identity beats both everywhere: no hit
    ],
)
def test_claims_for_counts_comparisons(change: dict, ste_order: str, bits_order: str) -> None:
    p = Protocol(net="lenet5", data="digits")
    claims = {c.id: c for c in tc.claims_for(p, _table({**GOOD, **change}))}
    assert set(claims) == {"ste-order", "bits-order"}  # LeNet-5 on digits: no more
    assert (claims["ste-order"].verdict, claims["bits-order"].verdict) == (ste_order, bits_order)


def test_claims_for_absolute_only_on_the_papers_data() -> None:
    p = Protocol(net="lenet5", data="mnist")
    pub = {k: tc.PUBLISHED[("lenet5", int(k[1]), k[3:])][1] for k in GOOD}
    cells = {k: (0.1, (pub[k] + tc.ABS_TOL_PTS * DOWN) / 100) for k in GOOD}
    claims = {c.id: c for c in tc.claims_for(p, _table(cells))}
    assert claims["absolute"].verdict == "reproduced"
    cells["a2-ste"] = (0.1, (pub["a2-ste"] + 1.0) / 100)
    claims = {c.id: c for c in tc.claims_for(p, _table(cells))}
    assert claims["absolute"].verdict == "partly"
    limited = Protocol(net="lenet5", data="mnist", limit=100)
    assert "absolute" not in {c.id for c in tc.claims_for(limited, _table(cells))}


def test_claims_for_crelu_vs_relu_on_deep_nets() -> None:
    p = Protocol(net="vgg11", data="digits")
    ids = [c.id for c in tc.claims_for(p, _table(GOOD))]
    assert ids == ["ste-order", "bits-order", "crelu-vs-relu"]
    flipped = {**GOOD, "a2-clipped_relu": (0.4, 0.84), "a4-clipped_relu": (0.3, 0.86)}
    claims = {c.id: c for c in tc.claims_for(p, _table(flipped))}
    assert claims["crelu-vs-relu"].verdict == "not"


# --------------------------------------------------------------------------- instability


def test_effect_vs_control_of_a_diverged_run() -> None:
    end, ctrl = {"val_acc": 0.5, "train_loss": 1.0}, {"val_acc": 0.9, "train_loss": 0.1}
    assert ic.effect_vs_control(None, ctrl) == {
        "acc_below_control_pts": math.inf,
        "loss_over_control": math.inf,
        "shows": True,
    }
    assert ic.effect_vs_control(end, None) is None  # nothing to compare with
    assert ic.effect_vs_control(end, ctrl) == ic.effect(end, ctrl)


def test_effect_just_around_both_thresholds() -> None:
    ctrl = {"val_acc": 0.5, "train_loss": 1.0}
    drop = ic.ACC_DROP / 100
    assert ic.effect({"val_acc": 0.5 - drop * UP, "train_loss": ic.LOSS_RATIO * UP}, ctrl)["shows"]
    for acc, loss in [(0.5 - drop * DOWN, ic.LOSS_RATIO * UP), (0.5 - drop * UP, ic.LOSS_RATIO)]:
        assert not ic.effect({"val_acc": acc, "train_loss": loss}, ctrl)["shows"]


def test_effect_floors_the_controls_loss() -> None:
    e = ic.effect({"val_acc": 0.0, "train_loss": 1.0}, {"val_acc": 0.5, "train_loss": 0.0})
    assert e["loss_over_control"] == 1.0 / ic.LOSS_FLOOR and e["shows"]


def _results(shows_at: dict[str, bool]) -> dict:
    end = {"val_acc": 0.8, "train_loss": 0.3}
    runs = {}
    for lr, shows in shows_at.items():
        eff = {"acc_below_control_pts": 2.0, "loss_over_control": 2.0, "shows": shows}
        runs[lr] = {
            "ste": {"end": end, "history": [], "effect": eff},
            "clipped_relu": {"end": end, "history": []},
        }
    return {"clipped_relu-a4": runs}


@pytest.mark.parametrize(
    ("shows_at", "verdict"),
    [
        ({"1e-05": True, "0.001": True}, "reproduced"),
        ({"1e-05": True, "0.001": False}, "reproduced"),
        ({"1e-05": False, "0.001": True}, "partly"),  # only a larger lr counts for partly
        ({"1e-05": False, "0.001": False}, "not"),  # no hit
    ],
)
def test_instability_claim_counts_the_paper_scaled_lr(shows_at: dict, verdict: str) -> None:
    p = Protocol(net="resnet20", data="digits", bits=(4,))
    start = {"clipped_relu-a4": {"val_acc": 0.9, "train_loss": 0.1}}
    [claim] = ic.claims_for(_results(shows_at), start, ("clipped_relu",), (4,), p, 3, "1e-05")
    assert claim.id == "ste-leaves-clipped_relu-a4" and claim.verdict == verdict
    shown = [lr for lr, s in shows_at.items() if s]
    assert (f"shows at lr {', '.join(shown)}" if shown else "shows at none") in claim.evidence


# --------------------------------------------------------------------------- survivors of a
# mutation sample (docs/testing.md): the evidence text and the rules away from zero


def test_settles_measures_the_distance_to_a_nonzero_f_spurious() -> None:
    f_sp = 0.5
    assert sc.settles(f_sp + sc.TOL_LOSS * DOWN, math.pi, f_sp)
    assert sc.settles(f_sp - sc.TOL_LOSS * DOWN, math.pi, f_sp)
    assert not sc.settles(f_sp + sc.TOL_LOSS * UP, math.pi, f_sp)
    assert not sc.settles(0.0, math.pi, f_sp)


@pytest.mark.parametrize(
    ("x", "text"),
    [
        (None, "None"),
        (math.nan, "nan"),
        (math.inf, "inf"),
        (1.23456, "1.23"),
        (0.0, "0"),
        (1.5e-5, "1.50e-05"),
        (12345.0, "1.23e+04"),
    ],
)
def test_fmt(x, text) -> None:
    assert sc.fmt(x) == text


def test_bits_order_evidence_lists_every_ste() -> None:
    p = Protocol(net="lenet5", data="digits")
    claims = {c.id: c for c in tc.claims_for(p, _table(GOOD))}
    ev = claims["bits-order"].evidence
    assert ev.startswith("6/6 comparisons hold (2-bit -> 4-bit")
    for est in ("ste", "relu", "clipped_relu"):
        a2, a4 = GOOD[f"a2-{est}"], GOOD[f"a4-{est}"]
        line = (
            f"{tc.LABELS[est]} {a2[0]:.2f} / {100 * a2[1]:.2f} -> {a4[0]:.2f} / {100 * a4[1]:.2f}"
        )
        assert line in ev


def test_instability_evidence_shows_the_last_epochs_train_mode_loss() -> None:
    p = Protocol(net="resnet20", data="digits", bits=(4,))
    start = {"clipped_relu-a4": {"val_acc": 0.9, "train_loss": 0.1}}
    results = _results({"1e-05": True})
    run = results["clipped_relu-a4"]["1e-05"]
    run["ste"]["history"] = [{"train_loss": 0.111}, {"train_loss": 0.222}]
    run["clipped_relu"]["history"] = [{"train_loss": 0.333}, {"train_loss": 0.444}]
    last = {"clipped_relu-a4": {"train_loss": 0.05}}
    [claim] = ic.claims_for(results, start, ("clipped_relu",), (4,), p, 3, "1e-05", last)
    assert "source -> 0.222, control 0.444]" in claim.evidence


def test_published_table_has_every_cell_once():
    """[Y19] Table 1: three nets x 2 and 4 bits x three STEs, (loss, accuracy %) each,
    accuracies in (0, 100); keys outside that grid would never be looked up."""
    nets, ests = ("lenet5", "vgg11", "resnet20"), ("ste", "relu", "clipped_relu")
    assert set(tc.PUBLISHED) == {(n, b, e) for n in nets for b in (2, 4) for e in ests}
    assert all(loss > 0 and 0 < acc < 100 for loss, acc in tc.PUBLISHED.values())
    assert set(tc.PUBLISHED_DATA) == set(nets)


# [Y19] Table 1 typed a second time, in the paper's own layout (one row per data set,
# net and bit width; "training loss / validation accuracy %" per STE), separately from
# table1_claims.PUBLISHED: a typo or a nudged number in either copy shows up as a
# difference between the two.
_TABLE1_AS_PRINTED = """
MNIST    | LeNet-5   | 2 | 2.6e-2 / 98.49 | 5.1e-3 / 99.24 | 5.4e-3 / 99.23
MNIST    | LeNet-5   | 4 | 6.0e-3 / 98.98 | 9.0e-4 / 99.32 | 8.8e-4 / 99.24
CIFAR-10 | VGG-11    | 2 | 0.19 / 86.58   | 0.10 / 88.69   | 0.02 / 90.92
CIFAR-10 | VGG-11    | 4 | 3.1e-2 / 90.19 | 1.5e-3 / 92.01 | 1.3e-3 / 92.08
CIFAR-10 | ResNet-20 | 2 | 1.56 / 46.52   | 1.50 / 48.05   | 0.24 / 88.39
CIFAR-10 | ResNet-20 | 4 | 1.38 / 54.16   | 0.25 / 86.59   | 0.04 / 91.24
"""


def test_published_table_matches_a_second_transcription():
    nets = {label: net for net, label in tc.NET_LABELS.items()}
    ests = ("ste", "relu", "clipped_relu")  # the paper's column order: identity, ReLU, clipped ReLU
    second: dict[tuple[str, int, str], tuple[float, float]] = {}
    for line in _TABLE1_AS_PRINTED.strip().splitlines():
        data, net, bits, *cells = (c.strip() for c in line.split("|"))
        assert tc.PUBLISHED_DATA[nets[net]] == data
        for est, cell in zip(ests, cells, strict=True):
            loss, acc = (float(v) for v in cell.split("/"))
            second[(nets[net], int(bits), est)] = (loss, acc)
    assert len(second) == 18
    assert tc.PUBLISHED == second  # exact: both are the same decimal literals


def _part_c(firsts: dict[str, list[float]]) -> dict:
    """Part (c)'s numbers for claim (c): descent at the small lr everywhere, P(decrease)
    0.6 -> 0.99 from B = 10 to 1000, and the given median first-flip lrs per STE."""
    c: dict = {"lrs": [1e-3, 1e-2, 1e-1]}
    for ste in sc.STES:
        c[ste] = {
            b: {
                "p_decrease_pop": [p] * 3,
                "mean_df_pop": [-1e-3] * 3,
                "median_first_flip_lr": f,
            }
            for b, p, f in zip(sc.BATCHES, (0.6, 0.8, 0.99), firsts[ste], strict=True)
        }
    return c


def test_claim_c_compares_the_smallest_and_largest_batchs_first_flip() -> None:
    """The coarse-scale check compares B = 10 (first) with B = 1000 (last), not B = 10
    with itself; each STE's line lists the three first-flip lrs in batch order."""
    coarser = {ste: [1e-2, 5e-3, 1e-3] for ste in sc.STES}  # small batch: coarser
    claim = sc.claim_c(_part_c(coarser))
    assert all(claim.checks[f"{ste}_coarser_scale_for_small_batch"] for ste in sc.STES)
    assert claim.verdict == "reproduced"
    assert "0.01, 0.005, 0.001 for B = 10, 50, 1000" in claim.evidence
    finer = {**coarser, sc.STES[0]: [1e-3, 5e-3, 1e-2]}  # one STE the other way round
    claim = sc.claim_c(_part_c(finer))
    assert not claim.checks[f"{sc.STES[0]}_coarser_scale_for_small_batch"]


def test_instability_evidence_names_a_diverged_control() -> None:
    p = Protocol(net="resnet20", data="digits", bits=(4,))
    start = {"clipped_relu-a4": {"val_acc": 0.9, "train_loss": 0.1}}
    results = _results({"1e-05": True, "0.001": True})
    results["clipped_relu-a4"]["0.001"]["clipped_relu"]["end"] = None  # control diverged
    [claim] = ic.claims_for(results, start, ("clipped_relu",), (4,), p, 3, "1e-05")
    per_lr = claim.evidence.split("; ")
    assert sum("(control diverged" in part for part in per_lr) == 1
    assert "(control 80.00%, 0.3" in claim.evidence  # the other lr's control, as numbers


def test_instability_evidence_names_a_diverged_run() -> None:
    p = Protocol(net="resnet20", data="digits", bits=(4,))
    start = {"clipped_relu-a4": {"val_acc": 0.9, "train_loss": 0.1}}
    results = _results({"1e-05": True, "0.001": True})
    results["clipped_relu-a4"]["0.001"]["ste"]["end"] = None  # the identity run diverged
    [claim] = ic.claims_for(results, start, ("clipped_relu",), (4,), p, 3, "1e-05")
    assert "lr 0.001: identity diverged (control 80.00%, 0.3" in claim.evidence
    assert "lr 1e-05: val acc 90.00 -> 80.00%, train loss 0.1 -> 0.3" in claim.evidence


def test_ste_order_evidence_counts_each_kind_of_comparison() -> None:
    p = Protocol(net="lenet5", data="digits")
    change = {"a2-ste": (0.25, 0.80)}  # identity's 2-bit loss beats ReLU's, not clipped's
    claims = {c.id: c for c in tc.claims_for(p, _table({**GOOD, **change}))}
    assert claims["ste-order"].evidence.startswith(
        "7/8 comparisons hold (lower loss 3/4, higher accuracy 4/4; loss / test accuracy %, "
        "one seed): "
    )


def _part_a(outcome: list[str], final_theta: list[float]) -> dict:
    """Part (a)'s numbers for claim (a): every run monotone, cosines nonnegative, and
    the given outcomes and final angles, the same for every family and STE."""
    run = {
        "outcome": outcome,
        "final_theta": final_theta,
        "max_loss_increase_per_run": [0.0] * len(outcome),
        "min_w_norm_per_run": [1.0] * len(outcome),
        "max_loss_increase": 0.0,
        "min_cosine": 0.5,
    }
    return {fam: {ste: dict(run) for ste in sc.STES} for fam in ("gaussian", "basin")}


def test_claim_a_reports_the_largest_final_angle_among_the_global_runs() -> None:
    claim = sc.claim_a(_part_a(["global", "spurious", "global"], [1e-3, 3.14, 4e-3]))
    for ste in sc.STES:
        assert (
            f"gaussian/{ste}: 2/3 global, 1 spurious, max final theta among global "
            f"{sc.fmt(4e-3)}," in claim.evidence
        )
    assert claim.verdict == "partly"  # the basin runs are not all global


def test_claim_a_is_reproduced_when_every_basin_run_is_global() -> None:
    claim = sc.claim_a(_part_a(["global", "global"], [1e-3, 2e-3]))
    assert claim.verdict == "reproduced"
    assert all(f"basin/{ste}: 2/2 global, 0 spurious" in claim.evidence for ste in sc.STES)


def test_instability_evidence_keeps_the_run_the_control_and_the_train_mode_loss() -> None:
    p = Protocol(net="resnet20", data="digits", bits=(4,))
    start = {"clipped_relu-a4": {"val_acc": 0.9, "train_loss": 0.1}}
    results = _results({"1e-05": True})
    run = results["clipped_relu-a4"]["1e-05"]
    run["ste"]["history"] = [{"train_loss": 0.222}]
    run["clipped_relu"]["history"] = [{"train_loss": 0.444}]
    last = {"clipped_relu-a4": {"train_loss": 0.05}}
    [claim] = ic.claims_for(results, start, ("clipped_relu",), (4,), p, 3, "1e-05", last)
    assert (
        "lr 1e-05: val acc 90.00 -> 80.00%, train loss 0.1 -> 0.3 (control 80.00%, 0.3; "
        "2.00 pts below it, loss ×2.00)" in claim.evidence
    )
    assert "source -> 0.222, control 0.444]" in claim.evidence


def test_claims_for_skips_a_comparison_whose_cell_is_missing() -> None:
    """A table without the 4-bit ReLU cell (not run, as opposed to diverged): its two
    comparisons are left out, not counted as lost."""
    p = Protocol(net="lenet5", data="digits")
    table = _table({k: v for k, v in GOOD.items() if k != "a4-relu"})
    claims = {c.id: c for c in tc.claims_for(p, table)}
    assert claims["ste-order"].evidence.startswith("6/6 comparisons hold")
    assert claims["ste-order"].verdict == "reproduced"


@pytest.mark.parametrize("cell", ["a4-relu", "a4-clipped_relu"])
def test_crelu_vs_relu_skips_a_bit_width_with_either_cell_missing(cell: str) -> None:
    """The deeper nets' clipped-ReLU-vs-ReLU claim compares a bit width only where both
    cells ran: with either 4-bit cell missing, the 2-bit pair alone is counted."""
    p = Protocol(net="resnet20", data="digits")
    full = {c.id: c for c in tc.claims_for(p, _table(GOOD))}["crelu-vs-relu"]
    assert full.evidence.count("-bit clipped ReLU") == 2
    table = _table({k: v for k, v in GOOD.items() if k != cell})
    claim = {c.id: c for c in tc.claims_for(p, table)}["crelu-vs-relu"]
    assert claim.evidence.count("-bit clipped ReLU") == 1
    assert "/2 comparisons hold: 2-bit clipped ReLU" in claim.evidence


# the whole evidence text of each claim on hand-made numbers, written out: a dropped or
# altered part of it (a mutation of the text) fails here


def test_claim_a_evidence_in_full() -> None:
    claim = sc.claim_a(_part_a(["global", "spurious", "global"], [1e-3, 3.14, 4e-3]))
    line = (
        "{}/{}: 2/3 global, 1 spurious, max final theta among global 0.004, "
        "max loss increase 0, min cos 0.5"
    )
    fams = ("gaussian", "basin")
    assert claim.evidence == "; ".join(line.format(f, s) for f in fams for s in sc.STES)


def test_claim_c_evidence_in_full() -> None:
    claim = sc.claim_c(_part_c({ste: [1e-2, 5e-3, 1e-3] for ste in sc.STES}))
    line = (
        "{}: at lr 0.01 P(f decreases) = 0.60 (B=10), 0.80 (B=50), 0.99 (B=1000); median "
        "smallest lr that flips an activation on the batch 0.01, 0.005, 0.001 for B = 10, "
        "50, 1000"
    )
    assert claim.evidence == "; ".join(line.format(s) for s in sc.STES)


def test_table1_evidence_in_full() -> None:
    p = Protocol(net="lenet5", data="digits")
    claims = {c.id: c for c in tc.claims_for(p, _table(GOOD))}
    held = "(loss lower, accuracy higher)"
    assert claims["ste-order"].evidence == (
        "8/8 comparisons hold (lower loss 4/4, higher accuracy 4/4; loss / test accuracy %, "
        f"one seed): 2-bit ReLU 0.30 / 85.00 vs identity 0.50 / 80.00 {held}; "
        f"2-bit clipped ReLU 0.20 / 86.00 vs identity 0.50 / 80.00 {held}; "
        f"4-bit ReLU 0.20 / 87.00 vs identity 0.40 / 82.00 {held}; "
        f"4-bit clipped ReLU 0.10 / 88.00 vs identity 0.40 / 82.00 {held}"
    )
    assert claims["bits-order"].evidence == (
        "6/6 comparisons hold (2-bit -> 4-bit, loss / test accuracy %): identity 0.50 / 80.00 "
        "-> 0.40 / 82.00; ReLU 0.30 / 85.00 -> 0.20 / 87.00; clipped ReLU 0.20 / 86.00 -> "
        "0.10 / 88.00"
    )


def test_absolute_and_crelu_evidence_in_full() -> None:
    p = Protocol(net="lenet5", data="mnist")
    pub = {k: tc.PUBLISHED[("lenet5", int(k[1]), k[3:])][1] for k in GOOD}
    cells = {k: (0.1, (pub[k] + 0.25) / 100) for k in GOOD}
    cells["a2-ste"] = (0.1, (pub["a2-ste"] + 1.0) / 100)  # 1 point off: not within 0.5
    claims = {c.id: c for c in tc.claims_for(p, _table(cells))}
    assert claims["absolute"].evidence == (
        "a2-clipped_relu: 99.48 vs 99.23; a2-relu: 99.49 vs 99.24; a4-clipped_relu: 99.49 vs "
        "99.24; a4-relu: 99.57 vs 99.32; a4-ste: 99.23 vs 98.98; a2-ste: 99.49 vs 98.49"
    )
    deep = {c.id: c for c in tc.claims_for(Protocol(net="vgg11", data="digits"), _table(GOOD))}
    assert deep["crelu-vs-relu"].evidence == (
        "4/4 comparisons hold: 2-bit clipped ReLU 0.20 / 86.00 vs ReLU 0.30 / 85.00; 4-bit "
        "clipped ReLU 0.10 / 88.00 vs ReLU 0.20 / 87.00"
    )


def _part_b(**change) -> dict:
    """Part (b)'s numbers where every check of claim (b) holds: |E g_id| equal to its
    formula, ReLU's and clipped ReLU's zero, both settled at f_spurious 0.5 with theta = pi,
    identity left (tail 0.9 > 0.5 + margin, max 1.5 > start 0.51), ratio slope -1 with a
    1e4-fold rise."""
    b = {
        "f_spurious": 0.5,
        "start_loss": 0.51,
        "identity_norm_formula": 0.123456,
        "at_spurious": {
            "identity": {"norm_Eg_w": 0.123456},
            "relu": {"norm_Eg_w": 0.0},
            "clipped_relu": {"norm_Eg_w": 0.0},
        },
        "relu": {"tail_mean_loss": 0.5, "final_theta": math.pi},
        "clipped_relu": {"tail_mean_loss": 0.5, "final_theta": math.pi},
        "identity": {"tail_mean_loss": 0.9, "max_loss": 1.5, "final_w_norm": 0.2},
        "ratio": {
            "identity": {"loglog_slope_small_t": -1.0, "ratio": [1e4, 1.0]},
            "t": [1e-4, 1e-1],
        },  # fmt: skip
    }
    b.update(change)
    return b


def test_claim_b_checks_and_evidence_in_full() -> None:
    claim = sc.claim_b(_part_b())
    assert claim.verdict == "reproduced" and all(claim.checks.values())
    assert claim.evidence == (
        "|E g_id| at the spurious minimizer 0.123456 vs formula 0.123456; |E g_relu|, "
        "|E g_crelu| there 0, 0. Started at distance 0.05 (f = 0.51, f_spurious = 0.5): "
        "ReLU mean loss over the last quarter 0.5, clipped ReLU 0.5; identity 0.9 (max 1.5, "
        "final |w| 0.2). Ratio |E g_id|^2/(|df/dv|^2+⟨E g_id, df/dw⟩) grows like t^-1 as the "
        "distance t -> 0 (from 1 at t=0.1 to 1.00e+04 at t=1.00e-04)."
    )
    # each check reads its own numbers: identity staying below f_sp + margin fails only
    # the "leaves" check, a ReLU run away from f_sp only the "settle" check
    stay = sc.claim_b(_part_b(identity={"tail_mean_loss": 0.5, "max_loss": 1.5,
                                        "final_w_norm": 0.2}))  # fmt: skip
    assert [k for k, v in stay.checks.items() if not v] == ["identity_leaves_and_loss_rises"]
    moved = sc.claim_b(_part_b(relu={"tail_mean_loss": 0.3, "final_theta": math.pi}))
    assert [k for k, v in moved.checks.items() if not v] == ["relu_crelu_settle"]
    nonzero = _part_b()
    nonzero["at_spurious"] = {**nonzero["at_spurious"], "clipped_relu": {"norm_Eg_w": 1e-3}}
    assert [k for k, v in sc.claim_b(nonzero).checks.items() if not v] == [
        "relu_crelu_zero_at_spurious"
    ]


def test_claim_a_names_the_collapsed_runs_and_a_rise_away_from_zero() -> None:
    """A run whose |w| fell below W_COLLAPSE is named in the evidence; when f also rose
    in a run whose |w| stayed away from 0, that is said too (monotone fails for it)."""
    a = _part_a(["global", "global"], [1e-3, 2e-3])
    r = a["gaussian"]["relu"] = dict(a["gaussian"]["relu"])
    r["min_w_norm_per_run"] = [sc.W_COLLAPSE * DOWN, 1.0]
    claim = sc.claim_a(a)
    tail = (
        f"|w| collapsed below {sc.W_COLLAPSE} in gaussian/relu#0 (the ReLU coarse gradient "
        "does not shrink with |w|; crossing w = 0 flips theta and f jumps)"
    )
    assert claim.evidence.endswith("; " + tail)
    r["max_loss_increase_per_run"] = [0.0, 1.0]  # run 1 rose with |w| = 1
    assert sc.claim_a(a).evidence.endswith(
        tail + "; f also rose in runs where |w| stayed away from 0"
    )
