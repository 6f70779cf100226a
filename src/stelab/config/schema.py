"""The config schema: the sections as frozen dataclasses, their allowed names and limits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "multistep", "cosine")
AUGMENTS = ("none", "flip_crop", "crop")
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")
PRECISIONS = ("32-true", "64-true", "16-mixed", "bf16-mixed", "bf16-true")
FLOAT_WORDS = ("float", "none", "fp32", "full")


@dataclass(frozen=True)
class DataConfig:
    """``[data]``: which dataset, how it is split, batched and augmented."""

    name: str = "digits"
    data_dir: str | None = None
    limit: int | None = None
    val_size: int | None = None
    seed: int = 0
    batch_size: int = 64
    eval_batch_size: int = 1000
    augment: str = "none"
    standardize: bool = True
    download: bool = True
    drop_last: bool = False


@dataclass(frozen=True)
class ModelConfig:
    """``[model]``: a zoo model with its activation and weight quantization."""

    name: str = "lenet5"
    bits: int | None = None
    estimator: str = "clipped_relu"
    estimator_params: dict[str, Any] = field(default_factory=dict)
    alpha: float | None = None
    weights: str | dict[str, Any] | None = None
    width: float | None = None


@dataclass(frozen=True)
class OptimConfig:
    """``[optim]``: the optimizer."""

    name: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8


@dataclass(frozen=True)
class ScheduleConfig:
    """``[schedule]``: the per-epoch learning-rate schedule."""

    name: str = "constant"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    min_lr: float = 0.0


@dataclass(frozen=True)
class LoopConfig:
    """``[train]``: the training loop (epochs, seeds, processes, clipping, init)."""

    epochs: int = 10
    seed: int = 0
    deterministic: bool = False
    devices: int = 1
    accelerator: str = "auto"
    precision: str = "32-true"
    threads: int | str = "auto"
    grad_clip: float | None = None
    grad_clip_norm: float | None = None
    init_from: str | None = None
    eval_every: int = 1
    save_best: bool = True
    max_steps: int | None = None


@dataclass(frozen=True)
class TrainConfig:
    """A whole experiment: ``name`` plus the five sections."""

    name: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: LoopConfig = field(default_factory=LoopConfig)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "train": LoopConfig,
}
TOP_KEYS = ("name", *SECTIONS)

INT_MAX = 2**63 - 1  # TOML integers are 64-bit: nothing larger is written or read back
SEED_MAX = 2**32 - 1  # train.seed: Lightning's seed_everything seeds numpy, which takes 32 bits
DATA_SEED_MAX = 2**64 - 1  # data.seed: a torch.Generator seed (unsigned 64-bit)
MAX_DEPTH = 16  # nesting of tables/arrays in free-form values (estimator_params, weights)
