"""Speed and memory of the SBN estimators (a script, not a test).

Measures, on this machine's CPU (or CUDA with --device cuda):

1. one training step (``surrogate_loss`` + ``backward`` + gradient clamp + SGD step) of
   the 8-conv SBN of [S20] §5 (3x32x32 input, batch 64, one sample per example) for
   ``psa`` and ``dst``, timed side by side in one process (steps interleaved
   psa, dst, psa, dst, ...; median over repeats). Both wall-clock time and the process's
   CPU time are recorded: on a shared machine the CPU time is the steadier of the two.
   The first PSA step (warm-up, not timed) may compile the fused flip kernel;
2. peak memory of one step: the peak, over the step, of the bytes of live tensors
   allocated by torch since the step began (``torch.profiler`` with
   ``profile_memory=True``: the running sum of every op's allocations minus frees, in
   time order). It counts autograd-saved activations, temporaries (PSA's flip-kernel
   blocks) and the new gradients, not the model, optimizer state or batch that exist
   before the step, nor memory outside torch's allocator. With --device cuda it is
   ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the step;
3. exact enumeration (value + gradient) of the toy 2-5-5-5-1 SBN on 200 points, float64;
4. per-call overhead of naming the estimator: one-sample ``dst`` draw (``surrogate_loss``
   + ``backward``) on the toy 2-5-5-5-1 SBN, 200 points, float64, with the estimator
   passed as a name (``"dst"``) and as a prebuilt object (``get_estimator("dst")``):
   calls interleaved name, object, name, ... in blocks of ``OVERHEAD_INNER`` calls, median
   over blocks of the seconds per call. Run it alone with ``--overhead-only``.

Usage::

    python benchmarks/bench_sbn.py [--quick] [--json PATH] [--repeats N] [--batch 64]
                                   [--threads N] [--kernel auto|eager|compiled]
                                   [--overhead-only]

Goals stated for stelab: psa/dst time <= 4x, psa/dst memory <= 2x, exact <= 1 s.

On a CPU shared with other busy processes, OpenMP threads that spin while waiting
at barriers make multi-threaded runs erratic (PSA's fused kernel suffers most): use
``--threads 1`` or ``OMP_WAIT_POLICY=PASSIVE`` there. Both are recorded in the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Any

import torch
import torch.nn.functional as F
from _scaling import fit_exponent  # noqa: E402  (benchmarks/ is on sys.path)

from stelab.sbn import exact_gradient, get_estimator, logistic_loss, sbn_conv8, sbn_mlp

ESTIMATORS = ("psa", "dst")
#: calls per timed block of the name-vs-object overhead row
OVERHEAD_INNER = 50


def _ce(eta: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(eta, y, reduction="none")


class Case:
    """Model, batch, optimizer and generator for one estimator's training steps."""

    def __init__(self, estimator: str, batch: int, device: str, options: dict[str, Any]):
        torch.manual_seed(0)
        self.estimator, self.device, self.options = estimator, device, options
        self.model = sbn_conv8().to(device)
        self.x = torch.randn(batch, 3, 32, 32, device=device)
        self.y = torch.randint(0, 10, (batch,), device=device)
        self.model.data_init(self.x, generator=torch.Generator(device=device).manual_seed(0))
        params = self.model.parameters()
        self.opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9, nesterov=True)
        self.gen = torch.Generator(device=device).manual_seed(1)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        loss = self.model.surrogate_loss(
            self.x, self.y, _ce, self.estimator, samples=1, generator=self.gen, **self.options
        )
        loss.backward()
        for p in self.model.parameters():
            p.grad.clamp_(-1e3, 1e3)  # [S20] §5: gradient clamp +-1e3
        self.opt.step()

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def timed_step(self) -> tuple[float, float]:
        """(wall seconds, process CPU seconds) of one step."""
        self.sync()
        w0, c0 = time.perf_counter(), time.process_time()
        self.step()
        self.sync()
        return time.perf_counter() - w0, time.process_time() - c0

    def peak_step_bytes(self) -> int:
        """Peak live tensor bytes allocated during one step (see the module docstring)."""
        if self.device == "cuda":
            self.opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            self.step()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        from torch.profiler import ProfilerActivity, profile

        self.opt.zero_grad(set_to_none=True)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            self.step()
        running = peak = 0
        for ev in sorted(prof.events(), key=lambda e: e.time_range.start):
            running += ev.self_cpu_memory_usage
            peak = max(peak, running)
        return peak


