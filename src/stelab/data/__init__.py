"""Datasets as in-memory tensors with fixed splits, and fast batching.

``load(name)`` returns :class:`Splits` (``train``/``val``/``test`` pairs of tensors
plus ``num_classes``, ``input_shape``, ``source``) for ``digits`` (bundled with
scikit-learn), ``mnist``, ``fashion-mnist``, ``cifar10`` (binary release, downloaded
and SHA-256 verified on first use), and the generated ``teacher`` ([Y19], docs/papers/yin2019.md)
and ``psa-toy`` ([S20], docs/papers/psa2020.md) data. ``batches``/``Loader`` iterate mini-batches
without per-sample Python; ``flip_crop`` is the vectorised CIFAR augmentation.

Example::

    import stelab.data as data
    ds = data.load("digits")
    for xb, yb in data.batches(*ds.train, 64, generator=torch.Generator().manual_seed(0)):
        ...
"""

from stelab.data.api import download, load, names
from stelab.data.base import Split, Splits
from stelab.data.batching import FlipCrop, Loader, batches, flip_crop, num_batches
from stelab.data.files import RESOURCES, RemoteFile, Resource, cache_root
from stelab.data.synthetic import teacher_labels

__all__ = [
    "RESOURCES",
    "FlipCrop",
    "Loader",
    "RemoteFile",
    "Resource",
    "Split",
    "Splits",
    "batches",
    "cache_root",
    "download",
    "flip_crop",
    "load",
    "names",
    "num_batches",
    "teacher_labels",
]
