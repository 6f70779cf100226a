"""The toy SBN of [S20] §5 and its REINFORCE training loop (the checkpoints ``gradeval``
analyses).

psa-toy data (seed 1, float64, 200 points), SBN 2-5-5-5-1 with logistic noise and hidden
states in {0, 1}, trained with REINFORCE (1 sample), SGD lr 0.03, momentum 0.9, batch 10.
The loop is :func:`train_toy`; everything else here saves and loads its checkpoints.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import torch

from ...io import atomic_write_bytes
from ..spine import cached

__all__ = ["TRAIN", "checkpoint_path", "data", "load_checkpoint", "model", "train_toy"]

#: the training protocol (also the cache key of the checkpoints)
TRAIN = {
    "estimator": "reinforce",
    "samples": 1,
    "lr": 0.03,
    "momentum": 0.9,
    "batch_size": 10,
    "hidden": [5, 5, 5],
    "states": "01",
    "data": "psa-toy seed 1 float64",
}


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """The 200 training points ``(x, t)`` of ``psa-toy`` in float64."""
    from ... import data as _data

    return tuple(_data.load("psa-toy", dtype=torch.float64).train)  # type: ignore[return-value]


def model(seed: int) -> Any:
    """The untrained toy SBN, initialised from ``seed`` (the global RNG is left alone)."""
    from ...sbn import sbn_mlp

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return sbn_mlp(2, tuple(TRAIN["hidden"]), 1, states=TRAIN["states"], dtype=torch.float64)


def _save_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    buf = io.BytesIO()
    torch.save({k: v.detach().clone() for k, v in state.items()}, buf)
    atomic_write_bytes(path, buf.getvalue())


def checkpoint_path(out_dir: Path, epoch: int) -> Path:
    """Where :func:`train_toy` saves the weights after ``epoch``."""
    return Path(out_dir) / "checkpoints" / f"epoch_{epoch:04d}.pt"


def _zero_one(eta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Per-example 0-1 error of the sign of ``eta`` for targets ``t`` in {-1, +1}."""
    return (eta.reshape(-1) * t.reshape(-1) <= 0).to(eta.dtype)


def _train(
    out_dir: Path, epochs: int, checkpoints: list[int], seed: int, curve_every: int, progress: bool
) -> dict[str, Any]:
    """The training (through :func:`stelab.train.fit`, run folder ``checkpoints/run``):
    saves the listed checkpoints, returns the curve."""
    from ...config import OptimConfig, ScheduleConfig
    from ...data import Split, Splits
    from ...sbn import exact_expected_loss, logistic_loss, surrogate_loss
    from ...train import fit
    from .sbn_training import global_rngs_kept

    x, y = data()
    net = model(seed)
    noise = torch.Generator().manual_seed(seed * 7919 + 2)
    none = Split(x[:0], y[:0])
    splits = Splits("psa-toy", Split(x, y), none, none, None, (2,), "psa-toy seed 1 float64")

    def point(epoch: int) -> list[float]:
        with torch.no_grad():
            loss = float(exact_expected_loss(net, x, y, logistic_loss))
            err = float(exact_expected_loss(net, x, y, _zero_one))
        return [epoch, loss, 1.0 - err]

    def on_epoch(row: dict[str, Any]) -> None:
        epoch = int(row["epoch"])
        if epoch % curve_every == 0 or epoch in checkpoints or epoch == 1:
            curve.append(point(epoch))
        if epoch in checkpoints:
            _save_state(checkpoint_path(out_dir, epoch), net.state_dict())

    curve = [point(0)]
    _save_state(checkpoint_path(out_dir, 0), net.state_dict())
    t0 = time.perf_counter()
    with global_rngs_kept(torch.device("cpu")):
        fit(
            net,
            splits,
            run_dir=out_dir / "checkpoints" / "run",
            overwrite=True,  # an earlier, unfinished training: start again
            epochs=epochs,
            batch_size=TRAIN["batch_size"],
            step=lambda m, b: surrogate_loss(m, *b, logistic_loss, "reinforce", 1, noise),
            generators={"noise": noise},
            optimizer=OptimConfig(name="sgd", lr=TRAIN["lr"], momentum=TRAIN["momentum"]),
            schedule=ScheduleConfig(name="constant"),
            seed=seed,
            shuffle_seed=seed * 7919 + 1,
            threads=torch.get_num_threads(),
            save_best=False,
            # a checkpoint holds the whole history: writing one after each of the many
            # tiny epochs took about a third of the time (the results are the same)
            checkpoint_every=50,
            on_epoch=on_epoch,
            progress=progress,
            name="psa-toy",
        )
    return {"epochs_done": epochs, "curve": curve, "seconds": time.perf_counter() - t0}


def train_toy(
    out_dir: Path,
    *,
    epochs: int,
    checkpoints: list[int],
    seed: int = 0,
    curve_every: int = 10,
    progress: bool = False,
) -> dict[str, Any]:
    """Train the toy SBN with REINFORCE as in docs/papers/psa2020.md and save the checkpoints.

    Checkpoints are ``out_dir/checkpoints/epoch_XXXX.pt`` (state dicts, loadable with
    ``weights_only=True``) plus ``train.json`` (config, exact expected loss curve).
    A previous run with the same settings whose checkpoints are all there is reused.
    Returns ``{"curve": [[epoch, exact expected loss, exact expected accuracy]], "seconds",
    "reused", "epochs_done"}``.
    """
    out_dir = Path(out_dir)
    meta_path = out_dir / "checkpoints" / "train.json"
    key = {
        **TRAIN,
        "seed": seed,
        "curve_every": curve_every,
        "curve": "loss, accuracy",
        "epochs": epochs,
        "checkpoints": sorted(checkpoints),
    }
    if not all(checkpoint_path(out_dir, e).exists() for e in checkpoints):
        meta_path.unlink(missing_ok=True)  # a deleted checkpoint: train again
    meta, reused = cached(
        meta_path,
        key,
        lambda: _train(out_dir, epochs, checkpoints, seed, curve_every, progress),
    )
    return {**meta, "reused": reused}


def load_checkpoint(out_dir: Path, epoch: int, seed: int = 0) -> Any:
    """The toy SBN with the weights saved after ``epoch`` (see :func:`train_toy`)."""
    net = model(seed)
    state = torch.load(checkpoint_path(out_dir, epoch), map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return net
