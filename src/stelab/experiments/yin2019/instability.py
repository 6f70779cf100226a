"""Experiment ``yin2019-instability``: the identity and ReLU STEs leave a good solution.

[Y19] §4 (docs/papers/yin2019.md, the paper's Fig. 2/3 idea): a 4-bit ResNet-20 started at the
clipped-ReLU solution (91.24 %) and trained on with the identity STE at learning
rate 1e-5 loses accuracy within 20 epochs (to about 47-50 %): the identity coarse
gradient does not vanish at a minimum of the true loss, so even tiny steps walk
away from it. The same holds started at the ReLU solution.

Default (``net="resnet20"``): the paper's protocol — ResNet-20 with 4-bit activations,
the float model pre-trained, the 4-bit clipped-ReLU and ReLU cells trained from it
with the Table-2 optimiser (SGD, momentum 0.9, batch 128, lr 0.01 with two ×0.1 drops),
then each cell continued at a constant learning rate by

* identity (``ste``) — the paper's experiment,
* the STE that found the solution — the control: what it does at the same learning
  rate is the drift SGD noise alone causes.

The paper's lr 1e-5 is a tenth of the schedule's final lr (1e-2 × 0.1²), which is what
``LR_SCALE`` × :func:`final_lr` gives here too. At the size a CPU runs (``RESNET20``:
Fashion-MNIST, a seeded subset of training rows, a compressed schedule; digits in quick
mode) a continuation makes far fewer SGD steps than the paper's 20 × 391, so a second
rate, 100× the paper's (about the paper's lr × steps), is run as well. Every departure
is stated in the report.

``net="lenet5"``: the earlier LeNet-5 variant (the ``yin2019-table1`` protocol and data,
2 and 4 bits, ReLU also continuing from the clipped-ReLU cell, rates ×1 … ×1000 the
paper-scaled one 1e-4).

The source cells are taken from a sibling ``table1`` folder (``out_dir/../table1``,
the layout of ``stelab reproduce``) when it holds the finished cell of the same
protocol and seed; otherwise the float model and the source cell are trained here
(with :mod:`stelab.experiments.yin2019.table1`'s code). Every continuation is one
resumable run directory under ``out_dir/runs*/``, so rerunning :func:`run` with the
same arguments resumes an interrupted run.

Public API: :func:`run`, :func:`protocol_for`, :func:`continuation_config`,
:func:`default_lrs`, :func:`final_lr`, ``LR_SCALE`` (the paper-scaled learning-rate
factor), ``RESNET20`` (the subset per mode); from :mod:`.instability_claims` (re-exported):
:func:`effect` and :func:`verdict_for` (the verdict rules), ``CONTROL`` and ``CONTINUE``
(which STEs continue from which source, per net); in :mod:`.instability_report`: the
figures, report.md and :func:`~.instability_report.write_docs` (a finished report into
``docs/``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ...config import SEED_MAX, TrainConfig, config_to_dict, load_config, parse_config
from ...errors import ConfigError, StelabTypeError, check_int, unknown
from ..spine import PartResult, write_part
from . import table1 as t1
from .instability_claims import (
    ACC_DROP,
    CONTINUE,
    CONTROL,
    LOSS_RATIO,
    claims_for,
    effect,
    effect_vs_control,
    verdict_for,
)

__all__ = [
    "ACC_DROP",
    "CONTINUE",
    "CONTROL",
    "LOSS_RATIO",
    "LR_SCALE",
    "NAME",
    "NETS",
    "RESNET20",
    "continuation_config",
    "default_lrs",
    "effect",
    "final_lr",
    "protocol_for",
    "run",
    "verdict_for",
]

NAME = "yin2019-instability"
#: the paper's lr (1e-5) over ResNet-20's final Table-2 lr (1e-2 · 0.1²)
LR_SCALE = 0.1
NETS = tuple(CONTINUE)

#: The ResNet-20 protocol at a CPU size, per mode: [Y19] Table 2's optimiser (SGD,
#: momentum 0.9, batch 128, lr 0.01, two ×0.1 drops, no weight decay) on a seeded subset
#: of the training rows, the 200-epoch schedule compressed (float pre-training 8 epochs,
#: the quantized source cells 6 with drops after epochs 3 and 5, so the final lr is 1e-4
#: as in the paper and the paper-scaled continuation lr is the paper's 1e-5). Full:
#: Fashion-MNIST (28×28, 1 channel; ResNet-20 is fully convolutional with a global
#: average pool), 1200 training rows, 500 validation rows; quick: scikit-learn's 8×8
#: digits, 600 training rows. ``epochs_after``: continuation epochs.
RESNET20: dict[str, dict[str, Any]] = {
    "full": {
        "data": "fashion-mnist",
        "limit": 1200,
        "val_size": 500,
        "float_epochs": 8,
        "epochs": 6,
        "milestones": (3, 5),
        "eval_batch_size": 250,
        "epochs_after": 6,
    },
    "quick": {
        "data": "digits",
        "limit": 600,
        "float_epochs": 8,
        "epochs": 6,
        "milestones": (3, 5),
        "eval_batch_size": 250,
        "epochs_after": 3,
    },
}


def final_lr(p: t1.Protocol) -> float:
    """The learning rate at the end of the Table-2 schedule of ``p``."""
    drops = sum(1 for m in p.milestones if m < p.epochs)
    return float(f"{p.lr * p.gamma**drops:.12g}")


def default_lrs(p: t1.Protocol, quick: bool) -> tuple[float, ...]:
    """The paper-scaled lr (``LR_SCALE`` × the final lr) and larger ones.

    ResNet-20: ×1 and ×100 (at this size a continuation makes about 1/100 of the paper's
    SGD steps, so ×100 matches the paper's lr × steps). LeNet-5: ×1, ×10, ×100, ×1000 (the
    last is the schedule's initial lr); quick ×1, ×100, ×1000."""
    base = LR_SCALE * final_lr(p)
    if p.net == "resnet20":
        factors: tuple[int, ...] = (1, 100)
    else:
        factors = (1, 100, 1000) if quick else (1, 10, 100, 1000)
    return tuple(float(f"{base * f:.12g}") for f in factors)  # 1e-4, not 1.0000000000000002e-4


def protocol_for(
    net: str, *, quick: bool, overrides: Mapping[str, Any] | None = None
) -> t1.Protocol:
    """The source-cell protocol of ``net``: LeNet-5's ``yin2019-table1`` protocol, or
    ResNet-20's (``RESNET20[mode]``, 4-bit activations) with ``overrides`` on top."""
    if net not in NETS:
        raise unknown("net", net, NETS)
    ov = dict(overrides or {})
    if net == "lenet5":
        return t1.protocol("lenet5", quick=quick, **ov)
    kw = {k: v for k, v in RESNET20["quick" if quick else "full"].items() if k != "epochs_after"}
    data = ov.pop("data", kw.pop("data"))
    kw.pop("data", None)
    kw["bits"] = (4,)
    kw.update(ov)
    return t1.protocol("resnet20", quick=quick, data=data, **kw)


def continuation_config(
    p: t1.Protocol,
    bits: int,
    estimator: str,
    *,
    lr: float,
    epochs: int,
    source: str | Path,
    seed: int = 0,
) -> TrainConfig:
    """The trainer config of one continuation: the Table-1 cell config of ``estimator``
    with a constant learning rate ``lr`` for ``epochs`` epochs, initialised from the
    finished run directory ``source`` (a quantized cell)."""
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr must be a finite number > 0, got {lr!r}")
    q = dataclasses.replace(p, lr=float(lr), epochs=check_int("epochs", epochs, 1, 10_000))
    raw = t1.cell_config(q, bits, estimator, seed=seed, init_from=source)
    d = config_to_dict(raw)
    d["schedule"] = {"name": "constant"}
    d["name"] = f"y19-instability/{estimator}-lr{lr:g}"
    return parse_config(d)


def _source_dir(
    out_dir: Path, p: t1.Protocol, bits: int, est: str, quick: bool, seed: int
) -> Path | None:
    """The finished source cell in the sibling table1 folder, or None."""
    d = t1.runs_dir(out_dir.parent / "table1", quick=quick, seed=seed) / t1.cell_name(
        p.net, bits, est
    )
    fdir = d.parent / t1.cell_name(p.net, None)
    cfg = t1.cell_config(p, bits, est, seed=seed, init_from=fdir.resolve())
    mfile = d / "metrics.json"
    if not mfile.is_file() or (d / "diverged.json").is_file():
        return None
    try:
        stored = load_config(d / "config.toml")
        t1.check_same(d, stored, cfg)
    except ConfigError:
        return None
    m = json.loads(mfile.read_text(encoding="utf-8"))
    return d if int(m.get("epochs") or 0) == cfg.train.epochs else None


_DATA_CACHE: dict[str, Any] = {}


def _evaluate_run(run_dir: Path, cfg: TrainConfig) -> dict[str, float]:
    """Eval-mode loss and accuracy of a run's final model on the train and val splits."""
    from ...train import evaluate, load_data, load_model

    key = repr(cfg.data)
    if key not in _DATA_CACHE:
        _DATA_CACHE.clear()
        _DATA_CACHE[key] = load_data(cfg)
    data = _DATA_CACHE[key]
    model = load_model(Path(run_dir) / "checkpoints" / "last.pt")
    tl, ta = evaluate(model, data.train.x, data.train.y, cfg.data.eval_batch_size)
    vl, va = evaluate(model, data.val.x, data.val.y, cfg.data.eval_batch_size)
    return {"train_loss": tl, "train_acc": ta, "val_loss": vl, "val_acc": va}


def _case(source: str, bits: int) -> str:
    return f"{source}-a{bits}"


def run(
    out_dir: Path,
    *,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    net: str = "resnet20",
    bits: int | Sequence[int] | None = None,
    lrs: Sequence[float] | None = None,
    epochs: int | None = None,
    sources: Sequence[str] | None = None,
    threads: int | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> PartResult:
    """Continue the clipped-ReLU (and ReLU) solutions with the identity STE (and the
    controls) at small constant learning rates; write one figure per source,
    results.json and report.md into ``out_dir``.

    Args:
        out_dir: where the run directories and outputs go (a sibling ``table1`` folder
            is searched for the source cells).
        quick: the same protocol at a tiny size (``RESNET20["quick"]``: digits, 600
            rows, 3 continuation epochs; LeNet-5: digits, 8 continuation epochs).
        seed: the seed of the protocol (source cells) and of the continuations.
        progress: per-epoch lines on stderr.
        net: ``resnet20`` (the paper's network, default) or ``lenet5``.
        bits: activation bit widths (default: 4, the paper's case, for ResNet-20;
            4 and 2 for LeNet-5, where the effect shows more at 2).
        lrs: constant learning rates to try (default :func:`default_lrs`).
        epochs: continuation epochs (ResNet-20: ``RESNET20[mode]["epochs_after"]``;
            LeNet-5: 20 as in the paper, quick 8).
        sources: the solutions to start from, among ``clipped_relu`` and ``relu``
            (default: both for ResNet-20, the paper's two cases; clipped ReLU for LeNet-5).
        threads: torch threads per run (quick default 1).
        overrides: more :class:`~stelab.experiments.yin2019.table1.Protocol` fields (and
            ``data`` for ResNet-20).

    Returns:
        the :class:`~stelab.experiments.spine.PartResult` (``extra["notes"]``: the setting
        and where the effect showed).

    Cost in full mode on one CPU thread, ResNet-20 (``RESNET20["full"]``): 3 source runs
    and 8 continuations of 6 epochs on 1200 rows, about 30 minutes.
    """
    from .instability_report import plot_source, report_md

    t0 = time.perf_counter()
    if not isinstance(out_dir, (str, Path)):
        raise StelabTypeError(f"out_dir must be a path, got {out_dir!r}")
    seed = check_int("seed", seed, 0, SEED_MAX)
    if net not in NETS:
        raise unknown("net", net, NETS)
    if bits is None:
        bits = (4,) if net == "resnet20" else (4, 2)
    widths = (bits,) if isinstance(bits, int) else tuple(bits)
    widths = tuple(check_int("bits", b, 1, 16) for b in widths)
    if not widths:
        raise ConfigError("bits must name at least one bit width, got an empty sequence")
    out_dir = Path(out_dir)
    ov = dict(overrides or {})
    if threads is not None:
        ov["threads"] = check_int("threads", threads, 1, 4096)
    if quick and "threads" not in ov:
        ov["threads"] = 1
    if net == "resnet20":
        ov.setdefault("bits", widths)
    p = protocol_for(net, quick=quick, overrides=ov)
    cont = CONTINUE[net]
    if sources is None:
        sources = ("clipped_relu", "relu") if net == "resnet20" else ("clipped_relu",)
    if isinstance(sources, str):
        sources = (sources,)
    srcs = tuple(sources)
    if not srcs:
        raise ConfigError(f"sources must name at least one of {', '.join(cont)}, got ()")
    for s in srcs:
        if s not in cont:
            raise unknown("source", s, cont)
    rates = tuple(float(x) for x in (lrs if lrs is not None else default_lrs(p, quick)))
    if not rates or any(not (math.isfinite(r) and r > 0) for r in rates):
        raise ConfigError(f"lrs must be finite numbers > 0, got {lrs!r}")
    if epochs is None:
        epochs = (
            RESNET20["quick" if quick else "full"]["epochs_after"]
            if net == "resnet20"
            else (8 if quick else 20)
        )
    n_ep = check_int("epochs", epochs, 1, 10_000)
    out_dir.mkdir(parents=True, exist_ok=True)
    say = (lambda s: print(f"[{NAME}] {s}", flush=True)) if progress else (lambda s: None)
    root = t1.runs_dir(out_dir, quick=quick, seed=seed)

    # the source cells: reuse the sibling table1 runs, else train them here
    source_dirs: dict[str, Path] = {}
    source_from: dict[str, str] = {}
    for s in srcs:
        for b in widths:
            case = _case(s, b)
            d = _source_dir(out_dir, p, b, s, quick, seed)
            if d is not None:
                source_dirs[case], source_from[case] = d, "table1 (reused)"
                continue
            fdir = root / t1.cell_name(p.net, None)
            fm, st = t1.ensure_run(t1.float_config(p, seed=seed), fdir, progress=progress)
            say(f"{fdir.name}: {st}")
            if fm is None:
                raise ConfigError(f"the float pre-training in {str(fdir)!r} diverged")
            d = root / t1.cell_name(p.net, b, s)
            cfg = t1.cell_config(p, b, s, seed=seed, init_from=fdir.resolve())
            m, st = t1.ensure_run(cfg, d, progress=progress)
            say(f"{d.name}: {st}")
            if m is None:
                raise ConfigError(f"the source cell {str(d)!r} diverged; it cannot be continued")
            source_dirs[case], source_from[case] = d, f"trained here ({st})"

    # the continuations
    any_cfg = t1.float_config(p, seed=seed)
    starts = {c: _evaluate_run(d, any_cfg) for c, d in source_dirs.items()}
    splits = next(iter(_DATA_CACHE.values()))
    rows = {"train": len(splits.train), "val": len(splits.val), "test": len(splits.test)}
    last_rows = {c: t1.read_history(d)[-1] for c, d in source_dirs.items()}
    results: dict[str, Any] = {}
    for s in srcs:
        for b in widths:
            case = _case(s, b)
            per_lr: dict[str, Any] = {}
            for lr in rates:
                runs: dict[str, Any] = {}
                for est in cont[s]:
                    d = root / f"from-{case}" / f"{est}-lr{lr:g}"
                    cfg = continuation_config(
                        p, b, est, lr=lr, epochs=n_ep, source=source_dirs[case].resolve(),
                        seed=seed,
                    )  # fmt: skip
                    m, st = t1.ensure_run(cfg, d, progress=progress)
                    say(f"from {case}: {est} lr {lr:g}: {st}")
                    runs[est] = {
                        "run_dir": str(d),
                        "status": st,
                        "history": t1.read_history(d),
                        "metrics": m,
                        "end": None if m is None else _evaluate_run(d, cfg),
                    }
                ctrl = runs[CONTROL[s]]
                for est, r in runs.items():
                    if est == CONTROL[s]:
                        continue
                    r["effect"] = effect_vs_control(r["end"], ctrl["end"])
                per_lr[f"{lr:g}"] = runs
            results[case] = per_lr

    base = f"{default_lrs(p, quick)[0]:g}"
    claims = claims_for(results, starts, srcs, widths, p, n_ep, base, last_rows)
    figs = {}
    for s in srcs:
        figs[s] = f"instability_from_{s}.png"
        plot_source(
            results, last_rows, s, widths, rates, p, out_dir / figs[s], dpi=80 if quick else 110
        )
    res = {
        "name": NAME,
        "paper": "Yin et al., ICLR 2019, arXiv:1903.05662, §4 (instability of identity/ReLU STE)",
        "quick": bool(quick),
        "seed": seed,
        "net": p.net,
        "net_label": t1.NET_LABELS[p.net],
        "bits": list(widths),
        "epochs": n_ep,
        "lrs": list(rates),
        "paper_scaled_lr": float(base),
        "data": p.data,
        "data_label": t1.DATA_LABELS.get(p.data, p.data),
        "rows": rows,
        "protocol": {k: v for k, v in dataclasses.asdict(p).items() if k != "data_source"},
        "sources": {c: {"run_dir": str(d), "from": source_from[c]} for c, d in source_dirs.items()},
        "start": starts,
        "source_last_epoch": last_rows,
        "continuations": results,
        "thresholds": {"acc_drop_pts": ACC_DROP, "loss_ratio": LOSS_RATIO},
        "wall_time_s": _wall_time(source_dirs, results),
        "seconds_this_call": time.perf_counter() - t0,
    }
    shown = [c.id for c in claims if c.verdict != "not"]
    return write_part(
        out_dir,
        name=NAME,
        claims=claims,
        results=res,
        report=report_md(res, claims, figs, p),
        figures=list(figs.values()),
        started=t0,
        extra={
            "notes": f"{res['net_label']} on {res['data_label']}, bits {list(widths)}, lrs "
            f"{', '.join(f'{r:g}' for r in rates)}; effect at some lr: "
            f"{', '.join(shown) or 'none'}"
        },
    )


def _wall_time(source_dirs: Mapping[str, Path], results: Mapping[str, Any]) -> float:
    """Training wall time summed over every run this result rests on (float pre-training,
    source cells, continuations), from their metrics.json."""
    dirs = {Path(d).resolve() for d in source_dirs.values()}
    for d in source_dirs.values():
        f = Path(d).parent / f"{Path(d).name.split('-a')[0]}-float"
        dirs.add(f.resolve())
    for per_lr in results.values():
        for runs in per_lr.values():
            dirs |= {Path(r["run_dir"]).resolve() for r in runs.values()}
    total = 0.0
    for d in dirs:
        try:
            m = json.loads((d / "metrics.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        total += float(m.get("wall_time_s") or 0.0)
    return total