def time_steps(cases: dict[str, Case], repeats: int) -> dict[str, dict[str, list[float]]]:
    """Wall and CPU seconds per step for each estimator, steps interleaved."""
    for c in cases.values():  # warm-up (and the PSA kernel's compile, if any)
        c.step()
    out: dict[str, dict[str, list[float]]] = {e: {"wall": [], "cpu": []} for e in cases}
    for _ in range(repeats):
        for e, c in cases.items():
            wall, cpu = c.timed_step()
            out[e]["wall"].append(wall)
            out[e]["cpu"].append(cpu)
    return out


def time_exact(repeats: int) -> list[float]:
    """Seconds for exact value + gradient of 2-5-5-5-1 on 200 points (float64)."""
    torch.manual_seed(1)
    model = sbn_mlp(dtype=torch.float64)
    x = torch.rand(200, 2, dtype=torch.float64) * 2 - 1
    t = torch.where(torch.arange(200) < 100, 1.0, -1.0).to(torch.float64)
    exact_gradient(model, x, t, logistic_loss)  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        exact_gradient(model, x, t, logistic_loss)
        out.append(time.perf_counter() - t0)
    return out


#: hidden widths (w, w, w) of the scaling rows: 2^(3w) joint hidden states
SCALING_WIDTHS = (3, 4, 5, 6, 7, 8, 9, 10)


def time_exact_scaling(repeats: int) -> list[dict]:
    """Exact value + gradient of a 2-w-w-w-1 SBN on 200 points vs its 2^(3w) states.

    The recursion costs N·2^w + 2·2^(2w) + N·2^w terms, so once the 2^w x 2^w
    transition tables dominate the time grows as states^(2/3).
    """
    out = []
    for w in SCALING_WIDTHS:
        torch.manual_seed(1)
        model = sbn_mlp(hidden=(w, w, w), dtype=torch.float64)
        x = torch.rand(200, 2, dtype=torch.float64) * 2 - 1
        t = torch.where(torch.arange(200) < 100, 1.0, -1.0).to(torch.float64)
        exact_gradient(model, x, t, logistic_loss)  # warm-up
        ts = []
        for _ in range(repeats):
            c = time.process_time()
            exact_gradient(model, x, t, logistic_loss)
            ts.append(time.process_time() - c)
        out.append({"states_log2": 3 * w, "seconds": ts, "median": statistics.median(ts)})
    return out


