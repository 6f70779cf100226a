"""The config sections: raw TOML tables validated into the dataclasses of
:mod:`.schema`, names checked against the registries (models, estimators, quantizers,
datasets) without knowing their members; :func:`parse_config`."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ConfigError, closest
from .checks import (
    as_bool,
    as_float,
    as_int,
    as_str,
    check_keys,
    choice,
    plain,
    type_error,
    with_where,
)
from .schema import (
    ACCELERATORS,
    AUGMENTS,
    DATA_SEED_MAX,
    FLOAT_WORDS,
    OPTIMIZERS,
    PRECISIONS,
    SCHEDULES,
    SECTIONS,
    SEED_MAX,
    TOP_KEYS,
    DataConfig,
    LoopConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)
from .tomlio import config_to_dict, dump_dict, require_toml


def _data(raw: Mapping[str, Any]) -> DataConfig:
    from ..data.api import canonical

    check_keys("data", raw, DataConfig)
    d = DataConfig()
    kw: dict[str, Any] = {}
    if "name" in raw:
        kw["name"] = with_where("data.name", lambda: canonical(as_str("data.name", raw["name"])))
    if raw.get("data_dir") is not None:
        kw["data_dir"] = as_str("data.data_dir", raw["data_dir"])
    if raw.get("limit") is not None:
        kw["limit"] = as_int("data.limit", raw["limit"], 1)
    if raw.get("val_size") is not None:
        kw["val_size"] = as_int("data.val_size", raw["val_size"], 0)
    if "seed" in raw:
        kw["seed"] = as_int("data.seed", raw["seed"], 0, DATA_SEED_MAX)
    for key in ("batch_size", "eval_batch_size"):
        if key in raw:
            kw[key] = as_int(f"data.{key}", raw[key], 1)
    if "augment" in raw:
        a = raw["augment"]
        if isinstance(a, bool):  # augment = true / false
            a = "flip_crop" if a else "none"
        kw["augment"] = choice("data.augment", a, AUGMENTS, "augmentation")
    for key in ("standardize", "download", "drop_last"):
        if key in raw:
            kw[key] = as_bool(f"data.{key}", raw[key])
    return dataclasses.replace(d, **kw)


def _model(raw: Mapping[str, Any]) -> ModelConfig:
    from .. import estimators, models

    check_keys("model", raw, ModelConfig)
    kw: dict[str, Any] = {}
    name = as_str("model.name", raw.get("name", ModelConfig.name))
    with_where("model.name", lambda: models.MODELS.entry(name))
    kw["name"] = name
    bits = raw.get("bits")
    if isinstance(bits, str) and bits.lower() in FLOAT_WORDS:
        bits = None
    if bits is not None:
        if isinstance(bits, str):
            raise type_error("model.bits", bits, 'an integer in [1, 16] or "float"')
        kw["bits"] = as_int("model.bits", bits, 1, 16)
    est = as_str("model.estimator", raw.get("estimator", ModelConfig.estimator))
    with_where("model.estimator", lambda: estimators.REGISTRY.entry(est))
    kw["estimator"] = est
    params = raw.get("estimator_params", {})
    if not isinstance(params, Mapping):
        raise type_error("model.estimator_params", params, "a table of estimator parameters")
    params = plain("model.estimator_params", dict(params))
    with_where("model.estimator_params", lambda: estimators.get(est, **params))
    kw["estimator_params"] = params
    if raw.get("alpha") is not None:
        kw["alpha"] = as_float("model.alpha", raw["alpha"], lo=0.0, lo_open=True)
    if raw.get("weights") is not None:
        kw["weights"] = _weights(raw["weights"])
    if raw.get("width") is not None:
        if "width" not in models.options(name):
            takes = [m for m in models.names() if "width" in models.options(m)]
            raise ConfigError(
                f"model.width: model {name!r} has no width option (models with one: "
                f"{', '.join(takes) or 'none'})"
            )
        w = raw["width"]
        kw["width"] = (
            as_int("model.width", w, 1, 4096)
            if name == "resnet20"
            else as_float("model.width", w, lo=0.0, lo_open=True)
        )
    return ModelConfig(**kw)


def _weights(spec: Any) -> str | dict[str, Any]:
    """``model.weights``: a spec string or table (:mod:`stelab.specs`), its quantizer and
    estimator names checked against the registries, ``bits`` and ``step`` by range."""
    from .. import estimators, quantizers
    from ..specs import QUANT_SPEC_HELP, quant_spec

    where = "model.weights"
    if not isinstance(spec, (str, Mapping)):
        raise type_error(where, spec, f"a spec string ({QUANT_SPEC_HELP}) or a table")
    out: str | dict[str, Any] = spec if isinstance(spec, str) else plain(where, dict(spec))
    kw = with_where(where, lambda: quant_spec(out, where))
    sub = " (forward function)" if isinstance(spec, str) else ".fn"
    with_where(where + sub, lambda: quantizers.FORWARDS.entry(as_str(where + sub, kw["fn"])))
    if "estimator" in kw:
        sub = " (estimator)" if isinstance(spec, str) else ".estimator"
        est = as_str(where + sub, kw["estimator"])
        with_where(where + sub, lambda: estimators.REGISTRY.entry(est))
    if "bits" in kw:
        as_int(where + ".bits", kw["bits"], 1, 16)
    if "step" in kw and kw["step"] != "auto":
        as_float(where + ".step", kw["step"], lo=0.0, lo_open=True)
    return out


def _optim(raw: Mapping[str, Any]) -> OptimConfig:
    check_keys("optim", raw, OptimConfig)
    o = OptimConfig()
    kw: dict[str, Any] = {}
    if "name" in raw:
        kw["name"] = choice("optim.name", str(raw["name"]).lower(), OPTIMIZERS, "optimizer")
    if "lr" in raw:
        kw["lr"] = as_float("optim.lr", raw["lr"], lo=0.0, lo_open=True)
    if "momentum" in raw:
        kw["momentum"] = as_float("optim.momentum", raw["momentum"], lo=0.0, hi=1.0, hi_open=True)
    if "nesterov" in raw:
        kw["nesterov"] = as_bool("optim.nesterov", raw["nesterov"])
    if "weight_decay" in raw:
        kw["weight_decay"] = as_float("optim.weight_decay", raw["weight_decay"], lo=0.0)
    if "betas" in raw:
        b = raw["betas"]
        if not isinstance(b, (list, tuple)) or len(b) != 2:
            raise type_error("optim.betas", b, "a list of two numbers in [0, 1)")
        kw["betas"] = tuple(
            as_float(f"optim.betas[{i}]", x, lo=0.0, hi=1.0, hi_open=True) for i, x in enumerate(b)
        )
    if "eps" in raw:
        kw["eps"] = as_float("optim.eps", raw["eps"], lo=0.0, lo_open=True)
    out = dataclasses.replace(o, **kw)
    if out.nesterov and (out.name != "sgd" or out.momentum <= 0):
        raise ConfigError(
            f"optim.nesterov = true needs optim.name = 'sgd' and optim.momentum > 0, got "
            f"name={out.name!r}, momentum={out.momentum!r}"
        )
    return out


def _schedule(raw: Mapping[str, Any]) -> ScheduleConfig:
    check_keys("schedule", raw, ScheduleConfig)
    kw: dict[str, Any] = {}
    if "name" in raw:
        kw["name"] = choice("schedule.name", raw["name"], SCHEDULES, "schedule")
    if "milestones" in raw:
        m = raw["milestones"]
        if not isinstance(m, (list, tuple)):
            raise type_error("schedule.milestones", m, "a list of epochs")
        ms = tuple(as_int(f"schedule.milestones[{i}]", x, 1) for i, x in enumerate(m))
        if any(b <= a for a, b in zip(ms, ms[1:], strict=False)):
            raise ConfigError(f"schedule.milestones must be strictly increasing, got {list(ms)}")
        kw["milestones"] = ms
    if "gamma" in raw:
        kw["gamma"] = as_float("schedule.gamma", raw["gamma"], lo=0.0, lo_open=True)
    if "min_lr" in raw:
        kw["min_lr"] = as_float("schedule.min_lr", raw["min_lr"], lo=0.0)
    out = ScheduleConfig(**kw)
    if out.name == "multistep" and not out.milestones:
        raise ConfigError("schedule.milestones must list at least one epoch for 'multistep'")
    return out


def _loop(raw: Mapping[str, Any]) -> LoopConfig:
    check_keys("train", raw, LoopConfig)
    kw: dict[str, Any] = {}
    if "epochs" in raw:
        kw["epochs"] = as_int("train.epochs", raw["epochs"], 1)
    if "seed" in raw:
        kw["seed"] = as_int("train.seed", raw["seed"], 0, SEED_MAX)
    for key in ("deterministic", "save_best"):
        if key in raw:
            kw[key] = as_bool(f"train.{key}", raw[key])
    if "devices" in raw:
        kw["devices"] = as_int("train.devices", raw["devices"], 1, 1024)
    if "accelerator" in raw:
        kw["accelerator"] = choice("train.accelerator", raw["accelerator"], ACCELERATORS)
    if "precision" in raw:
        kw["precision"] = choice("train.precision", str(raw["precision"]), PRECISIONS)
    if raw.get("threads") is not None:
        v = raw["threads"]
        if isinstance(v, str):
            if as_str("train.threads", v) != "auto":
                raise ConfigError(
                    f'train.threads must be an integer from 1 to 4096 or "auto", got {v!r}'
                )
            kw["threads"] = v
        else:
            kw["threads"] = as_int("train.threads", v, 1, 4096)
    for key in ("grad_clip", "grad_clip_norm"):
        if raw.get(key) is not None:
            kw[key] = as_float(f"train.{key}", raw[key], lo=0.0, lo_open=True)
    if raw.get("init_from") is not None:
        s = as_str("train.init_from", raw["init_from"])
        if not s:
            raise ConfigError("train.init_from must be a path, got an empty string")
        kw["init_from"] = s
    if "eval_every" in raw:
        kw["eval_every"] = as_int("train.eval_every", raw["eval_every"], 1)
    if raw.get("max_steps") is not None:
        kw["max_steps"] = as_int("train.max_steps", raw["max_steps"], 1)
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
    text = dump_dict(d)
    try:
        back: Any = same_data(require_toml().loads(text))
    except (ValueError, RecursionError) as e:  # pragma: no cover - a writer bug
        back = f"<cannot be read back: {e}>"
    if back != same_data(d):  # a writer bug: refuse rather than save what cannot resume
        raise ConfigError(
            f"this config cannot be written to TOML and read back unchanged: {text[:300]!r}; "
            "please report it"
        )
    return cfg


def same_data(v: Any) -> Any:
    """``v`` in a form where equal configs compare equal: lists for tuples, NaN as a
    token, empty tables left out (dump_config does not write them)."""
    if isinstance(v, Mapping):
        return {
            str(k): same_data(x) for k, x in v.items() if not (isinstance(x, Mapping) and not x)
        }
    if isinstance(v, (list, tuple)):
        return [same_data(x) for x in v]
    if isinstance(v, float) and math.isnan(v):
        return ("nan",)
    return (type(v).__name__, v)


def _parse(raw: Mapping[str, Any]) -> TrainConfig:
    if not isinstance(raw, Mapping):
        raise type_error("config", raw, "a table")
    for k in raw:
        if k not in TOP_KEYS:
            hint = closest(str(k), TOP_KEYS)
            raise ConfigError(
                f"unknown top-level key or section {k!r}; valid: name, "
                + ", ".join(f"[{s}]" for s in SECTIONS)
                + (f" (did you mean {hint!r}?)" if hint else "")
            )
    kw: dict[str, Any] = {}
    if "name" in raw:
        kw["name"] = as_str("name", raw["name"])
    for sec, parse in _PARSERS.items():
        body = raw.get(sec, {})
        if not isinstance(body, Mapping):
            raise type_error(f"[{sec}]", body, "a table")
        kw[sec] = parse(body)
    cfg = TrainConfig(**kw)
    if cfg.data.batch_size % cfg.train.devices:
        raise ConfigError(
            f"data.batch_size = {cfg.data.batch_size} must be divisible by train.devices = "
            f"{cfg.train.devices} (it is the batch of one optimizer step over all processes)"
        )
    return cfg
