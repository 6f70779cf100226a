"""Checkpoints: plain tensors and containers only, loadable with ``weights_only=True``.

A checkpoint is a dict::

    format      "stelab.checkpoint/1"
    epoch       finished epochs
    global_step optimizer steps so far
    model       the model's state_dict (unwrapped: no DDP "module." prefix)
    model_args  {"num_classes": int, "in_shape": [C, H, W]} to rebuild the model
                (absent for :func:`stelab.train.fit` runs, whose model the caller builds)
    optimizer   optimizer.state_dict()
    scheduler   the LR scheduler's state_dict()
    rng         {"torch": [per-rank CPU states], "cuda": [...], "shuffle": state,
                 "augment": [per-rank states], "numpy": [per-rank], "python": [per-rank],
                 "streams": {name: state} (the generators given to fit)}; the numpy and
                 Python states packed into float64 tensors (:func:`numpy_rng_state`)
    config      the resolved config (plain dict, see stelab.config.config_to_dict)
    history     one dict per finished epoch (the rows of metrics.csv)
    best        {"val_acc": float | None, "epoch": int | None}
    elapsed_s   training wall time so far (all sessions)
    world_size  processes that wrote it
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError
from . import files

FORMAT = "stelab.checkpoint/1"

__all__ = [
    "FORMAT",
    "check_state",
    "checkpoint_path",
    "load_checkpoint",
    "load_model",
    "numpy_rng_state",
    "python_rng_state",
    "set_numpy_rng_state",
    "set_python_rng_state",
]


def checkpoint_path(source: str | Path) -> Path:
    """``source`` itself if it is a file; ``source/checkpoints/last.pt`` for a run directory."""
    p = Path(source)
    if p.is_dir():
        last = p / files.CKPT_DIR / files.LAST
        if not last.is_file():
            raise ConfigError(
                f"{str(p)!r} is a directory without {files.CKPT_DIR}/{files.LAST}; give a run "
                "directory that finished at least one epoch, or a checkpoint file"
            )
        return last
    if not p.is_file():
        raise ConfigError(f"checkpoint {str(p)!r} does not exist")
    return p


def load_checkpoint(source: str | Path) -> dict[str, Any]:
    """Load a checkpoint (a file or a run directory's last.pt) with ``weights_only=True``.

    A bare ``state_dict`` file is accepted and returned as ``{"model": state_dict}``.
    """
    path = checkpoint_path(source)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"cannot load checkpoint {str(path)!r} with weights_only=True: {first}"
        ) from None
    if not isinstance(obj, Mapping):
        raise ConfigError(f"checkpoint {str(path)!r} holds a {type(obj).__name__}, not a dict")
    if obj.get("format") == FORMAT:
        return dict(obj)
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"model": dict(obj)}
    raise ConfigError(
        f"{str(path)!r} is neither a stelab checkpoint nor a state_dict "
        f"(keys: {', '.join(map(str, list(obj)[:8]))})"
    )


def check_state(model: nn.Module, state: Mapping[str, torch.Tensor], source: str = "") -> None:
    """ConfigError naming the keys if ``state`` does not fit ``model`` exactly."""
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    extra = [k for k in state if k not in target]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
        for k in state
        if k in target and tuple(state[k].shape) != tuple(target[k].shape)
    ]
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {_few(missing)}")
        if extra:
            parts.append(f"unexpected keys {_few(extra)}")
        if wrong:
            parts.append(f"shape mismatch (checkpoint vs model) {_few(wrong)}")
        where = f" {source!r}" if source else ""
        raise ConfigError(
            f"checkpoint{where} does not match the model ({type(model).__name__}): "
            + "; ".join(parts)
        )


def _few(items: list[str], n: int = 6) -> str:
    shown = ", ".join(items[:n])
    return f"[{shown}{', ...' if len(items) > n else ''}] ({len(items)} in all)"


def load_model(source: str | Path, model: nn.Module | None = None) -> nn.Module:
    """The model of a checkpoint or run directory, with its weights loaded.

    With ``model`` given, its weights are replaced (a ConfigError names the keys that
    do not match); otherwise the model is rebuilt from the checkpoint's config.
    The model is returned in eval mode.
    """
    ckpt = load_checkpoint(source)
    if model is None:
        model = model_from_checkpoint(ckpt, str(source))
    check_state(model, ckpt["model"], str(source))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def model_from_checkpoint(ckpt: Mapping[str, Any], source: str = "") -> nn.Module:
    """A fresh model built from a stelab checkpoint's config and model_args."""
    from ..config import parse_config
    from .parts import build_model

    if "config" not in ckpt or "model_args" not in ckpt:
        raise ConfigError(
            f"checkpoint {source!r} is a bare state_dict: pass the model to load it into"
        )
    cfg = parse_config(ckpt["config"])
    args = ckpt["model_args"]
    return build_model(cfg.model, int(args["num_classes"]), tuple(args["in_shape"]))


# --- numpy's and Python's global RNG states as tensors (weights_only loads no arrays) --


def numpy_rng_state() -> torch.Tensor:
    """numpy's global MT19937 state as a float64 tensor ``[pos, has_gauss, gauss, *key]``
    (every entry exact: the key words are < 2**32)."""
    import numpy as np

    kind, key, pos, has_gauss, gauss = np.random.get_state()
    head = torch.tensor([float(pos), float(has_gauss), float(gauss)], dtype=torch.float64)
    return torch.cat([head, torch.from_numpy(key.astype(np.float64))])


def set_numpy_rng_state(state: torch.Tensor) -> None:
    """Inverse of :func:`numpy_rng_state`."""
    import numpy as np

    v = state.to(torch.float64).tolist()
    key = np.array(v[3:], dtype=np.uint32)
    np.random.set_state(("MT19937", key, int(v[0]), int(v[1]), float(v[2])))


def python_rng_state() -> torch.Tensor:
    """:mod:`random`'s state as a float64 tensor ``[version, has_gauss, gauss, *words]``
    (no NaN for "no cached gaussian", so equal states compare equal)."""
    import random

    version, words, gauss_next = random.getstate()
    head = [float(version), float(gauss_next is not None), float(gauss_next or 0.0)]
    return torch.tensor(head + [float(w) for w in words], dtype=torch.float64)


def set_python_rng_state(state: torch.Tensor) -> None:
    """Inverse of :func:`python_rng_state`."""
    import random

    v = state.to(torch.float64).tolist()
    gauss_next = v[2] if v[1] else None
    random.setstate((int(v[0]), tuple(int(w) for w in v[3:]), gauss_next))
