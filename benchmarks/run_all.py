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


def _row(bench: str, metric: str, value: float, unit: str, goal: str | None = None,
         met: bool | None = None) -> dict:  # fmt: skip
    return {"benchmark": bench, "metric": metric, "value": value, "unit": unit, "goal": goal,
            "met": met}  # fmt: skip


def _sbn(d: dict) -> list[dict]:
    b = f"PSA vs DST training step (8-conv SBN, batch {d['batch']}, 32x32, {d['threads']} thr)"
    med, r = d["step_median_seconds"], d["time_ratio_psa_over_dst"]
    m = d["memory_ratio_psa_over_dst"]
    return [
        _row(b, "PSA step / DST step, CPU time", r["cpu"], "x", "<= 4x", r["cpu"] <= 4),
        _row(b, "PSA step / DST step, wall", r["wall"], "x", "<= 4x", r["wall"] <= 4),
        _row(b, "PSA step, wall", med["psa"]["wall"], "s"),
        _row(b, "DST step, wall", med["dst"]["wall"], "s"),
        _row(b, "PSA peak step memory / DST's", m, "x", "<= 2x", m <= 2),
        _row("exact enumeration, 2-5-5-5-1 net, 200 points (value + gradient)", "median time",
             d["exact_toy_median_seconds"], "s", "<= 1 s", d["exact_toy_median_seconds"] <= 1),
    ] + [
        _row("exact enumeration vs states: 2-w-w-w-1 net, 200 points, value + gradient",
             f"2^{r['states_log2']} states, CPU time", r["median"],
             f"s (spread {min(r['seconds']):.3g}-{max(r['seconds']):.3g})")
        for r in d.get("exact_scaling", [])
    ] + ([
        _row("exact enumeration vs states: 2-w-w-w-1 net, 200 points, value + gradient",
             "time ∝ states^p, 2^15-2^30: p (expected 2/3, the 2^w x 2^w tables)",
             d["exact_scaling_exponent"], "")
    ] if "exact_scaling_exponent" in d else []) + ([
        _row("SBN estimator named vs prebuilt: one-sample dst on the 2-5-5-5-1 toy, 1 thread",
             "by name / by object, median per call",
             d["name_vs_object_median_seconds"]["name"]
             / d["name_vs_object_median_seconds"]["object"], "x", "~1 (<= 1.05x)",
             d["name_vs_object_median_seconds"]["name"]
             / d["name_vs_object_median_seconds"]["object"] <= 1.05)
    ] if "name_vs_object_median_seconds" in d else [])  # fmt: skip


def _gradcheck(d: dict) -> list[dict]:
    return [
        _row(r["case"], f"CPU time, {r['threads']} thread", r["cpu_s"],
             f"s (wall {r['wall_s']:.0f} s)",
             None if r["goal_s"] is None else f"< {r['goal_s']:.0f} s",
             None if r["goal_s"] is None else r["cpu_s"] < r["goal_s"])
        for r in d["rows"]
    ]  # fmt: skip


def _threads(d: dict) -> list[dict]:
    rows = []
    for col, cases in d["results"].items():
        for case, r in cases.items():
            b = f"training step, {case} model ({d['macs'][case]:.3g} MACs x batch)"
            rows.append(
                _row(
                    b,
                    f"{col} machine (load {d['load'][col]:.1f}): 2 threads / 1",
                    r["t2_ms"] / r["t1_ms"],
                    f"x (1 thread: {r['t1_ms']:.1f} ms)",
                )
            )
    return rows  # fmt: skip


def _train(d: dict) -> list[dict]:
    s = d["single"]
    b = "data pipeline: LeNet-5 epoch through the trainer vs pure compute steps (batch 128)"
    rows = [
        _row(b, "trainer / pure compute, CPU time", s["overhead_ratio_cpu"], "x", "<= 1.10x",
             s["overhead_ratio_cpu"] <= 1.10),
        _row(b, "trainer / pure compute, wall", s["overhead_ratio_wall"], "x"),
        _row(b, "trainer epoch", s["trainer_epoch_s"], "s"),
        _row(b, "trainer throughput", s["trainer_images_per_s"], "images/s"),
        _row(b, "peak RSS", s["peak_rss_mib"], "MiB"),
    ]  # fmt: skip
    ddp = d.get("ddp", {})
    if "throughput_vs_1_process" in ddp:
        rows.append(_row("DDP on CPU, --devices 2 (gloo)", "throughput vs 1 process",
                         ddp["throughput_vs_1_process"], "x", None, None))  # fmt: skip
    return rows


def _disguise(d: dict) -> list[dict]:
    b = "[S24] M applied to all weights of ResNet-20 (0.27 M weights)"
    return [
        _row(b, "M(w), wall", d["m_ms"], "ms", "<= 10 ms", d["m_ms"] <= 10),
        _row(b, "M(w), process CPU time", d["m_cpu_ms"], "ms"),
        _row(
            b,
            "M(w), spread of per-round medians",
            f"{min(d['m_round_medians_ms']):.1f}-{max(d['m_round_medians_ms']):.1f}",
            "ms",
        ),
        _row(b, "M(w) called once per tensor, wall", d["m_per_tensor_ms"], "ms"),
        _row(b, "M^-1(w), wall", d["m_inv_ms"], "ms"),
        _row(b, "to_ste(model, SGD), wall", d["to_ste_ms"], "ms"),
    ] + _m_scaling(d)


