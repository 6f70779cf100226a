"""The claims of [Y19] Table 1 and their verdict rules.

The rules are small public functions of plain numbers (:func:`better`,
:func:`verdict_count`, :func:`within_published`) with their thresholds as named
constants, pinned at their thresholds by tests/test_yin2019_verdicts.py;
:func:`claims_for` applies them to the cells of a table (:func:`.table1.run_table`).
Also here: the published Table 1 and the labels the claims use.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ...errors import ConfigError
from ..spine import Claim, ladder

if TYPE_CHECKING:
    from .table1 import Protocol

__all__ = [
    "ABS_TOL_PTS",
    "DATA_LABELS",
    "LABELS",
    "NET_LABELS",
    "PUBLISHED",
    "PUBLISHED_DATA",
    "better",
    "cell_numbers",
    "claims_for",
    "fmt_cell",
    "fmt_loss",
    "verdict_count",
    "within_published",
]

#: the "absolute" claim holds for a cell when our accuracy is within this many points
#: (strictly) of the published one
ABS_TOL_PTS = 0.5
LABELS = {"ste": "identity", "relu": "ReLU", "clipped_relu": "clipped ReLU"}
NET_LABELS = {"lenet5": "LeNet-5", "vgg11": "VGG-11", "resnet20": "ResNet-20"}
DATA_LABELS = {
    "mnist": "MNIST",
    "fashion-mnist": "Fashion-MNIST",
    "digits": "digits (scikit-learn, 8×8)",
    "cifar10": "CIFAR-10",
}

#: [Y19] Table 1: (net, bits, estimator) -> (training loss, validation accuracy in %).
PUBLISHED: dict[tuple[str, int, str], tuple[float, float]] = {
    ("lenet5", 2, "ste"): (2.6e-2, 98.49),
    ("lenet5", 2, "relu"): (5.1e-3, 99.24),
    ("lenet5", 2, "clipped_relu"): (5.4e-3, 99.23),
    ("lenet5", 4, "ste"): (6.0e-3, 98.98),
    ("lenet5", 4, "relu"): (9.0e-4, 99.32),
    ("lenet5", 4, "clipped_relu"): (8.8e-4, 99.24),
    ("vgg11", 2, "ste"): (0.19, 86.58),
    ("vgg11", 2, "relu"): (0.10, 88.69),
    ("vgg11", 2, "clipped_relu"): (0.02, 90.92),
    ("vgg11", 4, "ste"): (3.1e-2, 90.19),
    ("vgg11", 4, "relu"): (1.5e-3, 92.01),
    ("vgg11", 4, "clipped_relu"): (1.3e-3, 92.08),
    ("resnet20", 2, "ste"): (1.56, 46.52),
    ("resnet20", 2, "relu"): (1.50, 48.05),
    ("resnet20", 2, "clipped_relu"): (0.24, 88.39),
    ("resnet20", 4, "ste"): (1.38, 54.16),
    ("resnet20", 4, "relu"): (0.25, 86.59),
    ("resnet20", 4, "clipped_relu"): (0.04, 91.24),
}
PUBLISHED_DATA = {"lenet5": "MNIST", "vgg11": "CIFAR-10", "resnet20": "CIFAR-10"}


def cell_numbers(rec: Mapping[str, Any] | None) -> tuple[float, float] | None:
    """(final training loss, test accuracy in %) of a cell record, None if it diverged."""
    if rec is None or rec.get("metrics") is None:
        return None
    m = rec["metrics"]
    acc = m.get("test_acc")
    if acc is None:
        acc = m.get("final_val_acc")
    return float(m["final_train_loss"]), 100.0 * float(acc)


def better(a: tuple[float, float] | None, b: tuple[float, float] | None) -> tuple[bool, bool]:
    """(a has lower loss than b, a has higher accuracy than b), both strict; a diverged
    cell (None) loses to any other, and two diverged cells beat neither."""
    if a is None:
        return False, False
    if b is None:
        return True, True
    return a[0] < b[0], a[1] > b[1]


def fmt_cell(x: tuple[float, float] | None) -> str:
    return "diverged" if x is None else f"{fmt_loss(x[0])} / {x[1]:.2f}"


def fmt_loss(x: float) -> str:
    return f"{x:.1e}" if x < 0.1 else f"{x:.2f}"


def verdict_count(hits: int, total: int) -> str:
    """The verdict of a claim made of ``total`` comparisons of which ``hits`` hold:
    ``reproduced`` if all hold, ``not`` if none does, ``partly`` otherwise."""
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ConfigError(f"total must be an int >= 1, got {total!r}")
    if isinstance(hits, bool) or not isinstance(hits, int) or not 0 <= hits <= total:
        raise ConfigError(f"hits must be an int in [0, total={total}], got {hits!r}")
    return ladder(reproduced=hits == total, partly=hits > 0)


def within_published(ours: float, published: float) -> bool:
    """Our accuracy (%) is within ``ABS_TOL_PTS`` points of the published one (strict)."""
    return abs(ours - published) < ABS_TOL_PTS


def claims_for(p: Protocol, table: Mapping[str, Any]) -> list[Claim]:
    """The Table-1 claims with verdicts from the cells of ``table``
    (:func:`.table1.run_table`)."""
    cells = table["cells"]
    num = {k: cell_numbers(v) for k, v in cells.items()}
    net = NET_LABELS[p.net]
    claims = []

    # (1) ReLU and clipped ReLU beat identity
    hits = total = loss_hits = acc_hits = 0
    parts = []
    for b in p.bits:
        base = num.get(f"a{b}-ste")
        for est in ("relu", "clipped_relu"):
            if f"a{b}-{est}" not in num or f"a{b}-ste" not in num:
                continue
            lo, hi = better(num[f"a{b}-{est}"], base)
            hits += lo + hi
            loss_hits += lo
            acc_hits += hi
            total += 2
            parts.append(
                f"{b}-bit {LABELS[est]} {fmt_cell(num[f'a{b}-{est}'])} vs identity "
                f"{fmt_cell(base)} (loss {'lower' if lo else 'NOT lower'}, accuracy "
                f"{'higher' if hi else 'NOT higher'})"
            )
    if total:
        claims.append(
            Claim(
                id="ste-order",
                text=f"ReLU and clipped ReLU beat identity at {' and '.join(map(str, p.bits))} "
                f"bits on {net} (lower training loss, higher accuracy)",
                verdict=verdict_count(hits, total),
                evidence=f"{hits}/{total} comparisons hold (lower loss {loss_hits}/"
                f"{total // 2}, higher accuracy {acc_hits}/{total // 2}; loss / test accuracy %, "
                "one seed): " + "; ".join(parts),
            )
        )

    # (2) more bits help every STE
    if len(p.bits) >= 2:
        lo_b, hi_b = min(p.bits), max(p.bits)
        hits = total = 0
        parts = []
        for est in p.estimators:
            a, b = num.get(f"a{hi_b}-{est}"), num.get(f"a{lo_b}-{est}")
            lo, hi = better(a, b)
            hits += lo + hi
            total += 2
            parts.append(f"{LABELS[est]} {fmt_cell(b)} -> {fmt_cell(a)}")
        claims.append(
            Claim(
                id="bits-order",
                text=f"{hi_b}-bit activations reach a lower training loss and a higher "
                f"accuracy than {lo_b}-bit ones for every STE on {net} (as in the "
                "published table)",
                verdict=verdict_count(hits, total),
                evidence=f"{hits}/{total} comparisons hold ({lo_b}-bit -> {hi_b}-bit, "
                "loss / test accuracy %): " + "; ".join(parts),
            )
        )

    # (3) deeper nets: clipped ReLU beats ReLU
    if p.net in ("vgg11", "resnet20"):
        hits = total = 0
        parts = []
        for b in p.bits:
            a, r = num.get(f"a{b}-clipped_relu"), num.get(f"a{b}-relu")
            if f"a{b}-clipped_relu" not in num or f"a{b}-relu" not in num:
                continue
            lo, hi = better(a, r)
            hits += lo + hi
            total += 2
            parts.append(f"{b}-bit clipped ReLU {fmt_cell(a)} vs ReLU {fmt_cell(r)}")
        if total:
            claims.append(
                Claim(
                    id="crelu-vs-relu",
                    text=f"clipped ReLU beats ReLU on {net} (lower loss, higher accuracy)",
                    verdict=verdict_count(hits, total),
                    evidence=f"{hits}/{total} comparisons hold: " + "; ".join(parts),
                )
            )

    # (4) absolute numbers, only when the paper's dataset was used
    if PUBLISHED_DATA[p.net] == DATA_LABELS.get(p.data) and p.limit is None:
        diffs = []
        for k, v in num.items():
            b, est = int(k[1 : k.index("-")]), k[k.index("-") + 1 :]
            pub = PUBLISHED.get((p.net, b, est))
            if pub is not None and v is not None:
                diffs.append((abs(v[1] - pub[1]), k, v[1], pub[1]))
        if diffs:
            ok = sum(within_published(ours, pub) for _, _, ours, pub in diffs)
            claims.append(
                Claim(
                    id="absolute",
                    text=f"our {net} accuracies are within {ABS_TOL_PTS:g} points of the "
                    "published ones",
                    verdict=verdict_count(ok, len(diffs)),
                    evidence="; ".join(
                        f"{k}: {ours:.2f} vs {pub:.2f}" for _, k, ours, pub in sorted(diffs)
                    ),
                )
            )
    return claims
