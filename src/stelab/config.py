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

import copy
import dataclasses
import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, StelabError, StelabTypeError, closest

try:  # Python >= 3.11
    import tomllib as _toml
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    try:
        import tomli as _toml  # type: ignore[no-redef]
    except ModuleNotFoundError:
        _toml = None  # type: ignore[assignment]

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
    "SCHEDULES",
    "OPTIMIZERS",
    "AUGMENTS",
]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "multistep", "cosine")
AUGMENTS = ("none", "flip_crop", "crop")
ACCELERATORS = ("auto", "cpu", "cuda", "gpu", "mps")
PRECISIONS = ("32-true", "64-true", "16-mixed", "bf16-mixed", "bf16-true")
_FLOAT_WORDS = ("float", "none", "fp32", "full")


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


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "schedule": ScheduleConfig,
    "train": LoopConfig,
}
_TOP_KEYS = ("name", *_SECTIONS)


# --- value checks -------------------------------------------------------------------


def _type_error(where: str, value: Any, expected: str) -> StelabTypeError:
    return StelabTypeError(f"{where} must be {expected}, got {value!r} ({type(value).__name__})")


INT_MAX = 2**63 - 1  # TOML integers are 64-bit: nothing larger is written or read back
SEED_MAX = 2**32 - 1  # train.seed: Lightning's seed_everything seeds numpy, which takes 32 bits
DATA_SEED_MAX = 2**64 - 1  # data.seed: a torch.Generator seed (unsigned 64-bit)
MAX_DEPTH = 16  # nesting of tables/arrays in free-form values (estimator_params, weights)


