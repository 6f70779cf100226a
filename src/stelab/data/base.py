"""The containers every dataset returns, and the small helpers the loaders share.

A dataset is three in-memory splits (``train``, ``val``, ``test``), each a pair of
tensors ``x`` (float) and ``y`` (labels), plus what a model needs to know about them
(``num_classes``, ``input_shape``) and where they came from (``source``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from stelab.errors import ConfigError, StelabTypeError

__all__ = ["Split", "Splits"]


@dataclass(frozen=True, eq=False)
class Split:
    """One split of a dataset: inputs ``x`` (N, ...) and targets ``y`` (N,).

    Unpacks like a pair: ``x, y = splits.train``.
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise ConfigError(
                f"x and y must have the same number of rows, got {self.x.shape[0]} and "
                f"{self.y.shape[0]}"
            )

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter((self.x, self.y))

    def to(self, device: torch.device | str) -> Split:
        """This split with both tensors moved to ``device``."""
        return Split(self.x.to(device), self.y.to(device))

    def __repr__(self) -> str:
        return (
            f"Split(x={tuple(self.x.shape)} {_dtype(self.x)}, y={tuple(self.y.shape)} "
            f"{_dtype(self.y)})"
        )


@dataclass(frozen=True, eq=False)
class Splits:
    """A dataset loaded in memory with a fixed train/val/test split.

    Attributes:
        name: the dataset's registry name (``"mnist"``, ``"teacher"``, ...).
        train, val, test: the three splits; ``val`` or ``test`` may hold 0 rows.
        num_classes: number of classes for classification data; ``None`` for
            regression targets (the ``teacher`` data).
        input_shape: shape of one input: ``(C, H, W)`` for images, ``(d,)`` for
            vectors, ``(m, n)`` for the teacher's patch matrices.
        source: where the data came from, in words (a file path, "scikit-learn
            bundled digits", "generated: ...").
        mean, std: per-channel statistics (in [0, 1] pixel units) that were used to
            standardise the images, computed on the training split; empty when the
            data were not standardised.
        meta: dataset-specific extras (e.g. ``v_star``/``w_star`` of the teacher).
    """

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int | None
    input_shape: tuple[int, ...]
    source: str
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def from_tensors(
        cls,
        train: tuple[torch.Tensor, torch.Tensor],
        val: tuple[torch.Tensor, torch.Tensor] | None = None,
        test: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        name: str = "tensors",
        num_classes: int | None = None,
    ) -> Splits:
        """Splits of your own tensors, e.g. for :func:`stelab.train.fit`: each split an
        ``(x, y)`` pair with as many rows in ``x`` as in ``y``; ``val``/``test`` may be
        left out (empty). ``num_classes`` defaults to ``max(y) + 1`` over the splits
        for integer targets, ``None`` (regression) otherwise."""
        pairs = {"train": train, "val": val, "test": test}
        splits: dict[str, Split] = {}
        for what, pair in pairs.items():
            if pair is None:
                x0, y0 = splits["train"].x, splits["train"].y
                splits[what] = Split(x0[:0], y0[:0])
                continue
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise StelabTypeError(f"{what} must be an (x, y) pair of tensors, got {pair!r}")
            x, y = pair
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                raise StelabTypeError(
                    f"{what} must be an (x, y) pair of tensors, got "
                    f"({type(x).__name__}, {type(y).__name__})"
                )
            if x.dim() < 1 or y.dim() < 1 or len(x) != len(y):
                raise ConfigError(
                    f"{what}: x and y must have as many rows, got x {tuple(x.shape)} and "
                    f"y {tuple(y.shape)}"
                )
            splits[what] = Split(x, y)
        if len(splits["train"]) == 0:
            raise ConfigError("train: needs at least one row, got 0")
        if num_classes is None and not splits["train"].y.is_floating_point():
            num_classes = 1 + max(int(s.y.max()) for s in splits.values() if len(s))
        return cls(
            name=name,
            num_classes=num_classes,
            input_shape=tuple(splits["train"].x.shape[1:]),
            source="given as tensors",
            **splits,
        )

    def to(self, device: torch.device | str) -> Splits:
        """These splits with every tensor moved to ``device``."""
        return replace(
            self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device)
        )

    def __repr__(self) -> str:
        return (
            f"Splits(name={self.name!r}, train={len(self.train)}, val={len(self.val)}, "
            f"test={len(self.test)}, num_classes={self.num_classes}, "
            f"input_shape={self.input_shape}, source={self.source!r})"
        )


