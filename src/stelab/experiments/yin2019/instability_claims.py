"""The claims of the ``instability`` part and their verdict rules.

:func:`effect` (did a continuation leave the solution, compared with the control at the
same learning rate) and :func:`verdict_for` (which learning rates count) are pure rules of
plain numbers with their thresholds as named constants (``ACC_DROP``, ``LOSS_RATIO``),
pinned at those thresholds by tests/test_yin2019_instability.py and
tests/test_yin2019_verdicts.py. :func:`claims_for` builds the claims from the numbers
:mod:`.instability` computed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ..spine import Claim, ladder
from .table1_claims import LABELS, NET_LABELS

if TYPE_CHECKING:
    from .table1 import Protocol

__all__ = [
    "ACC_DROP",
    "CONTINUE",
    "CONTROL",
    "LOSS_FLOOR",
    "LOSS_RATIO",
    "claims_for",
    "effect",
    "effect_vs_control",
    "verdict_for",
]

#: the effect "shows" at a learning rate when, after the continuation, the estimator's
#: validation accuracy is more than this many points below the control's ...
ACC_DROP = 1.0
#: ... and its training loss more than this many times the control's
LOSS_RATIO = 1.5
#: the control's training loss is floored at this in the ratio (a control at loss 0)
LOSS_FLOOR = 1e-12

#: the estimator each source solution was found with continues as the control
CONTROL = {"clipped_relu": "clipped_relu", "relu": "relu"}
#: what continues from each source, per net: the paper's cases (identity, and the control);
#: LeNet-5 also continues the clipped-ReLU solution with ReLU
CONTINUE: dict[str, dict[str, tuple[str, ...]]] = {
    "resnet20": {"clipped_relu": ("ste", "clipped_relu"), "relu": ("ste", "relu")},
    "lenet5": {"clipped_relu": ("ste", "relu", "clipped_relu"), "relu": ("ste", "relu")},
}


def effect(end: Mapping[str, float], control_end: Mapping[str, float]) -> dict[str, Any]:
    """How far a continuation left the solution, compared with the control at the same lr.

    With a = the continuation's end numbers and c = the control's (eval-mode):
    ``drop = 100·(c.val_acc − a.val_acc)`` points, ``ratio = a.train_loss / c.train_loss``
    (the denominator floored at ``LOSS_FLOOR``); the effect *shows* iff
    ``drop > ACC_DROP`` and ``ratio > LOSS_RATIO`` (both strict).
    """
    drop = 100 * (float(control_end["val_acc"]) - float(end["val_acc"]))
    ratio = float(end["train_loss"]) / max(float(control_end["train_loss"]), LOSS_FLOOR)
    return {
        "acc_below_control_pts": drop,
        "loss_over_control": ratio,
        "shows": bool(drop > ACC_DROP and ratio > LOSS_RATIO),
    }


def verdict_for(shows_at: Sequence[str], paper_lr: str) -> str:
    """The claim's verdict from the learning rates (as ``f"{lr:g}"``) where the effect
    shows: ``reproduced`` if ``paper_lr`` (the paper-scaled rate) is among them,
    ``partly`` if only other rates are, ``not`` if none is."""
    return ladder(reproduced=paper_lr in shows_at, partly=len(shows_at) > 0)


def effect_vs_control(
    end: Mapping[str, float] | None, control_end: Mapping[str, float] | None
) -> dict[str, Any] | None:
    """:func:`effect` of a continuation whose end numbers are ``end`` (None: it diverged,
    as far from the solution as it gets: the effect shows, with infinite distances);
    None when only the control diverged (nothing to compare with)."""
    if end is None:
        return {"acc_below_control_pts": math.inf, "loss_over_control": math.inf, "shows": True}
    return None if control_end is None else effect(end, control_end)


def _line(est: str, lr: str, r: dict[str, Any], start: dict[str, float]) -> str:
    if r["end"] is None:
        return f"lr {lr}: {LABELS[est]} diverged"
    e = r["end"]
    return (
        f"lr {lr}: val acc {100 * start['val_acc']:.2f} -> {100 * e['val_acc']:.2f}%, train loss "
        f"{start['train_loss']:.3g} -> {e['train_loss']:.3g}"
    )


def _train_mode(r: dict[str, Any], c: dict[str, Any], src_last: dict[str, Any] | None) -> str:
    """The trainer's own last-epoch training loss (train-mode batch norm) of a
    continuation and its control, beside the source's: shows how much of an eval-mode
    change comes from the batch-norm running statistics."""

    def last(rec: dict[str, Any]) -> str:
        h = rec.get("history") or []
        v = h[-1].get("train_loss") if h else None
        return "–" if v is None else f"{float(v):.3g}"

    if not r.get("history") or src_last is None or src_last.get("train_loss") is None:
        return ""
    return (
        f" [train-mode loss of the last epoch: {float(src_last['train_loss']):.3g} at the "
        f"source -> {last(r)}, control {last(c)}]"
    )


def claims_for(
    results: dict[str, Any],
    starts: dict[str, Any],
    srcs: tuple[str, ...],
    widths: tuple[int, ...],
    p: Protocol,
    n_ep: int,
    base: str,
    last_rows: dict[str, Any] | None = None,
) -> list[Claim]:
    """One claim per (source, continuing STE, bit width): the verdict is
    :func:`verdict_for` of the learning rates where the stored ``effect`` shows."""
    claims = []
    for s in srcs:
        for est in CONTINUE[p.net][s]:
            if est == CONTROL[s]:
                continue
            for b in widths:
                case = f"{s}-a{b}"
                per_lr = results[case]
                shows = [
                    lr
                    for lr, runs in per_lr.items()
                    if (runs[est].get("effect") or {}).get("shows")
                ]
                verdict = verdict_for(shows, base)
                ev = []
                for lr, runs in per_lr.items():
                    r, c = runs[est], runs[CONTROL[s]]
                    eff = r.get("effect") or {}
                    ctrl = (
                        "diverged" if c["end"] is None
                        else f"{100 * c['end']['val_acc']:.2f}%, {c['end']['train_loss']:.3g}"
                    )  # fmt: skip
                    cmp = (
                        f"; {eff['acc_below_control_pts']:.2f} pts below it, loss "
                        f"×{eff['loss_over_control']:.2f}"
                        if eff
                        else ""
                    )
                    ev.append(
                        _line(est, lr, r, starts[case])
                        + f" (control {ctrl}{cmp})"
                        + _train_mode(r, c, last_rows[case] if last_rows else None)
                    )
                where = (
                    f"shows at lr {', '.join(shows)}"
                    if shows
                    else "shows at none of the learning rates"
                )
                claims.append(
                    Claim(
                        id=f"{est}-leaves-{s}-a{b}",
                        text=f"started at the {b}-bit {LABELS[s]} solution "
                        f"({NET_LABELS[p.net]}), training with the {LABELS[est]} STE at a "
                        f"tiny learning rate moves away from it (training loss up, accuracy "
                        f"down) within {n_ep} epochs, while the {LABELS[CONTROL[s]]} STE "
                        "stays",
                        verdict=verdict,
                        evidence=f"the effect (> {ACC_DROP:g} pts below the control's "
                        f"validation accuracy and > {LOSS_RATIO:g}× its training loss) "
                        f"{where} (tried {', '.join(per_lr)}; paper-scaled {base}): "
                        + "; ".join(ev),
                    )
                )
    return claims
