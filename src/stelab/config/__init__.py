"""Experiment configs: TOML files validated into frozen dataclasses.

A config has a ``name`` and five sections. Every key is optional; the values below
are the defaults, and keys marked "absent" have no default value (they are left out
of the resolved config unless set)::

    name = ""                         # a label for reports

    [data]
    name = "digits"                   # stelab.data.names(): digits, mnist, cifar10, ...
    data_dir = ...                    # absent: stelab's search path and cache
    limit = ...                       # absent: all training rows (else a seeded subset)
    val_size = ...                    # absent: the dataset's default (5000; digits 180)
    seed = 0                          # seed of the validation carve-out (not train.seed)
    batch_size = 64                   # rows per optimizer step, over all processes
    eval_batch_size = 1000
    augment = "none"                  # none | flip_crop (flip + pad-4 crop) | crop (no flip)
    standardize = true
    download = true
    drop_last = false                 # drop an incomplete last batch (always with devices > 1)

    [model]
    name = "lenet5"                   # stelab.models.names()
    bits = ...                        # absent (or "float"): float ReLU; else 1..16 bits σ_α
    estimator = "clipped_relu"        # stelab.estimators.names()
    alpha = ...                       # absent: MSE-optimal σ_α step for a half-Gaussian
    width = ...                       # vgg11 (float multiplier) and resnet20 (int) only
    weights = ...                     # absent: float weights; "sign:ste", or a table
    [model.estimator_params]          # e.g. beta = 5 for swish_sign (default: none)
    # [model.weights]                 # fn = "uniform", bits = 4, step = "auto", estimator = "ste"

    [optim]
    name = "sgd"                      # sgd | adam | adamw
    lr = 0.1
    momentum = 0.9                    # sgd only
    nesterov = false                  # sgd only, needs momentum > 0
    weight_decay = 0.0
    betas = [0.9, 0.999]              # adam/adamw only
    eps = 1e-8                        # adam/adamw only

    [schedule]                        # the learning rate, set once per epoch
    name = "constant"                 # constant | multistep | cosine
    milestones = []                   # multistep: lr *= gamma after these many epochs
    gamma = 0.1
    min_lr = 0.0                      # cosine: the learning rate it decays to

    [train]
    epochs = 10
    seed = 0
    deterministic = false             # torch.use_deterministic_algorithms(True)
    devices = 1                       # processes (data parallel); > 1 uses DDP (gloo on CPU)
    accelerator = "auto"              # auto | cpu | cuda | gpu | mps
    precision = "32-true"             # 32-true | 64-true | 16-mixed | bf16-mixed | bf16-true
    threads = "auto"                  # "auto": 1 for small models, else the cores; or an int
    grad_clip = ...                   # clamp every gradient element to [-v, v] ([S20]: 1e3)
    grad_clip_norm = ...              # clip the global gradient norm
    init_from = ...                   # a run dir or checkpoint of a float model ([Y19])
    eval_every = 1                    # validate every n epochs (and after the last)
    save_best = true                  # keep checkpoints/best.pt (best validation accuracy)
    max_steps = ...                   # stop after this many optimizer steps (mid-epoch too)

Entry points: :func:`load_config` (file + ``--set`` overrides), :func:`parse_config`
(a dict), :func:`dump_config` (resolved TOML, round-trips), :func:`config_to_dict`,
:func:`parse_override`. Every error names the section, the key, the bad value and
what is allowed (with the closest valid name for typos), as a
:class:`~stelab.errors.ConfigError` or :class:`~stelab.errors.StelabTypeError`.
"""

from __future__ import annotations

from .overrides import apply_overrides, load_config, parse_override
from .schema import (
    ACCELERATORS,
    AUGMENTS,
    DATA_SEED_MAX,
    INT_MAX,
    MAX_DEPTH,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    SEED_MAX,
    DataConfig,
    LoopConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)
from .sections import parse_config
from .tomlio import config_to_dict, diff_configs, dump_config, toml_string

__all__ = [
    "DataConfig",
    "LoopConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_config",
    "parse_override",
    "apply_overrides",
    "diff_configs",
    "toml_string",
    "SCHEDULES",
    "OPTIMIZERS",
    "AUGMENTS",
    "ACCELERATORS",
    "PRECISIONS",
    "INT_MAX",
    "SEED_MAX",
    "DATA_SEED_MAX",
    "MAX_DEPTH",
]
