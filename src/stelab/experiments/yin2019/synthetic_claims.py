"""The claims of the ``synthetic`` part and their verdict rules.

Every rule is a small public function of plain numbers with its thresholds as named
module constants, so a test can pin each one at its threshold
(tests/test_yin2019_verdicts.py). :func:`claim_a`, :func:`claim_b` and :func:`claim_c`
apply the rules to the numbers :mod:`.synthetic` computed and build the
:class:`~stelab.experiments.spine.Claim` with its evidence.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ...theory.two_layer import STES
from ..spine import Claim, ladder

__all__ = [
    "B_PARTLY_MIN",
    "BLOWUP_FACTOR",
    "LEAVE_MARGIN",
    "NORM_RTOL",
    "P_DECREASE_MIN",
    "SLOPE_MAX",
    "TOL_COS",
    "TOL_LOSS",
    "TOL_MONO",
    "TOL_SETTLE",
    "TOL_THETA",
    "W_COLLAPSE",
    "ZERO_NORM",
    "claim_a",
    "claim_b",
    "claim_c",
    "coarser_for_small_batch",
    "collapsed",
    "cos_nonneg",
    "fmt",
    "leaves",
    "monotone",
    "norm_matches_formula",
    "outcome",
    "small_lr_index",
    "p_decrease_grows",
    "ratio_blows_up",
    "settles",
    "vanishes",
    "verdict_a",
    "verdict_b",
    "verdict_c",
]

BATCHES = ("10", "50", "1000")  # the batch sizes of part (c), smallest first

# where a run ended (claim a) and whether ReLU / clipped ReLU settle (claim b)
TOL_THETA = 1e-2  # final theta within this of 0 or pi ...
TOL_LOSS = 1e-4  # ... and final loss within this of the critical value
TOL_SETTLE = 1e-9  # a loss increase above this late in a run: oscillating
# claim (a)
W_COLLAPSE = 0.05  # |w| below this somewhere in a run: "collapsed" towards w = 0
TOL_MONO = 1e-12  # a loss increase above this between two steps: not monotone
TOL_COS = -1e-6  # cos(E g, df/dw) at least this: positively correlated (rounding allowed)
# claim (b)
NORM_RTOL = 1e-10  # |E g_id| at the spurious minimizer vs the closed form, relative
ZERO_NORM = 1e-12  # |E g| below this: vanishes
LEAVE_MARGIN = 1e-3  # identity's late mean loss at least this above f_spurious: it left
SLOPE_MAX = -0.8  # log-log slope of the descent ratio as t -> 0 below this: blows up ...
BLOWUP_FACTOR = 1e3  # ... and the ratio grows by more than this factor along the path
B_PARTLY_MIN = 3  # claim (b) is "partly" with at least this many of its five checks
# claim (c)
P_DECREASE_MIN = 0.95  # P(f decreases) of a B = 1000 step at small lr at least this


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for the evidence and the report: ``digits`` significant digits,
    scientific notation when tiny or huge."""
    if x is None or not math.isfinite(x):
        return str(x)
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e4):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


# --------------------------------------------------------------------------- claim (a)


def outcome(theta: float, loss: float, rise: float, f_sp: float) -> str:
    """Where a run ended: "global", "spurious", "oscillating" or "other" (still moving).

    ``rise`` is the largest loss increase between records over the last 10% of them:
    above ``TOL_SETTLE`` the run oscillates; else "global" if ``theta < TOL_THETA`` and
    ``loss < TOL_LOSS``, "spurious" if ``theta > pi - TOL_THETA`` and
    ``|loss - f_sp| < TOL_LOSS``.
    """
    if rise > TOL_SETTLE:
        return "oscillating"
    if theta < TOL_THETA and loss < TOL_LOSS:
        return "global"
    if theta > math.pi - TOL_THETA and abs(loss - f_sp) < TOL_LOSS:
        return "spurious"
    return "other"


def monotone(max_increase: float) -> bool:
    """A run decreased f monotonically: its largest step-to-step increase ≤ ``TOL_MONO``."""
    return max_increase <= TOL_MONO


