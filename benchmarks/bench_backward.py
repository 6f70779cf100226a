"""One activation quantizer's forward + backward against ReLU's, and its ATen kernels.

The QAT step ratio (bench_qat.py) adds the quantizer's elementwise work to a whole
training step, so on a loaded machine its 5% goal drowns in noise. This isolates
that work: the 2-bit σ_α quantizer (``act``, α = 0.5) with each estimator, forward
and backward on one activation tensor (LeNet-5's first ReLU at batch 128:
128x6x28x28 float32), timed round-robin against ``nn.ReLU`` in one process (median
process CPU time, one thread; the spread is the ratio over three blocks of rounds).
The kernel count is the top-level ATen calls of one forward + backward
(torch.profiler), the structural number the step ratio follows: every extra pass
over the activations costs about what ReLU's own pass does.

    python benchmarks/bench_backward.py --threads 1 [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
from _scaling import block_medians, interleaved_medians
from torch import nn

from stelab.quantizers import Quantizer

ESTIMATORS = ["ste", "clipped_relu", "relu", "dsq", "ewgs"]
SHAPE = (128, 6, 28, 28)


def modules() -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {"float ReLU": nn.ReLU()}
    for e in ESTIMATORS:
        out[e] = Quantizer("act", e, bits=2, step=0.5)
    return out


def kernels(m: nn.Module, x0: torch.Tensor, g: torch.Tensor) -> list[str]:
    from torch.profiler import profile

    x = x0.clone().requires_grad_(True)
    with profile() as p:
        m(x).backward(g)
    return [e.name.removeprefix("aten::") for e in p.events()
            if e.name.startswith("aten::") and e.name not in ("aten::detach", "aten::clone")
            and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))]  # fmt: skip


def _dsq_fused(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """DSQ's backward for act, 2 bits, α = 0.5, k = 3 (jumps at 0, 0.5, 1; zero outside
    [-0.25, 1.25]) as one plain expression, for torch.compile to fuse into one loop."""
    k, step = 3.0, 0.5
    t = x / step
    r = t - torch.round(t)
    e = torch.sigmoid(-2 * k * r.abs())  # sech²(kr) = 4σ(1 - σ), as stelab's eager path
    d = (2 * k / math.tanh(k / 2)) * e * (1 - e)
    return torch.where((x >= -0.25) & (x <= 1.25), g * d, 0.0)


def _ewgs_fused(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return g + 0.2 * g.abs() * (x - y)


def fused_floor(x0: torch.Tensor, g: torch.Tensor, rounds: int) -> list[dict]:
    """The backward alone: stelab's eager DSQ and EWGS backward against the same formula
    compiled by torch.compile into one fused loop (the fastest the formula runs on this
    CPU; fixed shape, compilation not timed), and both against ReLU's backward
    (threshold_backward). Rows are skipped where torch.compile does not work."""
    q = {e: Quantizer("act", e, bits=2, step=0.5) for e in ("dsq", "ewgs")}
    ctx = q["dsq"].fwd.context(0.5)
    y = q["ewgs"](x0).detach()
    try:
        dsq_c = torch.compile(_dsq_fused, dynamic=False)
        ewgs_c = torch.compile(_ewgs_fused, dynamic=False)
        dsq_c(x0, g), ewgs_c(x0, y, g)
    except Exception as err:  # no C++ compiler, unsupported platform
        print(f"fused floor skipped: torch.compile failed ({type(err).__name__})")
        return []
    runners = {
        "ReLU backward": lambda: torch.ops.aten.threshold_backward(g, x0, 0.0),
        "dsq eager": lambda: q["dsq"].estimator.grad_input(x0, None, g, ctx),
        "dsq fused": lambda: dsq_c(x0, g),
        "ewgs eager": lambda: q["ewgs"].estimator.grad_input(x0, y, g, ctx),
        "ewgs fused": lambda: ewgs_c(x0, y, g),
    }
    with torch.no_grad():
        med = interleaved_medians(runners, rounds)
    bench = "estimator backward alone: eager vs one fused compiled loop (128x6x28x28 float32)"
    rows = []
    for e in ("dsq", "ewgs"):
        eager, fused = med[f"{e} eager"], med[f"{e} fused"]
        rows.append({"benchmark": bench, "metric": f"{e}: stelab eager / fused compiled",
                     "value": eager / fused,
                     "unit": f"x ({1e3 * eager:.2f} vs {1e3 * fused:.2f} ms)",
                     "goal": None, "met": None})  # fmt: skip
        rows.append({"benchmark": bench, "metric": f"{e}: fused compiled / ReLU backward",
                     "value": fused / med["ReLU backward"],
                     "unit": f"x ({1e3 * med['ReLU backward']:.2f} ms ReLU)",
                     "goal": None, "met": None})  # fmt: skip
        print(f"{e} backward: eager {1e3 * eager:.2f} ms, fused compiled {1e3 * fused:.2f} ms, "
              f"ReLU backward {1e3 * med['ReLU backward']:.2f} ms")  # fmt: skip
    return rows


def call_overhead(rounds: int) -> list[dict]:
    """Per-call cost on a small activation (32 x 64 float32, a fully connected layer's),
    forward + backward of the ``ste`` quantizer, where Python overhead dominates: the
    quantizer's own apply (straight to autograd's C++ apply) against torch's
    ``Function.apply`` (which binds the arguments with inspect.signature on every call),
    side by side, and both against ReLU's."""
    from stelab.quantizers.quantizer import _Quantize, quantize_tensor

    q = Quantizer("act", "ste", bits=2, step=0.5)
    x0, g = torch.randn(32, 64), torch.randn(32, 64)
    ctx = q.fwd.context(0.5)
    relu = nn.ReLU()

    def fast() -> None:
        x = x0.detach().requires_grad_(True)
        quantize_tensor(x, q.fwd, q.estimator, 0.5, context=ctx).backward(g)

    def torchs() -> None:
        x = x0.detach().requires_grad_(True)
        args = (x, 0.5, q.fwd, q.estimator, ctx, None, None)
        torch.autograd.Function.apply.__func__(_Quantize, *args).backward(g)

    def plain() -> None:
        x = x0.detach().requires_grad_(True)
        relu(x).backward(g)

    runners = {"stelab apply": fast, "torch's Function.apply": torchs, "ReLU": plain}
    med = interleaved_medians(runners, rounds * 20)
    bench = "quantizer per-call cost: forward + backward of a 32x64 activation (ste)"
    print(", ".join(f"{k} {1e6 * v:.1f} us" for k, v in med.items()))
    return [
        {
            "benchmark": bench,
            "metric": f"{k}, median CPU time per call",
            "value": 1e6 * v,
            "unit": "us",
            "goal": None,
            "met": None,
        }  # fmt: skip
        for k, v in med.items()
    ]


