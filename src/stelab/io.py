"""Atomic file writes: a temp file in the destination folder, then ``os.replace``.

A reader never sees a half-written file, and an interrupted write leaves the
previous version (or nothing) in place.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from .errors import ConfigError

_TEMP_SUFFIX = ".tmp"


def _temp_prefix(name: str) -> str:
    return f".{name}."


def is_temp_of(filename: str, target: str) -> bool:
    """Whether ``filename`` is a temporary file :func:`atomic_open` makes for a file named
    ``target`` in the same folder: ``.TARGET.XXXXXXXX.tmp`` (``XXXXXXXX`` from
    :func:`tempfile.mkstemp`). Such a file outlives its write only if the process was
    killed mid-write; :func:`remove_stale_temp_files` removes those."""
    pattern = re.escape(_temp_prefix(target)) + r"[A-Za-z0-9_]+" + re.escape(_TEMP_SUFFIX)
    return re.fullmatch(pattern, filename) is not None


def remove_stale_temp_files(folder: str | os.PathLike[str], targets: tuple[str, ...]) -> list[Path]:
    """Delete the temporary files :func:`atomic_open` left in ``folder`` for the files named
    ``targets`` (a writer killed mid-write). Only call it while no other writer can be
    writing those files (e.g. holding the run folder's lock). Returns what was removed."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        if any(is_temp_of(entry.name, t) for t in targets) and entry.is_file():
            with contextlib.suppress(FileNotFoundError):
                entry.unlink()
                removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "w") -> Iterator[IO[Any]]:
    """Open a temporary file next to ``path`` (``"w"``: UTF-8 text, ``"wb"``: bytes);
    when the block ends without an exception, fsync it, move it onto ``path`` and
    fsync the folder (the rename itself is then on disk too).

    Creates the parent folder. On an exception the temporary file is removed and
    ``path`` keeps its previous content (or stays absent).
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path.name), suffix=_TEMP_SUFFIX)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give what open() would
        kw = {} if mode == "wb" else {"encoding": "utf-8", "newline": ""}
        with os.fdopen(fd, mode, **kw) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    """fsync ``folder`` so that the rename in it survives a power loss (POSIX; a no-op
    where folders cannot be opened, as on Windows, or the file system refuses)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; creates the parent folder."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON, atomically (non-finite floats become null, other
    non-JSON values their ``str``)."""
    text = json.dumps(_finite(obj), indent=2, sort_keys=False, default=str)
    return atomic_write_text(path, text + "\n")


def read_numeric_csv(
    path: str | os.PathLike[str], int_columns: tuple[str, ...] = ()
) -> list[dict[str, float | int | None]]:
    """The rows of a CSV file with a header as dicts of numbers: None for empty cells,
    ints in ``int_columns``. A ConfigError names the file when it is not UTF-8 text
    CSV (binary, NUL bytes, a huge field), has no header, or has a cell that is not a
    number (naming the column too)."""
    rows = []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise ConfigError(f"{str(path)!r} is empty: a CSV file with a header is expected")
            for rec in reader:
                row: dict[str, float | int | None] = {}
                for k, v in rec.items():
                    if k is None:
                        continue
                    try:
                        kind = int if k in int_columns else float
                        row[k] = None if v in ("", None) else kind(v)
                    except ValueError:
                        raise ConfigError(
                            f"{str(path)!r}: column {k!r} has a non-number {v[:40]!r}"
                        ) from None
                rows.append(row)
    except (UnicodeDecodeError, csv.Error) as e:
        why = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else str(e)
        raise ConfigError(f"{str(path)!r} is not a readable CSV file ({why})") from None
    return rows


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if obj == obj and abs(obj) != float("inf") else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block is done, then raise it: files written together
    (a checkpoint and the metrics it describes) are never left half-updated. Only the main
    thread can do this; elsewhere the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda *args: caught.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught and callable(previous):
        previous(*caught[0])  # Python's default handler raises KeyboardInterrupt here
    elif caught and previous == signal.SIG_DFL:
        signal.raise_signal(signal.SIGINT)