def _int(where: str, v: Any, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _type_error(where, v, "an integer")
    top = INT_MAX if hi is None else hi
    if (lo is not None and v < lo) or v > top:
        if lo is None:
            rng = f"<= {top}"
        elif hi is None and v < lo:
            rng = f">= {lo}"
        else:
            rng = f"in [{lo}, {top}]"
        raise ConfigError(f"{where} must be an integer {rng}, got {v!r}")
    return int(v)


def _float(
    where: str,
    v: Any,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise _type_error(where, v, "a number")
    x = float(v)
    bad = not math.isfinite(x)
    if lo is not None:
        bad = bad or (x <= lo if lo_open else x < lo)
    if hi is not None:
        bad = bad or (x >= hi if hi_open else x > hi)
    if bad:
        parts = []
        if lo is not None:
            parts.append(f"{'>' if lo_open else '>='} {lo:g}")
        if hi is not None:
            parts.append(f"{'<' if hi_open else '<='} {hi:g}")
        raise ConfigError(f"{where} must be a finite number {' and '.join(parts)}, got {v!r}")
    return x


def _bool(where: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise _type_error(where, v, "true or false")
    return v


def _str(where: str, v: Any) -> str:
    if not isinstance(v, str):
        raise _type_error(where, v, "a string")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(
            f"{where} must be valid Unicode text (no lone surrogates), got {v!r}"
        ) from None
    return v


def _plain(where: str, v: Any, depth: int = 0) -> Any:
    """Check a free-form value (estimator parameters, a weights table): strings, numbers,
    booleans, arrays and tables only, at most :data:`MAX_DEPTH` levels deep, so that it can
    be written to config.toml (and a checkpoint) and read back unchanged."""
    if depth > MAX_DEPTH:
        raise ConfigError(f"{where} is nested more than {MAX_DEPTH} levels deep")
    if isinstance(v, str):
        return _str(where, v)
    if isinstance(v, bool) or isinstance(v, float):
        return v
    if isinstance(v, int):
        return _int(where, v, -INT_MAX - 1)
    if isinstance(v, (list, tuple)):
        return [_plain(f"{where}[{i}]", x, depth + 1) for i, x in enumerate(v)]
    if isinstance(v, Mapping):
        return {
            _str(f"{where} (key)", k): _plain(f"{where}.{k}", x, depth + 1) for k, x in v.items()
        }
    raise _type_error(where, v, "a string, number, boolean, array or table")


def _choice(where: str, v: Any, options: Sequence[str], kind: str = "value") -> str:
    s = _str(where, v)
    if s not in options:
        hint = closest(s, options)
        raise ConfigError(
            f"{where}: unknown {kind} {s!r}; allowed: {', '.join(options)}"
            + (f" (did you mean {hint!r}?)" if hint else "")
        )
    return s


def _with_where(where: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn``; prefix the message of a stelab error it raises with ``where``."""
    try:
        return fn()
    except StelabError as e:
        raise type(e)(f"{where}: {e}") from None


# --- sections -----------------------------------------------------------------------


def _check_keys(section: str, raw: Mapping[str, Any], cls: type) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    for k in raw:
        if k not in valid:
            hint = closest(str(k), valid)
            raise ConfigError(
                f"unknown key {k!r} in section [{section}]; valid keys: {', '.join(valid)}"
                + (f" (did you mean {hint!r}?)" if hint else "")
            )


def _data(raw: Mapping[str, Any]) -> DataConfig:
    from .data.api import canonical

    _check_keys("data", raw, DataConfig)
    d = DataConfig()
    kw: dict[str, Any] = {}
    if "name" in raw:
        kw["name"] = _with_where("data.name", lambda: canonical(_str("data.name", raw["name"])))
    if raw.get("data_dir") is not None:
        kw["data_dir"] = _str("data.data_dir", raw["data_dir"])
    if raw.get("limit") is not None:
        kw["limit"] = _int("data.limit", raw["limit"], 1)
    if raw.get("val_size") is not None:
        kw["val_size"] = _int("data.val_size", raw["val_size"], 0)
    if "seed" in raw:
        kw["seed"] = _int("data.seed", raw["seed"], 0, DATA_SEED_MAX)
    for key in ("batch_size", "eval_batch_size"):
        if key in raw:
            kw[key] = _int(f"data.{key}", raw[key], 1)
    if "augment" in raw:
        a = raw["augment"]
        if isinstance(a, bool):  # augment = true / false
            a = "flip_crop" if a else "none"
        kw["augment"] = _choice("data.augment", a, AUGMENTS, "augmentation")
    for key in ("standardize", "download", "drop_last"):
        if key in raw:
            kw[key] = _bool(f"data.{key}", raw[key])
    return dataclasses.replace(d, **kw)


def _zoo_ctor(name: str) -> Callable[..., Any] | None:
    from . import models

    zoo = getattr(models, "_ZOO", {})
    return zoo.get(name)


def _model(raw: Mapping[str, Any]) -> ModelConfig:
    from . import estimators, models, quantizers

    _check_keys("model", raw, ModelConfig)
    kw: dict[str, Any] = {}
    name = _str("model.name", raw.get("name", ModelConfig.name))
    if name not in models.names():
        hint = closest(name, models.names())
        raise ConfigError(
            f"model.name: unknown model {name!r}; known: {', '.join(models.names())}"
            + (f" (did you mean {hint!r}?)" if hint else "")
        )
    kw["name"] = name
    bits = raw.get("bits")
    if isinstance(bits, str) and bits.lower() in _FLOAT_WORDS:
        bits = None
    if bits is not None:
        if isinstance(bits, str):
            raise _type_error("model.bits", bits, 'an integer in [1, 16] or "float"')
        kw["bits"] = _int("model.bits", bits, 1, 16)
    est = _str("model.estimator", raw.get("estimator", ModelConfig.estimator))
    if est not in estimators.names():
        hint = closest(est, estimators.names())
        raise ConfigError(
            f"model.estimator: unknown estimator {est!r}; known: "
            f"{', '.join(estimators.names())}" + (f" (did you mean {hint!r}?)" if hint else "")
        )
    kw["estimator"] = est
    params = raw.get("estimator_params", {})
    if not isinstance(params, Mapping):
        raise _type_error("model.estimator_params", params, "a table of estimator parameters")
    params = _plain("model.estimator_params", dict(params))
    _with_where("model.estimator_params", lambda: estimators.get(est, **params))
    kw["estimator_params"] = params
    if raw.get("alpha") is not None:
        kw["alpha"] = _float("model.alpha", raw["alpha"], lo=0.0, lo_open=True)
    if raw.get("weights") is not None:
        kw["weights"] = _weights(raw["weights"], quantizers.forward_names(), estimators.names())
    if raw.get("width") is not None:
        ctor = _zoo_ctor(name)
        if ctor is not None and "width" not in inspect.signature(ctor).parameters:
            takes = [m for m in models.names() if _takes_width(m)]
            raise ConfigError(
                f"model.width: model {name!r} has no width option (models with one: "
                f"{', '.join(takes) or 'none'})"
            )
        w = raw["width"]
        kw["width"] = (
            _int("model.width", w, 1, 4096)
            if name == "resnet20"
            else _float("model.width", w, lo=0.0, lo_open=True)
        )
    return ModelConfig(**kw)


def _takes_width(name: str) -> bool:
    ctor = _zoo_ctor(name)
    return ctor is not None and "width" in inspect.signature(ctor).parameters


def _weights(spec: Any, fns: Sequence[str], ests: Sequence[str]) -> str | dict[str, Any]:
    where = "model.weights"
    if isinstance(spec, str):
        fn, _, est = spec.partition(":")
        _choice(where + " (forward function)", fn, fns, "quantizer")
        if est:
            _choice(where + " (estimator)", est, ests, "estimator")
        return spec
    if not isinstance(spec, Mapping):
        raise _type_error(where, spec, 'a spec string like "sign:ste" or a table')
    spec = _plain(where, dict(spec))
    if "fn" not in spec:
        raise ConfigError(f"{where} needs a 'fn' key (one of {', '.join(fns)}), got {spec!r}")
    _choice(where + ".fn", spec["fn"], fns, "quantizer")
    if "estimator" in spec:
        _choice(where + ".estimator", spec["estimator"], ests, "estimator")
    if "bits" in spec:
        _int(where + ".bits", spec["bits"], 1, 16)
    if "step" in spec and spec["step"] != "auto":
        _float(where + ".step", spec["step"], lo=0.0, lo_open=True)
    return spec


def _optim(raw: Mapping[str, Any]) -> OptimConfig:
    _check_keys("optim", raw, OptimConfig)
    o = OptimConfig()
    kw: dict[str, Any] = {}
    if "name" in raw:
        kw["name"] = _choice("optim.name", str(raw["name"]).lower(), OPTIMIZERS, "optimizer")
    if "lr" in raw:
        kw["lr"] = _float("optim.lr", raw["lr"], lo=0.0, lo_open=True)
    if "momentum" in raw:
        kw["momentum"] = _float("optim.momentum", raw["momentum"], lo=0.0, hi=1.0, hi_open=True)
    if "nesterov" in raw:
        kw["nesterov"] = _bool("optim.nesterov", raw["nesterov"])
    if "weight_decay" in raw:
        kw["weight_decay"] = _float("optim.weight_decay", raw["weight_decay"], lo=0.0)
    if "betas" in raw:
        b = raw["betas"]
        if not isinstance(b, (list, tuple)) or len(b) != 2:
            raise _type_error("optim.betas", b, "a list of two numbers in [0, 1)")
        kw["betas"] = tuple(
            _float(f"optim.betas[{i}]", x, lo=0.0, hi=1.0, hi_open=True) for i, x in enumerate(b)
        )
    if "eps" in raw:
        kw["eps"] = _float("optim.eps", raw["eps"], lo=0.0, lo_open=True)
    out = dataclasses.replace(o, **kw)
    if out.nesterov and (out.name != "sgd" or out.momentum <= 0):
        raise ConfigError(
            f"optim.nesterov = true needs optim.name = 'sgd' and optim.momentum > 0, got "
            f"name={out.name!r}, momentum={out.momentum!r}"
        )
    return out


def _schedule(raw: Mapping[str, Any]) -> ScheduleConfig:
    _check_keys("schedule", raw, ScheduleConfig)
    kw: dict[str, Any] = {}
    if "name" in raw:
        kw["name"] = _choice("schedule.name", raw["name"], SCHEDULES, "schedule")
    if "milestones" in raw:
        m = raw["milestones"]
        if not isinstance(m, (list, tuple)):
            raise _type_error("schedule.milestones", m, "a list of epochs")
        ms = tuple(_int(f"schedule.milestones[{i}]", x, 1) for i, x in enumerate(m))
        if any(b <= a for a, b in zip(ms, ms[1:], strict=False)):
            raise ConfigError(f"schedule.milestones must be strictly increasing, got {list(ms)}")
        kw["milestones"] = ms
    if "gamma" in raw:
        kw["gamma"] = _float("schedule.gamma", raw["gamma"], lo=0.0, lo_open=True)
    if "min_lr" in raw:
        kw["min_lr"] = _float("schedule.min_lr", raw["min_lr"], lo=0.0)
    out = ScheduleConfig(**kw)
    if out.name == "multistep" and not out.milestones:
        raise ConfigError("schedule.milestones must list at least one epoch for 'multistep'")
    return out


def _loop(raw: Mapping[str, Any]) -> LoopConfig:
    _check_keys("train", raw, LoopConfig)
    kw: dict[str, Any] = {}
    if "epochs" in raw:
        kw["epochs"] = _int("train.epochs", raw["epochs"], 1)
    if "seed" in raw:
        kw["seed"] = _int("train.seed", raw["seed"], 0, SEED_MAX)
    for key in ("deterministic", "save_best"):
        if key in raw:
            kw[key] = _bool(f"train.{key}", raw[key])
    if "devices" in raw:
        kw["devices"] = _int("train.devices", raw["devices"], 1, 1024)
    if "accelerator" in raw:
        kw["accelerator"] = _choice("train.accelerator", raw["accelerator"], ACCELERATORS)
    if "precision" in raw:
        kw["precision"] = _choice("train.precision", str(raw["precision"]), PRECISIONS)
    if raw.get("threads") is not None:
        v = raw["threads"]
        if isinstance(v, str):
            if _str("train.threads", v) != "auto":
                raise ConfigError(
                    f'train.threads must be an integer from 1 to 4096 or "auto", got {v!r}'
                )
            kw["threads"] = v
        else:
            kw["threads"] = _int("train.threads", v, 1, 4096)
    for key in ("grad_clip", "grad_clip_norm"):
        if raw.get(key) is not None:
            kw[key] = _float(f"train.{key}", raw[key], lo=0.0, lo_open=True)
    if raw.get("init_from") is not None:
        s = _str("train.init_from", raw["init_from"])
        if not s:
            raise ConfigError("train.init_from must be a path, got an empty string")
        kw["init_from"] = s
    if "eval_every" in raw:
        kw["eval_every"] = _int("train.eval_every", raw["eval_every"], 1)
    if raw.get("max_steps") is not None:
        kw["max_steps"] = _int("train.max_steps", raw["max_steps"], 1)
    return LoopConfig(**kw)


_PARSERS: dict[str, Callable[[Mapping[str, Any]], Any]] = {
    "data": _data,
    "model": _model,
    "optim": _optim,
    "schedule": _schedule,
    "train": _loop,
}


def parse_config(raw: Mapping[str, Any]) -> TrainConfig:
    """Validate a nested dict (as read from TOML) into a :class:`TrainConfig`.

    Whatever it accepts can be written and read back: ``dump_config`` of the result,
    read with ``tomllib`` and parsed again, gives the same TOML text (checked here, so
    a run's config.toml always resumes).

    Raises:
        ConfigError: unknown section or key (with the closest valid one), a value out
            of range, an unknown model/dataset/estimator/optimizer/schedule name.
        StelabTypeError: a value of the wrong type.
    """
    cfg = _parse(raw)
    d = config_to_dict(cfg)
    text = _dump(d)
    try:
        back: Any = _same_data(_require_toml().loads(text))
    except (ValueError, RecursionError) as e:  # pragma: no cover - a writer bug
        back = f"<cannot be read back: {e}>"
    if back != _same_data(d):  # a writer bug: refuse rather than save what cannot resume
        raise ConfigError(
            f"this config cannot be written to TOML and read back unchanged: {text[:300]!r}; "
            "please report it"
        )
    return cfg


def _same_data(v: Any) -> Any:
    """``v`` in a form where equal configs compare equal: lists for tuples, NaN as a
    token, empty tables left out (dump_config does not write them)."""
    if isinstance(v, Mapping):
        return {
            str(k): _same_data(x) for k, x in v.items() if not (isinstance(x, Mapping) and not x)
        }
    if isinstance(v, (list, tuple)):
        return [_same_data(x) for x in v]
    if isinstance(v, float) and math.isnan(v):
        return ("nan",)
    return (type(v).__name__, v)


def _parse(raw: Mapping[str, Any]) -> TrainConfig:
    if not isinstance(raw, Mapping):
        raise _type_error("config", raw, "a table")
    for k in raw:
        if k not in _TOP_KEYS:
            hint = closest(str(k), _TOP_KEYS)
            raise ConfigError(
                f"unknown top-level key or section {k!r}; valid: name, "
                + ", ".join(f"[{s}]" for s in _SECTIONS)
                + (f" (did you mean {hint!r}?)" if hint else "")
            )
    kw: dict[str, Any] = {}
    if "name" in raw:
        kw["name"] = _str("name", raw["name"])
    for sec, parse in _PARSERS.items():
        body = raw.get(sec, {})
        if not isinstance(body, Mapping):
            raise _type_error(f"[{sec}]", body, "a table")
        kw[sec] = parse(body)
    cfg = TrainConfig(**kw)
    if cfg.data.batch_size % cfg.train.devices:
        raise ConfigError(
            f"data.batch_size = {cfg.data.batch_size} must be divisible by train.devices = "
            f"{cfg.train.devices} (it is the batch of one optimizer step over all processes)"
        )
    return cfg


# --- files and overrides ------------------------------------------------------------


def _require_toml() -> Any:
    if _toml is None:  # pragma: no cover - Python 3.10 without tomli
        raise ConfigError(
            "reading TOML configs needs Python >= 3.11 (tomllib) or the 'tomli' package "
            "(pip install tomli)"
        )
    return _toml


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"optim.lr=0.01"`` → ``(["optim", "lr"], 0.01)``.

    The value is read as a TOML literal (``4``, ``0.1``, ``true``, ``[20, 40]``,
    ``"text"``, ``{fn = "sign"}``); anything that is not one is taken as a bare
    string (``data.name=digits``, ``model.weights=sign:ste``).
    """
    if not isinstance(text, str) or "=" not in text:
        raise ConfigError(
            f"--set needs KEY=VALUE with a dotted key (e.g. optim.lr=0.01), got {text!r}"
        )
    key, _, value = text.partition("=")
    parts = [p.strip() for p in key.strip().split(".")]
    if not all(re.fullmatch(r"[A-Za-z0-9_\-]+", p) for p in parts):
        raise ConfigError(f"--set key must be dotted names like optim.lr, got {key.strip()!r}")
    value = value.strip()
    toml = _require_toml()
    try:
        parsed = toml.loads(f"v = {value}")["v"]
    except toml.TOMLDecodeError:
        parsed = value
    except RecursionError:
        raise ConfigError(
            f"--set {key.strip()}: the value is nested too deeply to read "
            f"(more than {MAX_DEPTH} levels are not allowed)"
        ) from None
    return parts, parsed


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``raw`` with every ``KEY=VALUE`` of ``overrides`` set (:func:`parse_override`)."""
    out = copy.deepcopy(dict(raw))  # TOML values: may hold dates, which JSON cannot copy
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, p in enumerate(parts[:-1]):
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(
                    f"--set {text}: {'.'.join(parts[: i + 1])} is a value, not a table"
                )
            node = nxt
        node[parts[-1]] = value
    return out


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a TOML config (or start from the defaults when ``path`` is None), apply
    ``--set`` style ``overrides`` and validate.

    Errors name the file, the section and key, the bad value and what is allowed.
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist or is not a file")
        toml = _require_toml()
        try:
            raw = toml.loads(p.read_text(encoding="utf-8"))
        except toml.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not a UTF-8 text file ({e.reason})") from None
        except RecursionError:
            raise ConfigError(
                f"{p}: not valid TOML for stelab: arrays or tables nested too deeply "
                f"(more than {MAX_DEPTH} levels are allowed in a config)"
            ) from None
        except OSError as e:
            raise ConfigError(f"cannot read config file {str(p)!r}: {e.strerror or e}") from None
    if overrides:
        raw = apply_overrides(raw, list(overrides))
    try:
        return parse_config(raw)
    except StelabError as e:
        shown = " ".join(overrides).encode("utf-8", "backslashreplace").decode("utf-8")
        where = source + (" with --set " + shown if overrides else "")
        raise type(e)(f"{where}: {e}") from None


# --- writing ------------------------------------------------------------------------


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """The config as plain nested data (None values left out): TOML-, JSON- and
    ``torch.load(weights_only=True)``-safe."""

    def clean(v: Any) -> Any:
        if isinstance(v, Mapping):
            return {str(k): clean(x) for k, x in v.items() if x is not None}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    out: dict[str, Any] = {}
    if cfg.name:
        out["name"] = cfg.name
    for sec in _SECTIONS:
        out[sec] = clean(dataclasses.asdict(getattr(cfg, sec)))
    return out


_BARE = re.compile(r"^[A-Za-z0-9_\-]+$")


_ESCAPES = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}
_NEEDS_ESCAPE = re.compile(r'["\\\x00-\x1f\x7f]')


def toml_string(s: str) -> str:
    r"""``s`` as a TOML basic string: ``"`` and ``\`` escaped, and every control character
    TOML forbids raw (U+0000–U+001F, U+007F) written as ``\b \t \n \f \r`` or
    ``\uXXXX``; everything else (including characters outside the BMP) as itself."""

    def esc(m: re.Match[str]) -> str:
        c = m.group()
        return _ESCAPES.get(c) or f"\\u{ord(c):04X}"

    return '"' + _NEEDS_ESCAPE.sub(esc, s) + '"'


def _key(k: str) -> str:
    return k if _BARE.match(k) else toml_string(k)


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        r = repr(v)
        return r if any(c in r for c in ".en") else r + ".0"
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{" + ", ".join(f"{_key(str(k))} = {_value(x)}" for k, x in v.items()) + "}"
    raise StelabTypeError(f"cannot write {v!r} ({type(v).__name__}) to TOML")


def dump_config(cfg: TrainConfig) -> str:
    """The resolved config as TOML text; ``parse_config(tomllib.loads(dump_config(c))) == c``."""
    return _dump(config_to_dict(cfg))


def _dump(d: Mapping[str, Any]) -> str:
    lines = ["# stelab experiment config (resolved: every key with its value)"]
    if "name" in d:
        lines.append(f"name = {_value(d['name'])}")
    for sec in _SECTIONS:
        body = d[sec]
        lines.append("")
        lines.append(f"[{sec}]")
        tables = []
        for k, v in body.items():
            if isinstance(v, Mapping):
                tables.append((k, v))
            else:
                lines.append(f"{_key(k)} = {_value(v)}")
        for k, v in tables:
            if not v:
                continue
            lines.append("")
            lines.append(f"[{sec}.{_key(k)}]")
            for kk, vv in v.items():
                lines.append(f"{_key(str(kk))} = {_value(vv)}")
    return "\n".join(lines) + "\n"


def diff_configs(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Dotted keys whose values differ between two :func:`config_to_dict` dicts."""
    out: dict[str, tuple[Any, Any]] = {}

    def walk(x: Any, y: Any, prefix: str) -> None:
        if isinstance(x, Mapping) and isinstance(y, Mapping):
            for k in sorted(set(x) | set(y)):
                walk(x.get(k), y.get(k), f"{prefix}.{k}" if prefix else str(k))
        elif x != y:
            out[prefix] = (x, y)

    walk(a, b, "")
    return out