def collapsed(min_w_norm: float) -> bool:
    """|w| fell below ``W_COLLAPSE`` somewhere in a run."""
    return min_w_norm < W_COLLAPSE


def cos_nonneg(min_cosine: float) -> bool:
    """The coarse gradient correlated positively with the true one: min cos ≥ ``TOL_COS``."""
    return min_cosine >= TOL_COS


def verdict_a(
    *,
    monotone: bool,
    monotone_while_w_away: bool,
    cos_nonneg: bool,
    at_critical_point: bool,
    basin_all_global: bool,
) -> str:
    """Claim (a): ``reproduced`` if ReLU / clipped ReLU descend monotonically in every run,
    correlate positively, end at a critical point, and every STE reaches the global
    minimum from the basin; ``partly`` if monotone only while |w| stays away from 0 (the
    rest holding except the basin check); else ``not``."""
    return ladder(
        reproduced=monotone and cos_nonneg and at_critical_point and basin_all_global,
        partly=monotone_while_w_away and cos_nonneg and at_critical_point,
    )


def _max_where(r: Mapping[str, Any], kind: str) -> float:
    vals = [float(t) for t, o in zip(r["final_theta"], r["outcome"], strict=True) if o == kind]
    return max(vals) if vals else math.nan


def claim_a(a: Mapping[str, Any]) -> Claim:
    """Claim (a) from the numbers of part (a) (``synthetic`` part A)."""
    ok_mono, ok_mono_regular, ok_cos, ok_crit = True, True, True, True
    collapsed_runs: list[str] = []
    for fam in ("gaussian", "basin"):
        for ste in ("relu", "clipped_relu"):
            r = a[fam][ste]
            mono = [monotone(float(x)) for x in r["max_loss_increase_per_run"]]
            coll = [collapsed(float(x)) for x in r["min_w_norm_per_run"]]
            ok_mono &= all(mono)
            ok_mono_regular &= all(m or c for m, c in zip(mono, coll, strict=True))
            collapsed_runs += [f"{fam}/{ste}#{i}" for i, c in enumerate(coll) if c]
            ok_cos &= cos_nonneg(r["min_cosine"])
            ok_crit &= all(o in ("global", "spurious") for o in r["outcome"])
    lines = []
    basin_all_global = all(all(o == "global" for o in a["basin"][ste]["outcome"]) for ste in STES)
    for fam in ("gaussian", "basin"):
        for ste in STES:
            r = a[fam][ste]
            n_glob = sum(o == "global" for o in r["outcome"])
            n_sp = sum(o == "spurious" for o in r["outcome"])
            lines.append(
                f"{fam}/{ste}: {n_glob}/{len(r['outcome'])} global, {n_sp} spurious, "
                f"max final theta among global {fmt(_max_where(r, 'global'))}, "
                f"max loss increase {fmt(r['max_loss_increase'])}, min cos {fmt(r['min_cosine'])}"
            )
    if collapsed_runs:
        lines.append(
            f"|w| collapsed below {W_COLLAPSE} in {', '.join(collapsed_runs)} (the ReLU coarse "
            "gradient does not shrink with |w|; crossing w = 0 flips theta and f jumps)"
            + ("" if ok_mono_regular else "; f also rose in runs where |w| stayed away from 0")
        )
    return Claim(
        id="a",
        text=(
            "ReLU and clipped-ReLU expected coarse gradients correlate positively with the "
            "true gradient; population coarse gradient descent decreases f monotonically for "
            "small lr and converges to a critical point (the global minimum from "
            "initialisations in its basin)."
        ),
        verdict=verdict_a(
            monotone=ok_mono,
            monotone_while_w_away=ok_mono_regular,
            cos_nonneg=ok_cos,
            at_critical_point=ok_crit,
            basin_all_global=basin_all_global,
        ),
        evidence="; ".join(lines),
        checks={
            "relu_crelu_monotone": ok_mono,
            "relu_crelu_monotone_while_w_away_from_0": ok_mono_regular,
            "relu_crelu_cos_nonneg": ok_cos,
            "relu_crelu_end_at_critical_point": ok_crit,
            "basin_inits_all_global_all_stes": basin_all_global,
        },
    )


