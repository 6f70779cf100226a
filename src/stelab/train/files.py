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

A run goes through :func:`plan_run` (read-only checks: may a run go there, what does it
resume from) before set-up, and :func:`commit` (free space, the :class:`RunLock`, the
checks again under the lock, removing an earlier run's files, stale temporary files,
the marker :data:`MARKER` and config.toml) after set-up succeeded.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import math
import os
import platform
import re
import shutil
import socket
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..config import TrainConfig, config_to_dict, diff_configs, dump_config
from ..errors import ConfigError, StelabError
from ..io import atomic_write_text as write_text
from ..io import read_numeric_csv, remove_stale_temp_files, write_json

MARKER = ".stelab-run.json"
LOCK = ".stelab.lock"
RUN_FORMAT = "stelab.run/1"
TB_DIR = "tensorboard"
CONFIG = "config.toml"
ENV = "env.json"
METRICS_CSV = "metrics.csv"
METRICS_JSON = "metrics.json"
LOG = "train.log"
CKPT_DIR = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"

# what stelab writes in a run folder; --overwrite removes these and nothing else
OWNED_FILES = (
    CONFIG,
    ENV,
    METRICS_CSV,
    METRICS_JSON,
    LOG,
    MARKER,
    f"{CKPT_DIR}/{LAST}",
    f"{CKPT_DIR}/{BEST}",
)
_OWNED_TOP = (CONFIG, ENV, METRICS_CSV, METRICS_JSON, MARKER)
_OWNED_CKPT = (LAST, BEST)
_TB_FILE = re.compile(r"events\.out\.tfevents\..+|hparams\.yaml")

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


def is_marked(path: Path) -> bool:
    """Whether stelab marked ``path`` as a run folder it wrote (:data:`MARKER`)."""
    try:
        with open(Path(path) / MARKER, encoding="utf-8") as f:
            return json.load(f).get("format") == RUN_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _entries(path: Path) -> list[str]:
    """The names in ``path`` other than the lock file (a folder holding only a lock is empty)."""
    return [] if not path.is_dir() else [e.name for e in path.iterdir() if e.name != LOCK]


def started(run_dir: Path) -> bool:
    """Whether a run in ``run_dir`` finished at least one epoch (has a checkpoint or metrics)."""
    return (run_dir / CKPT_DIR / LAST).is_file() or (run_dir / METRICS_CSV).is_file()


# --- the run-folder lock ----------------------------------------------------------------


def _holder(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace").split()
    except OSError:
        text = []
    return f"pid {text[0]} on {text[1]}" if len(text) >= 2 else "another process"


class RunLock:
    """An exclusive lock on a run folder: ``fcntl.flock`` on ``RUN_DIR/.stelab.lock``,
    which holds the pid and host of its holder.

    The kernel drops a flock when its process ends, however it ends (SIGKILL too), so a
    lock file left by a killed run never blocks a later ``--resume``. On release the file
    is removed; :meth:`acquire` checks that the file it locked is still the one at the
    path, so a release racing with an acquire cannot give two holders. On systems
    without ``fcntl`` (Windows) there is no lock.
    """

    def __init__(self, path: Path, fd: int | None):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, run_dir: Path) -> RunLock:
        """Lock ``run_dir`` (which must exist), or a ConfigError naming the holder."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return cls(Path(run_dir) / LOCK, None)
        path = Path(run_dir) / LOCK
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise ConfigError(
                    f"the run directory {str(run_dir)!r} (--out) is in use by another "
                    f"stelab train ({_holder(path)}); wait for it to finish, or choose "
                    "another --out"
                ) from None
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
                return cls(path, fd)
            os.close(fd)  # the previous holder removed the file after we opened it: retry

    @staticmethod
    def held(run_dir: Path) -> str | None:
        """Who holds the lock of ``run_dir`` (``"pid N on HOST"``), or None; creates nothing."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows
            return None
        path = Path(run_dir) / LOCK
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _holder(path)
        finally:
            os.close(fd)  # closing drops the probe's own lock
        return None

    def release(self) -> None:
        """Remove the lock file and drop the lock (idempotent)."""
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = None


# --- planning (read-only) and committing a run folder -----------------------------------


