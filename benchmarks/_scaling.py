"""Shared helpers of the benchmarks: fitted power laws, spreads, interleaved timing."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence


def fit_exponent(sizes: Sequence[float], times: Sequence[float]) -> float:
    """p of the least-squares fit log t = p·log n + c (numpy.polyfit on the logs)."""
    import numpy as np

    return float(np.polyfit(np.log(sizes), np.log(times), 1)[0])


def spread(values: Sequence[float], fmt: str = "{:.3g}") -> str:
    """``min-max`` of repeated measurements, for the table's spread column."""
    return f"{fmt.format(min(values))}-{fmt.format(max(values))}"


def block_medians(samples: Sequence[float], blocks: int = 3) -> list[float]:
    """Medians of ``blocks`` consecutive blocks of ``samples`` (the spread over time)."""
    n = max(1, len(samples) // blocks)
    return [statistics.median(samples[i : i + n]) for i in range(0, n * blocks, n)
            if samples[i : i + n]]  # fmt: skip


def interleaved_medians(fns: Mapping[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median process CPU time of each function, timed round-robin (one call of each per
    round), so that drift of the machine hits all alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            c = time.process_time()
            f()
            times[k].append(time.process_time() - c)
    return {k: statistics.median(v) for k, v in times.items()}
