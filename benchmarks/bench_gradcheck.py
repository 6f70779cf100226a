"""Speed of the descent test of stelab.analysis.deterministic (a script, not a test).

LeNet-5 ([Y19] form, 2-bit activations, 28x28 inputs, random data: only the cost
matters), batch 64: the descent test for 4 estimators (ste, relu, clipped_relu, ewgs)
x 10 step sizes x 20 batches, i.e. 80 coarse gradients and 1,600 loss evaluations
(training and held-out batch per step), on one CPU thread. Also the Monte-Carlo
reference of the bias check (``--reference-samples``, default 200 draws, eval mode so
the examples are independent) for the record.

Usage::

    python benchmarks/bench_gradcheck.py [--json PATH] [--threads 1] [--repeats 3]

Goal stated for stelab: the descent test above in under 60 s on one CPU core.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from stelab import models
from stelab.analysis.deterministic import DEFAULT_ETAS, cross_entropy, descent_test
from stelab.analysis.relax import relaxed_gradient

GOAL_SECONDS = 60.0
ESTIMATORS = "ste,relu,clipped_relu,ewgs"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None, help="write {'rows': [...]} here")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--reference-samples", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(2048, 1, 28, 28)
    y = torch.randint(0, 10, (2048,))
    net = models.build("lenet5", in_shape=(1, 28, 28), act={"bits": 2, "estimator": "ste"})
    walls, cpus = [], []
    for _ in range(args.repeats):
        w, c = time.perf_counter(), time.process_time()
        descent_test(net, x, y, ESTIMATORS, etas=DEFAULT_ETAS, batches=20, batch_size=64)
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    rows = [
        {
            "case": "descent test, LeNet-5 28x28, batch 64, 4 estimators x 10 eta x 20 batches",
            "wall_s": statistics.median(walls),
            "cpu_s": statistics.median(cpus),
            "goal_s": GOAL_SECONDS,
            "threads": args.threads,
        }
    ]
    net.eval()
    w, c = time.perf_counter(), time.process_time()
    relaxed_gradient(net, x[:64], y[:64], cross_entropy, "mc", samples=args.reference_samples)
    rows.append(
        {
            "case": f"relaxed MC reference, LeNet-5 eval mode, batch 64, "
            f"{args.reference_samples} draws",
            "wall_s": time.perf_counter() - w,
            "cpu_s": time.process_time() - c,
            "goal_s": None,
            "threads": args.threads,
        }
    )
    for r in rows:
        goal = "" if r["goal_s"] is None else f"  (goal < {r['goal_s']:.0f} s)"
        print(f"{r['case']}: {r['wall_s']:.1f} s wall, {r['cpu_s']:.1f} s CPU{goal}")
    if args.json:
        from stelab.io import write_json

        write_json(args.json, {"rows": rows, "torch": torch.__version__})


if __name__ == "__main__":
    main()
