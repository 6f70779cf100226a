"""How many intra-op CPU threads a training run uses (``train.threads``).

torch's default (one thread per core) is pathological for the small models this
library trains most: a LeNet-5 step on 8x8 digits is so short that waking and
joining a second thread costs more than it saves, and on a busy machine every
thread waits for a core (20x slower measured; see ``benchmarks/bench_threads.py``).
``"auto"`` (the default) therefore picks

    threads = 1                                          if W < AUTO_THRESHOLD
            = max(1, min(torch.get_num_threads(), free))  otherwise
    free    = cores - round(max(0, load - 1))

where ``W = MACs per sample x batch rows per process`` is the multiply-accumulate
count of one step's forward pass (Linear and Conv layers), ``cores`` the CPUs this
process may run on and ``load`` the 1-minute load average (this process counts as
one): threads beyond the free cores wait for one, and even ResNet-20 ran 3x slower
on 2 threads than on 1 on a loaded 2-core machine. A large model's count thus
depends on the load when the run starts; it is recorded (env.json, the checkpoint)
and ``--resume`` reuses it. Set an integer for runs that must match bit for bit
across machines or loads. When the user set ``OMP_NUM_THREADS`` or
``MKL_NUM_THREADS``, ``"auto"`` leaves torch's setting (which honours them) alone.
An integer always wins.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["AUTO_THRESHOLD", "ENV_VARS", "auto_threads", "resolve_threads", "step_macs"]

#: Below this many forward MACs per step one thread is used. Measured with
#: benchmarks/bench_threads.py on a shared 2-core machine (load 6-7): 2 threads were
#: 4-20x slower than 1 for LeNet-5 (4e6 to 1.1e8 MACs per step) and 2.8x slower for
#: ResNet-20 at batch 128 (5e9). Every LeNet-5 config (digits, Fashion-MNIST, batch
#: up to 2048) stays below; ResNet-20 / VGG-11 at batch 128 (5e9, 2e10), where a
#: free machine gains from its cores, get the free ones.
AUTO_THRESHOLD = 1e9

#: Environment variables that, when set, mean the user chose the thread count.
ENV_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def step_macs(model: nn.Module, in_shape: Sequence[int]) -> int:
    """Forward multiply-accumulates of ``model`` for one sample of shape ``in_shape``.

    Linear: in·out; ConvNd: numel(output)·(C_in/groups)·prod(kernel). Measured by one
    forward pass of a copy of the model in eval mode, under ``torch.no_grad`` and a
    forked RNG: the model, its buffers and the random streams are left untouched.
    """
    probe = copy.deepcopy(model).eval()
    total = 0

    def hook(m: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(m, nn.Linear):
            total += out.numel() // max(1, out.shape[-1]) * m.in_features * m.out_features
        else:
            k = 1
            for s in m.kernel_size:
                k *= s
            total += out.numel() * (m.in_channels // m.groups) * k

    kinds = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
    handles = [m.register_forward_hook(hook) for m in probe.modules() if isinstance(m, kinds)]
    try:
        p = next(probe.parameters(), None)
        x = torch.zeros(1, *in_shape, dtype=p.dtype if p is not None else torch.float32)
        if p is not None:
            x = x.to(p.device)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            probe(x)
    finally:
        for h in handles:
            h.remove()
    return total


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def auto_threads(work: float) -> int | None:
    """The ``"auto"`` choice for ``work`` forward MACs per step (formula in the module
    docstring); ``None`` (keep torch's setting) when the user set :data:`ENV_VARS`."""
    if any(os.environ.get(v, "").strip() for v in ENV_VARS):
        return None
    if work < AUTO_THRESHOLD:
        return 1
    try:
        busy = round(max(0.0, os.getloadavg()[0] - 1.0))
    except (AttributeError, OSError):  # pragma: no cover - no load average (Windows)
        busy = 0
    return max(1, min(torch.get_num_threads(), _cores() - busy))


def resolve_threads(requested: int | str | None, work: float) -> int:
    """The thread count for ``train.threads = requested``: an int as given; ``"auto"``
    (or None) by :func:`auto_threads`, falling back to torch's current setting."""
    if isinstance(requested, int) and not isinstance(requested, bool):
        if requested < 1:
            raise ValueError(f"threads must be a positive integer or 'auto', got {requested!r}")
        return requested
    if requested not in (None, "auto"):
        raise ValueError(f"threads must be a positive integer or 'auto', got {requested!r}")
    n = auto_threads(work)
    return torch.get_num_threads() if n is None else n
