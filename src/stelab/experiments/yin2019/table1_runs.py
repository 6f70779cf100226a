"""Run directories of [Y19] Table 1: train, resume or reuse one run, and read it back.

One run directory per cell (:func:`stelab.train.train` writes it). :func:`ensure_run`
reuses a finished one (its ``metrics.json`` covers every epoch of the config), resumes an
interrupted one from its last checkpoint and refuses one of a different experiment
(:func:`check_same`), so rerunning a part continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ...config import TrainConfig, config_to_dict, diff_configs, load_config
from ...errors import ConfigError
from ...io import write_json
from ...train.files import read_metrics_csv

__all__ = ["check_same", "ensure_run", "read_history", "runs_dir"]

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


def read_history(run_dir: Path) -> list[dict[str, float | int | None]]:
    """The per-epoch rows of ``run_dir/metrics.csv`` (numbers; None for empty cells)."""
    path = Path(run_dir) / "metrics.csv"
    return read_metrics_csv(path) if path.is_file() else []


def _stored_config(run_dir: Path) -> TrainConfig | None:
    path = run_dir / "config.toml"
    return load_config(path) if path.is_file() else None


def check_same(run_dir: Path, stored: TrainConfig, cfg: TrainConfig) -> None:
    """Raise a ConfigError naming the keys if the run directory ``run_dir`` (whose stored
    config is ``stored``) holds a different experiment than ``cfg`` (epochs and where or
    how it ran may differ)."""
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
        check_same(run_dir, stored, cfg)
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
