"""Fast mini-batches over in-memory tensors, and batch-level augmentation.

No per-sample ``__getitem__``: an epoch is one ``randperm`` and one
``index_select`` per batch, and augmentations act on whole batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from stelab.errors import ConfigError, StelabTypeError

__all__ = ["FlipCrop", "Loader", "batches", "flip_crop"]

Augment = Callable[[torch.Tensor], torch.Tensor]


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise StelabTypeError(
            f"x and y must be tensors, got {type(x).__name__} and {type(y).__name__}"
        )
    if x.dim() == 0 or y.dim() == 0 or x.shape[0] != y.shape[0]:
        raise ConfigError(
            f"x and y must have the same number of rows, got shapes {tuple(x.shape)} "
            f"and {tuple(y.shape)}"
        )


def _check_batch_size(batch_size: object) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    return batch_size


def num_batches(n: int, batch_size: int, drop_last: bool = False) -> int:
    """How many batches :func:`batches` yields for ``n`` rows."""
    return n // batch_size if drop_last else math.ceil(n / batch_size)


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    shuffle: bool = True,
    generator: torch.Generator | None = None,
    augment: Augment | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of ``(xb, yb)`` mini-batches of in-memory tensors.

    Args:
        x, y: tensors with the same number of rows (any device).
        batch_size: rows per batch; the last batch is smaller unless ``drop_last``.
        shuffle: visit rows in the order of ``torch.randperm(N, generator=generator)``
            (drawn on CPU, so a seeded CPU generator gives the same order on any
            device); else in order, as views (no copy).
        generator: source of the permutation; each call draws a fresh one.
        augment: a function applied to every ``xb`` (whole batch), e.g. :func:`flip_crop`.
        drop_last: drop the final incomplete batch.

    Every row appears exactly once per epoch (when not ``drop_last``).
    """
    _check_pair(x, y)
    batch_size = _check_batch_size(batch_size)
    if augment is not None and not callable(augment):
        raise StelabTypeError(f"augment must be callable or None, got {augment!r}")
    n = int(x.shape[0])
    order = torch.randperm(n, generator=generator) if shuffle else None
    return _iterate(x, y, batch_size, order, augment, drop_last)


def _iterate(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    order: torch.Tensor | None,
    augment: Augment | None,
    drop_last: bool,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    n = int(x.shape[0])
    stop = n - n % batch_size if drop_last else n
    ox = oy = None
    if order is not None:
        ox = order.to(x.device)
        oy = ox if y.device == x.device else order.to(y.device)
    for start in range(0, stop, batch_size):
        end = min(start + batch_size, n)
        if ox is None or oy is None:
            xb, yb = x[start:end], y[start:end]
        else:
            xb = x.index_select(0, ox[start:end])
            yb = y.index_select(0, oy[start:end])
        if augment is not None:
            xb = augment(xb)
        yield xb, yb


class Loader:
    """A re-iterable :func:`batches`: each ``iter()`` is one epoch, ``len()`` its batches.

    Like a ``DataLoader`` over in-memory tensors: ``for epoch ...: for xb, yb in loader``.
    With ``seed`` (or ``generator``) the sequence of epochs is deterministic.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        *,
        shuffle: bool = True,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        augment: Augment | None = None,
        drop_last: bool = False,
    ) -> None:
        _check_pair(x, y)
        self.batch_size = _check_batch_size(batch_size)
        if generator is not None and seed is not None:
            raise ConfigError("pass either generator or seed to Loader, not both")
        if seed is not None:
            generator = torch.Generator()
            generator.manual_seed(int(seed))
        self.x, self.y = x, y
        self.shuffle, self.generator, self.augment, self.drop_last = (
            shuffle,
            generator,
            augment,
            drop_last,
        )

    def __len__(self) -> int:
        return num_batches(int(self.x.shape[0]), self.batch_size, self.drop_last)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return batches(
            self.x,
            self.y,
            self.batch_size,
            shuffle=self.shuffle,
            generator=self.generator,
            augment=self.augment,
            drop_last=self.drop_last,
        )

    def __repr__(self) -> str:
        return (
            f"Loader(n={int(self.x.shape[0])}, batch_size={self.batch_size}, "
            f"shuffle={self.shuffle}, drop_last={self.drop_last}, augment={self.augment!r})"
        )


class FlipCrop:
    """Random horizontal flip + random crop after zero padding, vectorised over a batch.

    For a batch (B, C, H, W) it draws, from ``generator`` on CPU and in this order,
    ``flip = rand(B) < 0.5``, ``dy = randint(0, 2·pad+1, (B,))``,
    ``dx = randint(0, 2·pad+1, (B,))``, and returns
    ``out[b] = crop(pad(x[b]), dy[b], dx[b])`` flipped left-right where ``flip[b]``:
    ``out[b, c, i, j] = P[b, c, dy+i, dx+j]`` (or ``dx+W-1-j`` when flipped), with
    ``P`` the input zero-padded by ``pad`` on every side. Padding with 0 after
    standardisation pads with the mean pixel.
    """

    def __init__(
        self, pad: int = 4, *, generator: torch.Generator | None = None, flip: bool = True
    ) -> None:
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise ConfigError(f"pad must be an integer >= 0, got {pad!r}")
        self.pad, self.generator, self.flip = pad, generator, flip

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ConfigError(f"flip_crop needs a batch of images (B, C, H, W), got {shape}")
        b, c, h, w = x.shape
        p, g, dev = self.pad, self.generator, x.device
        flips = torch.rand(b, generator=g) < 0.5
        if not self.flip:
            flips = torch.zeros_like(flips)
        dy = torch.randint(0, 2 * p + 1, (b,), generator=g)
        dx = torch.randint(0, 2 * p + 1, (b,), generator=g)
        padded = F.pad(x, (p, p, p, p)) if p else x
        rows = dy[:, None] + torch.arange(h)  # (B, H)
        cols = dx[:, None] + torch.arange(w)  # (B, W)
        cols = torch.where(flips[:, None], cols.flip(1), cols)
        # one gather over the flattened padded plane: index (dy+i)·(W+2p) + col(j)
        flat = rows[:, :, None] * (w + 2 * p) + cols[:, None, :]  # (B, H, W)
        index = flat.reshape(b, 1, h * w).to(dev).expand(b, c, h * w)
        return padded.reshape(b, c, -1).gather(2, index).reshape(b, c, h, w)

    def __repr__(self) -> str:
        return f"FlipCrop(pad={self.pad}, flip={self.flip})"


def flip_crop(
    pad: int = 4, *, generator: torch.Generator | None = None, flip: bool = True
) -> FlipCrop:
    """The standard CIFAR augmentation (random flip + pad-``pad`` random crop) for ``augment=``.

    See :class:`FlipCrop` for the exact draws; ``generator`` makes it reproducible.
    """
    return FlipCrop(pad, generator=generator, flip=flip)
