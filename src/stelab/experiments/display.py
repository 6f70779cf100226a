"""What ``stelab reproduce`` shows while it runs: live rich bars on a terminal, else lines."""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["Display"]

_EPOCH = re.compile(r"\bepoch (\d+)/(\d+):")
_START = re.compile(r"^(?:starting|resuming at epoch \d+) ([^:]+):")


class Display:
    """What ``reproduce`` shows while it runs: rich bars on a terminal, else log lines.

    The bars: one for all parts (done / total, ETA from the parts done so far), one
    for the running part (its training runs finished so far, elapsed), and one for
    the training run inside it, advanced by the ``epoch k/n:`` records of the
    ``stelab.train`` logger (ETA from its epochs).
    """

    def __init__(
        self, n_parts: int, *, bars: bool, log: Callable[[str], Any], console: Any = None
    ) -> None:
        self.n, self.log, self.progress = n_parts, log, None
        self._handler: logging.Handler | None = None
        if bars:
            from rich.console import Console

            console = console if console is not None else Console(stderr=True)
            if console.is_terminal:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    SpinnerColumn,
                    TextColumn,
                    TimeElapsedColumn,
                    TimeRemainingColumn,
                )

                self.progress = Progress(
                    SpinnerColumn(),
                    TextColumn("{task.description}"),
                    BarColumn(bar_width=30),
                    MofNCompleteColumn(),
                    TimeElapsedColumn(),
                    TextColumn("ETA"),
                    TimeRemainingColumn(),
                    console=console,
                    transient=True,
                    redirect_stdout=sys.stdout.isatty(),
                )

    def __enter__(self) -> Display:
        if self.progress is not None:
            self.progress.start()
            self.all = self.progress.add_task("all parts", total=self.n)
            self.part = self.progress.add_task("", total=None, visible=False)
            self.run = self.progress.add_task("", total=None, visible=False)
            display = self

            class Handler(logging.Handler):
                def emit(self, record: logging.LogRecord) -> None:
                    try:
                        display._record(record.getMessage())
                    except Exception:  # pragma: no cover - a display problem stops nothing
                        self.handleError(record)

            self._handler = Handler(logging.INFO)
            logging.getLogger("stelab.train").addHandler(self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            if self._handler is not None:
                logging.getLogger("stelab.train").removeHandler(self._handler)
            self.progress.stop()

    def _record(self, msg: str) -> None:
        assert self.progress is not None
        m = _START.match(msg)
        if m:
            self.progress.reset(self.run, total=None, visible=True)
            self.progress.update(self.run, description=f"  run {m.group(1)}")
        if msg.startswith("finished "):  # a training run of the part is done
            self.progress.advance(self.part)
        m = _EPOCH.search(msg)
        if m:
            self.progress.update(
                self.run, completed=int(m.group(1)), total=int(m.group(2)), visible=True
            )

    def start(self, name: str, i: int) -> None:
        """Part ``name`` (the ``i``-th, from 0) starts."""
        if self.progress is None:
            self.log(f"{name}: running (part {i + 1} of {self.n})")
            return
        self.progress.reset(self.part, total=None, visible=True, description=name)
        self.progress.update(self.run, visible=False)

    def end(self, name: str, line: str) -> None:
        """Part ``name`` is finished, reused or skipped: ``line`` says how."""
        self.log(line)
        if self.progress is not None:
            self.progress.advance(self.all)
            self.progress.update(self.part, visible=False)
            self.progress.update(self.run, visible=False)