@dataclass(frozen=True)
class Plan:
    """What :func:`plan_run` found: where the run goes and what it continues from."""

    run_dir: str
    resume: bool
    overwrite: bool
    resume_from: str | None = None
    stamp: tuple[int, int, int] | None = None  # (inode, size, mtime_ns) of resume_from


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _existing_ancestor(path: Path) -> Path:
    p = path.absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _check_creatable(run_dir: Path) -> None:
    anc = _existing_ancestor(run_dir)
    if not anc.is_dir():
        raise ConfigError(
            f"cannot write to the run directory {str(run_dir)!r}: {str(anc)!r} is a file, not "
            "a folder; choose another output path (--out)"
        )
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ConfigError(
            f"cannot write to the run directory {str(run_dir)!r}: no permission to write in "
            f"{str(anc)!r}; choose another output path (--out)"
        )


def plan_run(
    run_dir: Path, cfg: TrainConfig, *, resume: bool, overwrite: bool, locked: bool = False
) -> Plan:
    """Check that a run may go to ``run_dir``, reading only; returns the :class:`Plan`.

    An empty or absent folder takes a new run. A folder stelab marked as its run
    (:data:`MARKER`) that never finished an epoch is started again. Any other existing,
    non-empty folder is refused unless ``resume`` (continue from its
    ``checkpoints/last.pt``; the config may change only in :data:`RESUMABLE_CHANGES`) or
    ``overwrite`` (only a folder stelab marked; only the files stelab wrote are removed,
    by :func:`commit`). ``locked``: the caller holds the folder's lock.
    """
    run_dir = Path(run_dir)
    if resume and overwrite:
        raise ConfigError("choose either resume or overwrite (--resume / --overwrite), not both")
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(
            f"the run directory {str(run_dir)!r} (--out) exists and is not a directory"
        )
    _check_creatable(run_dir)
    if not locked and (holder := RunLock.held(run_dir)):
        raise ConfigError(
            f"the run directory {str(run_dir)!r} (--out) is in use by another stelab train "
            f"({holder}); wait for it to finish, or choose another --out"
        )
    plan = Plan(str(run_dir), resume, overwrite)
    if not _entries(run_dir):
        return plan
    if resume:
        if not is_run_dir(run_dir):
            raise ConfigError(
                f"cannot resume {str(run_dir)!r}: it is not a stelab run directory (no {CONFIG})"
            )
        check_resumable(run_dir, cfg)
        last = run_dir / CKPT_DIR / LAST
        if last.is_file():
            return dataclasses.replace(plan, resume_from=str(last), stamp=_stamp(last))
        return plan
    if is_marked(run_dir) and (overwrite or not started(run_dir)):
        return plan  # commit removes the files of the earlier run
    if overwrite:
        raise ConfigError(
            f"refusing to overwrite {str(run_dir)!r}: stelab did not mark it as a run "
            f"directory of its own (no {MARKER}), and it deletes only files it wrote; "
            "remove it yourself or choose another --out"
        )
    raise ConfigError(
        f"the run directory {str(run_dir)!r} already exists; pass --resume to continue "
        "it or --overwrite to start over (train(..., resume=True / overwrite=True))"
    )


def commit(plan: Plan, cfg: TrainConfig, *, need_bytes: int = 0) -> RunLock:
    """Create (or take over) the run folder of ``plan`` once the run has been set up:
    check free space, lock it, check the plan again under the lock, remove the files
    of an earlier run (:func:`remove_own_files`) unless resuming, remove stale temporary
    files, write the marker and config.toml. Returns the held :class:`RunLock`.

    Nothing is created or removed when it fails before the lock is taken; after, the
    folders it made are removed again.
    """
    run_dir = Path(plan.run_dir)
    anc = _existing_ancestor(run_dir)
    try:
        free = shutil.disk_usage(anc).free
    except OSError:
        free = None
    if free is not None and free < need_bytes:
        raise ConfigError(
            f"not enough free space for the run directory {str(run_dir)!r} (--out): the run "
            f"needs about {_size(need_bytes)} for its checkpoints and logs, {str(anc)!r} has "
            f"{_size(free)} free; free some space or choose another --out"
        )
    made: list[Path] = []
    p = run_dir.absolute()
    while not p.exists():
        made.append(p)
        p = p.parent
    fresh = not _entries(run_dir)  # nothing there yet: on failure, leave nothing behind
    lock = None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock.acquire(run_dir)
        again = plan_run(run_dir, cfg, resume=plan.resume, overwrite=plan.overwrite, locked=True)
        if (again.resume_from, again.stamp) != (plan.resume_from, plan.stamp):
            raise ConfigError(
                f"the run directory {str(run_dir)!r} changed while this run was being set up "
                "(another stelab train wrote to it); start this run again"
            )
        if not plan.resume:
            remove_own_files(run_dir)
        remove_stale_temp_files(run_dir, _OWNED_TOP)
        remove_stale_temp_files(run_dir / CKPT_DIR, _OWNED_CKPT)
        (run_dir / CKPT_DIR).mkdir(exist_ok=True)
        _write_marker(run_dir)
        write_text(run_dir / CONFIG, dump_config(cfg))
    except BaseException as e:
        if lock is not None:
            if fresh:
                with contextlib.suppress(OSError):
                    remove_own_files(run_dir)
            lock.release()
        for d in made:  # deepest first; only the folders this call made, and only if empty
            with contextlib.suppress(OSError):
                d.rmdir()
        if isinstance(e, OSError) and not isinstance(e, StelabError):
            raise write_error(run_dir, e) from None
        raise
    return lock


