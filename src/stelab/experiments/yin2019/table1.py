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
:func:`halfnormal_mse` and :func:`alpha_table` (the α values), ``PUBLISHED`` (the
paper's Table 1) and ``TABLE2``. The claims and their verdict rules are in
:mod:`.table1_claims`; the figure, the tables, report.md, :func:`~.table1_report.status_table`
(where a long run stands, training nothing) and :func:`~.table1_report.write_docs` (a
finished run's report into ``docs/``) in :mod:`.table1_report`.

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
    parse_config,
)
from ...errors import ConfigError, DataError, check_int, unknown
from ...halfnormal import halfnormal_alpha, halfnormal_mse, lloyd_alpha
from ..spine import PartResult, part_dir, write_part
from .table1_claims import (
    DATA_LABELS,
    LABELS,
    NET_LABELS,
    PUBLISHED,
    PUBLISHED_DATA,
    claims_for,
)
from .table1_runs import check_same, ensure_run, read_history, runs_dir

__all__ = [
    "DATA_LABELS",
    "ESTIMATORS",
    "LABELS",
    "NAME",
    "NET_LABELS",
    "PUBLISHED",
    "PUBLISHED_DATA",
    "QUICK",
    "TABLE2",
    "Protocol",
    "alpha_table",
    "cell_config",
    "cell_name",
    "check_same",
    "ensure_run",
    "float_config",
    "halfnormal_mse",
    "lloyd_alpha",
    "pick_data",
    "protocol",
    "read_history",
    "run",
    "run_table",
    "runs_dir",
]


NAME = "yin2019-table1"
ESTIMATORS = ("ste", "relu", "clipped_relu")
NETS = ("lenet5", "vgg11", "resnet20")

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
) -> PartResult:
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
        the :class:`~stelab.experiments.spine.PartResult`; its ``extra`` holds ``rows``,
        ``alphas``, ``wall_time_s`` and ``notes``.
    """
    from .table1_report import plot_curves, report_md, table_rows

    t0 = time.perf_counter()
    out_dir, seed = part_dir(out_dir, seed, seed_max=SEED_MAX)
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
    return write_part(
        out_dir,
        name=NAME,
        claims=claims,
        results=res,
        report=report_md(p, res, claims, fig, bool(quick)),
        figures=[fig],
        started=t0,
        extra={"rows": rows, "alphas": alphas, "wall_time_s": wall, "notes": note},
    )


def _source_of(table: dict[str, Any]) -> str:
    """The data source recorded by the float run (its env.json), or ''."""
    env = Path(table["float"]["run_dir"]) / "env.json"
    try:
        return str(json.loads(env.read_text(encoding="utf-8")).get("data_source", ""))
    except (OSError, ValueError):
        return ""
