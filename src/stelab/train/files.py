"""The run directory: atomic writes, preparing/refusing a directory, env.json, metrics files.

Layout of a run directory::

    config.toml            the resolved config (every key with its value)
    env.json               versions, seed, device, host, start time (one entry per session)
    metrics.csv            one row per epoch: train/val loss and accuracy, lr, seconds
    metrics.json           the final summary (written when the run finishes)
    train.log              what the run said, with times
    checkpoints/last.pt    the state after the last finished epoch
    checkpoints/best.pt    the state with the best validation accuracy (train.save_best)

metrics.csv columns: epoch, train_loss, train_acc, val_loss, val_acc (empty when not
evaluated that epoch), lr, seconds (the whole epoch, with validation), train_seconds
(the training loop alone), train_cpu_seconds (CPU time of this process in that loop:
all its threads, which makes it steadier than wall time on a busy machine).

Every file is written to a temporary file in the same directory and moved into
place with :func:`os.replace`, so a crash or Ctrl-C never leaves half a file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import platform
import shutil
import socket
import sys
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..config import TrainConfig, config_to_dict, diff_configs, dump_config
from ..errors import ConfigError
from ..io import atomic_write_text as write_text
from ..io import read_numeric_csv, write_json

CONFIG = "config.toml"
ENV = "env.json"
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
LOG = "train.log"
CKPT_DIR = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"

CSV_COLUMNS = (
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "lr",
    "seconds",
    "train_seconds",
    "train_cpu_seconds",
)

# keys a resumed run may change; anything else must match the stored config
RESUMABLE_CHANGES = (
    "name",
    "train.epochs",
    "train.eval_every",
    "train.devices",
    "train.accelerator",
    "train.threads",
    "train.save_best",
    "train.init_from",  # used only before epoch 1; a resumed run starts from its checkpoint
    "data.data_dir",
    "data.download",
    "data.eval_batch_size",
)


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` looks like a stelab run directory (has a config.toml)."""
    return (Path(path) / CONFIG).is_file()


def _empty(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def started(run_dir: Path) -> bool:
    """Whether a run in ``run_dir`` finished at least one epoch (has a checkpoint or metrics)."""
    return (run_dir / CKPT_DIR / LAST).is_file() or (run_dir / METRICS_CSV).is_file()


def check_writable(run_dir: Path) -> None:
    """Create ``run_dir`` (and checkpoints/) and prove a file can be written there."""
    try:
        (run_dir / CKPT_DIR).mkdir(parents=True, exist_ok=True)
        write_text(run_dir / ".write-test", "ok\n")
        (run_dir / ".write-test").unlink()
    except OSError as e:
        reason = e.strerror or type(e).__name__
        raise ConfigError(
            f"cannot write to the run directory {str(run_dir)!r}: {reason}; choose another "
            "output path (--out)"
        ) from None


def prepare(run_dir: Path, cfg: TrainConfig, *, resume: bool, overwrite: bool) -> Path | None:
    """Make ``run_dir`` ready for a run and return the checkpoint to resume from (or None).

    A run directory that never finished an epoch is started afresh. Any other
    existing, non-empty directory is refused unless ``resume`` (continue from its
    ``checkpoints/last.pt``; the config may change only in :data:`RESUMABLE_CHANGES`)
    or ``overwrite`` (delete it first; only if it is a stelab run directory).
    """
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise ConfigError("choose either resume or overwrite (--resume / --overwrite), not both")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"the run directory {str(run_dir)!r} exists and is not a directory")
    resume_from: Path | None = None
    if is_run_dir(run_dir) and not started(run_dir) and not resume:
        shutil.rmtree(run_dir)  # a run that stopped before its first epoch: nothing to keep
    if run_dir.exists() and not _empty(run_dir):
        if resume:
            if not is_run_dir(run_dir):
                raise ConfigError(
                    f"cannot resume {str(run_dir)!r}: it is not a stelab run directory "
                    f"(no {CONFIG})"
                )
            check_resumable(run_dir, cfg)
            last = run_dir / CKPT_DIR / LAST
            resume_from = last if last.is_file() else None
        elif overwrite:
            if not (is_run_dir(run_dir) or (run_dir / CKPT_DIR).is_dir()):
                raise ConfigError(
                    f"refusing to overwrite {str(run_dir)!r}: it is not a stelab run directory "
                    f"(no {CONFIG}); remove it yourself or choose another --out"
                )
            shutil.rmtree(run_dir)
        else:
            raise ConfigError(
                f"the run directory {str(run_dir)!r} already exists; pass --resume to continue "
                "it or --overwrite to start over (train(..., resume=True / overwrite=True))"
            )
    check_writable(run_dir)
    write_text(run_dir / CONFIG, dump_config(cfg))
    return resume_from


def check_resumable(run_dir: Path, cfg: TrainConfig) -> None:
    """ConfigError if ``cfg`` differs from the stored config beyond :data:`RESUMABLE_CHANGES`."""
    from ..config import load_config

    try:
        stored = load_config(run_dir / CONFIG)
    except ConfigError as e:
        raise ConfigError(
            f"cannot resume {str(run_dir)!r}: its stored config is invalid: {e}"
        ) from None
    diff = diff_configs(config_to_dict(stored), config_to_dict(cfg))
    bad = {k: v for k, v in diff.items() if k not in RESUMABLE_CHANGES}
    if bad:
        parts = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in sorted(bad.items())]
        raise ConfigError(
            f"cannot resume {str(run_dir)!r} with a different config ({'; '.join(parts)}); "
            f"only {', '.join(RESUMABLE_CHANGES)} may change on resume. Start a new run "
            "directory (or use train.init_from to start from its weights)"
        )


def environment(
    cfg: TrainConfig, *, device: str, world_size: int, extra: Mapping[str, Any]
) -> dict[str, Any]:
    """What a run needs to be reproduced: versions, seed, device, host, time."""
    import numpy
    import torch

    from .. import __version__

    try:
        import lightning

        lightning_version = lightning.__version__
    except Exception:  # pragma: no cover
        lightning_version = None
    env = {
        "stelab": __version__,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "lightning": lightning_version,
        "numpy": numpy.__version__,
        "platform": platform.platform(),
        "hostname": socket.gethostname(),
        "start_time": datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds"),
        "seed": cfg.train.seed,
        "deterministic": cfg.train.deterministic,
        "device": device,
        "world_size": world_size,
        "torch_threads": torch.get_num_threads(),
        "argv": list(sys.argv),
    }
    if torch.cuda.is_available() and device.startswith("cuda"):
        env["cuda"] = torch.version.cuda
        env["device_name"] = torch.cuda.get_device_name()
    env.update(extra)
    return env


def write_env(run_dir: Path, env: dict) -> None:
    """Write env.json; an earlier session's record (a resumed run) goes under ``sessions``."""
    path = run_dir / ENV
    sessions: list = []
    if path.is_file():
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            sessions = [*old.pop("sessions", []), old]
        except (OSError, ValueError):
            sessions = []
    write_json(path, {**env, "sessions": sessions} if sessions else env)


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return str(v)


def write_metrics_csv(run_dir: Path, history: Sequence[Mapping[str, Any]]) -> None:
    """metrics.csv from the per-epoch history (rewritten whole, atomically)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for row in history:
        w.writerow([_cell(row.get(c)) for c in CSV_COLUMNS])
    write_text(run_dir / METRICS_CSV, buf.getvalue())


def read_metrics_csv(path: Path) -> list[dict[str, float | int | None]]:
    """The rows of a metrics.csv as dicts of numbers (``epoch`` an int)."""
    return read_numeric_csv(path, int_columns=("epoch",))
