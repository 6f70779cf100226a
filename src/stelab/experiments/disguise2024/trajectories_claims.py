"""[S24]'s claims about the lockstep runs and the rules that judge them.

Every verdict is decided by a small pure function of plain numbers (``verdict_*``), its
thresholds named module constants; tests/test_disguise2024_verdicts.py pins each rule
at and around each threshold. :func:`claims` reads the numbers out of a run's results
and builds the :class:`~stelab.experiments.spine.Claim` objects. The rules are stated
in docs/papers/disguise2024.md, section 5.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..spine import Claim, ladder

__all__ = [
    "ADAM_REL_GAP",
    "ALPHA_TOL",
    "MOVED_FLOOR",
    "PLAIN_SLOPE_MAX",
    "SHRINK_SLOPE_MIN",
    "SLOPE_HI",
    "SLOPE_LO",
    "TWIN_RATIO",
    "claims",
    "closed_form_alpha",
    "closest_twin",
    "first_order",
    "relative_gap",
    "verdict_adam",
    "verdict_alpha",
    "verdict_first_order",
    "verdict_sgd",
]

#: largest |α from quadrature - α closed form| that counts as agreement
ALPHA_TOL = 1e-8
#: a twin is the closest when its gap is below this fraction of every other twin's gap
TWIN_RATIO = 0.5
#: the (iii) gap is first order in η when its log-log slope lies in [SLOPE_LO, SLOPE_HI]
SLOPE_LO, SLOPE_HI = 0.8, 1.25
#: ... and the plain STE's gap does not scale with η: |slope of the (i) gap| < this
PLAIN_SLOPE_MAX = 0.3
#: the (iii) gap at least shrinks with η when its slope is above this
SHRINK_SLOPE_MIN = 0.3
#: Adam, short window: the plain-STE gap is at most this fraction of the distance moved
ADAM_REL_GAP = 0.05
#: the distance moved is floored at this (in Δ) when dividing by it
MOVED_FLOOR = 1e-12


# --------------------------------------------------------------------------- rules


def verdict_alpha(worst_abs_diff: float, tol: float = ALPHA_TOL) -> str:
    """``reproduced`` when the largest |α quadrature - α closed form| is ≤ ``tol``, else
    ``not`` (NaN is ``not``)."""
    return "reproduced" if worst_abs_diff <= tol else "not"


def closest_twin(gap: float, *others: float, ratio: float = TWIN_RATIO) -> bool:
    """Whether ``gap`` is below ``ratio`` times the smallest of the ``others``."""
    return gap < ratio * min(others)


def verdict_sgd(held: Sequence[bool]) -> str:
    """SGD runs, one flag per run (the (iii) twin the closest): ``reproduced`` when it held
    in every run, ``partly`` in some, ``not`` in none (or no runs)."""
    return ladder(reproduced=bool(held) and all(held), partly=any(held))


def first_order(slope_iii: float, slope_i: float) -> bool:
    """The (iii) gap scales like η (slope in [SLOPE_LO, SLOPE_HI]) and the (i) gap does not
    (|slope| < PLAIN_SLOPE_MAX)."""
    return SLOPE_LO <= slope_iii <= SLOPE_HI and abs(slope_i) < PLAIN_SLOPE_MAX


def verdict_first_order(slopes: Sequence[tuple[float, float]]) -> str:
    """One ``(slope of the (iii) gap, slope of the (i) gap)`` per optimizer of the
    learning-rate sweep: ``reproduced`` when every optimizer is :func:`first_order`;
    ``partly`` when some is, or every (iii) slope is > SHRINK_SLOPE_MIN; else ``not``."""
    first = [first_order(s3, s1) for s3, s1 in slopes]
    shrinking = [s3 > SHRINK_SLOPE_MIN for s3, _ in slopes]
    return ladder(
        reproduced=bool(first) and all(first),
        partly=any(first) or (bool(shrinking) and all(shrinking)),
    )


def relative_gap(gap: float, moved: float) -> float:
    """The plain-STE gap as a fraction of the distance the custom weights moved."""
    return gap / max(moved, MOVED_FLOOR)


def verdict_adam(closest: Sequence[bool], rel_gaps: Sequence[float]) -> str:
    """Adam: ``closest`` has one flag per main Adam run (the plain STE the closest twin),
    ``rel_gaps`` one :func:`relative_gap` per run of the window sweep. ``reproduced``: the
    plain STE is the closest in every main run and some window run has a relative gap
    ≤ ADAM_REL_GAP; ``partly``: either holds somewhere; ``not``: neither."""
    short = any(g <= ADAM_REL_GAP for g in rel_gaps)
    return ladder(reproduced=bool(closest) and all(closest) and short, partly=any(closest) or short)


def closed_form_alpha(est: str, params: Mapping[str, float]) -> float | None:
    """α from the closed forms in docs/papers/disguise2024.md (k in units of 1/Δ for DSQ).

    None if none is known.
    """
    if est == "cosine":
        return math.sqrt(1 - params["a"] ** 2)
    if est == "dsq":
        k = params["k"]
        return k / math.tanh(k / 2) / (1 + math.sinh(k) / k)
    return None


# --------------------------------------------------------------------------- claims


def claims(res: Mapping[str, Any]) -> list[Claim]:
    """[S24]'s claims, each with a verdict decided by the numbers of this run (a claim
    whose runs are absent is left out, never given an invented verdict)."""
    out: list[Claim] = []
    main = res["main"]

    seen, errs = set(), []
    for r in main:
        key = (r["estimator"], json.dumps(r["params"], sort_keys=True))
        want = closed_form_alpha(r["estimator"], r["params"])
        if key in seen or want is None:
            continue
        seen.add(key)
        errs.append((r["estimator"], r["params"], r["alpha"], want, abs(r["alpha"] - want)))
    if errs:
        worst = max(e[-1] for e in errs)
        out.append(
            Claim(
                "alpha",
                "The learning-rate factor is the harmonic mean of q̂' over a bin: α = √(1-a²) "
                "for 1 + a·cos(2πw/Δ), α = k·coth(k/2)/(1 + sinh(k)/k) for DSQ (kΔ = k).",
                verdict_alpha(worst),
                "; ".join(
                    f"{e} {p}: quadrature {a:.10f} vs closed form {w:.10f} (|diff| {d:.1e})"
                    for e, p, a, w, d in errs
                ),
                checks={"worst_abs_diff": worst, "tol": ALPHA_TOL},
            )
        )

    sgd = [r for r in main if r["optimizer"].lower() != "adam"]
    if sgd:
        held = [
            closest_twin(
                r["final"]["gap_M_mean_iii"],
                r["final"]["gap_M_mean_i"],
                r["final"]["gap_M_mean_ii"],
            )
            for r in sgd
        ]
        out.append(
            Claim(
                "sgd",
                "With SGD (with or without momentum), the STE with lr αη started at M(w₀) "
                "tracks the custom estimator: small latent gap |M(w_custom) - w_STE|, few "
                "differing quantized weights; the plain STE (same lr and w₀) and αη alone do "
                "not.",
                verdict_sgd(held),
                f"(iii) gap below half of both (i) and (ii) in {sum(held)}/{len(sgd)} runs: "
                + "; ".join(
                    f"{r['estimator']}/{r['optimizer']}: (iii) "
                    f"{r['final']['gap_M_mean_iii']:.4f} Δ ({r['final']['flips_iii']:.1%} "
                    f"differ) vs (i) {r['final']['gap_M_mean_i']:.3f} Δ "
                    f"({r['final']['flips_i']:.1%}), (ii) {r['final']['gap_M_mean_ii']:.3f} Δ"
                    for r in sgd
                ),
                checks={"held": sum(held), "runs": len(sgd), "ratio": TWIN_RATIO},
            )
        )

    slopes = res["summary"]["lr_slopes"]
    if slopes:
        out.append(
            Claim(
                "first-order",
                "At a fixed horizon η·T the gap of (iii) is O(η) (halving η halves it), while "
                "the plain STE's gap does not shrink with η.",
                verdict_first_order([(s["iii"], s["i"]) for s in slopes.values()]),
                "; ".join(
                    f"{k}: log-log slope of the (iii) gap against η {s['iii']:.2f} (theory 1), "
                    f"of the (i) gap {s['i']:.2f} (theory 0)"
                    for k, s in slopes.items()
                ),
                checks={
                    "first_order": {k: first_order(s["iii"], s["i"]) for k, s in slopes.items()},
                    "slope_range": [SLOPE_LO, SLOPE_HI],
                    "plain_slope_max": PLAIN_SLOPE_MAX,
                    "shrink_slope_min": SHRINK_SLOPE_MIN,
                },
            )
        )

    adam_main = [r for r in main if r["optimizer"].lower() == "adam"]
    window = sorted((r for r in res["adam"] if r["sweep"] == "window"), key=lambda r: r["travel"])
    if adam_main or window:

        def rel(r: Mapping[str, Any]) -> float:
            return relative_gap(r["final"]["gap_id_mean_i"], r["final"]["moved"])

        closest = [
            closest_twin(
                r["final"]["gap_id_mean_i"],
                r["final"]["gap_id_mean_ii"],
                r["final"]["gap_M_mean_iii"],
            )
            for r in adam_main
        ]
        ev = [
            f"main runs (β₂ = {r['hp'].get('betas', (0.9, 0.999))[1]}): plain-STE gap "
            f"{r['final']['gap_id_mean_i']:.3f} Δ vs (ii) {r['final']['gap_id_mean_ii']:.3f} Δ,"
            f" (iii) {r['final']['gap_M_mean_iii']:.3f} Δ ({r['estimator']})"
            for r in adam_main
        ]
        ev += [
            f"lr {r['lr']:g}, β₂ {r['hp']['betas'][1]} (travel η/((1-β₂)Δ) = {r['travel']:.2g}):"
            f" gap {r['final']['gap_id_mean_i']:.4f} Δ = {rel(r):.1%} of the distance moved"
            for r in window
        ]
        rels = [rel(r) for r in window]
        out.append(
            Claim(
                "adam",
                "With Adam nothing needs to change: the plain STE with the same lr and w₀ tracks "
                "the custom estimator (Adam's normalisation cancels q̂'), provided ε ≪ √v̂ and "
                "η/(1-β₂) is small against Δ.",
                verdict_adam(closest, rels),
                "; ".join(ev) + ". Verdict rule: plain STE the closest twin in every main run, "
                f"and a gap within {ADAM_REL_GAP:.0%} of the distance moved at a short window.",
                checks={
                    "closest": sum(closest),
                    "main_runs": len(adam_main),
                    "short_window": sum(g <= ADAM_REL_GAP for g in rels),
                    "rel_gap_max": ADAM_REL_GAP,
                },
            )
        )
    return out
