"""The dataset registry: :func:`names`, :func:`load`, :func:`download`."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from stelab.data import synthetic, vision
from stelab.data.base import Request, Splits, check_count, check_limit, check_seed
from stelab.data.files import RESOURCES, download_dir
from stelab.errors import ConfigError, StelabTypeError, closest, unknown

__all__ = ["download", "load", "names"]

_LOADERS: dict[str, Callable[..., Splits]] = {
    "digits": vision.load_digits,
    "fashion-mnist": vision.load_idx,
    "mnist": vision.load_idx,
    "cifar10": vision.load_cifar10,
    "teacher": synthetic.load_teacher,
    "psa-toy": synthetic.load_psa_toy,
}
_DEFAULT_SEED = {"psa-toy": 1}
_ALIASES = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "psa": "psa-toy"}


def names() -> list[str]:
    """The dataset names :func:`load` accepts."""
    return list(_LOADERS)


def canonical(name: Any) -> str:
    """The registry name for ``name`` (case- and ``_``/``-``-insensitive), or ConfigError."""
    if not isinstance(name, str):
        raise StelabTypeError(f"dataset name must be a string, got {name!r}")
    key = name.strip().lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in _LOADERS:
        raise unknown("dataset", name, _LOADERS)
    return key


def _options(loader: Callable[..., Splits]) -> list[str]:
    params = inspect.signature(loader).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def load(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    seed: int | None = None,
    val_size: int | None = None,
    limit: int | None = None,
    progress: bool = True,
    **kwargs: Any,
) -> Splits:
    """Load dataset ``name`` into memory with a fixed train/val/test split.

    Args:
        name: one of :func:`names`: ``digits``, ``fashion-mnist``, ``mnist``,
            ``cifar10``, ``teacher``, ``psa-toy``.
        data_dir: a directory holding the dataset's files (or a sub-directory named
            after the dataset); searched first, and where downloads go when given.
            Then ``$STELAB_DATA``, the user cache ``$XDG_CACHE_HOME/stelab/<name>``
            (default ``~/.cache/stelab/<name>``) and system directories (Debian's
            ``/usr/share/datasets/fashion-mnist``) are searched.
        download: download missing files (SHA-256 verified) into ``data_dir`` or the cache.
        seed: seed of the validation carve-out for image data (the test set never
            depends on it) and of the sampling for generated data. Default 0
            (1 for ``psa-toy``, as in docs/papers/psa2020.md).
        val_size: validation rows (defaults: 5000 for mnist, fashion-mnist, cifar10;
            180 for digits; 1000 for teacher; psa-toy takes ``n_val_per_class``).
        limit: keep at most this many training rows (a seeded subset), for quick runs.
        progress: show a download progress bar.
        **kwargs: options of the dataset's loader: ``standardize``, ``verify``,
            ``mirrors`` for image data (see :mod:`stelab.data.vision`); ``m``, ``n``,
            ``v_star``, ``w_star``, ``n_train``, ``n_test``, ``dtype`` for ``teacher``;
            ``n_per_class``, ``n_val_per_class``, ``n_test_per_class``, ``labels``,
            ``dtype`` for ``psa-toy`` (see :mod:`stelab.data.synthetic`).

    Raises:
        ConfigError: unknown name or option, or a bad number (names the parameter).
        DataError: files missing and not downloadable, or truncated/corrupt.
    """
    key = canonical(name)
    loader = _LOADERS[key]
    allowed = _options(loader)
    for k in kwargs:
        if k not in allowed:
            hint = closest(k, allowed)
            raise ConfigError(
                f"unknown option {k!r} for dataset {key!r}; allowed: "
                f"{', '.join(allowed) or 'none'}" + (f" (did you mean {hint!r}?)" if hint else "")
            )
    req = Request(
        name=key,
        data_dir=data_dir,
        download=bool(download),
        seed=_DEFAULT_SEED.get(key, 0) if seed is None else check_seed(seed),
        val_size=None if val_size is None else check_count("val_size", val_size, minimum=0),
        limit=check_limit(limit),
        progress=bool(progress),
    )
    return loader(req, **kwargs)


def download(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    mirrors: Sequence[str] | str | None = None,
) -> Path | None:
    """Download dataset ``name`` into ``data_dir`` (default: the user cache) if not there yet.

    Files are SHA-256 verified and written atomically; CIFAR-10 is also extracted.
    Returns the directory holding the files, or None for datasets that need no
    download (``digits`` ships with scikit-learn; ``teacher`` and ``psa-toy`` are
    generated).
    """
    key = canonical(name)
    if key not in RESOURCES:
        return None
    target = download_dir(key, data_dir)
    if key == "cifar10":
        return vision.ensure_cifar(target, mirrors=mirrors, progress=progress)
    vision.ensure_idx(key, target, mirrors=mirrors, progress=progress)
    return target
