"""`import stelab` (with its core: estimators, quantizers, nn) on top of `import torch`,
and the whole of `stelab --help`.

Each import sample starts a new Python process that imports torch, then stelab, and
reports both durations measured inside the process (perf_counter), so process
start-up is excluded. `stelab --help` is timed from outside as the wall time of the
whole process (interpreter start, torch, the CLI, typer), beside a bare
`python -c pass` and `python -c "import torch"` for reference, interleaved. Medians
over repeats; goals: stelab adds well under 1 s to torch's import, and `--help`
costs under 1 s more than a bare interpreter (it never imports torch).

    python benchmarks/bench_import.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

CODE = (
    "import time; t0 = time.perf_counter(); import torch; t1 = time.perf_counter(); "
    "import stelab; stelab.quantize; t2 = time.perf_counter(); print(t1 - t0, t2 - t1)"
)
GOAL_S = 1.0
HELP_GOAL_S = 1.0  # `stelab --help` minus a bare `python -c pass` (it does not import torch)


def _wall(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, capture_output=True, check=True)
    return time.perf_counter() - t0


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
    walls: dict[str, list[float]] = {"pass": [], "torch": [], "help": []}
    for _ in range(n):  # interleaved, so a change in machine load hits all three alike
        walls["pass"].append(_wall([sys.executable, "-c", "pass"]))
        walls["torch"].append(_wall([sys.executable, "-c", "import torch"]))
        walls["help"].append(_wall([sys.executable, "-m", "stelab.cli", "--help"]))
    w = {k: statistics.median(v) for k, v in walls.items()}
    extra = w["help"] - w["pass"]
    print(f"stelab --help: {w['help'] * 1e3:.0f} ms whole process, {extra * 1e3:.0f} ms over a "
          f"bare python (goal < {HELP_GOAL_S * 1e3:.0f} ms); python -c 'import torch': "
          f"{w['torch'] * 1e3:.0f} ms")  # fmt: skip
    verdict = "met" if s < GOAL_S else "NOT met"
    print(f"import torch: {t * 1e3:.0f} ms; import stelab on top: {s * 1e3:.1f} ms "
          f"(median of {n}; goal < {GOAL_S:.0f} s: {verdict})")  # fmt: skip
    if args.json:
        rows = [{"benchmark": "import", "metric": "import stelab on top of torch",
                 "value": s * 1e3, "unit": "ms", "goal": "< 1000 ms", "met": s < GOAL_S},
                {"benchmark": "import", "metric": "import torch (reference)",
                 "value": t * 1e3, "unit": "ms", "goal": None, "met": None},
                {"benchmark": "import", "metric": "stelab --help, whole process",
                 "value": w["help"] * 1e3, "unit": "ms", "goal": None, "met": None},
                {"benchmark": "import", "metric": "stelab --help minus a bare python -c pass",
                 "value": extra * 1e3, "unit": "ms",
                 "goal": f"< {HELP_GOAL_S * 1e3:.0f} ms", "met": extra < HELP_GOAL_S},
                {"benchmark": "import", "metric": "python -c 'import torch', whole process",
                 "value": w["torch"] * 1e3, "unit": "ms", "goal": None, "met": None}]  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
