"""Speed of the per-draw gradient engine of stelab.analysis (a script, not a test).

For the toy SBN of [S20] (2-5-5-5-1, 200 points, float64) and every estimator of the
gradient-accuracy figure, measures the time per one-draw gradient estimate

* vectorised: :class:`stelab.analysis.DrawEngine` (thousands of draws per call,
  decomposed into per-draw gradients by hooks / a batched double backward);
* loop: one ``surrogate_loss`` call + ``autograd.grad`` per draw (the fallback);

and reports the speed-up and the projected time of the protocol's 20,000 draws.
Wall-clock and process CPU time are both recorded (CPU time is steadier on a shared
machine); the medians of ``--repeats`` runs.

Usage::

    python benchmarks/bench_analysis.py [--quick] [--json PATH] [--threads 1]

Goal stated for stelab: 20,000 draws of every paper estimator in under 5 minutes on
one CPU core (vectorised), i.e. the toy protocol is not limited by the estimator draws.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from stelab import data, sbn
from stelab.analysis import PAPER_ESTIMATORS, DrawEngine, is_deterministic, parse_estimator

GOAL_SECONDS = 300.0


def _time(fn, repeats: int) -> tuple[float, float]:
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer draws and repeats")
    ap.add_argument("--json", default=None, help="write {'rows': [...]} here")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    draws = 500 if args.quick else 2000
    loop_draws = 20 if args.quick else 100
    repeats = args.repeats or (1 if args.quick else 3)
    x, y = data.load("psa-toy", dtype=torch.float64).train
    torch.manual_seed(0)
    model = sbn.sbn_mlp(dtype=torch.float64)
    rows, total = [], 0.0
    for spec in PAPER_ESTIMATORS:
        est = parse_estimator(spec)
        if is_deterministic(est.estimator):
            continue
        m = est.estimator.min_samples

        def vec(est=est, m=m) -> None:
            eng = DrawEngine(
                model, x, y, sbn.logistic_loss, est.estimator, torch.Generator().manual_seed(0)
            )
            for _ in eng.groups(m, draws // m):
                pass

        def loop(est=est, m=m) -> None:
            eng = DrawEngine(
                model,
                x,
                y,
                sbn.logistic_loss,
                est.estimator,
                torch.Generator().manual_seed(0),
                vectorise=False,
            )
            for _ in eng.groups(m, loop_draws // m):
                pass

        vec()  # warm-up (and the one-time switch of PSA's output layer to the Jacobian mode)
        wv, cv = _time(vec, repeats)
        wl, cl = _time(loop, repeats)
        per_v, per_l = cv / draws, cl / loop_draws
        total += per_v * 20_000
        bench = f"per-draw gradients, toy SBN 2-5-5-5-1 (200 points, {args.threads} thread)"
        rows += [
            {
                "benchmark": bench,
                "metric": f"{est.label}: vectorised CPU time per draw",
                "value": per_v * 1e6,
                "unit": "us",
                "goal": None,
                "met": None,
            },
            {
                "benchmark": bench,
                "metric": f"{est.label}: speed-up over one call per draw",
                "value": per_l / per_v,
                "unit": "x",
                "goal": None,
                "met": None,
            },
        ]
        print(
            f"{est.label:>18}: vectorised {per_v * 1e6:7.0f} us/draw (wall {wv / draws * 1e6:.0f}),"
            f" loop {per_l * 1e6:7.0f} us/draw, speed-up {per_l / per_v:5.1f}x"
        )
    rows.append(
        {
            "benchmark": rows[0]["benchmark"],
            "metric": "20,000 draws of every stochastic paper estimator (projected CPU time)",
            "value": total,
            "unit": "s",
            "goal": f"<= {GOAL_SECONDS:.0f} s",
            "met": total <= GOAL_SECONDS,
        }
    )
    print(f"projected 20,000 draws x {len(rows) // 2} estimators: {total:.0f} s CPU")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
