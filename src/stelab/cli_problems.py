"""The nets, data and losses that ``stelab gradcheck`` analyses, built from its options.

SBNs of the zoo (:func:`sbn_problem`), deterministic quantized nets of the zoo or a
user's ``MODULE:FACTORY`` (:func:`det_problem`), weights from ``--checkpoint``
(:func:`load_state`) and the comma-separated number options. Every bad option is a
ConfigError naming it. Heavy modules are imported inside the functions so
``stelab --help`` stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = [
    "DET_MODELS",
    "SBN_MODELS",
    "det_problem",
    "load_state",
    "parse_floats",
    "parse_ints",
    "sbn_problem",
]

SBN_MODELS = ("toy", "mlp", "conv8")
DET_MODELS = ("lenet5", "vgg11", "resnet20", "convnet")


def parse_ints(option: str, text: str | None, lo: int = 1) -> list[int] | None:
    from .errors import ConfigError

    if text is None:
        return None
    out = []
    for tok in text.split(","):
        tok = tok.strip()
        try:
            v = int(tok)
        except ValueError:
            raise ConfigError(
                f"{option} must be comma-separated integers >= {lo}, got {text!r}"
            ) from None
        if v < lo:
            raise ConfigError(f"{option} must be integers >= {lo}, got {v} in {text!r}")
        out.append(v)
    if not out:
        raise ConfigError(f"{option} is empty")
    return out


def sbn_problem(
    model: str,
    data: str | None,
    hidden: list[int] | None,
    channels: list[int] | None,
    examples: int,
    checkpoint: Path | None,
    seed: int,
    dtype: str,
) -> tuple[Any, Any, Any, Any, str]:
    """(model, x, y, loss_fn, description) for the gradcheck command."""
    import torch
    import torch.nn.functional as F

    from . import data as _data
    from . import sbn
    from .errors import ConfigError, unknown

    if model not in SBN_MODELS:
        raise unknown("gradcheck model", model, SBN_MODELS)
    if dtype not in ("float64", "float32"):
        raise ConfigError(f"--dtype must be 'float64' or 'float32', got {dtype!r}")
    dt = torch.float64 if dtype == "float64" else torch.float32
    name = data or ("psa-toy" if model == "toy" else "digits")
    if model == "toy" and name != "psa-toy":
        raise ConfigError(
            f"--model toy runs on --data psa-toy, got --data {name!r}; use --model mlp"
        )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if name == "psa-toy":
            ds = _data.load("psa-toy", dtype=dt)
            x, y = ds.train
            loss_fn = sbn.logistic_loss
            out_features, in_shape = 1, (2,)
        else:
            ds = _data.load(name, limit=examples, progress=False)
            x, y = ds.train
            x = x[:examples].to(dt)
            y = y[:examples]
            out_features, in_shape = int(ds.num_classes or 2), tuple(ds.input_shape)

            def loss_fn(eta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
                return F.cross_entropy(eta, t, reduction="none")

        if model == "toy":
            net = sbn.sbn_mlp(2, tuple(hidden or (5, 5, 5)), 1, dtype=dt)
        elif model == "mlp":
            feats = 1
            for s in in_shape:
                feats *= s
            net = sbn.sbn_mlp(feats, tuple(hidden or (8, 8)), out_features, dtype=dt)
        else:
            if len(in_shape) != 3:
                raise ConfigError(
                    f"--model conv8 needs image data, got {name!r} of shape {in_shape}"
                )
            ch = channels or [8, 16]
            if len(ch) != 2:
                raise ConfigError(f"--channels must be two integers (e.g. 8,16), got {ch}")
            pad = 1 if min(in_shape[1:]) < 24 else 0
            net = sbn.sbn_conv8(in_shape[0], in_shape[1:], out_features, tuple(ch), pad, dtype=dt)
        if checkpoint is not None:
            load_state(net, checkpoint, f"--model {model}")
            net.to(dt)
        elif model != "toy":
            sbn.data_init(net, x, generator=seed)
    widths = [
        layer.out_features if hasattr(layer, "out_features") else layer.out_channels
        for layer in net.hidden
    ]
    desc = f"--model {model} (hidden widths {widths}) on {name}, {x.shape[0]} examples, {dtype}"
    return net, x, y, loss_fn, desc


def load_state(net: Any, checkpoint: Path, what: str) -> None:
    """Load a state dict (or a stelab checkpoint's ``model``) from ``checkpoint`` into
    ``net``; every failure is a ConfigError naming --checkpoint and the file."""
    import warnings

    import torch

    from .errors import ConfigError

    where = f"--checkpoint {str(checkpoint)!r}"
    if not checkpoint.is_file():
        extra = " (it is a directory; give a .pt file)" if checkpoint.is_dir() else ""
        raise ConfigError(f"{where} does not exist as a file{extra}")
    try:
        with warnings.catch_warnings():  # torch warns about pickle protocols: one line only
            warnings.simplefilter("ignore")
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError, EOFError, RuntimeError, ...: not a checkpoint
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ConfigError(
            f"{where} is not a PyTorch state dict loadable with weights_only=True "
            f"({type(e).__name__}{': ' + first if first else ''})"
        ) from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{where} holds a {type(state).__name__}, not a state dict of tensors")
    try:
        net.load_state_dict(state)
    except (RuntimeError, KeyError, ValueError) as e:
        msg = " ".join(str(e).split())[:300]
        raise ConfigError(f"{where} does not fit {what}: {msg}") from None


def parse_floats(option: str, text: str | None) -> list[float] | None:
    from .errors import ConfigError

    if text is None:
        return None
    out = []
    for tok in text.split(","):
        try:
            v = float(tok)
        except ValueError:
            raise ConfigError(
                f"{option} must be comma-separated numbers > 0, got {text!r}"
            ) from None
        if not v > 0 or v == float("inf"):
            raise ConfigError(f"{option} must be numbers > 0, got {tok.strip()!r} in {text!r}")
        out.append(v)
    return out


def _from_factory(spec: str) -> tuple[Any, Any, Any]:
    """(model, x, y) from ``MODULE:FACTORY``; x, y are None when the factory returns a model."""
    from torch import Tensor, nn

    from .errors import ConfigError
    from .plugins import resolve

    factory = resolve(spec, "--model")
    if not callable(factory):
        raise ConfigError(f"--model {spec!r} names a {type(factory).__name__}, not a callable")
    try:
        out = factory()
    except Exception as e:
        raise ConfigError(
            f"--model {spec!r}: calling it failed: {type(e).__name__}: {str(e)[:200]}"
        ) from None
    x = y = None
    if isinstance(out, tuple):
        if len(out) == 2 and isinstance(out[1], (tuple, list)) and len(out[1]) == 2:
            out, (x, y) = out[0], out[1]
        elif len(out) == 3:
            out, x, y = out
        else:
            raise ConfigError(
                f"--model {spec!r} returned a tuple of {len(out)}; expected a model, "
                "(model, (x, y)) or (model, x, y)"
            )
    if not isinstance(out, nn.Module):
        raise ConfigError(f"--model {spec!r} returned a {type(out).__name__}, not an nn.Module")
    if x is not None and not (isinstance(x, Tensor) and isinstance(y, Tensor)):
        raise ConfigError(f"--model {spec!r} returned a data batch that is not two tensors (x, y)")
    return out, x, y


def det_problem(
    model: str,
    data: str | None,
    examples: int | None,
    bits: int,
    weight_bits: int | None,
    checkpoint: Path | None,
    seed: int,
    dtype: str | None,
) -> tuple[Any, Any, Any, str]:
    """(model, x, y, description) of a deterministic quantized net (or a factory's SBN)."""
    import torch

    from . import data as _data
    from . import models as _models
    from .errors import ConfigError, check_int

    if dtype not in (None, "float32", "float64"):
        raise ConfigError(f"--dtype must be 'float64' or 'float32', got {dtype!r}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        x = y = None
        if ":" in model:
            net, x, y = _from_factory(model)
            what = f"--model {model}"
        else:
            net = None
            what = f"--model {model} (--bits {bits})"
        if x is None:
            name = data or "digits"
            ds = _data.load(name, limit=examples, progress=False)
            x, y = ds.train
            if examples is not None:
                x, y = x[:examples], y[:examples]
            src = f"{name}, {x.shape[0]} examples"
            if net is None:
                bits = check_int("--bits", bits, 1, 16)
                weights = None
                if weight_bits is not None:
                    weights = {"fn": "uniform", "bits": weight_bits, "step": "auto"}
                net = _models.build(
                    model,
                    num_classes=int(ds.num_classes or 2),
                    in_shape=tuple(ds.input_shape),
                    act={"bits": bits, "estimator": "ste"},
                    weights=weights,
                )
        else:
            if data is not None:
                raise ConfigError(
                    f"--model {model!r} returns its own data batch; drop --data {data!r}"
                )
            src = f"the factory's batch, {x.shape[0]} examples"
        from .sbn import SBN

        if dtype is None:  # SBN analyses default to float64 (exact enumeration)
            dtype = "float64" if isinstance(net, SBN) else "float32"
        dt = torch.float64 if dtype == "float64" else torch.float32
        net = net.to(dt)
        if checkpoint is not None:
            load_state(net, checkpoint, what)
            net.to(dt)
    if x.is_floating_point():
        x = x.to(dt)
    return net, x, y, f"{what} on {src}, {dtype}"