# --------------------------------------------------------------------------- claim (b)


def norm_matches_formula(norm: float, formula: float) -> bool:
    """|E g_id| at the spurious minimizer equals the closed form (> 0) within
    ``NORM_RTOL`` relative (absolute below 1)."""
    return abs(norm - formula) <= NORM_RTOL * max(1.0, formula) and formula > 0


def vanishes(norm: float) -> bool:
    """An expected coarse gradient norm below ``ZERO_NORM``."""
    return norm < ZERO_NORM


def settles(tail_mean_loss: float, final_theta: float, f_sp: float) -> bool:
    """A run stayed at the spurious minimizer: late mean loss within ``TOL_LOSS`` of
    ``f_sp`` and final theta above pi - ``TOL_THETA``."""
    return abs(tail_mean_loss - f_sp) < TOL_LOSS and final_theta > math.pi - TOL_THETA


def leaves(tail_mean_loss: float, max_loss: float, start_loss: float, f_sp: float) -> bool:
    """A run left the spurious minimizer: late mean loss more than ``LEAVE_MARGIN`` above
    ``f_sp`` and the loss rose above its start somewhere."""
    return tail_mean_loss - f_sp > LEAVE_MARGIN and max_loss > start_loss


def ratio_blows_up(slope: float, ratio_near: float, ratio_far: float) -> bool:
    """The descent ratio blows up towards the minimizer: log-log slope below ``SLOPE_MAX``
    and the ratio nearest it more than ``BLOWUP_FACTOR`` × the farthest."""
    return slope < SLOPE_MAX and ratio_near > BLOWUP_FACTOR * ratio_far


def verdict_b(checks: Sequence[bool]) -> str:
    """Claim (b): ``reproduced`` if all five checks hold, ``partly`` with at least
    ``B_PARTLY_MIN``, else ``not``."""
    if len(checks) != 5:
        raise ValueError(f"checks must hold claim (b)'s 5 booleans, got {len(checks)}")
    n_ok = sum(bool(c) for c in checks)
    return ladder(reproduced=n_ok == 5, partly=n_ok >= B_PARTLY_MIN)


def claim_b(b: Mapping[str, Any]) -> Claim:
    """Claim (b) from the numbers of part (b)."""
    f_sp = b["f_spurious"]
    ident = b["identity"]
    at = b["at_spurious"]
    norm_ok = norm_matches_formula(at["identity"]["norm_Eg_w"], b["identity_norm_formula"])
    relu_zero = all(vanishes(at[s]["norm_Eg_w"]) for s in ("relu", "clipped_relu"))
    settle = all(
        settles(b[s]["tail_mean_loss"], b[s]["final_theta"], f_sp) for s in ("relu", "clipped_relu")
    )
    left = leaves(ident["tail_mean_loss"], ident["max_loss"], b["start_loss"], f_sp)
    slope = b["ratio"]["identity"]["loglog_slope_small_t"]
    r_id = b["ratio"]["identity"]["ratio"]
    blowup = ratio_blows_up(slope, float(r_id[0]), float(r_id[-1]))
    ev = (
        f"|E g_id| at the spurious minimizer {fmt(at['identity']['norm_Eg_w'], 6)} "
        f"vs formula {fmt(b['identity_norm_formula'], 6)}; |E g_relu|, |E g_crelu| there "
        f"{fmt(at['relu']['norm_Eg_w'])}, "
        f"{fmt(at['clipped_relu']['norm_Eg_w'])}. Started at distance 0.05 "
        f"(f = {fmt(b['start_loss'], 5)}, f_spurious = {fmt(f_sp, 6)}): ReLU mean loss over "
        f"the last quarter {fmt(b['relu']['tail_mean_loss'], 8)}, clipped ReLU "
        f"{fmt(b['clipped_relu']['tail_mean_loss'], 8)}; "
        f"identity {fmt(ident['tail_mean_loss'], 5)} "
        f"(max {fmt(ident['max_loss'], 4)}, final |w| {fmt(ident['final_w_norm'])}). "
        f"Ratio |E g_id|^2/(|df/dv|^2+⟨E g_id, df/dw⟩) grows like t^{fmt(slope)} as the "
        f"distance t -> 0 (from {fmt(float(r_id[-1]))} at t={fmt(float(b['ratio']['t'][-1]))} "
        f"to {fmt(float(r_id[0]))} at t={fmt(float(b['ratio']['t'][0]))})."
    )
    return Claim(
        id="b",
        text=(
            "At the spurious minimizer the identity STE's expected coarse gradient is nonzero "
            "(|E g_id| = 2(m-1)/(sqrt(2 pi)(m+1)^2) (1^T v*)^2): identity cannot stay there and "
            "its descent ratio blows up, while ReLU and clipped ReLU settle at it."
        ),
        verdict=verdict_b([norm_ok, relu_zero, settle, left, blowup]),
        evidence=ev,
        checks={
            "identity_norm_matches_formula": norm_ok,
            "relu_crelu_zero_at_spurious": relu_zero,
            "relu_crelu_settle": settle,
            "identity_leaves_and_loss_rises": left,
            "ratio_blows_up": blowup,
        },
    )


