"""Run every benchmark and write BENCHMARKS.md.

Each ``benchmarks/bench_*.py`` runs in its own process with ``--json FILE``
and reports rows ``{benchmark, metric, value, unit, goal, met}``; this script
collects them into one table per benchmark with the command that produced it.
Benchmarks measure medians of repeated runs, ratios side by side in one process.

    python benchmarks/run_all.py            # full
    python benchmarks/run_all.py --quick    # fewer repeats
    python benchmarks/run_all.py --only qat,import
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated names, e.g. qat,import")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    scripts = sorted(HERE.glob("bench_*.py"))
    if args.only:
        wanted = {f"bench_{n.strip()}.py" for n in args.only.split(",")}
        scripts = [s for s in scripts if s.name in wanted]
    import torch

    sections = []
    for script in scripts:
        cmd = [sys.executable, str(script.relative_to(ROOT))] + (["--quick"] if args.quick else [])
        with tempfile.TemporaryDirectory() as tmp:
            js = Path(tmp) / "out.json"
            t0 = time.perf_counter()
            p = subprocess.run([*cmd, "--json", str(js)], cwd=ROOT, capture_output=True,
                               text=True)  # fmt: skip
            secs = time.perf_counter() - t0
            shown = "python " + " ".join(cmd[1:])
            print(f"{shown}: exit {p.returncode} ({secs:.0f} s)", flush=True)
            if p.returncode != 0 or not js.exists():
                tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
                sections.append((shown, None, " / ".join(tail)))
                continue
            sections.append((shown, json.loads(js.read_text()), p.stdout.strip()))
    lines = [
        "# Benchmarks",
        "",
        f"Written by `python benchmarks/run_all.py{' --quick' if args.quick else ''}` on "
        f"{dt.date.today().isoformat()}: {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}. "
        "Medians of repeated runs; ratios are measured side by side in one process. This "
        "machine is shared, so absolute times move between runs; ratios are the numbers "
        "to read.",
        "",
    ]
    for cmd, data, text in sections:
        lines += [f"## `{cmd}`", ""]
        if data is None:
            lines += [f"Failed: {text}", ""]
            continue
        lines += ["| benchmark | metric | value | unit | goal | met |", "|---|---|---|---|---|---|"]
        for r in data["rows"]:
            met = {True: "yes", False: "**no**", None: ""}[r.get("met")]
            v = r["value"]
            val = f"{v:.3g}" if isinstance(v, float) else str(v)
            lines.append(f"| {r['benchmark']} | {r['metric']} | {val} | {r.get('unit', '')} | "
                         f"{r.get('goal') or ''} | {met} |")  # fmt: skip
        if data.get("notes"):
            lines += ["", data["notes"]]
        lines.append("")
    sys.path.insert(0, str(ROOT / "src"))
    from stelab.io import atomic_write_text

    atomic_write_text(args.out, "\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
