"""`import stelab` (with its core: estimators, quantizers, nn) on top of `import torch`.

Each sample starts a new Python process that imports torch, then stelab, and
reports both durations measured inside the process (perf_counter), so process
start-up is excluded. Median over repeats; goal: stelab adds well under 1 s.

    python benchmarks/bench_import.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CODE = (
    "import time; t0 = time.perf_counter(); import torch; t1 = time.perf_counter(); "
    "import stelab; stelab.quantize; t2 = time.perf_counter(); print(t1 - t0, t2 - t1)"
)
GOAL_S = 1.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    n = 5 if args.quick else 15
    torch_s, stelab_s = [], []
    for _ in range(n):
        out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True,
                             check=True).stdout.split()  # fmt: skip
        torch_s.append(float(out[0]))
        stelab_s.append(float(out[1]))
    t, s = statistics.median(torch_s), statistics.median(stelab_s)
    verdict = "met" if s < GOAL_S else "NOT met"
    print(f"import torch: {t * 1e3:.0f} ms; import stelab on top: {s * 1e3:.1f} ms "
          f"(median of {n}; goal < {GOAL_S:.0f} s: {verdict})")  # fmt: skip
    if args.json:
        rows = [{"benchmark": "import", "metric": "import stelab on top of torch",
                 "value": s * 1e3, "unit": "ms", "goal": "< 1000 ms", "met": s < GOAL_S},
                {"benchmark": "import", "metric": "import torch (reference)",
                 "value": t * 1e3, "unit": "ms", "goal": None, "met": None}]  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
