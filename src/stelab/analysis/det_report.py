"""The results of :func:`~stelab.analysis.deterministic.deterministic_fidelity` and their
tables: per estimator and step size the descent test (P(loss decreases), mean loss
change ± standard error, training and held-out batch), per layer the bias and cosine
against the relaxed reference (formulas in :mod:`stelab.analysis.deterministic`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["DescentCurve", "LayerBias", "DeterministicReport"]


@dataclass
class DescentCurve:
    """One estimator's descent test on one parameter group, per step size."""

    label: str
    group: str
    etas: list[float]
    batches: int
    p_train: list[float]
    p_train_se: list[float]
    d_train: list[float]
    d_train_se: list[float]
    p_held: list[float]
    p_held_se: list[float]
    d_held: list[float]
    d_held_se: list[float]
    grad_norm: float  # mean ||g_e|| of the group over the batches


@dataclass
class LayerBias:
    """One estimator against the relaxed reference on one layer."""

    layer: str
    label: str
    params: int
    ref_norm: float
    est_norm: float
    bias: float
    bias_raw: float
    bias_floor: float
    bias_z: float
    cosine: float


@dataclass
class DeterministicReport:
    """What :func:`deterministic_fidelity` measured; ``to_dict()`` is JSON-ready."""

    estimators: list[str]
    where: str
    layers: list[str]
    descent: dict[str, dict[str, DescentCurve]]
    bias: dict[str, dict[str, LayerBias]]
    reference: dict[str, Any]
    relaxation: str
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "deterministic",
            "estimators": self.estimators,
            "where": self.where,
            "layers": self.layers,
            "relaxation": self.relaxation,
            "reference": self.reference,
            "descent": {e: {g: asdict(c) for g, c in d.items()} for e, d in self.descent.items()},
            "bias": {e: {k: asdict(v) for k, v in d.items()} for e, d in self.bias.items()},
            "seconds": self.seconds,
        }

    def __str__(self) -> str:
        """The descent and bias tables, as ``stelab gradcheck`` prints them."""
        return self.descent_table() + "\n\n" + self.bias_table()

    def descent_table(self, group: str = "all") -> str:
        """P(loss decreases) and the mean loss change ± s.e., per estimator and step size."""
        curves = {e: d[group] for e, d in self.descent.items() if group in d}
        if not curves:
            return ""
        c0 = next(iter(curves.values()))
        head = ["estimator", "batch"] + [f"{eta:.2g}" for eta in c0.etas]
        p_rows, d_rows = [], []
        for lab, c in curves.items():
            for which, p, d, dse in (
                ("train", c.p_train, c.d_train, c.d_train_se),
                ("held-out", c.p_held, c.d_held, c.d_held_se),
            ):
                p_rows.append([lab, which] + [f"{v:.2f}" for v in p])
                d_rows.append(
                    [lab, which] + [f"{v:+.1e}±{e:.0e}" for v, e in zip(d, dse, strict=True)]
                )
        what = "all parameters" if group == "all" else repr(group)
        t1 = (
            f"descent test, step -eta*g on {what}, {c0.batches} batches: P(loss decreases) "
            "per step size eta"
        )
        t2 = f"descent test, step on {what}: mean loss change ± s.e. per step size eta"
        return _render(t1, head, p_rows) + "\n\n" + _render(t2, head, d_rows)

    def bias_table(self) -> str:
        """Per layer: relative bias (debiased) and cosine of every estimator vs the reference."""
        ref = self.reference
        head = ["layer", "params", "floor"]
        for lab in self.estimators:
            head += [f"{lab} bias", "cos"]
        rows = []
        first = self.bias[self.estimators[0]]
        for layer in self.layers:
            lb = first[layer]
            row = [layer, str(lb.params), _num(lb.bias_floor)]
            for lab in self.estimators:
                v = self.bias[lab][layer]
                row += [_num(v.bias), _num(v.cosine)]
            rows.append(row)
        kind = (
            f"exact enumeration of {ref['states']} outcomes"
            if ref["kind"] == "exact"
            else f"Monte Carlo, {ref['samples']} REINFORCE draws"
        )
        title = (
            f"bias against the gradient of the stochastic relaxation ({kind}); relaxation: "
            f"{self.relaxation}"
        )
        return _render(title, head, rows)


def _num(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return "inf" if math.isinf(v) else f"{v:.3g}"


def _render(title: str, head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:<{w}}}" if i < 2 else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [title, fmt.format(*head), fmt.format(*["-" * w for w in widths])]
    return "\n".join(lines + [fmt.format(*r) for r in rows])