def write_error(run_dir: Path, e: OSError) -> ConfigError:
    """A one-line error for a failed write in the run folder (disk full, permissions)."""
    reason = e.strerror or str(e) or type(e).__name__
    what = f" ({Path(e.filename).name})" if e.filename else ""
    return ConfigError(
        f"cannot write to the run directory {str(run_dir)!r} (--out){what}: {reason}; free "
        "some space or choose another output path (--out)"
    )


@contextlib.contextmanager
def writing(run_dir: Path) -> Iterator[None]:
    """Turn an OSError of the writes in this block into :func:`write_error`."""
    try:
        yield
    except OSError as e:
        if isinstance(e, StelabError):
            raise
        raise write_error(run_dir, e) from None


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""  # pragma: no cover


def _write_marker(run_dir: Path) -> None:
    from .. import __version__

    path = run_dir / MARKER
    created = None
    if is_marked(run_dir):
        with contextlib.suppress(OSError, ValueError):
            created = json.loads(path.read_text(encoding="utf-8")).get("created")
    now = datetime.now(timezone.utc).astimezone().isoformat(timespec="seconds")
    write_json(
        path,
        {
            "format": RUN_FORMAT,
            "created": created or now,
            "stelab": __version__,
            "files": [*OWNED_FILES, f"{TB_DIR}/events.out.tfevents.*", f"{TB_DIR}/hparams.yaml"],
            "note": "written by stelab train; --overwrite removes only the files listed here",
        },
    )


def remove_own_files(run_dir: Path) -> list[Path]:
    """Delete the files stelab writes in a run folder (:data:`OWNED_FILES`, TensorBoard
    event files, their temporary files) and then ``checkpoints/`` and ``tensorboard/``
    if that leaves them empty. Anything else (a user's notes, subfolders) is kept."""
    removed = []
    for rel in OWNED_FILES:
        f = run_dir / rel
        if f.is_file() or f.is_symlink():
            f.unlink()
            removed.append(f)
    tb = run_dir / TB_DIR
    if tb.is_dir():
        for f in tb.iterdir():
            if _TB_FILE.fullmatch(f.name) and f.is_file():
                f.unlink()
                removed.append(f)
    removed += remove_stale_temp_files(run_dir, _OWNED_TOP)
    removed += remove_stale_temp_files(run_dir / CKPT_DIR, _OWNED_CKPT)
    for d in (run_dir / CKPT_DIR, tb):
        if d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    return removed


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
    """metrics.csv from the per-epoch history (rewritten whole, atomically): the
    :data:`CSV_COLUMNS`, then any other metric a custom training step or evaluation
    logged (``train_<name>``, ``val_<name>``), in the order they first appear."""
    extra = [k for k in dict.fromkeys(k for r in history for k in r) if k not in CSV_COLUMNS]
    columns = (*CSV_COLUMNS, *extra)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(columns)
    for row in history:
        w.writerow([_cell(row.get(c)) for c in columns])
    write_text(run_dir / METRICS_CSV, buf.getvalue())


def read_metrics_csv(path: Path) -> list[dict[str, float | int | None]]:
    """The rows of a metrics.csv as dicts of numbers (``epoch`` an int)."""
    return read_numeric_csv(path, int_columns=("epoch",))