@dataclass(frozen=True)
class Request:
    """The common options :func:`stelab.data.load` passes to every loader."""

    name: str
    data_dir: str | os.PathLike[str] | None
    download: bool
    seed: int
    val_size: int | None
    limit: int | None
    progress: bool


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


# --- parameter checks ---------------------------------------------------------------


def check_count(name: str, value: Any, *, minimum: int = 0) -> int:
    """``value`` as an int >= ``minimum``, else a ConfigError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_dtype(name: str, value: Any) -> torch.dtype:
    """A floating torch dtype (``torch.float32``/``"float64"``...), else an error."""
    allowed = {"float32": torch.float32, "float64": torch.float64}
    if isinstance(value, str) and value in allowed:
        return allowed[value]
    if value in (torch.float32, torch.float64):
        return value
    raise StelabTypeError(f"{name} must be torch.float32 or torch.float64, got {value!r}")


def check_seed(value: Any) -> int:
    """A seed for ``torch.Generator.manual_seed``."""
    return check_count("seed", value, minimum=0)


def generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with ``seed``."""
    g = torch.Generator()
    g.manual_seed(seed)
    return g


# --- splitting and scaling ------------------------------------------------------------


def carve(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, val) of a seeded random partition of ``range(n)``.

    ``perm = torch.randperm(n, generator=Generator().manual_seed(seed))``;
    the validation set is ``perm[n - val_size:]`` and the training set is
    ``perm[:n - val_size]``, kept in that (seeded, deterministic) order.
    """
    if not 0 <= val_size < n:
        raise ConfigError(f"val_size must be an integer in [0, {n - 1}], got {val_size!r}")
    perm = torch.randperm(n, generator=generator(seed))
    return perm[: n - val_size], perm[n - val_size :]


def channel_stats(
    raw: torch.Tensor, scale: float, levels: int = 256
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std of ``raw / scale`` for integer images (N, C, H, W).

    Computed from per-channel histograms of the integer values, so the result is
    exact (float64) and costs no float copy of the data.
    """
    means, stds = [], []
    values = torch.arange(levels, dtype=torch.float64) / scale
    for c in range(raw.shape[1]):
        counts = torch.bincount(raw[:, c].reshape(-1), minlength=levels)
        counts = counts.to(torch.float64)
        total = counts.sum()
        mean = (counts * values).sum() / total
        var = (counts * (values - mean) ** 2).sum() / total
        means.append(float(mean))
        stds.append(float(var.sqrt()) if var > 0 else 1.0)
    return tuple(means), tuple(stds)


def to_float(
    raw: torch.Tensor,
    scale: float,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
) -> torch.Tensor:
    """``raw`` (N, C, H, W integers) as float32 ``raw / scale``, standardised if asked."""
    x = raw.to(torch.float32).div_(scale)
    if mean is not None and std is not None:
        shape = (1, len(mean)) + (1,) * (x.dim() - 2)
        x.sub_(torch.tensor(mean, dtype=torch.float32).view(shape))
        x.div_(torch.tensor(std, dtype=torch.float32).view(shape))
    return x


def limit_rows(split: Split, limit: int | None) -> Split:
    """The first ``limit`` rows of ``split`` (all of it when ``limit`` is None)."""
    if limit is None or limit >= len(split):
        return split
    return Split(split.x[:limit].clone(), split.y[:limit].clone())


def check_limit(limit: Any) -> int | None:
    """``limit`` as a positive int (or None)."""
    if limit is None:
        return None
    return check_count("limit", limit, minimum=1)
