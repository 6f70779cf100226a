"""Experiment ``yin2019-table1``: [Y19] Table 1, the three STEs on deep networks.

Yin et al., *Understanding Straight-Through Estimator in Training Activation
Quantized Neural Nets*, ICLR 2019 (arXiv:1903.05662), section 4 (docs/papers/yin2019.md):
float weights, activations quantized by σ_α with 2 and 4 bits, a batch norm
without scale and shift before every σ_α, α fixed per bit width (MSE-optimal for
the half-Gaussian that follows such a batch norm), SGD with momentum 0.9,
every quantized network initialised from a trained full-precision twin (same
architecture with ReLU), the Table-2 schedule, and three backward rules:
identity (``ste``), ``relu`` and ``clipped_relu``.

One run directory per cell, written by :func:`stelab.train.train`::

    out_dir/runs[-quick][-seedS]/lenet5-float          the float pre-training (shared)
    out_dir/runs[-quick][-seedS]/lenet5-a2-ste         2-bit activations, identity STE
    out_dir/runs[-quick][-seedS]/lenet5-a4-clipped_relu ...

A finished cell (its ``metrics.json`` covers every epoch of the config) is reused,
an interrupted one resumes from its last checkpoint, so rerunning :func:`run`
continues where it stopped. Then ``table1_curves.png``, ``results.json`` and
``report.md`` are (re)written from the run directories.

Public API: :func:`run` (the reproduction part), :func:`protocol` / :class:`Protocol`
(the Table-2 settings per network), :func:`float_config` / :func:`cell_config` (the
trainer configs), :func:`ensure_run` (train, resume or reuse one run directory),
:func:`run_table` (the float run and every cell), :func:`lloyd_alpha`,
:func:`halfnormal_mse` and :func:`alpha_table` (the α values), :func:`status_table`
(where a long run stands, training nothing), :func:`write_docs` (a finished run's
report into ``docs/``), ``PUBLISHED`` (the paper's Table 1) and ``TABLE2``.

Choices where the paper is silent (marked in the report): the float model is
pre-trained with the same schedule as the quantized cells; no weight decay; no
augmentation for (Fashion-)MNIST/digits and flip + pad-4 crop for CIFAR-10; the
reported accuracy is on the official test split (the paper's "validation
accuracy"; our 5000-row validation carve-out is in ``results.json``); the training
loss is the epoch mean of the mini-batch losses of the last epoch.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...config import (
    SEED_MAX,
    TrainConfig,
    config_to_dict,
    diff_configs,
    load_config,
    parse_config,
)
from ...errors import ConfigError, DataError, StelabTypeError, check_int, unknown
from ...halfnormal import halfnormal_alpha, halfnormal_mse, lloyd_alpha
from ...io import atomic_write_text, write_json
from ...train.files import read_metrics_csv

__all__ = [
    "ESTIMATORS",
    "NAME",
    "PUBLISHED",
    "QUICK",
    "TABLE2",
    "Protocol",
    "alpha_table",
    "cell_config",
    "cell_name",
    "claims_for",
    "ensure_run",
    "float_config",
    "halfnormal_mse",
    "lloyd_alpha",
    "pick_data",
    "plot_curves",
    "protocol",
    "read_history",
    "run",
    "run_table",
    "runs_dir",
    "status_table",
    "table_markdown",
    "table_rows",
    "write_docs",
]

NAME = "yin2019-table1"
ESTIMATORS = ("ste", "relu", "clipped_relu")
LABELS = {"ste": "identity", "relu": "ReLU", "clipped_relu": "clipped ReLU"}
COLORS = {"ste": "tab:blue", "relu": "tab:orange", "clipped_relu": "tab:green"}
NETS = ("lenet5", "vgg11", "resnet20")
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

#: [Y19] Table 2: the training schedule per network.
TABLE2: dict[str, dict[str, Any]] = {
    "lenet5": {"epochs": 50, "batch_size": 64, "lr": 0.1, "milestones": (20, 40)},
    "vgg11": {"epochs": 200, "batch_size": 128, "lr": 0.01, "milestones": (80, 140)},
    "resnet20": {"epochs": 200, "batch_size": 128, "lr": 0.01, "milestones": (80, 140)},
}

#: quick mode: LeNet-5 on scikit-learn's digits (bundled), a shortened schedule (about a
#: minute for the float model and six cells on 2 CPU cores; with 24 epochs the final
#: training losses of the STEs were too noisy across seeds to order at 2 bits).
QUICK = {"epochs": 40, "batch_size": 64, "lr": 0.1, "milestones": (20, 32)}

# config keys that may differ between a finished run directory and the config asked
# for without changing what was trained (where it ran, how often it was logged)
_HARMLESS = (
    "name",
    "train.threads",
    "train.devices",
    "train.accelerator",
    "train.init_from",
    "train.eval_every",
    "train.save_best",
    "data.data_dir",
    "data.download",
    "data.eval_batch_size",
)


# --------------------------------------------------------------------------- α values


def alpha_table(bits: Sequence[int] = (1, 2, 4)) -> dict[int, dict[str, float]]:
    """Per bit width: the MSE-optimal α (the one the models use), the Lloyd fixed point,
    and the half-Gaussian MSE of each."""
    out = {}
    for b in bits:
        a_mse, a_lloyd = halfnormal_alpha(b), lloyd_alpha(b)
        out[int(b)] = {
            "alpha_mse": a_mse,
            "alpha_lloyd": a_lloyd,
            "mse_at_alpha_mse": halfnormal_mse(a_mse, b),
            "mse_at_alpha_lloyd": halfnormal_mse(a_lloyd, b),
            "top_level": (2**b - 1) * a_mse,
        }
    return out


# --------------------------------------------------------------------------- protocol


@dataclass(frozen=True)
class Protocol:
    """The settings shared by the float pre-training and every Table-1 cell.

    ``epochs``/``batch_size``/``lr``/``milestones``/``gamma``: the schedule ([Y19]
    Table 2); ``float_epochs``: the float pre-training (None: ``epochs``, same
    schedule); ``limit``/``val_size``: rows kept/held out; ``width``: the VGG-11 /
    ResNet-20 width option; ``threads``: torch threads per run (None: the "auto" default).
    """

    net: str = "lenet5"
    data: str = "fashion-mnist"
    epochs: int = 50
    batch_size: int = 64
    lr: float = 0.1
    milestones: tuple[int, ...] = (20, 40)
    gamma: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    augment: str = "none"
    float_epochs: int | None = None
    limit: int | None = None
    val_size: int | None = None
    data_dir: str | None = None
    width: float | None = None
    threads: int | None = None
    accelerator: str = "auto"
    eval_batch_size: int = 1000
    bits: tuple[int, ...] = (2, 4)
    estimators: tuple[str, ...] = ESTIMATORS
    data_source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.net not in NETS:
            raise unknown("net", self.net, NETS)
        for b in self.bits:
            check_int("bits", b, 1, 16)
        for e in self.estimators:
            if e not in ESTIMATORS:
                raise unknown("estimator", e, ESTIMATORS)
        if not self.bits or not self.estimators:
            raise ConfigError(
                f"bits and estimators must be non-empty, got bits={self.bits!r}, "
                f"estimators={self.estimators!r}"
            )


def pick_data(net: str, *, data_dir: str | None = None) -> tuple[str, str]:
    """The dataset for ``net`` and a line saying where it came from.

    LeNet-5: MNIST when its files are found (no download), else Fashion-MNIST; VGG-11
    and ResNet-20: CIFAR-10 (a DataError says how to get it when it is missing).
    """
    from ... import data as _data

    if net not in NETS:
        raise unknown("net", net, NETS)
    tries = ("mnist", "fashion-mnist") if net == "lenet5" else ("cifar10",)
    errors = []
    for name in tries:
        try:
            # val_size=0: only presence is checked (a tiny copy has fewer rows than 5000)
            splits = _data.load(name, data_dir=data_dir, download=False, progress=False, val_size=0)
        except DataError as e:
            errors.append(f"{name}: {e}")
            continue
        return name, str(splits.source)
    raise DataError(
        f"no dataset for net={net!r} found (tried {', '.join(tries)}): " + " | ".join(errors)
    )


def protocol(
    net: str = "lenet5",
    *,
    quick: bool = False,
    data: str | None = None,
    **overrides: Any,
) -> Protocol:
    """The Table-2 protocol for ``net`` (``quick``: LeNet-5 on digits, 40 epochs).

    ``data``: the dataset (default: :func:`pick_data`); ``overrides``: any
    :class:`Protocol` field (e.g. ``epochs=2``, ``threads=1``, ``width=0.25``).
    """
    if net not in NETS:
        raise unknown("net", net, NETS)
    valid = [f.name for f in dataclasses.fields(Protocol)]
    for k in overrides:
        if k not in valid or k in ("net", "data"):
            raise unknown("protocol override", k, [v for v in valid if v not in ("net", "data")])
    kw: dict[str, Any] = dict(QUICK if quick and net == "lenet5" else TABLE2[net])
    if quick and net != "lenet5":  # a smoke run of the CIFAR path
        kw.update(epochs=2, limit=512, milestones=(1,))
    source = ""
    if data is None:
        if quick and net == "lenet5":
            data = "digits"
        else:
            data, source = pick_data(net, data_dir=overrides.get("data_dir"))
    if data == "cifar10":
        kw.setdefault("augment", "flip_crop")
    if data in ("mnist", "fashion-mnist", "cifar10") and overrides.get("val_size") is None:
        kw["val_size"] = 5000
    kw.update({k: v for k, v in overrides.items() if v is not None or k == "float_epochs"})
    for k in ("milestones", "bits", "estimators"):
        if k in kw:
            kw[k] = tuple(kw[k])
    return Protocol(net=net, data=data, data_source=source, **kw)


def _raw_config(p: Protocol, seed: int, *, bits: int | None, estimator: str) -> dict[str, Any]:
    float_run = bits is None
    epochs = p.float_epochs if (float_run and p.float_epochs is not None) else p.epochs
    model: dict[str, Any] = {"name": p.net}
    if not float_run:
        model.update(bits=int(bits), estimator=estimator)
    if p.width is not None:
        model["width"] = p.width
    data: dict[str, Any] = {
        "name": p.data,
        "seed": seed,
        "batch_size": p.batch_size,
        "eval_batch_size": p.eval_batch_size,
        "augment": p.augment,
        "download": False,
    }
    for k in ("limit", "val_size", "data_dir"):
        if getattr(p, k) is not None:
            data[k] = getattr(p, k)
    milestones = [m for m in p.milestones if m < epochs]
    schedule: dict[str, Any] = (
        {"name": "multistep", "milestones": milestones, "gamma": p.gamma}
        if milestones
        else {"name": "constant"}
    )
    train: dict[str, Any] = {"epochs": epochs, "seed": seed, "accelerator": p.accelerator}
    if p.threads is not None:
        train["threads"] = p.threads
    name = cell_name(p.net, bits, estimator)
    return {
        "name": f"y19-table1/{name}",
        "data": data,
        "model": model,
        "optim": {
            "name": "sgd",
            "lr": p.lr,
            "momentum": p.momentum,
            "weight_decay": p.weight_decay,
        },
        "schedule": schedule,
        "train": train,
    }


def cell_name(net: str, bits: int | None, estimator: str | None = None) -> str:
    """The run-directory name of a cell: ``lenet5-float``, ``lenet5-a2-clipped_relu``."""
    return f"{net}-float" if bits is None else f"{net}-a{int(bits)}-{estimator}"


def float_config(p: Protocol, *, seed: int = 0) -> TrainConfig:
    """The trainer config of the full-precision pre-training (ReLU, same architecture)."""
    return parse_config(_raw_config(p, seed, bits=None, estimator="relu"))


def cell_config(
    p: Protocol, bits: int, estimator: str, *, seed: int = 0, init_from: str | Path | None = None
) -> TrainConfig:
    """The trainer config of one Table-1 cell: σ_α with ``bits`` bits and ``estimator``,
    initialised from the float run directory ``init_from`` (None: random init)."""
    if estimator not in ESTIMATORS:
        raise unknown("estimator", estimator, ESTIMATORS)
    raw = _raw_config(p, seed, bits=check_int("bits", bits, 1, 16), estimator=estimator)
    if init_from is not None:
        raw["train"]["init_from"] = str(init_from)
    return parse_config(raw)


# --------------------------------------------------------------------------- run directories


def read_history(run_dir: Path) -> list[dict[str, float | int | None]]:
    """The per-epoch rows of ``run_dir/metrics.csv`` (numbers; None for empty cells)."""
    path = Path(run_dir) / "metrics.csv"
    return read_metrics_csv(path) if path.is_file() else []


def _stored_config(run_dir: Path) -> TrainConfig | None:
    path = run_dir / "config.toml"
    return load_config(path) if path.is_file() else None


def _check_same(run_dir: Path, stored: TrainConfig, cfg: TrainConfig) -> None:
    diff = diff_configs(config_to_dict(stored), config_to_dict(cfg))
    bad = {k: v for k, v in diff.items() if k not in _HARMLESS and k != "train.epochs"}
    if bad:
        parts = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(bad.items()))
        raise ConfigError(
            f"the run directory {str(run_dir)!r} holds a different experiment ({parts}); "
            "use another out_dir or delete that directory"
        )


def ensure_run(
    cfg: TrainConfig, run_dir: Path, *, progress: bool = False
) -> tuple[dict[str, Any] | None, str]:
    """Make sure ``run_dir`` holds the finished run of ``cfg``; returns (metrics, status).

    status: ``"reused"`` (its metrics.json already covers ``cfg.train.epochs``; nothing
    is trained), ``"resumed"`` (continued from checkpoints/last.pt), ``"trained"``
    (from scratch; a directory left without a checkpoint is started over) or
    ``"diverged"`` (the loss became NaN/inf; ``diverged.json`` records it, metrics is
    None, and later calls do not retry). A run directory of a different experiment
    is a ConfigError naming the differing keys.
    """
    from ...train import TrainingDiverged, train

    run_dir = Path(run_dir)
    stored = _stored_config(run_dir)
    if stored is not None:
        _check_same(run_dir, stored, cfg)
        if stored.train.init_from != cfg.train.init_from:  # moved folder: keep the record
            cfg = dataclasses.replace(
                cfg, train=dataclasses.replace(cfg.train, init_from=stored.train.init_from)
            )
        if (run_dir / "diverged.json").is_file():
            return None, "diverged"
        mfile = run_dir / "metrics.json"
        if mfile.is_file():
            metrics = json.loads(mfile.read_text(encoding="utf-8"))
            if int(metrics.get("epochs") or 0) == cfg.train.epochs:
                return metrics, "reused"
    last = run_dir / "checkpoints" / "last.pt"
    resume = stored is not None and last.is_file()
    overwrite = not resume and run_dir.is_dir() and any(run_dir.iterdir())
    try:
        metrics = train(cfg, run_dir, resume=resume, overwrite=overwrite, progress=progress)
    except TrainingDiverged as e:
        write_json(run_dir / "diverged.json", {"message": str(e)})
        return None, "diverged"
    return metrics, "resumed" if resume else "trained"


def runs_dir(out_dir: Path, *, quick: bool, seed: int) -> Path:
    """Where the run directories of one mode and seed live under ``out_dir``."""
    return Path(out_dir) / ("runs" + ("-quick" if quick else "") + (f"-seed{seed}" if seed else ""))


def _record(
    run_dir: Path, metrics: dict[str, Any] | None, status: str, seconds: float
) -> dict[str, Any]:
    return {
        "run_dir": str(run_dir),
        "status": status,
        "seconds_this_call": seconds,
        "metrics": metrics,
        "history": read_history(run_dir),
    }


def run_table(
    root: Path,
    p: Protocol,
    *,
    seed: int = 0,
    progress: bool = False,
    log: Any = None,
) -> dict[str, Any]:
    """Train (or reuse) the float model and every (bits, estimator) cell of ``p`` under
    ``root``; returns ``{"float": record, "cells": {"a2-ste": record, ...}}`` where a
    record holds run_dir, status, metrics (metrics.json) and history (metrics.csv)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    say = log or (lambda s: None)
    fdir = root / cell_name(p.net, None)
    t0 = time.perf_counter()
    fm, fstatus = ensure_run(float_config(p, seed=seed), fdir, progress=progress)
    say(f"{fdir.name}: {fstatus} ({time.perf_counter() - t0:.0f} s)")
    out: dict[str, Any] = {"float": _record(fdir, fm, fstatus, time.perf_counter() - t0)}
    if fm is None:
        raise ConfigError(
            f"the float pre-training in {str(fdir)!r} diverged; lower the learning rate"
        )
    cells: dict[str, Any] = {}
    for bits in p.bits:
        for est in p.estimators:
            d = root / cell_name(p.net, bits, est)
            t0 = time.perf_counter()
            cfg = cell_config(p, bits, est, seed=seed, init_from=fdir.resolve())
            m, status = ensure_run(cfg, d, progress=progress)
            say(f"{d.name}: {status} ({time.perf_counter() - t0:.0f} s)")
            cells[f"a{bits}-{est}"] = _record(d, m, status, time.perf_counter() - t0)
    out["cells"] = cells
    return out


