"""Wall time per training step with 1 vs 2 torch threads: the data behind
``train.threads = "auto"``.

For each model (the work per step is MACs per sample x batch, the quantity
:func:`stelab.threads.auto_threads` compares with its threshold):

- **small**: LeNet-5 on 8x8 digits, batch 64 (``configs/lenet5-digits.toml``);
- **medium**: LeNet-5 on 28x28 inputs, batch 64;
- **large**: LeNet-5 on 28x28 inputs, batch 256, and ResNet-20 on 32x32, batch 128;

all with 2-bit σ_α activations and the clipped-ReLU STE, SGD with momentum, on
random inputs (the step time does not depend on the values). Each cell is the
median over ``--reps`` interleaved rounds (1 thread, 2 threads, 1, 2, ...) of the
mean time of ``--steps`` steps after warm-up.

"idle" is the machine as it is (the 1-minute load average is printed: on a shared
machine it is not idle); "busy" adds one controlled CPU hog, a Python busy loop
pinned to core 0 (``os.sched_setaffinity``), running for the whole column.

    python benchmarks/bench_threads.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from stelab import models
from stelab.threads import AUTO_THRESHOLD, step_macs

CASES = {
    "small": ("lenet5", (1, 8, 8), 64),
    "medium": ("lenet5", (1, 28, 28), 64),
    "large": ("lenet5", (1, 28, 28), 256),
    "resnet20": ("resnet20", (3, 32, 32), 128),
}

HOG = "import os\nos.sched_setaffinity(0, {0})\nwhile True:\n    pass\n"


def _step_time(name: str, shape: tuple[int, ...], batch: int, threads: int, steps: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = models.build(
        name, num_classes=10, in_shape=shape, act={"bits": 2, "estimator": "clipped_relu"}
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(batch, *shape)
    y = torch.randint(0, 10, (batch,))

    def step() -> None:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - t0) / steps


def _column(cases: list[str], reps: int, steps: dict[str, int]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for c in cases:
        name, shape, batch = CASES[c]
        times: dict[int, list[float]] = {1: [], 2: []}
        for _ in range(reps):
            for t in (1, 2):
                times[t].append(_step_time(name, shape, batch, t, steps[c]))
        out[c] = {f"t{t}_ms": 1e3 * statistics.median(v) for t, v in times.items()}
        print(f"  {c}: {out[c]}", file=sys.stderr, flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds and steps")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    reps = args.reps or (3 if args.quick else 7)
    steps = {"small": 30, "medium": 20, "large": 8, "resnet20": 3}
    if args.quick:
        steps = {k: max(2, v // 3) for k, v in steps.items()}
    cases = list(CASES)
    macs = {}
    for c in cases:
        name, shape, batch = CASES[c]
        m = models.build(name, num_classes=10, in_shape=shape, act={"bits": 2})
        macs[c] = step_macs(m, shape) * batch
    prev = torch.get_num_threads()
    load = {"idle": os.getloadavg()[0]}
    res = {"idle": _column(cases, reps, steps)}
    hog = subprocess.Popen([sys.executable, "-c", HOG])
    try:
        time.sleep(1.0)
        load["busy"] = os.getloadavg()[0]
        res["busy"] = _column(cases, reps, steps)
    finally:
        hog.kill()
        hog.wait()
        torch.set_num_threads(prev)
    print(f"cpu cores: {os.cpu_count()}, torch {torch.__version__}, threshold {AUTO_THRESHOLD:.2g}")
    print(f"load average (1 min) at start: idle {load['idle']:.2f}, busy {load['busy']:.2f}")
    print(
        "| model | MACs x batch per step | machine | 1 thread (ms) | 2 threads (ms) | 2 / 1 "
        "| `auto` picks |"
    )
    print("|---|---:|---|---:|---:|---:|---|")
    for c in cases:
        for col in ("idle", "busy"):
            r = res[col][c]
            name, shape, batch = CASES[c]
            label = f"{c}: {name} {'x'.join(map(str, shape[1:]))}, batch {batch}"
            print(
                f"| {label} | {macs[c]:.3g} | {col} (load {load[col]:.1f}) | {r['t1_ms']:.2f} | "
                f"{r['t2_ms']:.2f} | {r['t2_ms'] / r['t1_ms']:.2f} | "
                f"{'1' if macs[c] < AUTO_THRESHOLD else 'the free cores'} |"
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"macs": macs, "load": load, "results": res}, f, indent=2)


if __name__ == "__main__":
    main()
