"""The claims of ``gradeval`` ([S20] §5, gradient accuracy) and their verdict rules.

Each rule is a small public function of plain numbers with its thresholds as module
constants (tested at and around each threshold in tests/test_psa2020_verdicts.py); the
``claim_*`` functions read the numbers off the :class:`~stelab.analysis.FidelityReport`
of each checkpoint, apply the rules and write the evidence.

* (a) PSA has the lowest relative RMSE among the stochastic estimators at M in {1, 10}
  in every hidden layer (:func:`psa_is_lowest`, counted by :func:`verdict_share`);
* (b) ST plateaus from its bias (:func:`is_plateau`, counted by :func:`verdict_share`);
* (c) ARM and REINFORCE need ~10^3 samples to reach PSA's one-sample error
  (:func:`verdict_catch_up` on the medians of :func:`samples_to_reach`);
* (d) Concrete(tau=0.1) is very noisy (:func:`is_very_noisy`, counted by
  :func:`verdict_share`).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

from ...analysis import FidelityReport, layer_label
from ..spine import Claim, ladder

__all__ = [
    "CATCH_UP_LOOSE",
    "CATCH_UP_RANGE",
    "NOISY_FACTOR",
    "PARTLY_SHARE",
    "PLATEAU_BIAS_SHARE",
    "PLATEAU_NOISE_RATIO",
    "PLATEAU_Z",
    "SMALL_M",
    "ST_NAMES",
    "claim_a",
    "claim_b",
    "claim_c",
    "claim_d",
    "claims",
    "hidden_layers",
    "is_plateau",
    "is_very_noisy",
    "psa_is_lowest",
    "rmse_at",
    "samples_to_reach",
    "samples_to_reach_curve",
    "stochastic",
    "verdict_catch_up",
    "verdict_share",
]

#: a rule that holds in this share of its cases (but not all) makes the claim ``partly``
PARTLY_SHARE = 0.5
#: (a): the sample sizes at which PSA must have the lowest error
SMALL_M = (1, 10)
#: (b): the ST estimators whose plateau is checked (dst = the paper's ST)
ST_NAMES = ("dst", "hard_st")
#: (b): a plateau needs a bias z-score above this ...
PLATEAU_Z = 5.0
#: (b): ... a bias of at least this share of the RMSE at the largest M ...
PLATEAU_BIAS_SHARE = 0.7
#: (b): ... and that RMSE at least this many times the noise-only value sqrt(rel.var / M)
PLATEAU_NOISE_RATIO = 3.0
#: (c): both medians of "samples to reach PSA's one-sample RMSE" in this range: reproduced
CATCH_UP_RANGE = (1e2, 1e4)
#: (c): one median in CATCH_UP_RANGE, or both in this looser range: partly
CATCH_UP_LOOSE = (1e1, 1e5)
#: (d): Concrete(0.1)'s one-draw relative variance at least this many times PSA's
NOISY_FACTOR = 10.0


# --------------------------------------------------------------------------- the rules


def verdict_share(ok: int, cases: int, partly: float = PARTLY_SHARE) -> str:
    """``reproduced`` if the rule held in all ``cases``, ``partly`` in at least a share
    ``partly`` of them, else ``not`` (also when there was no case at all)."""
    if cases <= 0:
        return "not"
    return ladder(reproduced=ok == cases, partly=ok >= partly * cases)


def psa_is_lowest(psa: float, others: Mapping[str, float]) -> bool:
    """(a): PSA's error is strictly below the lowest finite error of the other estimators
    (True when there is none)."""
    finite = [v for v in others.values() if math.isfinite(v)]
    return not finite or psa < min(finite)


def is_plateau(*, bias_z: float, bias: float, rmse: float, rel_variance: float, m: int) -> bool:
    """(b): at the largest sample size ``m``, the error is the bias's, not the noise's:
    ``bias_z > PLATEAU_Z``, ``bias >= PLATEAU_BIAS_SHARE * rmse`` and
    ``rmse >= PLATEAU_NOISE_RATIO * sqrt(rel_variance / m)``."""
    noise_only = math.sqrt(rel_variance / m)
    return (
        bias_z > PLATEAU_Z
        and bias >= PLATEAU_BIAS_SHARE * rmse
        and rmse >= PLATEAU_NOISE_RATIO * noise_only
    )


def verdict_catch_up(median_arm: float, median_reinforce: float) -> str:
    """(c): ``reproduced`` if both medians lie in :data:`CATCH_UP_RANGE` (inclusive),
    ``partly`` if one does or both lie in :data:`CATCH_UP_LOOSE`, else ``not``."""
    meds = (median_arm, median_reinforce)
    lo, hi = CATCH_UP_RANGE
    llo, lhi = CATCH_UP_LOOSE
    in_range = [lo <= m <= hi for m in meds]
    loose = [llo <= m <= lhi for m in meds]
    return ladder(reproduced=all(in_range), partly=any(in_range) or all(loose))


def is_very_noisy(concrete01: float, psa: float, concrete1: float) -> bool:
    """(d): Concrete(0.1)'s relative variance is at least :data:`NOISY_FACTOR` times
    PSA's and above Concrete(1)'s."""
    return concrete01 >= NOISY_FACTOR * psa and concrete01 > concrete1


def samples_to_reach_curve(
    sizes: Sequence[int], rmse: Sequence[float], target: float
) -> tuple[float, bool]:
    """(M, extrapolated): the smallest M at which the curve ``rmse(sizes)`` reaches
    ``target`` (log-log interpolation; beyond the grid, extrapolated with M^(-1/2))."""
    pts = [(m, r) for m, r in zip(sizes, rmse, strict=True) if math.isfinite(r)]
    prev = None
    for m, r in pts:
        if r <= target:
            if prev is None:
                return float(m), False
            (m0, r0) = prev
            t = (math.log(r0) - math.log(target)) / (math.log(r0) - math.log(r))
            return math.exp(math.log(m0) + t * (math.log(m) - math.log(m0))), False
        prev = (m, r)
    m, r = pts[-1]
    return m * (r / target) ** 2, True


# --------------------------------------------------------------------------- reading reports


def samples_to_reach(rep: FidelityReport, lab: str, key: str, target: float) -> tuple[float, bool]:
    """:func:`samples_to_reach_curve` of estimator ``lab`` on layer ``key``."""
    lf = rep.estimators[lab].layers[key]
    return samples_to_reach_curve(lf.sample_sizes, lf.rmse, target)


def hidden_layers(rep: FidelityReport) -> list[str]:
    return [k for k in rep.layers if k != "output"]


def stochastic(rep: FidelityReport) -> list[str]:
    """The estimators of ``rep`` with a variance (not the deterministic ones)."""
    return [lab for lab, ef in rep.estimators.items() if ef.kind != "deterministic"]


def rmse_at(rep: FidelityReport, lab: str, key: str, m: int) -> float:
    """Relative RMSE of ``lab`` on layer ``key`` at sample size ``m`` (NaN off the grid)."""
    lf = rep.estimators[lab].layers[key]
    return lf.rmse[lf.at(m)] if m in lf.sample_sizes else math.nan


# --------------------------------------------------------------------------- the claims


def claim_a(reps: Mapping[int, FidelityReport]) -> Claim:
    cases, wins, lines = 0, 0, []
    for epoch, rep in reps.items():
        for key in hidden_layers(rep):
            for m in SMALL_M:
                others = {lab: rmse_at(rep, lab, key, m) for lab in stochastic(rep) if lab != "psa"}
                others = {k: v for k, v in others.items() if math.isfinite(v)}
                best = min(others, key=others.get)  # type: ignore[arg-type]
                psa = rmse_at(rep, "psa", key, m)
                cases += 1
                ok = psa_is_lowest(psa, others)
                wins += ok
                if m == 1:
                    lines.append(
                        f"epoch {epoch} {layer_label(key)}: PSA {psa:.3g} vs best other "
                        f"{best} {others[best]:.3g}{'' if ok else ' (PSA not lowest)'}"
                    )
    tanh = []
    for epoch, rep in reps.items():
        for key in hidden_layers(rep):
            t, p = rmse_at(rep, "tanh_mf", key, 1), rmse_at(rep, "psa", key, 1)
            tanh.append(f"e{epoch} {layer_label(key)}: {'PSA' if p < t else 'tanh_mf'} lower")
    return Claim(
        id="a",
        text="PSA has the lowest gradient error (relative RMSE) at small M in every hidden layer",
        verdict=verdict_share(wins, cases),
        evidence=f"PSA lowest in {wins}/{cases} (checkpoint, hidden layer, M in {{1, 10}}) "
        f"cases among the stochastic estimators. RMSE at M=1: "
        + "; ".join(lines)
        + ". Against the zero-variance tanh mean-field: "
        + ", ".join(tanh)
        + ".",
        checks={"cases": cases, "psa_lowest": wins},
    )


def _plateau(rep: FidelityReport, lab: str, key: str) -> tuple[bool, str]:
    lf = rep.estimators[lab].layers[key]
    i = max(j for j, r in enumerate(lf.rmse) if math.isfinite(r))
    m, r = lf.sample_sizes[i], lf.rmse[i]
    noise_only = math.sqrt(lf.rel_variance / m)
    ok = is_plateau(bias_z=lf.bias_z, bias=lf.bias, rmse=r, rel_variance=lf.rel_variance, m=m)
    return ok, (
        f"{lab} {layer_label(key)}: RMSE {lf.rmse[0]:.3g} (M=1) -> {r:.3g} (M={m}), "
        f"bias {lf.bias:.3g} (z={lf.bias_z:.0f}), noise alone {noise_only:.2g}"
    )


def claim_b(reps: Mapping[int, FidelityReport]) -> Claim:
    cases, ok, lines = 0, 0, []
    for epoch, rep in reps.items():
        for lab in ST_NAMES:
            if lab not in rep.estimators:
                continue
            for key in hidden_layers(rep):
                good, txt = _plateau(rep, lab, key)
                cases += 1
                ok += good
                lines.append(f"epoch {epoch} {txt}{'' if good else ' (no plateau)'}")
    return Claim(
        id="b",
        text="ST plateaus from its bias: its error stops decreasing with M",
        verdict=verdict_share(ok, cases),
        evidence=f"plateau (bias z > 5, bias >= 70% of the RMSE at the largest M, and that "
        f"RMSE >= 3x the noise-only value sqrt(rel.var/M)) in {ok}/{cases} cases (dst = the "
        f"paper's ST with F' backward, hard_st = hardtanh'): " + "; ".join(lines) + ".",
        checks={"cases": cases, "plateaus": ok},
    )


def claim_c(reps: Mapping[int, FidelityReport]) -> Claim:
    per: dict[str, list[float]] = {"arm": [], "reinforce": []}
    if all("arm_shared" in rep.estimators for rep in reps.values()):
        per["arm_shared"] = []
    lines = []
    for epoch, rep in reps.items():
        for key in hidden_layers(rep):
            target = rmse_at(rep, "psa", key, 1)
            st = rep.estimators["dst"].layers[key]
            st_level = [r for r in st.rmse if math.isfinite(r)][-1]
            parts = []
            for lab in per:
                m, ext = samples_to_reach(rep, lab, key, target)
                m2, ext2 = samples_to_reach(rep, lab, key, st_level)
                per[lab].append(m)
                parts.append(
                    f"{lab} {m:.3g}{'*' if ext else ''} (to ST's plateau "
                    f"{m2:.3g}{'*' if ext2 else ''})"
                )
            lines.append(f"epoch {epoch} {layer_label(key)}: " + ", ".join(parts))
    med = {lab: statistics.median(v) for lab, v in per.items()}
    # the verdict is about the paper's estimators (arm_shared is reported, not judged)
    return Claim(
        id="c",
        text="ARM and REINFORCE need ~10^3 samples to catch up",
        verdict=verdict_catch_up(med["arm"], med["reinforce"]),
        evidence="samples M needed to reach PSA's one-sample RMSE (median over checkpoints "
        f"and hidden layers: ARM {med['arm']:.3g}, REINFORCE {med['reinforce']:.3g}"
        + (f", ARM with shared noise {med['arm_shared']:.3g}" if "arm_shared" in med else "")
        + "; "
        "'reproduced' if both medians lie in [10^2, 10^4]; * = extrapolated beyond the M grid "
        "with M^-1/2): " + "; ".join(lines) + ".",
        checks={f"median_{lab}": v for lab, v in med.items()},
    )


def claim_d(reps: Mapping[int, FidelityReport]) -> Claim:
    cases, ok, lines = 0, 0, []
    c01, c1 = "concrete(tau=0.1)", "concrete(tau=1)"
    for epoch, rep in reps.items():
        for key in hidden_layers(rep):
            v01 = rep.estimators[c01].layers[key].rel_variance
            vp = rep.estimators["psa"].layers[key].rel_variance
            v1 = rep.estimators[c1].layers[key].rel_variance
            cases += 1
            ok += is_very_noisy(v01, vp, v1)
            lines.append(
                f"epoch {epoch} {layer_label(key)}: rel.var {v01:.3g} vs PSA {vp:.3g}, "
                f"Concrete(1) {v1:.3g}"
            )
    return Claim(
        id="d",
        text="Concrete with tau = 0.1 is very noisy",
        verdict=verdict_share(ok, cases),
        evidence=f"one-draw relative variance tr Cov / ||g||^2 of Concrete(0.1) >= 10x PSA's "
        f"and above Concrete(1)'s in {ok}/{cases} cases: " + "; ".join(lines) + ".",
        checks={"cases": cases, "noisy": ok},
    )


def claims(reps: Mapping[int, FidelityReport]) -> list[Claim]:
    """The four claims (a)-(d), judged on the analysed checkpoints ``reps``."""
    return [claim_a(reps), claim_b(reps), claim_c(reps), claim_d(reps)]