# --------------------------------------------------------------------------- verdicts


def _cell_numbers(rec: dict[str, Any] | None) -> tuple[float, float] | None:
    """(final training loss, test accuracy in %) of a cell record, None if it diverged."""
    if rec is None or rec.get("metrics") is None:
        return None
    m = rec["metrics"]
    acc = m.get("test_acc")
    if acc is None:
        acc = m.get("final_val_acc")
    return float(m["final_train_loss"]), 100.0 * float(acc)


def _better(a: tuple[float, float] | None, b: tuple[float, float] | None) -> tuple[bool, bool]:
    """(a has lower loss than b, a has higher accuracy than b); a diverged cell loses."""
    if a is None:
        return False, False
    if b is None:
        return True, True
    return a[0] < b[0], a[1] > b[1]


def _fmt_cell(x: tuple[float, float] | None) -> str:
    return "diverged" if x is None else f"{_fmt_loss(x[0])} / {x[1]:.2f}"


def _fmt_loss(x: float) -> str:
    return f"{x:.1e}" if x < 0.1 else f"{x:.2f}"


def _verdict(hits: int, total: int) -> str:
    return "reproduced" if hits == total else ("not" if hits == 0 else "partly")


def claims_for(p: Protocol, table: dict[str, Any]) -> list[dict[str, Any]]:
    """The Table-1 claims with verdicts from the cells of ``table`` (see :func:`run_table`)."""
    cells = table["cells"]
    num = {k: _cell_numbers(v) for k, v in cells.items()}
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
            lo, hi = _better(num[f"a{b}-{est}"], base)
            hits += lo + hi
            loss_hits += lo
            acc_hits += hi
            total += 2
            parts.append(
                f"{b}-bit {LABELS[est]} {_fmt_cell(num[f'a{b}-{est}'])} vs identity "
                f"{_fmt_cell(base)} (loss {'lower' if lo else 'NOT lower'}, accuracy "
                f"{'higher' if hi else 'NOT higher'})"
            )
    if total:
        claims.append(
            {
                "id": "ste-order",
                "text": f"ReLU and clipped ReLU beat identity at {' and '.join(map(str, p.bits))} "
                f"bits on {net} (lower training loss, higher accuracy)",
                "verdict": _verdict(hits, total),
                "evidence": f"{hits}/{total} comparisons hold (lower loss {loss_hits}/"
                f"{total // 2}, higher accuracy {acc_hits}/{total // 2}; loss / test accuracy %, "
                "one seed): " + "; ".join(parts),
            }
        )

    # (2) more bits help every STE
    if len(p.bits) >= 2:
        lo_b, hi_b = min(p.bits), max(p.bits)
        hits = total = 0
        parts = []
        for est in p.estimators:
            a, b = num.get(f"a{hi_b}-{est}"), num.get(f"a{lo_b}-{est}")
            lo, hi = _better(a, b)
            hits += lo + hi
            total += 2
            parts.append(f"{LABELS[est]} {_fmt_cell(b)} -> {_fmt_cell(a)}")
        claims.append(
            {
                "id": "bits-order",
                "text": f"{hi_b}-bit activations reach a lower training loss and a higher "
                f"accuracy than {lo_b}-bit ones for every STE on {net} (as in the "
                "published table)",
                "verdict": _verdict(hits, total),
                "evidence": f"{hits}/{total} comparisons hold ({lo_b}-bit -> {hi_b}-bit, "
                "loss / test accuracy %): " + "; ".join(parts),
            }
        )

    # (3) deeper nets: clipped ReLU beats ReLU
    if p.net in ("vgg11", "resnet20"):
        hits = total = 0
        parts = []
        for b in p.bits:
            a, r = num.get(f"a{b}-clipped_relu"), num.get(f"a{b}-relu")
            if f"a{b}-clipped_relu" not in num or f"a{b}-relu" not in num:
                continue
            lo, hi = _better(a, r)
            hits += lo + hi
            total += 2
            parts.append(f"{b}-bit clipped ReLU {_fmt_cell(a)} vs ReLU {_fmt_cell(r)}")
        if total:
            claims.append(
                {
                    "id": "crelu-vs-relu",
                    "text": f"clipped ReLU beats ReLU on {net} (lower loss, higher accuracy)",
                    "verdict": _verdict(hits, total),
                    "evidence": f"{hits}/{total} comparisons hold: " + "; ".join(parts),
                }
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
            ok = sum(d < 0.5 for d, *_ in diffs)
            claims.append(
                {
                    "id": "absolute",
                    "text": f"our {net} accuracies are within 0.5 points of the published ones",
                    "verdict": _verdict(ok, len(diffs)),
                    "evidence": "; ".join(
                        f"{k}: {ours:.2f} vs {pub:.2f}" for _, k, ours, pub in sorted(diffs)
                    ),
                }
            )
    return claims


# --------------------------------------------------------------------------- outputs


def plot_curves(p: Protocol, table: dict[str, Any], path: Path, dpi: int = 110) -> Path:
    """Training loss (log scale) and validation accuracy per epoch: one row per bit
    width, one line per STE, the float pre-training dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ...plots import save_figure

    fhist = table["float"]["history"]
    fig, axes = plt.subplots(
        len(p.bits), 2, figsize=(11, 3.4 * len(p.bits)), squeeze=False, sharex=True
    )
    for row, b in enumerate(p.bits):
        ax_l, ax_a = axes[row]
        for ax, key, ylabel in (
            (ax_l, "train_loss", "training loss"),
            (ax_a, "val_acc", "validation accuracy (%)"),
        ):
            scale = 100.0 if key == "val_acc" else 1.0
            fx = [r["epoch"] for r in fhist if r.get(key) is not None]
            fy = [scale * float(r[key]) for r in fhist if r.get(key) is not None]
            ax.plot(fx, fy, color="0.45", ls="--", lw=1.2, label="float (ReLU) pre-training")
            for est in p.estimators:
                rec = table["cells"].get(f"a{b}-{est}")
                if rec is None:
                    continue
                h = rec["history"]
                xs = [r["epoch"] for r in h if r.get(key) is not None]
                ys = [scale * float(r[key]) for r in h if r.get(key) is not None]
                lab = LABELS[est] + (" (diverged)" if rec["status"] == "diverged" else "")
                ax.plot(xs, ys, color=COLORS[est], lw=1.6, label=lab)
            for m in p.milestones:
                if m < p.epochs:
                    ax.axvline(m + 0.5, color="0.8", lw=0.8, ls=":", zorder=0)
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
        ax_l.set_yscale("log")
        ax_l.set_title(f"{NET_LABELS[p.net]}, {b}-bit activations: training loss")
        ax_a.set_title(f"{NET_LABELS[p.net]}, {b}-bit activations: validation accuracy")
        accs = [
            100.0 * float(r["val_acc"])
            for rec in [table["float"], *table["cells"].values()]
            for r in rec["history"]
            if r.get("val_acc") is not None
        ]
        if accs:  # zoom on the interesting range (the first epochs may be far lower)
            top = max(accs)
            lo = min(sorted(accs)[len(accs) // 20], top - 1.0)
            ax_a.set_ylim(max(0.0, lo - 0.5), min(100.0, top + 0.5))
    axes[0][0].legend(fontsize=9)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
    fig.suptitle(
        f"[Y19] Table 1 protocol on {DATA_LABELS.get(p.data, p.data)}: {NET_LABELS[p.net]}, "
        "three STEs (dotted: learning-rate drops)",
        y=1.0,
    )
    fig.tight_layout()
    out = save_figure(fig, path, dpi=dpi)
    plt.close(fig)
    return out


def table_rows(p: Protocol, table: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per bit width: ours and published (loss, accuracy %) per estimator."""
    rows = []
    for b in p.bits:
        row: dict[str, Any] = {"net": p.net, "bits": int(b), "ours": {}, "published": {}}
        for est in p.estimators:
            rec = table["cells"].get(f"a{b}-{est}")
            x = _cell_numbers(rec)
            row["ours"][est] = None if x is None else {"train_loss": x[0], "accuracy": x[1]}
            pub = PUBLISHED.get((p.net, int(b), est))
            row["published"][est] = (
                None if pub is None else {"train_loss": pub[0], "accuracy": pub[1]}
            )
        rows.append(row)
    return rows


def table_markdown(p: Protocol, rows: list[dict[str, Any]]) -> str:
    """The table in the paper's layout, ours beside the published numbers."""
    data = DATA_LABELS.get(p.data, p.data) + (f" ({p.limit} rows)" if p.limit else "")
    head = "| data | net | bits | | " + " | ".join(LABELS[e] for e in p.estimators) + " |"
    lines = [head, "|---|---|---|---|" + "---|" * len(p.estimators)]
    for r in rows:
        ours = [
            "diverged" if r["ours"][e] is None else
            f"{_fmt_loss(r['ours'][e]['train_loss'])} / {r['ours'][e]['accuracy']:.2f}"
            for e in p.estimators
        ]  # fmt: skip
        pub = [
            "–" if r["published"][e] is None else
            f"{_fmt_loss(r['published'][e]['train_loss'])} / {r['published'][e]['accuracy']:.2f}"
            for e in p.estimators
        ]  # fmt: skip
        net = NET_LABELS[p.net]
        lines.append(f"| {data} | {net} | {r['bits']} | **ours** | " + " | ".join(ours) + " |")
        lines.append(
            f"| {PUBLISHED_DATA[p.net]} | {net} | {r['bits']} | paper | " + " | ".join(pub) + " |"
        )
    return "\n".join(lines)


def _alpha_markdown(alphas: dict[int, dict[str, float]]) -> str:
    lines = [
        "| bits | α (MSE-optimal, used) | MSE at it | α (Lloyd fixed point) | MSE at it | "
        "top level (2^b−1)α |",
        "|---|---|---|---|---|---|",
    ]
    for b, a in alphas.items():
        lines.append(
            f"| {b} | {a['alpha_mse']:.6f} | {a['mse_at_alpha_mse']:.6f} | "
            f"{a['alpha_lloyd']:.6f} | {a['mse_at_alpha_lloyd']:.6f} | {a['top_level']:.4f} |"
        )
    return "\n".join(lines)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600} h {s % 3600 // 60:02d} min" if s >= 3600 else f"{s // 60} min {s % 60} s"


def _report_md(
    p: Protocol,
    res: dict[str, Any],
    claims: list[dict[str, Any]],
    fig: str,
    quick: bool,
) -> str:
    fl = res["table"]["float"]["metrics"] or {}
    cells = res["table"]["cells"]
    statuses = {k: v["status"] for k, v in cells.items()}
    wall = res["wall_time_s"]
    data = DATA_LABELS.get(p.data, p.data)
    L = [
        f"# [Y19] Table 1: the three STEs on {NET_LABELS[p.net]} ({'quick' if quick else 'full'})",
        "",
        f"Data: **{data}**"
        + (f" ({p.limit} training rows)" if p.limit else "")
        + ". "
        + (res["data_note"] + " " if res.get("data_note") else "")
        + f"Source: {res['data_source']}.",
        "",
        f"Protocol ([Y19] §4, docs/papers/yin2019.md): {NET_LABELS[p.net]} with float weights, "
        "a batch norm "
        "without scale and shift before every quantized activation σ_α, α fixed to the "
        "MSE-optimal value for a half-Gaussian; every quantized cell initialised from the "
        f"trained full-precision ReLU model (`{Path(res['table']['float']['run_dir']).name}`, "
        f"test accuracy {100 * (fl.get('test_acc') or 0):.2f}%); SGD, momentum {p.momentum}, "
        f"{p.epochs} epochs, batch {p.batch_size}, lr {p.lr} ×{p.gamma} after epochs "
        f"{', '.join(map(str, p.milestones))}, weight decay {p.weight_decay}, augmentation "
        f"{p.augment}; seed {res['seed']}. The float model is pre-trained with the same "
        "schedule (choice: the paper does not give its recipe).",
        "",
        "## Table (training loss / test accuracy %)",
        "",
        table_markdown(p, res["rows"]),
        "",
        "Training loss: mean mini-batch cross-entropy of the last epoch (train-mode batch "
        "norm). Accuracy: the official test split (the paper calls it validation accuracy); "
        "the held-out validation accuracies are in `results.json`. One seed: differences "
        "of a few tenths of a point are within seed-to-seed noise.",
        "",
        f"Wall time: {_hms(wall)} for the whole table (float pre-training + "
        f"{len(cells)} cells, summed over every session of each run). Cells this call: "
        + ", ".join(f"{k} {v}" for k, v in statuses.items())
        + ".",
        "",
        "## α values",
        "",
        _alpha_markdown(res["alphas"]),
        "",
        "α (used) minimises the closed-form MSE E[(σ_α(X) − X)²], X ~ |N(0,1)|, of the "
        "ceil-based quantizer (golden-section search, `stelab.quantizers.halfnormal_alpha`). "
        "The Lloyd-style fixed point α ← E[k(X)X]/E[k(X)²] (k the level index under the "
        "current α) is shown for comparison; it is not a minimiser of this MSE for b ≥ 2 "
        "because moving α moves mass across the edges where the ceil quantizer's error jumps. "
        "At 1 bit both equal E[X] = sqrt(2/π).",
        "",
        "## Curves",
        "",
        f"![Table-1 training curves]({fig})",
        "",
        "## Claims",
        "",
    ]
    for c in claims:
        L.append(f"- **{c['verdict']}**: {c['text']}. {c['evidence']}.")
    if quick:
        L += [
            "",
            "Quick mode trains on scikit-learn's 8×8 digits (1437 training rows) with a "
            f"{p.epochs}-epoch schedule: it checks the code path and shows whether the "
            "STE ordering appears at this size; its accuracies (360 test images, 0.28 points "
            "per image) are too coarse to separate the STEs.",
        ]
    return "\n".join(L) + "\n"


def run(
    out_dir: Path,
    *,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    net: str = "lenet5",
    data: str | None = None,
    threads: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Run (or resume) [Y19] Table 1 for ``net`` and write the figure, results.json and
    report.md into ``out_dir``.

    Args:
        out_dir: where the run directories (``runs*/``) and outputs go.
        quick: LeNet-5 on scikit-learn's digits with 40 epochs (about a minute on 2 CPU
            cores); VGG-11/ResNet-20 run 2 epochs on 512 rows.
        seed: seeds the training (init, shuffling) and the validation carve-out.
        progress: per-epoch lines (and progress bars on a terminal) on stderr.
        net: ``lenet5`` (MNIST if found, else Fashion-MNIST), ``vgg11`` or ``resnet20``
            (CIFAR-10, which must be present).
        data: force a dataset (default: see ``net``).
        threads: torch threads per training run (None: train.threads's "auto").
        overrides: more :class:`Protocol` fields (``epochs``, ``limit``, ``width``, ...).

    Returns:
        ``{"name", "claims", "rows", "alphas", "figures", "results", "report",
        "wall_time_s", "seconds"}``.
    """
    t0 = time.perf_counter()
    if not isinstance(out_dir, (str, Path)):
        raise StelabTypeError(f"out_dir must be a path, got {out_dir!r}")
    seed = check_int("seed", seed, 0, SEED_MAX)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ov = dict(overrides or {})
    if threads is not None:
        ov["threads"] = check_int("threads", threads, 1, 4096)
    if quick and threads is None and "threads" not in ov:
        ov["threads"] = 1  # tiny models: one thread is faster than two on a shared CPU
    p = protocol(net, quick=quick, data=data, **ov)
    note = ""
    if p.net == "lenet5" and p.data == "fashion-mnist":
        note = "MNIST's files were not found (no download attempted), so Fashion-MNIST is used."
    root = runs_dir(out_dir, quick=quick, seed=seed)
    say = (lambda s: print(f"[{NAME}] {s}", flush=True)) if progress else None
    table = run_table(root, p, seed=seed, progress=progress, log=say)
    source = p.data_source or _source_of(table)
    alphas = alpha_table((1, *p.bits) if 1 not in p.bits else p.bits)
    rows = table_rows(p, table)
    claims = claims_for(p, table)
    wall = sum(
        float((rec["metrics"] or {}).get("wall_time_s") or 0.0)
        for rec in [table["float"], *table["cells"].values()]
    )
    fig = "table1_curves.png"
    plot_curves(p, table, out_dir / fig, dpi=80 if quick else 110)
    res = {
        "name": NAME,
        "paper": "Yin et al., ICLR 2019, arXiv:1903.05662, Table 1",
        "quick": bool(quick),
        "seed": seed,
        "protocol": {k: v for k, v in dataclasses.asdict(p).items() if k not in ("data_source",)},
        "data": p.data,
        "data_label": DATA_LABELS.get(p.data, p.data),
        "data_source": source,
        "data_note": note,
        "alphas": alphas,
        "rows": rows,
        "table": table,
        "wall_time_s": wall,
        "seconds_this_call": time.perf_counter() - t0,
    }
    report = _report_md(p, res, claims, fig, bool(quick))
    res["claims"] = claims
    write_json(out_dir / "results.json", res)
    atomic_write_text(out_dir / "report.md", report)
    return {
        "name": NAME,
        "claims": claims,
        "rows": rows,
        "alphas": alphas,
        "figures": [str(out_dir / fig)],
        "results": str(out_dir / "results.json"),
        "report": str(out_dir / "report.md"),
        "wall_time_s": wall,
        "seconds": time.perf_counter() - t0,
        "notes": note,
    }


def _source_of(table: dict[str, Any]) -> str:
    """The data source recorded by the float run (its env.json), or ''."""
    env = Path(table["float"]["run_dir"]) / "env.json"
    try:
        return str(json.loads(env.read_text(encoding="utf-8")).get("data_source", ""))
    except (OSError, ValueError):
        return ""


# --------------------------------------------------------------------------- progress and docs


def status_table(
    out_dir: Path,
    *,
    quick: bool = False,
    seed: int = 0,
    net: str = "lenet5",
    data: str | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> str:
    """A markdown table of where each run of ``out_dir`` stands (trains nothing).

    Finished cells show training loss / test accuracy %; unfinished ones the epoch
    reached and its training loss / validation accuracy %; missing ones "not started".
    """
    p = protocol(net, quick=quick, data=data, **dict(overrides or {}))
    root = runs_dir(Path(out_dir), quick=quick, seed=seed)

    def state(d: Path, epochs: int) -> str:
        mfile = d / "metrics.json"
        if (d / "diverged.json").is_file():
            return "diverged"
        if mfile.is_file():
            m = json.loads(mfile.read_text(encoding="utf-8"))
            if int(m.get("epochs") or 0) == epochs:
                acc = m.get("test_acc") if m.get("test_acc") is not None else m["final_val_acc"]
                return f"{_fmt_loss(m['final_train_loss'])} / {100 * acc:.2f} (done)"
        h = read_history(d)
        if not h:
            return "not started"
        r = h[-1]
        va = "–" if r.get("val_acc") is None else f"{100 * float(r['val_acc']):.2f}"
        return f"epoch {r['epoch']}/{epochs}: {_fmt_loss(float(r['train_loss']))} / {va} (val)"

    fcfg = float_config(p, seed=seed)
    lines = [
        f"Float pre-training (`{cell_name(p.net, None)}`): "
        + state(root / cell_name(p.net, None), fcfg.train.epochs),
        "",
        "| bits | " + " | ".join(LABELS[e] for e in p.estimators) + " |",
        "|---|" + "---|" * len(p.estimators),
    ]
    for b in p.bits:
        cells = [state(root / cell_name(p.net, b, e), p.epochs) for e in p.estimators]
        lines.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_docs(
    out_dir: Path, docs_dir: Path = Path("docs"), *, stem: str = "yin2019_table1"
) -> Path:
    """Copy a finished run's report into the docs: ``docs_dir/<stem>.md`` and the curves
    as ``docs_dir/<stem>_curves.png`` (both written atomically). Returns the .md path."""
    from ...io import atomic_write_bytes

    out_dir, docs_dir = Path(out_dir), Path(docs_dir)
    report, png = out_dir / "report.md", out_dir / "table1_curves.png"
    if not (report.is_file() and png.is_file()):
        raise ConfigError(
            f"out_dir={str(out_dir)!r} has no finished report (report.md and table1_curves.png); "
            "run stelab.experiments.yin2019.table1.run(out_dir) to the end first"
        )
    atomic_write_bytes(docs_dir / f"{stem}_curves.png", png.read_bytes())
    text = report.read_text(encoding="utf-8").replace("(table1_curves.png)", f"({stem}_curves.png)")
    try:
        res = json.loads((out_dir / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        res = {}
    args = f"'{out_dir}'" + (", quick=True" if res.get("quick") else "")
    args += f", seed={res['seed']}" if res.get("seed") else ""
    text += (
        "\n## How this was produced\n\n"
        "```\n"
        'python -c "from stelab.experiments.yin2019.table1 import run; '
        f'run({args}, threads=1)"\n'
        "```\n\n"
        "The run is resumable (rerunning reuses finished cells and resumes an interrupted one). "
        "Regenerate this page with `yin2019.table1.write_docs(out_dir, 'docs')`.\n"
    )
    return atomic_write_text(docs_dir / f"{stem}.md", text)
