"""QAT training step vs the float step, side by side in one process (LeNet-5, ResNet-20).

Models follow [Y19] (BN without affine before each activation). The float model uses
ReLU; each quantized model replaces every ReLU by stelab's 2-bit σ_α with one
deterministic estimator. A step is forward + cross-entropy + backward + SGD.

Measurement: models are timed round-robin (one step of each per round), so drift of
the machine hits all alike; the judged number is the ratio of median process CPU
times (with one thread, ``--threads 1``, CPU time is the compute itself and ignores
time spent waiting for a core on a shared machine). The spread is the range of the
ratio over three consecutive blocks of rounds.

Sections (each a set of rows in the JSON):

* eager: every estimator at every (architecture, batch) in ``--grid``;
* compiled: ``torch.compile`` of the float and the quantized models, for the
  (architecture, batch) pairs in ``--compiled`` (compilation is not timed);
* scaling: the fitted exponent p of ratio ∝ batch^p (expected 0: the quantizer adds
  work proportional to the activations, as the float step's own elementwise work)
  and of the float step time ∝ batch^p (expected 1);
* peers (``--peers``, eager; ``--peers-compiled``, every model compiled; when
  installed): Brevitas ``QuantReLU(bit_width=2)`` (static
  scale: statistics collected for its first 300 training steps, then fixed, so it is
  timed in both phases) and torchao's ``IntxFakeQuantizer`` (unsigned 2-bit,
  asymmetric, *dynamic* per row of the last dimension: a min/max per row at every
  step) after each ReLU, against the same float model and stelab's clipped_relu.

    python benchmarks/bench_qat.py --threads 1            # full
    python benchmarks/bench_qat.py --threads 1 --quick    # fewer rounds
    python benchmarks/bench_qat.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from _scaling import block_medians, fit_exponent
from torch import nn

from stelab import models

GOAL = 1.05
ESTIMATORS = ["ste", "clipped", "relu", "clipped_relu", "dsq", "ewgs"]
SHAPES = {"lenet5": (1, 28, 28), "resnet20": (3, 32, 32)}
NAMES = {"lenet5": "LeNet-5", "resnet20": "ResNet-20"}
BREVITAS_COLLECT = 300  # QuantReLU's default collect_stats_steps


def build(arch: str, est: str | None) -> nn.Module:
    act = None if est is None else {"bits": 2, "estimator": est}
    return models.build(arch, in_shape=SHAPES[arch], act=act)


def _replace_relu(m: nn.Module, make: Callable[[], nn.Module]) -> nn.Module:
    for parent in list(m.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, name, make())
    return m


def peer_models(arch: str) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    try:
        from brevitas.nn import QuantReLU

        out["brevitas QuantReLU(bit_width=2)"] = _replace_relu(
            build(arch, None), lambda: QuantReLU(bit_width=2)
        )
    except ImportError:
        pass
    try:
        from torchao.quantization.qat import IntxFakeQuantizeConfig, IntxFakeQuantizer

        cfg = IntxFakeQuantizeConfig(torch.uint2, "per_token", is_symmetric=False)
        out["torchao ReLU + IntxFakeQuantizer(uint2, per_token, dynamic)"] = _replace_relu(
            build(arch, None), lambda: nn.Sequential(nn.ReLU(), IntxFakeQuantizer(cfg))
        )
    except ImportError:
        pass
    return out


class Runner:
    """One model with its optimizer and a fixed batch; ``step()`` returns CPU seconds."""

    def __init__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, compiled: bool):
        self.model = torch.compile(model) if compiled else model
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        self.x, self.y = x, y
        self.steps = 0

    def step(self) -> float:
        c = time.process_time()
        loss = nn.functional.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.steps += 1
        return time.process_time() - c


def interleaved(runners: dict[str, Runner], rounds: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        for k, r in runners.items():
            times[k].append(r.step())
    return times


def ratios(times: dict[str, list[float]], base: str = "float") -> dict[str, dict]:
    """Ratio of medians to ``base`` and its range over three blocks of rounds."""
    b = statistics.median(times[base])
    bb = block_medians(times[base])
    out = {}
    for k, ts in times.items():
        blocks = [m / mb for m, mb in zip(block_medians(ts), bb, strict=True)]
        out[k] = {"ratio": statistics.median(ts) / b, "lo": min(blocks), "hi": max(blocks),
                  "median_ms": 1e3 * statistics.median(ts)}  # fmt: skip
    return out


def batch_of(arch: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, *SHAPES[arch], generator=g), torch.randint(0, 10, (n,), generator=g)


def grid_section(arch: str, batch: int, rounds: int, compiled: bool) -> dict[str, dict]:
    x, y = batch_of(arch, batch)
    ests = ESTIMATORS if not compiled else ["ste", "clipped_relu", "dsq", "ewgs"]
    runners = {"float": Runner(build(arch, None), x, y, compiled)}
    for e in ests:
        runners[e] = Runner(build(arch, e), x, y, compiled)
    for r in runners.values():  # warm-up (and compilation)
        for _ in range(3):
            r.step()
    return ratios(interleaved(runners, rounds))


def peer_section(arch: str, batch: int, rounds: int, compiled: bool = False) -> dict[str, dict]:
    """Peers against float and stelab clipped_relu; Brevitas in both of its phases.

    ``compiled``: every model under torch.compile (float too); a model whose compilation
    or first steps fail is reported as such (key ``"<name>: failed"``) instead of timed.
    """
    x, y = batch_of(arch, batch)
    peers = peer_models(arch)
    runners = {
        "float": Runner(build(arch, None), x, y, compiled),
        "stelab clipped_relu": Runner(build(arch, "clipped_relu"), x, y, compiled),
    }
    runners.update({k: Runner(m, x, y, compiled) for k, m in peers.items()})
    failed: dict[str, dict] = {}
    for k, r in list(runners.items()):
        try:
            for _ in range(3):
                r.step()
        except Exception as err:  # a peer torch.compile cannot handle
            if k == "float":
                raise
            del runners[k]
            failed[f"{k}: failed"] = {"error": f"{type(err).__name__}: {str(err)[:120]}"}
            print(f"{k}: {failed[f'{k}: failed']['error']}", flush=True)
    first = interleaved(runners, rounds)  # Brevitas still collecting statistics
    bre = next((k for k in runners if k.startswith("brevitas")), None)
    out = {f"{k} (steps 4-{3 + rounds})" if k == bre else k: v
           for k, v in ratios(first).items()}  # fmt: skip
    if bre is not None:
        while runners[bre].steps < BREVITAS_COLLECT + 5:  # to its fixed-scale phase
            runners[bre].step()
        second = interleaved({"float": runners["float"], bre: runners[bre]}, rounds)
        after = ratios(second)[bre]
        out[f"{bre} (after step {BREVITAS_COLLECT}, fixed scale)"] = after
    return {**out, **failed}


def _pairs(text: str) -> list[tuple[str, int]]:
    out = []
    for item in filter(None, text.split(",")):
        arch, _, b = item.partition(":")
        out.append((arch, int(b)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=None, help="eager rounds (LeNet-5)")
    ap.add_argument("--grid", default="lenet5:32,lenet5:128,lenet5:512,resnet20:32,resnet20:128")
    ap.add_argument("--compiled", default="lenet5:32,resnet20:32",
                    help="arch:batch pairs to time under torch.compile ('' for none)")  # fmt: skip
    ap.add_argument("--peers", default="lenet5:128,resnet20:32", help="arch:batch ('' for none)")
    ap.add_argument("--peers-compiled", default="lenet5:128",
                    help="arch:batch for the peers under torch.compile ('' for none)")  # fmt: skip
    ap.add_argument("--json", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base_rounds = args.rounds or (30 if args.quick else 150)

    def rounds_for(arch: str, batch: int) -> int:
        scale = (batch / 32) * (16 if arch == "resnet20" else 1)  # keep each cell's time alike
        return max(6, int(base_rounds / max(1.0, scale**0.5)))

    rows: list[dict] = []

    def row(bench: str, metric: str, r: dict, goal: bool) -> None:
        met = r["ratio"] <= GOAL if goal else None
        rows.append({"benchmark": bench, "metric": metric, "value": r["ratio"],
                     "unit": f"x float (blocks {r['lo']:.3f}-{r['hi']:.3f}; "
                             f"{r['median_ms']:.1f} ms)",
                     "goal": f"<= {GOAL:.2f}x" if goal else None, "met": met})  # fmt: skip
        print(f"{bench} | {metric} | {r['ratio']:.3f} ({r['lo']:.3f}-{r['hi']:.3f})", flush=True)

    eager: dict[tuple[str, int], dict] = {}
    for arch, batch in _pairs(args.grid):
        res = grid_section(arch, batch, rounds_for(arch, batch), compiled=False)
        eager[(arch, batch)] = res
        for k, r in res.items():
            if k != "float":
                row(f"QAT step vs float, eager ({NAMES[arch]}, batch {batch})",
                    f"stelab 2-bit {k}, CPU time", r, goal=True)  # fmt: skip
    for arch, batch in _pairs(args.compiled):
        res = grid_section(arch, batch, rounds_for(arch, batch), compiled=True)
        for k, r in res.items():
            if k != "float":
                row(f"QAT step vs float, torch.compile ({NAMES[arch]}, batch {batch})",
                    f"stelab 2-bit {k}, CPU time, both compiled", r, goal=True)  # fmt: skip
    for arch in sorted({a for a, _ in eager}):
        bs = sorted(b for a, b in eager if a == arch)
        if len(bs) < 2:
            continue
        fl = [eager[(arch, b)]["float"]["median_ms"] for b in bs]
        p = fit_exponent(bs, fl)
        rows.append({"benchmark": f"QAT scaling with batch ({NAMES[arch]}, batch {bs[0]}-{bs[-1]})",
                     "metric": "float step time ∝ batch^p: p (expected 1)", "value": p,
                     "unit": "", "goal": None, "met": None})  # fmt: skip
        for e in ESTIMATORS:
            q = fit_exponent(bs, [eager[(arch, b)][e]["ratio"] for b in bs])
            rows.append({"benchmark": f"QAT scaling with batch ({NAMES[arch]}, batch "
                                      f"{bs[0]}-{bs[-1]})",
                         "metric": f"{e}: ratio ∝ batch^p: p (expected 0)", "value": q,
                         "unit": "", "goal": None, "met": None})  # fmt: skip
    peer_runs = [(p, False) for p in _pairs(args.peers)]
    peer_runs += [(p, True) for p in _pairs(args.peers_compiled)]
    for (arch, batch), comp in peer_runs:
        res = peer_section(arch, batch, rounds_for(arch, batch), compiled=comp)
        mode = "torch.compile, every model" if comp else "eager"
        bench = f"peers: QAT step vs float, {mode} ({NAMES[arch]}, batch {batch})"
        for k, r in res.items():
            if "error" in r:
                rows.append({"benchmark": bench, "metric": k, "value": "failed",
                             "unit": r["error"], "goal": None, "met": None})  # fmt: skip
            elif k != "float":
                row(bench, f"{k}, CPU time", r, goal=False)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rounds": base_rounds, "threads": torch.get_num_threads(), "rows": rows},
                      f, indent=2)  # fmt: skip


if __name__ == "__main__":
    main()
