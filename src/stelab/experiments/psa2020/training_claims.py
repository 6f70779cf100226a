"""The claim of ``training`` ([S20] abstract: PSA trains deep conv SBNs better) and its
verdict rule, a function of the test accuracies only (tested at its thresholds in
tests/test_psa2020_verdicts.py); and :func:`choose_lr`, the rule of the learning-rate
search (which learning rate counts)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..spine import Claim, ladder

__all__ = ["BEATS_AT_LEAST", "NEAR_BEST", "choose_lr", "claim_e", "verdict_training"]

#: 'partly' if PSA's accuracy is at most this far (absolute, 0.01 = 1 point) below the best
NEAR_BEST = 0.01
#: ... or if PSA is strictly above at least this many baselines
BEATS_AT_LEAST = 2


def verdict_training(acc: Mapping[str, float], psa: str = "psa") -> str:
    """The verdict from the test accuracies ``acc`` (in [0, 1], by estimator spec):
    ``reproduced`` if PSA's is >= every finite baseline's; ``partly`` if it is within
    :data:`NEAR_BEST` of the best or strictly above at least :data:`BEATS_AT_LEAST`
    baselines; ``not`` otherwise, or when PSA's is missing or not finite, or there is no
    finite baseline."""
    p = acc.get(psa, math.nan)
    others = [a for s, a in acc.items() if s != psa and math.isfinite(a)]
    if not math.isfinite(p) or not others:
        return "not"
    best = max(others)
    return ladder(
        reproduced=p >= best,
        partly=p >= best - NEAR_BEST or sum(p > a for a in others) >= BEATS_AT_LEAST,
    )


def choose_lr(rows: Sequence[Mapping[str, Any]]) -> float:
    """The learning rate a search picks from its ``rows`` (``{"lr", "val_acc_avg",
    "diverged"}``): the best validation accuracy among the runs that neither diverged nor
    have a non-finite accuracy (the first of equals); if there is none, the smallest rate."""
    ok = [r for r in rows if not r["diverged"] and math.isfinite(r["val_acc_avg"])]
    return max(ok, key=lambda r: r["val_acc_avg"])["lr"] if ok else min(r["lr"] for r in rows)


def claim_e(results: Mapping[str, Mapping[str, Any]]) -> Claim:
    """Claim (e), judged on the training runs ``results`` (by estimator spec)."""
    from ...analysis import parse_estimator

    acc = {s: r["test"]["acc_avg"] for s, r in results.items()}
    acc1 = {s: r["test"]["acc1"] for s, r in results.items()}
    diverged = [s for s, r in results.items() if r["diverged"]]
    parts = [
        f"{parse_estimator(s).label} {100 * acc[s]:.1f}% (1 sample {100 * acc1[s]:.1f}%)"
        for s in results
    ]
    return Claim(
        id="e",
        text="PSA gives better-performing (and more stable) training of deep convolutional "
        "SBNs than the baselines",
        verdict=verdict_training(acc),
        evidence="test accuracy of the 10-sample averaged prediction: "
        + ", ".join(parts)
        + (f"; diverged: {', '.join(diverged)}" if diverged else "; no run diverged")
        + ". One seed, a narrow 8-conv net on a small CPU budget (see the table), not the "
        "paper's CIFAR-10 runs: 'reproduced' means PSA >= every baseline here, 'partly' PSA "
        "within 1 point of the best or above at least two baselines.",
        checks={"acc_avg": acc, "acc1": acc1},
    )