def _relu_and_mask(x: torch.Tensor, dtype: torch.dtype | None) -> tuple[torch.Tensor, ...]:
    m = x <= 0
    return torch.relu(x), (m if dtype is None else m.to(dtype))


def mask_store(x0: torch.Tensor, rounds: int) -> list[dict]:
    """What a compiled ReLU saves for its backward: relu(x) and the mask x <= 0, written
    by one torch.compile kernel as bool (what autograd saves), uint8 or float32, against
    eager. On this machine's torch build the bool store is the slow part of any
    compiled step that keeps a comparison mask (ReLU's, the clipped STEs')."""
    try:
        fns = {
            f"compiled, mask as {n}": torch.compile(
                lambda x, d=d: _relu_and_mask(x, d), dynamic=False
            )
            for n, d in (("bool", None), ("uint8", torch.uint8), ("float32", torch.float32))
        }
        for f in fns.values():
            f(x0)
    except Exception as err:
        print(f"mask store skipped: torch.compile failed ({type(err).__name__})")
        return []
    fns["eager, mask as bool"] = lambda x: _relu_and_mask(x, None)
    calls = {k: (lambda f=f: f(x0)) for k, f in fns.items()}
    bench = "relu(x) and the mask x <= 0 in one kernel (128x6x28x28 float32)"
    rows = []
    for k, t in interleaved_medians(calls, rounds).items():
        ms = 1e3 * t
        rows.append({"benchmark": bench, "metric": f"{k}, median CPU time", "value": ms,
                     "unit": "ms", "goal": None, "met": None})  # fmt: skip
        print(f"{k}: {ms:.2f} ms")
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (30 if args.quick else 120)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(SHAPE, generator=gen)
    g = torch.randn(SHAPE, generator=gen)
    mods = modules()

    def step(m: nn.Module) -> float:
        x = x0.detach().requires_grad_(True)
        c = time.process_time()
        m(x).backward(g)
        return time.process_time() - c

    for m in mods.values():
        step(m)
    times: dict[str, list[float]] = {k: [] for k in mods}
    for _ in range(rounds):
        for k, m in mods.items():
            times[k].append(step(m))
    base, bb = statistics.median(times["float ReLU"]), block_medians(times["float ReLU"])
    rows = []
    for k, ts in times.items():
        if k == "float ReLU":
            continue
        ks = kernels(mods[k], x0, g)
        blocks = [a / b for a, b in zip(block_medians(ts), bb, strict=True)]
        r = statistics.median(ts) / base
        rows.append({"benchmark": "activation quantizer forward + backward vs ReLU's "
                                  "(128x6x28x28 float32)",
                     "metric": f"stelab 2-bit {k}, CPU time", "value": r,
                     "unit": f"x ReLU (blocks {min(blocks):.2f}-{max(blocks):.2f}; "
                             f"{1e3 * statistics.median(ts):.2f} ms; {len(ks)} kernels: "
                             f"{', '.join(ks)})",
                     "goal": None, "met": None})  # fmt: skip
        print(
            f"{k:14s} {r:5.2f}x ReLU ({min(blocks):.2f}-{max(blocks):.2f}), "
            f"{1e3 * statistics.median(ts):.2f} ms, {len(ks)} kernels: {', '.join(ks)}"
        )
    relu_k = kernels(mods["float ReLU"], x0, g)
    print(f"float ReLU: {1e3 * base:.2f} ms, {len(relu_k)} kernels: {', '.join(relu_k)}")
    rows += fused_floor(x0, g, rounds)
    rows += call_overhead(rounds)
    with torch.no_grad():
        rows += mask_store(x0, rounds)
    out = {"rounds": rounds, "threads": torch.get_num_threads(), "rows": rows}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    main()