def _m_scaling(d: dict) -> list[dict]:
    rows = []
    for r in d.get("scaling", []):
        b = f"[S24] M vs a fake-quant pass over the same tensor ({r['dtype']})"
        big = r["n"] >= 10**6
        a = r["ratio_aten_fq"]
        aten = "" if a is None else f"; {a:.2f}x aten fake_quantize"
        lo, hi = min(r["ratio_fq_blocks"]), max(r["ratio_fq_blocks"])
        unit = f"x (blocks {lo:.2f}-{hi:.2f}; {r['m_ns_per_weight']:.2f} ns/weight{aten})"
        rows.append(_row(b, f"{r['n']:.0e} weights: M / Forward('uniform', 4), CPU time",
                         r["ratio_fq"], unit, "<= 5x" if big else None,
                         (r["ratio_fq"] <= 5) if big else None))  # fmt: skip
    for kind in ("float32", "float64"):
        if f"scaling_exponent_{kind}" in d:
            rows.append(_row(f"[S24] M vs a fake-quant pass over the same tensor ({kind})",
                             "M time ∝ weights^p, 1e4-1e7: p (expected 1)",
                             d[f"scaling_exponent_{kind}"], ""))  # fmt: skip
    return rows


def _native(d: dict) -> list[dict]:
    return d["rows"]


# script -> (extra arguments, adapter from its JSON to rows); bench_data.py is a
# stand-alone micro-benchmark of batching and is not part of the table
SCRIPTS = {
    "bench_qat.py": (["--threads", "1"], _native),
    "bench_backward.py": (["--threads", "1"], _native),
    "bench_import.py": ([], _native),
    "bench_sbn.py": (["--threads", "1"], _sbn),
    "bench_train.py": (["--threads", "1"], _train),
    "bench_disguise.py": ([], _disguise),
    "bench_analysis.py": (["--threads", "1"], _native),
    "bench_gradcheck.py": (["--threads", "1"], _gradcheck),
    "bench_threads.py": ([], _threads),
}


#: scripts without a --quick mode (already short)
NO_QUICK = ("bench_disguise.py", "bench_gradcheck.py")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated names, e.g. qat,import")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args()
    scripts = [HERE / name for name in SCRIPTS]
    if args.only:
        wanted = {f"bench_{n.strip()}.py" for n in args.only.split(",")}
        scripts = [s for s in scripts if s.name in wanted]
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from stelab.io import atomic_write_text, write_json

    # each script's rows are kept in benchmarks/results/, so --only refreshes some
    # sections and BENCHMARKS.md is always assembled from every saved result
    results = HERE / "results"
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
               f"Python {platform.python_version()}, torch {torch.__version__}")  # fmt: skip
    for script in scripts:
        extra, adapt = SCRIPTS[script.name]
        quick = ["--quick"] if args.quick and script.name not in NO_QUICK else []
        cmd = [sys.executable, str(script.relative_to(ROOT)), *quick, *extra]
        shown = "python " + " ".join(cmd[1:])
        with tempfile.TemporaryDirectory() as tmp:
            js = Path(tmp) / "out.json"
            t0 = time.perf_counter()
            p = subprocess.run([*cmd, "--json", str(js)], cwd=ROOT, capture_output=True,
                               text=True)  # fmt: skip
            print(f"{shown}: exit {p.returncode} ({time.perf_counter() - t0:.0f} s)", flush=True)
            entry = {"command": shown, "date": dt.date.today().isoformat(), "machine": machine}
            if p.returncode != 0 or not js.exists():
                entry["failed"] = " / ".join((p.stderr or p.stdout).strip().splitlines()[-3:])
            else:
                entry["rows"] = adapt(json.loads(js.read_text()))
        write_json(results / f"{script.stem}.json", entry)

    lines = [
        "# Benchmarks",
        "",
        "Written by `python benchmarks/run_all.py` (`--quick` for fewer repeats, `--only qat,sbn` "
        "to refresh some sections). Medians of repeated runs; ratios are measured side by side "
        "in one process, with one torch thread, so other jobs on this shared 2-core machine "
        "disturb them least; absolute times move between runs, ratios are the numbers to read.",
        "",
    ]
    for name in SCRIPTS:
        f = results / f"{Path(name).stem}.json"
        if not f.exists():
            continue
        e = json.loads(f.read_text())
        lines += [f"## `{e['command']}`", "", f"{e['date']}, {e['machine']}.", ""]
        if "failed" in e:
            lines += [f"Failed: {e['failed']}", ""]
            continue
        lines += ["| benchmark | metric | value | unit | goal | met |", "|---|---|---|---|---|---|"]
        for r in e["rows"]:
            met = {True: "yes", False: "**no**", None: ""}[r.get("met")]
            v = r["value"]
            val = f"{v:.3g}" if isinstance(v, float) else str(v)
            lines.append(f"| {r['benchmark']} | {r['metric']} | {val} | {r.get('unit', '')} | "
                         f"{r.get('goal') or ''} | {met} |")  # fmt: skip
        lines.append("")
    notes = HERE / "NOTES.md"
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    atomic_write_text(args.out, "\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
