"""Image datasets: scikit-learn's digits, MNIST, Fashion-MNIST and CIFAR-10 (binary release).

Every loader returns float32 images ``(N, C, H, W)`` scaled to [0, 1] and, unless
``standardize=False``, standardised per channel with the mean and std of the
training split (recorded in ``Splits.mean``/``Splits.std``), and int64 labels.

Splits (``seed`` only moves the train/val boundary; the test set never depends on it):

- ``digits``: 1797 images. A fixed test set of 360 images (a permutation drawn with
  seed 0, whatever ``seed`` is), then ``val_size`` (default 180) of the remaining
  1437 carved with ``seed``: 1257 / 180 / 360.
- ``mnist``, ``fashion-mnist``: the official 60000 / 10000 train/test files; the
  validation set (default 5000) is carved from the training files with ``seed``:
  55000 / 5000 / 10000.
- ``cifar10``: the official 50000 / 10000; validation 5000 carved with ``seed``
  (45k / 5k / 10k, docs/papers/psa2020.md).

Carving (:func:`stelab.data.base.carve`): ``perm = randperm(N, seed)``, validation is
``perm[N - val_size:]``, training is ``perm[:N - val_size]`` in that seeded order, so
``limit=k`` keeps a seeded random subset of k training images. Test sets keep file order.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from stelab.data.base import (
    Request,
    Split,
    Splits,
    carve,
    channel_stats,
    generator,
    to_float,
)
from stelab.data.files import (
    CIFAR_DIR,
    CIFAR_TEST,
    CIFAR_TRAIN,
    RESOURCES,
    cache_root,
    download_dir,
    extract_cifar,
    fetch,
    find_local,
    missing_error,
    read_cifar_bin,
    read_idx,
    search_dirs,
    verify_file,
)
from stelab.errors import DataError

DIGITS_TEST = 360
DIGITS_VAL = 180
DEFAULT_VAL = 5000


def _assemble(
    req: Request,
    raw_train: torch.Tensor,
    y_train: torch.Tensor,
    raw_test: torch.Tensor,
    y_test: torch.Tensor,
    *,
    scale: float,
    levels: int,
    default_val: int,
    standardize: bool,
    source: str,
    num_classes: int = 10,
) -> Splits:
    """Carve validation from ``raw_train``, scale/standardise and wrap as Splits."""
    val_size = default_val if req.val_size is None else req.val_size
    tr, va = carve(raw_train.shape[0], val_size, req.seed)
    raw_tr = raw_train[tr]
    mean = std = None
    if standardize:
        mean, std = channel_stats(raw_tr, scale, levels)

    def split(raw: torch.Tensor, y: torch.Tensor) -> Split:
        return Split(to_float(raw, scale, mean, std), y.to(torch.int64))

    if req.limit is not None:
        raw_tr, tr = raw_tr[: req.limit], tr[: req.limit]
    train = split(raw_tr, y_train[tr])
    return Splits(
        name=req.name,
        train=train,
        val=split(raw_train[va], y_train[va]),
        test=split(raw_test, y_test),
        num_classes=num_classes,
        input_shape=tuple(raw_train.shape[1:]),
        source=source,
        mean=mean or (),
        std=std or (),
    )


# --- digits ---------------------------------------------------------------------------


def load_digits(req: Request, *, standardize: bool = True) -> Splits:
    """scikit-learn's bundled 8x8 digits (no download): (1, 8, 8), 10 classes.

    Pixel values 0..16 are scaled to [0, 1] by dividing by 16.
    """
    from sklearn.datasets import load_digits as sk_load_digits

    d = sk_load_digits()
    raw = torch.from_numpy(np.rint(d.images).astype(np.uint8))[:, None]
    y = torch.from_numpy(np.asarray(d.target, dtype=np.int64))
    perm = torch.randperm(raw.shape[0], generator=generator(0))
    test = perm[-DIGITS_TEST:].sort().values
    rest = perm[:-DIGITS_TEST].sort().values
    return _assemble(
        req,
        raw[rest],
        y[rest],
        raw[test],
        y[test],
        scale=16.0,
        levels=17,
        default_val=DIGITS_VAL,
        standardize=standardize,
        source="scikit-learn bundled digits (sklearn.datasets.load_digits)",
    )


# --- MNIST / Fashion-MNIST ----------------------------------------------------------------

_IDX_ROLES = ("train_images", "train_labels", "test_images", "test_labels")


def _locate_idx(name: str, dirs: Sequence[Path]) -> dict[str, Path] | None:
    """The four IDX files of ``name`` from the first directory holding all of them."""
    res = RESOURCES[name]
    for d in dirs:
        found = {r: find_local([d], res.file(r).filename) for r in _IDX_ROLES}
        if all(found.values()):
            return found  # type: ignore[return-value]
    return None


def ensure_idx(
    name: str, target: Path, *, mirrors: Sequence[str] | str | None, progress: bool
) -> dict[str, Path]:
    """Download whichever of the four IDX files of ``name`` ``target`` lacks."""
    res = RESOURCES[name]
    for role in _IDX_ROLES:
        remote = res.file(role)
        if find_local([target], remote.filename) is None:
            fetch(name, remote, target, mirrors=mirrors, progress=progress)
    found = _locate_idx(name, [target])
    assert found is not None
    return found


def load_idx(
    req: Request,
    *,
    standardize: bool = True,
    verify: bool = True,
    mirrors: Sequence[str] | str | None = None,
) -> Splits:
    """MNIST or Fashion-MNIST from IDX files (gzip'd or raw): (1, 28, 28), 10 classes.

    Args:
        standardize: standardise with the training split's mean/std (else [0, 1]).
        verify: check the SHA-256 of each file's decompressed content against the table.
        mirrors: base URLs to download from instead of the table's (see ``files``).
    """
    dirs = search_dirs(req.name, req.data_dir)
    paths = _locate_idx(req.name, dirs)
    how = ""
    if paths is None:
        if not req.download:
            raise missing_error(req.name, dirs, "download=False")
        try:
            paths = ensure_idx(
                req.name,
                download_dir(req.name, req.data_dir),
                mirrors=mirrors,
                progress=req.progress,
            )
        except DataError as e:
            raise missing_error(req.name, dirs, f"download failed: {e}") from e
        how = " (downloaded)"
    res = RESOURCES[req.name]
    arr = {r: read_idx(p, res.file(r).content_sha256, verify=verify) for r, p in paths.items()}
    for part in ("train", "test"):
        images, labels = arr[f"{part}_images"], arr[f"{part}_labels"]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(
                f"{paths[part + '_images']} and {paths[part + '_labels']} do not match: "
                f"images {images.shape}, labels {labels.shape}"
            )
        if labels.size and int(labels.max()) > 9:
            raise DataError(f"{paths[part + '_labels']} is corrupt: labels outside 0..9")

    def tensors(part: str) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(arr[f"{part}_images"].copy())[:, None]
        return images, torch.from_numpy(arr[f"{part}_labels"].astype(np.int64))

    folder = paths["train_images"].parent
    return _assemble(
        req,
        *tensors("train"),
        *tensors("test"),
        scale=255.0,
        levels=256,
        default_val=DEFAULT_VAL,
        standardize=standardize,
        source=f"IDX files in {folder}{how}",
    )


# --- CIFAR-10 -------------------------------------------------------------------------------


def _locate_cifar(dirs: Sequence[Path]) -> Path | None:
    """The first directory holding the six extracted CIFAR-10 binary batches."""
    names = CIFAR_TRAIN + CIFAR_TEST
    for d in dirs:
        for cand in (d / CIFAR_DIR, d):
            if all((cand / n).is_file() for n in names):
                return cand
    return None


def ensure_cifar(
    target: Path,
    *,
    mirrors: Sequence[str] | str | None,
    progress: bool,
    verify: bool = True,
) -> Path:
    """Make sure ``target`` holds the extracted batches; download the archive if needed."""
    found = _locate_cifar([target])
    if found is not None:
        return found
    remote = RESOURCES["cifar10"].file("archive")
    archive = find_local([target], remote.filename)
    if archive is None:
        archive = fetch("cifar10", remote, target, mirrors=mirrors, progress=progress)
    elif verify:
        verify_file(archive, remote.sha256)
    return extract_cifar(archive, target)


def load_cifar10(
    req: Request,
    *,
    standardize: bool = True,
    verify: bool = True,
    mirrors: Sequence[str] | str | None = None,
) -> Splits:
    """CIFAR-10 from its binary release ``cifar-10-binary.tar.gz``: (3, 32, 32), 10 classes.

    Looks for the extracted ``cifar-10-batches-bin/*.bin`` (or the ``.bin`` files
    directly) in the search directories, then for the archive (verified against its
    SHA-256 and extracted next to it, or into the user cache when that directory is
    read-only), then downloads the archive.
    """
    remote = RESOURCES["cifar10"].file("archive")
    dirs = search_dirs(req.name, req.data_dir)
    folder = _locate_cifar(dirs)
    how = ""
    if folder is None:
        archive = find_local(dirs, remote.filename)
        if archive is not None:
            if verify:
                verify_file(archive, remote.sha256)
            parent = archive.parent
            if not os.access(parent, os.W_OK):
                parent = cache_root() / req.name
            folder = extract_cifar(archive, parent)
            how = f" (extracted from {archive})"
        elif not req.download:
            raise missing_error(req.name, dirs, "download=False")
        else:
            try:
                folder = ensure_cifar(
                    download_dir(req.name, req.data_dir),
                    mirrors=mirrors,
                    progress=req.progress,
                    verify=verify,
                )
            except DataError as e:
                raise missing_error(req.name, dirs, f"download failed: {e}") from e
            how = " (downloaded)"
    xtr, ytr = read_cifar_bin([folder / n for n in CIFAR_TRAIN])
    xte, yte = read_cifar_bin([folder / n for n in CIFAR_TEST])
    return _assemble(
        req,
        torch.from_numpy(xtr),
        torch.from_numpy(ytr.astype(np.int64)),
        torch.from_numpy(xte),
        torch.from_numpy(yte.astype(np.int64)),
        scale=255.0,
        levels=256,
        default_val=DEFAULT_VAL,
        standardize=standardize,
        source=f"CIFAR-10 binary batches in {folder}{how}",
    )
