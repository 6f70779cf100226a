"""`stelab train` and `stelab report` (registered on the main app by :mod:`stelab.cli`).

Heavy modules (torch, Lightning, matplotlib) are imported inside the commands, so
``stelab --help`` stays fast.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the training and report commands to ``app``."""

    @app.command()
    def train(
        config: Annotated[
            Path,
            typer.Argument(
                help="Experiment config (TOML), or a run directory (its config.toml) to resume."
            ),
        ],
        set_: Annotated[
            list[str] | None,
            typer.Option(
                "--set",
                help="Override a config value: --set optim.lr=0.01 --set model.bits=4 "
                "(TOML literal; anything else is a string). Repeatable.",
            ),
        ] = None,
        out: Annotated[
            Path | None,
            typer.Option(
                "--out", help="Run directory (default: runs/<config stem>, or the run directory)."
            ),
        ] = None,
        resume: Annotated[
            bool, typer.Option("--resume", help="Continue from the run's last checkpoint.")
        ] = False,
        overwrite: Annotated[
            bool,
            typer.Option(
                "--overwrite",
                help="Start over in an existing run directory: removes only the files an "
                "earlier stelab run wrote there (never your own files), after set-up.",
            ),
        ] = False,
        devices: Annotated[
            int | None,
            typer.Option(min=1, help="Processes (data parallel); sets train.devices."),
        ] = None,
        no_progress: Annotated[
            bool, typer.Option("--no-progress", help="No progress bars or per-epoch lines.")
        ] = False,
    ) -> None:
        """Train a model from a TOML config and write a run directory.

        The run directory holds config.toml, env.json, metrics.csv, metrics.json,
        train.log and checkpoints/last.pt (+ best.pt). It is created only after the
        config, data and model were set up, and locked while the run writes it. Ctrl-C
        (or a killed process) keeps the last checkpoint; continue with --resume.
        """
        from .config import load_config
        from .errors import ConfigError

        overrides = list(set_ or [])
        if devices is not None:
            overrides.append(f"train.devices={devices}")
        source = config
        if config.is_dir():
            source = config / "config.toml"
            if not source.is_file():
                raise ConfigError(
                    f"{str(config)!r} is a directory without config.toml; give a TOML config "
                    "file or a run directory"
                )
            run_dir = out if out is not None else config
        else:
            run_dir = out if out is not None else Path("runs") / config.stem
        cfg = load_config(source, overrides)

        from .train import TrainingInterrupted
        from .train import train as _train

        try:
            metrics = _train(
                cfg, run_dir, resume=resume, overwrite=overwrite, progress=not no_progress
            )
        except TrainingInterrupted as e:
            typer.echo(f"stelab: {e}", err=True)
            raise typer.Exit(130) from None

        if int(os.environ.get("RANK", "0")) != 0:  # torchrun: one summary line, not N
            return

        def pct(v: float | None) -> str:
            return "n/a" if v is None else f"{100 * v:.2f}%"

        typer.echo(
            f"{run_dir}: {metrics['epochs']} epochs, test accuracy {pct(metrics['test_acc'])}, "
            f"final val accuracy {pct(metrics['final_val_acc'])}, best val accuracy "
            f"{pct(metrics['best_val_acc'])} (epoch {metrics['best_epoch']}), "
            f"{metrics['wall_time_s']:.1f} s"
        )

    @app.command()
    def report(
        run_dirs: Annotated[
            list[Path], typer.Argument(help="Run directories written by `stelab train`.")
        ],
        out: Annotated[
            Path, typer.Option("--out", help="Where report.md, report.html and the plots go.")
        ] = Path("report"),
    ) -> None:
        """Tables (mean ± std over seeds) and loss/accuracy plots from run directories,
        as report.md and report.html."""
        from .report import write_report

        path = write_report(run_dirs, out)
        typer.echo(f"wrote {path} and {path.with_suffix('.html')}")
