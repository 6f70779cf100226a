"""What defines a [S24] lockstep run: :class:`Config` and the quick / full presets."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["VARIANTS", "Config", "preset"]

#: the STE twins of the custom model (see :mod:`.trajectories`)
VARIANTS = ("i", "ii", "iii")


@dataclass(frozen=True)
class Config:
    """Everything that defines a run (written to results.json)."""

    dataset: str = "digits"
    limit: int | None = None  # training rows kept
    dtype: str = "float64"
    channels: tuple[int, int] = (8, 16)
    bits: int = 4
    step_fraction: float = 1 / 6  # Δ_l = bound_l · step_fraction
    batch_size: int = 64
    steps: int = 150  # main runs
    eval_every: int = 15
    test_limit: int | None = None  # test rows used for accuracy
    estimators: tuple[tuple[str, tuple[tuple[str, float], ...]], ...] = (
        ("cosine", (("a", 0.5),)),
        ("dsq", (("k", 3.0),)),
    )
    # name -> (torch optimizer, lr, extra hyperparameters)
    optimizers: tuple[tuple[str, str, float, tuple[tuple[str, Any], ...]], ...] = (
        ("sgd", "SGD", 0.02, ()),
        ("sgd+momentum", "SGD", 0.001, (("momentum", 0.9),)),
        ("adam", "Adam", 1e-4, ()),
    )
    # learning-rate sweep at a fixed horizon lr·steps = lr0·sweep_steps0, lr0 = the main lr
    sweep_optimizers: tuple[str, ...] = ("sgd",)
    sweep_lr_factors: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    sweep_steps0: int = 40
    # Adam sweeps (custom vs plain STE, same lr and w0): the second-moment window ...
    adam_window_lrs: tuple[float, ...] = (1e-4, 1e-3)
    adam_beta2s: tuple[float, ...] = (0.9, 0.99, 0.999)
    # ... and eps (at adam_eps_lr, betas (0.9, adam_eps_beta2))
    adam_eps: tuple[float, ...] = (1e-8, 1e-3, 1e-1)
    adam_eps_lr: float = 1e-4
    adam_eps_beta2: float = 0.9
    adam_steps: int = 100
    notes: tuple[str, ...] = field(default=())


def preset(quick: bool) -> Config:
    """The configuration of ``stelab reproduce disguise2024`` (``--quick`` or full)."""
    if quick:
        return Config()
    # Fashion-MNIST has larger weight gradients and a finer step in the 784-input fc layer
    # (Δ = 0.006) than digits, so the same lr moves a weight further per step in units of
    # Δ: the learning rates here are 4x smaller than quick mode's.
    return Config(
        dataset="fashion-mnist",
        limit=20000,
        dtype="float32",
        steps=500,
        eval_every=25,
        test_limit=2000,
        optimizers=(
            ("sgd", "SGD", 0.005, ()),
            ("sgd+momentum", "SGD", 0.00025, (("momentum", 0.9),)),
            ("adam", "Adam", 3e-5, ()),
        ),
        sweep_optimizers=("sgd", "sgd+momentum"),
        sweep_lr_factors=(0.25, 0.5, 1.0, 2.0),
        sweep_steps0=100,
        adam_window_lrs=(3e-5, 1e-4, 1e-3),
        adam_eps_lr=3e-5,
        adam_steps=200,
    )