def time_name_vs_object(repeats: int) -> dict[str, list[float]]:
    """Seconds per one-sample ``dst`` call on the toy SBN, estimator by name vs by object."""
    torch.manual_seed(1)
    model = sbn_mlp(dtype=torch.float64)
    x = torch.rand(200, 2, dtype=torch.float64) * 2 - 1
    t = torch.where(torch.arange(200) < 100, 1.0, -1.0).to(torch.float64)
    gen = torch.Generator().manual_seed(0)
    how = {"name": "dst", "object": get_estimator("dst")}

    def block(est: Any) -> float:
        t0 = time.perf_counter()
        for _ in range(OVERHEAD_INNER):
            model.surrogate_loss(x, t, logistic_loss, est, samples=1, generator=gen).backward()
        return (time.perf_counter() - t0) / OVERHEAD_INNER

    for est in how.values():  # warm-up
        block(est)
    out: dict[str, list[float]] = {k: [] for k in how}
    for _ in range(repeats):
        for k, est in how.items():
            out[k].append(block(est))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats (3 steps, 3 exact)")
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per estimator")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--kernel", default="auto", help="PSA flip kernel: auto, eager, compiled")
    ap.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    ap.add_argument(
        "--overhead-only", action="store_true", help="only the name-vs-object overhead row"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 10)
    over = time_name_vs_object(max(repeats, 5) * 4)
    over_med = {k: statistics.median(v) for k, v in over.items()}
    over_row = (
        f"| toy 2-5-5-5-1 one-sample dst call, estimator by name / by object (us) | "
        f"{over_med['name'] * 1e6:.0f} | {over_med['object'] * 1e6:.0f} | "
        f"{over_med['name'] / over_med['object']:.3f} | = 1 |"
    )
    if args.overhead_only:
        print(f"SBN name-vs-object overhead ({torch.get_num_threads()} threads)\n")
        print("| quantity | name | object | name/object | goal |\n|---|---|---|---|---|")
        print(over_row)
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as fh:
                json.dump({"name_vs_object_seconds": over, "median": over_med}, fh, indent=2)
            os.replace(tmp, args.json)
        return 0
    options = {"psa": {"kernel": args.kernel}, "dst": {}}
    cases = {e: Case(e, args.batch, args.device, options[e]) for e in ESTIMATORS}

    t_compile = time.perf_counter()
    times = time_steps(cases, repeats)
    t_total = time.perf_counter() - t_compile
    med = {e: {k: statistics.median(v) for k, v in d.items()} for e, d in times.items()}
    mem = {e: c.peak_step_bytes() for e, c in cases.items()}
    ex = time_exact(3 if args.quick else 10)
    scaling = time_exact_scaling(3 if args.quick else 7)
    big = [r for r in scaling if r["states_log2"] >= 15]
    result = {
        "exact_scaling": scaling,
        "exact_scaling_exponent": fit_exponent(
            [2.0 ** r["states_log2"] for r in big], [r["median"] for r in big]
        ),
        "device": args.device,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "batch": args.batch,
        "repeats": repeats,
        "psa_kernel": args.kernel,
        "step_seconds": times,
        "step_median_seconds": med,
        "time_ratio_psa_over_dst": {k: med["psa"][k] / med["dst"][k] for k in ("wall", "cpu")},
        "peak_step_memory_bytes": mem,
        "memory_ratio_psa_over_dst": mem["psa"] / mem["dst"],
        "memory_measure": (
            "peak live torch-allocated tensor bytes during one step (torch.profiler)"
            if args.device == "cpu"
            else "torch.cuda.max_memory_allocated - memory_allocated before the step"
        ),
        "exact_toy_seconds": ex,
        "exact_toy_median_seconds": statistics.median(ex),
        "name_vs_object_seconds_per_call": over,
        "name_vs_object_median_seconds": over_med,
        "wall_seconds_including_warmup": t_total,
    }
    mib = 2.0**20
    rt, rm = result["time_ratio_psa_over_dst"], result["memory_ratio_psa_over_dst"]
    print(
        f"SBN benchmark ({args.device}, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, batch {args.batch}, {repeats} repeats, psa kernel {args.kernel}, "
        f"load avg {result['load_average_1min']})\n"
    )
    print("| quantity | psa | dst | psa/dst | goal |")
    print("|---|---|---|---|---|")
    for k, label in (("wall", "wall-clock"), ("cpu", "CPU time")):
        print(
            f"| conv8 train step, median {label} (s) | {med['psa'][k]:.3f} | "
            f"{med['dst'][k]:.3f} | {rt[k]:.2f} | <= 4 |"
        )
    print(
        f"| conv8 step peak tensor memory (MiB) | {mem['psa'] / mib:.1f} | "
        f"{mem['dst'] / mib:.1f} | {rm:.2f} | <= 2 |"
    )
    print(
        f"| exact 2-5-5-5-1, 200 points, value+grad (s) | "
        f"{result['exact_toy_median_seconds']:.4f} | | | <= 1 |"
    )
    for r in scaling:
        print(f"| exact 2-w-w-w-1, 2^{r['states_log2']} states, CPU time (s) | "
              f"{r['median']:.4g} | | | |")  # fmt: skip
    print(f"| exact: fitted exponent of time vs states (2^15..2^30; expected 2/3) | "
          f"{result['exact_scaling_exponent']:.3f} | | | |")  # fmt: skip
    print("| (name / object columns:) | name | object | name/object | |")
    print(over_row)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(result, fh, indent=2)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