# --------------------------------------------------------------------------- claim (c)


def p_decrease_grows(p_small_batch: float, p_large_batch: float) -> bool:
    """P(f decreases) at small lr grows from B = 10 to B = 1000 and reaches
    ``P_DECREASE_MIN`` at B = 1000."""
    return p_small_batch < p_large_batch and p_large_batch >= P_DECREASE_MIN


def coarser_for_small_batch(first_flip_small_batch: float, first_flip_large_batch: float) -> bool:
    """A small batch changes its loss only at a larger lr (a coarser scale) than a large one."""
    return first_flip_small_batch > first_flip_large_batch


def verdict_c(checks: Sequence[bool]) -> str:
    """Claim (c): ``reproduced`` if every check holds, ``partly`` if at least half do,
    else ``not``."""
    if not checks:
        raise ValueError("checks must hold at least one boolean, got none")
    n_ok = sum(bool(c) for c in checks)
    return ladder(reproduced=n_ok == len(checks), partly=n_ok >= len(checks) / 2)


def small_lr_index(lrs: Sequence[float]) -> int:
    """The index of the largest learning rate ≤ 1e-2 (where claim (c) is judged)."""
    return max(i for i, x in enumerate(lrs) if float(x) <= 1e-2)


def claim_c(c: Mapping[str, Any]) -> Claim:
    """Claim (c) from the numbers of part (c)."""
    lrs = c["lrs"]
    small = small_lr_index(lrs)
    checks: dict[str, bool] = {}
    lines = []
    for ste in STES:
        r = c[ste]
        p10 = float(r["10"]["p_decrease_pop"][small])
        p1000 = float(r["1000"]["p_decrease_pop"][small])
        mean_ok = all(float(r[b]["mean_df_pop"][small]) < 0 for b in BATCHES)
        firsts = [r[b]["median_first_flip_lr"] for b in BATCHES]
        checks[f"{ste}_mean_descent_small_lr"] = mean_ok
        checks[f"{ste}_p_decrease_grows_with_batch"] = p_decrease_grows(p10, p1000)
        checks[f"{ste}_coarser_scale_for_small_batch"] = coarser_for_small_batch(
            firsts[0], firsts[-1]
        )
        lines.append(
            f"{ste}: at lr {fmt(float(lrs[small]))} P(f decreases) = {p10:.2f} (B=10), "
            f"{float(r['50']['p_decrease_pop'][small]):.2f} (B=50), {p1000:.2f} (B=1000); "
            "median smallest lr that flips an activation on the batch "
            f"{', '.join(fmt(x) for x in firsts)} "
            f"for B = 10, 50, 1000"
        )
    return Claim(
        id="c",
        text=(
            "With few samples per step (sampled coarse gradients) descent holds only on a "
            "coarse scale: the batch loss is piecewise constant in the step size and a single "
            "step decreases f only with some probability, approaching 1 as the batch grows."
        ),
        verdict=verdict_c(list(checks.values())),
        evidence="; ".join(lines),
        checks=checks,
    )
