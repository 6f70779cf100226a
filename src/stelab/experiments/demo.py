"""A one-minute demo: LeNet-5 with 2-bit activations on scikit-learn's digits,
trained with two estimators, printing their test accuracies.

It uses only data that ships with the install, and shows the library's whole
path: a zoo model built with an activation quantizer, trained by SGD, with the
estimator as the only difference between the runs.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .. import models
from ..data import load


def train_digits(
    estimator: str,
    *,
    bits: int = 2,
    epochs: int = 8,
    lr: float = 0.05,
    batch_size: int = 64,
    seed: int = 0,
    threads: int | str = "auto",
    on_epoch: Callable[[int, float], Any] | None = None,
) -> dict[str, float]:
    """Train LeNet-5 (σ_α activations, ``bits`` bits, ``estimator`` backward) on digits.

    SGD with momentum 0.9 and cosine decay (per epoch), through :func:`stelab.train.fit`
    in a temporary run folder; returns the final train loss and the test accuracy.
    ``threads``: torch threads while training, as ``train.threads``
    (:func:`stelab.threads.resolve_threads`; "auto" gives 1 for this small model);
    torch's setting is restored afterwards. ``on_epoch(epoch, train_loss)`` after each
    epoch (0-based).
    """
    from ..config import OptimConfig, ScheduleConfig
    from ..train import fit

    torch.manual_seed(seed)
    data = load("digits", seed=seed, progress=False)
    model = models.build(
        "lenet5",
        num_classes=data.num_classes,
        in_shape=data.input_shape,
        act={"bits": bits, "estimator": estimator},
    )
    report = None
    if on_epoch is not None:

        def report(row: dict[str, Any]) -> None:
            on_epoch(int(row["epoch"]) - 1, float(row["train_loss"]))

    m = fit(
        model,
        data,
        epochs=epochs,
        optimizer=OptimConfig(name="sgd", lr=lr, momentum=0.9),
        schedule=ScheduleConfig(name="cosine"),
        batch_size=batch_size,
        seed=seed,
        threads=threads,
        save_best=False,
        on_epoch=report,
    )
    return {"train_loss": float(m["final_train_loss"]), "test_accuracy": float(m["test_acc"])}


def run(
    estimators: Sequence[str] = ("ste", "clipped_relu"),
    *,
    bits: int = 2,
    epochs: int = 8,
    seed: int = 0,
    log: Callable[[str], Any] = print,
    progress: bool = False,
    verbose: bool = False,
) -> dict[str, dict[str, float]]:
    """Train once per estimator and log one line each; returns the results.

    ``progress``: on a terminal (stderr), one rich bar per estimator (epochs, ETA);
    ``verbose``: a line per epoch as well.
    """
    from contextlib import nullcontext

    bars: Any = None
    if progress:
        from rich.console import Console

        console = Console(stderr=True)
        if console.is_terminal:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            bars = Progress(
                TextColumn("{task.description}"),
                BarColumn(bar_width=30),
                MofNCompleteColumn(),
                TextColumn("epochs"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=console,
                redirect_stdout=sys.stdout.isatty(),
            )
    out = {}
    with bars if bars is not None else nullcontext():
        tasks = {}
        if bars is not None:
            tasks = {e: bars.add_task(f"{e:>13}", total=epochs, start=False) for e in estimators}
        for est in estimators:

            def on_epoch(epoch: int, loss: float, est: str = est) -> None:
                if bars is not None:
                    bars.advance(tasks[est])
                if verbose:
                    log(f"  {est} epoch {epoch + 1}/{epochs}: train loss {loss:.4f}")

            if bars is not None:
                bars.start_task(tasks[est])
            t0 = time.perf_counter()
            r = train_digits(est, bits=bits, epochs=epochs, seed=seed, on_epoch=on_epoch)
            r["seconds"] = time.perf_counter() - t0
            out[est] = r
            log(
                f"LeNet-5, {bits}-bit activations, estimator {est:>13}: "
                f"test accuracy {100 * r['test_accuracy']:.2f}%  "
                f"(train loss {r['train_loss']:.4f}, {r['seconds']:.1f} s)"
            )
    return out
