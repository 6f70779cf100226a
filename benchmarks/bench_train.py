"""Overhead of the trainer's data path, and DDP throughput, for LeNet-5 on Fashion-MNIST.

Measures, on CPU:

1. **trainer epoch**: ``stelab.train.train`` on Fashion-MNIST (60k training images:
   ``data.val_size = 0``), batch 128, LeNet-5 with 2-bit σ_α activations ([Y19]),
   SGD momentum 0.9. The time is the training loop of one epoch (``train_seconds``
   in metrics.csv: shuffling, gathering batches, forward/backward/step through
   Fabric, loss bookkeeping, the NaN check), the fastest of the measured epochs.
2. **pure compute**: the same model and optimizer stepping over pre-made,
   contiguous batches in a bare loop (no shuffle, no gather, no Fabric, no
   bookkeeping): the floor for (1). The ratio (1)/(2) is the data-path overhead;
   the goal is <= 1.10. Both wall time and CPU time of this process are
   reported: on a busy machine the CPU-time ratio is the steadier one.
3. **devices = 2**: the trainer with 2 DDP processes (gloo), each with half the
   threads, against 1 process with all of them; images/s of the training loop.

Peak RSS: of this process (ru_maxrss) and, for DDP, of the sum over all processes
(sampled from /proc every 0.2 s). When Fashion-MNIST is not installed, random
tensors of the same size are used for (1) and (2) and (3) is skipped; the output
says so.

    python benchmarks/bench_train.py [--quick] [--json out.json] [--threads N]

``--quick``: 12,800 training images (100 batches) instead of 60,000.
Timings on a shared machine are noisy: the script alternates the measurements and
keeps the fastest of each.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from stelab.config import load_config
from stelab.errors import DataError
from stelab.train import build_model, build_optimizer, load_data, train


def _rss_tree_mib(root: int) -> tuple[float, int]:
    """Sum of VmRSS over ``root`` and its descendants (MiB), and how many processes."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/status") as f:
                text = f.read()
        except OSError:
            continue
        pid = int(d)
        for line in text.splitlines():
            if line.startswith("PPid:"):
                parents[pid] = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss[pid] = int(line.split()[1])
    tree = {root}
    grew = True
    while grew:
        grew = False
        for pid, pp in parents.items():
            if pp in tree and pid not in tree:
                tree.add(pid)
                grew = True
    return sum(rss.get(p, 0) for p in tree) / 1024, len(tree)


class RssSampler:
    """Peak of :func:`_rss_tree_mib` over the life of a ``with`` block."""

    def __enter__(self) -> RssSampler:
        self.peak, self.procs = 0.0, 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._loop, daemon=True)
        self._t.start()
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            mib, n = _rss_tree_mib(os.getpid())
            if mib > self.peak:
                self.peak, self.procs = mib, n
            self._stop.wait(0.2)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_cfg(n_limit: int | None, threads: int, devices: int = 1, epochs: int = 2):
    sets = [
        "data.name='fashion-mnist'",
        "data.val_size=0",
        "data.batch_size=128",
        "model.name='lenet5'",
        "model.bits=2",
        "model.estimator='clipped_relu'",
        "optim.lr=0.05",
        "optim.momentum=0.9",
        f"train.epochs={epochs}",
        f"train.devices={devices}",
        f"train.threads={threads}",
        "train.save_best=false",
    ]
    if n_limit is not None:
        sets.append(f"data.limit={n_limit}")
    return load_config(None, sets)


def trainer_epoch(cfg, workdir: Path, tag: str) -> tuple[float, float, dict, int]:
    """A train() run: its fastest training-loop epoch in wall and CPU seconds, its
    metrics, and the steps per epoch."""
    run = workdir / tag
    metrics = train(cfg, run, overwrite=run.exists(), progress=False)
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    wall = min(float(r["train_seconds"]) for r in rows)
    cpu = min(float(r["train_cpu_seconds"]) for r in rows)
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    return wall, cpu, metrics, ckpt["global_step"] // cfg.train.epochs


