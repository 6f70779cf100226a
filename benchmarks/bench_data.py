"""Throughput of stelab.data.batches (and flip_crop) on Fashion-MNIST / CIFAR-sized tensors.

Compares one shuffled epoch of ``batches`` (randperm + index_select per batch) with
iterating over pre-made batches (the floor: no gather at all) and with a
``torch.utils.data.DataLoader`` over a ``TensorDataset`` (per-sample ``__getitem__``).

    python benchmarks/bench_data.py [--n 60000] [--batch 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Iterable

import torch

from stelab.data import batches, flip_crop


def timed(label: str, n: int, make: Callable[[], Iterable], repeat: int = 3) -> None:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        total = 0.0
        for xb, _ in make():
            total += float(xb[0, 0, 0, 0])  # touch every batch
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    print(f"{label:<42} {best * 1e3:8.1f} ms/epoch  {n / best:12,.0f} images/s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=60000)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-dataloader", action="store_true")
    a = p.parse_args()
    dev = torch.device(a.device)
    g = torch.Generator().manual_seed(0)

    x = torch.randn(a.n, 1, 28, 28, device=dev)
    y = torch.randint(0, 10, (a.n,), device=dev)
    print(f"Fashion-MNIST sized: {tuple(x.shape)}, batch {a.batch}, {dev}")
    pre = [(x[i : i + a.batch], y[i : i + a.batch]) for i in range(0, a.n, a.batch)]
    timed("pre-made batches", a.n, lambda: pre)
    timed("batches(shuffle=False)", a.n, lambda: batches(x, y, a.batch, shuffle=False))
    timed("batches(shuffle=True)", a.n, lambda: batches(x, y, a.batch, generator=g))
    if not a.skip_dataloader and dev.type == "cpu":
        ds = torch.utils.data.TensorDataset(x, y)
        timed(
            "DataLoader(TensorDataset, shuffle=True)",
            a.n,
            lambda: torch.utils.data.DataLoader(ds, a.batch, shuffle=True),
            repeat=1,
        )

    n = min(a.n, 50000)
    xc = torch.randn(n, 3, 32, 32, device=dev)
    yc = torch.randint(0, 10, (n,), device=dev)
    aug = flip_crop(4, generator=torch.Generator().manual_seed(0))
    print(f"CIFAR sized: {tuple(xc.shape)}, batch {a.batch}, {dev}")
    timed("batches(shuffle=True)", n, lambda: batches(xc, yc, a.batch, generator=g))
    timed(
        "batches(shuffle=True, augment=flip_crop)",
        n,
        lambda: batches(xc, yc, a.batch, generator=g, augment=aug),
    )


if __name__ == "__main__":
    main()