def pure_compute(cfg, splits, repeat: int) -> tuple[float, float]:
    """Fastest epoch (wall, CPU seconds) of bare forward/backward/step over pre-made
    contiguous batches."""
    torch.manual_seed(0)
    model = build_model(cfg.model, splits.num_classes, splits.input_shape)
    opt = build_optimizer(cfg.optim, model.parameters())
    b = cfg.data.batch_size
    x, y = splits.train.x, splits.train.y
    pre = [(x[i : i + b].contiguous(), y[i : i + b].contiguous()) for i in range(0, len(x), b)]
    model.train()
    wall = cpu = float("inf")
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        for xb, yb in pre:
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        wall = min(wall, time.perf_counter() - t0)
        cpu = min(cpu, time.process_time() - c0)
    return wall, cpu


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="12,800 images instead of 60,000")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--repeat", type=int, default=2, help="alternating rounds (fastest kept)")
    p.add_argument("--skip-ddp", action="store_true")
    a = p.parse_args()
    limit = 12_800 if a.quick else None
    threads = max(1, a.threads)
    torch.set_num_threads(threads)
    out: dict = {
        "benchmark": "bench_train",
        "quick": a.quick,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": threads,
        "loadavg_start": os.getloadavg(),
        "batch_size": 128,
        "model": "lenet5, 2-bit sigma_alpha activations (clipped_relu)",
    }
    cfg = make_cfg(limit, threads)
    real = True
    try:
        splits = load_data(cfg)
        out["data"] = splits.source
    except DataError as e:
        real = False
        out["data"] = f"random tensors (Fashion-MNIST not available: {e})"
        splits = _random_splits(limit or 60_000)
        import stelab.train.loop as loop

        loop.load_data = lambda cfg, progress=False: splits  # single process only
    n = len(splits.train)
    out["train_images"] = n
    print(f"data: {out['data']}; {n} training images, batch 128, {threads} threads")

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        inf = float("inf")
        t_trainer = c_trainer = t_pure = c_pure = inf
        for r in range(a.repeat):
            w, c = pure_compute(cfg, splits, repeat=2)
            t_pure, c_pure = min(t_pure, w), min(c_pure, c)
            w, c, metrics, steps = trainer_epoch(cfg, work, f"one-{r}")
            t_trainer, c_trainer = min(t_trainer, w), min(c_trainer, c)
            print(
                f"round {r + 1}: pure compute {t_pure:.2f} s wall / {c_pure:.2f} s CPU, "
                f"trainer {t_trainer:.2f} s wall / {c_trainer:.2f} s CPU"
            )
        ratio, ratio_cpu = t_trainer / t_pure, c_trainer / c_pure
        out["single"] = {
            "trainer_epoch_s": t_trainer,
            "pure_compute_epoch_s": t_pure,
            "trainer_epoch_cpu_s": c_trainer,
            "pure_compute_epoch_cpu_s": c_pure,
            "overhead_ratio_wall": ratio,
            "overhead_ratio_cpu": ratio_cpu,
            "goal_ratio": 1.10,
            "trainer_images_per_s": n / t_trainer,
            "pure_images_per_s": n / t_pure,
            "peak_rss_mib": peak_rss_mib(),
        }
        print(
            f"1 process : trainer epoch {t_trainer:.2f} s ({n / t_trainer:,.0f} img/s), pure "
            f"compute {t_pure:.2f} s ({n / t_pure:,.0f} img/s): ratio {ratio:.3f} wall, "
            f"{ratio_cpu:.3f} CPU time (goal <= 1.10); peak RSS {peak_rss_mib():.0f} MiB"
        )
        if a.skip_ddp or not real:
            out["ddp"] = {"skipped": "--skip-ddp" if a.skip_ddp else "no real data"}
        else:
            half = max(1, threads // 2)
            cfg2 = make_cfg(limit, half, devices=2)
            with RssSampler() as rs:
                sec2, _, m2, steps2 = trainer_epoch(cfg2, work, "two")
            imgs2 = steps2 * cfg2.data.batch_size
            speedup = (imgs2 / sec2) / (n / t_trainer)
            out["ddp"] = {
                "processes": 2,
                "threads_per_process": half,
                "epoch_s": sec2,
                "images_per_s": imgs2 / sec2,
                "throughput_vs_1_process": speedup,
                "peak_rss_all_processes_mib": rs.peak,
                "processes_sampled": rs.procs,
                "ranks_in_sync": m2["ranks_in_sync"],
            }
            print(
                f"2 processes ({half} thread(s) each): epoch {sec2:.2f} s "
                f"({imgs2 / sec2:,.0f} img/s) = {speedup:.2f}x the 1-process throughput; "
                f"peak RSS of all processes {rs.peak:.0f} MiB"
            )
    out["loadavg_end"] = os.getloadavg()
    if a.json:
        a.json.write_text(json.dumps(out, indent=2) + "\n")
        print(f"wrote {a.json}")
    return 0


def _random_splits(n: int):
    from stelab.data import Split, Splits

    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    empty = Split(x[:0], y[:0])
    test = Split(x[:1000], y[:1000])
    return Splits("fashion-mnist", Split(x, y), empty, test, 10, (1, 28, 28), "random tensors")


if __name__ == "__main__":
    sys.exit(main())
