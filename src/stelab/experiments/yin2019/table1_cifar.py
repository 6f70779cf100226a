"""[Y19] Table 1's CIFAR-10 rows (VGG-11, ResNet-20) as a ``stelab reproduce`` part.

The LeNet-5 rows are the ``table1`` part. These two nets need CIFAR-10, which does
not ship with the install, and the paper's 200-epoch schedule (7 runs per net) is
days of CPU time, so the part runs only in full mode and only when CIFAR-10 is on
disk; otherwise it reports itself skipped, with the reason and how to get the data,
and ``stelab reproduce`` tries it again next time (a skipped part is not cached).

On a GPU (``accelerator = "auto"`` picks it)::

    python -c "import stelab.data as d; d.download('cifar10')"
    stelab reproduce yin2019 --out stelab-out

Expected time (:data:`GPU_ASSUMPTIONS`, an estimate: no GPU was available to measure
it): 1.2-2.3 h for VGG-11 and about 0.9 h for ResNet-20 (:func:`gpu_estimate_hours`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...errors import DataError, unknown
from ..spine import Claim, PartResult, skipped, write_part
from . import table1 as t1

NAME = "yin2019-table1-cifar10"
NETS = ("vgg11", "resnet20")

#: forward multiply-accumulates per 32×32 CIFAR-10 image (``stelab summary <net>
#: --input-shape 3,32,32``)
MACS = {"vgg11": 152_769_536, "resnet20": 40_813_184}

#: How the GPU time of one net's table (float pre-training + 6 cells, each 200 epochs of
#: 45 000 training rows at batch 128, plus 15 000 evaluation rows per epoch) is estimated:
#: training costs 3 forward passes (6 FLOP per MAC), evaluation 1 (2 FLOP per MAC);
#: compute-bound at an assumed sustained 10-20 TFLOP/s (fp32/TF32 convolutions at CIFAR
#: sizes on a current data-centre GPU), or launch-bound at an assumed ~5 ms per SGD step
#: (ResNet-20's small layers: ~500 kernels per step, the quantizers included) — the larger
#: of the two, plus ~30 % for augmentation, evaluation overheads and checkpoints.
GPU_ASSUMPTIONS = {
    "tflops": (10.0, 20.0),
    "step_ms": 5.0,
    "overhead": 1.3,
    "runs": 7,
    "epochs": 200,
    "train_rows": 45_000,
    "eval_rows": 15_000,
    "batch_size": 128,
}


def gpu_estimate_hours(net: str) -> tuple[float, float]:
    """(low, high) estimated GPU hours of one net's table (see :data:`GPU_ASSUMPTIONS`).

    ``flop = runs · epochs · (6·train_rows + 2·eval_rows) · MACS[net]``;
    ``steps = runs · epochs · ceil(train_rows / batch)``; hours =
    ``overhead · max(flop / tflops, steps · step_ms) / 3600`` at the high and low
    throughput.
    """
    a = GPU_ASSUMPTIONS
    per_epoch = 6 * a["train_rows"] + 2 * a["eval_rows"]
    flop = a["runs"] * a["epochs"] * per_epoch * MACS[net]
    steps = a["runs"] * a["epochs"] * -(-a["train_rows"] // a["batch_size"])
    launch = steps * a["step_ms"] / 1e3
    lo, hi = (max(flop / (t * 1e12), launch) for t in sorted(a["tflops"], reverse=True))
    return a["overhead"] * lo / 3600, a["overhead"] * hi / 3600


COMMAND = (
    "python -c \"import stelab.data as d; d.download('cifar10')\"\n"
    "stelab reproduce yin2019 --out stelab-out"
)


def _span(lo: float, hi: float) -> str:
    return f"about {lo:.1f} h" if f"{lo:.1f}" == f"{hi:.1f}" else f"{lo:.1f}-{hi:.1f} h"


def _how_to_run() -> str:
    est = "; ".join(f"{t1.NET_LABELS[n]} {_span(*gpu_estimate_hours(n))}" for n in NETS)
    a = GPU_ASSUMPTIONS
    return (
        "## Running the CIFAR-10 rows\n\n"
        "```\n" + COMMAND + "\n```\n\n"
        "The part runs in full mode when CIFAR-10 is found (the download above, or "
        "`$STELAB_DATA` / `data_dir` pointing at `cifar-10-binary.tar.gz` or its extracted "
        "`cifar-10-batches-bin/`); training uses the GPU when one is visible. Expected time "
        f"on one GPU (estimated, not measured: {a['runs']} runs × {a['epochs']} epochs per "
        f"net, 3 forward passes of MACs per training image, at an assumed "
        f"{a['tflops'][0]:g}-{a['tflops'][1]:g} TFLOP/s or ~{a['step_ms']:g} ms per step, "
        f"whichever is slower, +{round(100 * (a['overhead'] - 1))}%): {est}. The runs are "
        "resumable: rerunning the command continues where it stopped.\n"
    )


def run(
    out_dir: Path,
    *,
    quick: bool = False,
    seed: int = 0,
    progress: bool = True,
    threads: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    net_overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> PartResult:
    """Run [Y19] Table 1 for VGG-11 and ResNet-20 on CIFAR-10 into ``out_dir/<net>``.

    ``overrides``: :class:`~stelab.experiments.yin2019.table1.Protocol` fields for both
    nets (``epochs``, ``limit``, ``data_dir``, ...; tests run a tiny table);
    ``net_overrides``: more fields per net (``{"vgg11": {"width": 0.125}}``).
    Returns the :class:`~stelab.experiments.spine.PartResult` (each claim's id prefixed
    with its net; ``results.json`` names each net's own results), or a skipped one in
    quick mode (bundled data only) or when CIFAR-10 is not found.
    """
    t0 = time.perf_counter()
    if quick:
        return skipped(
            NAME, "quick mode uses only bundled data; VGG-11 and ResNet-20 need CIFAR-10"
        )
    ov = dict(overrides or {})
    per_net = dict(net_overrides or {})
    for k in per_net:
        if k not in NETS:
            raise unknown("net in net_overrides", k, NETS)
    try:
        t1.pick_data("vgg11", data_dir=ov.get("data_dir"))
    except DataError as e:
        return skipped(NAME, f"CIFAR-10 is not available: {e}")
    out_dir = Path(out_dir)
    claims: list[Claim] = []
    results: dict[str, str] = {}
    sections = []
    figures = []
    for net in NETS:
        r = t1.run(
            out_dir / net,
            quick=False,
            seed=seed,
            progress=progress,
            net=net,
            threads=threads,
            overrides={**ov, **dict(per_net.get(net) or {})},
        )
        claims += [dataclasses.replace(c, id=f"{net} {c.id}") for c in r.claims]
        figures += list(r.figures)
        sub = Path(r.out_dir if r.out_dir is not None else out_dir / net)
        results[net] = str(sub / "results.json")
        text = (sub / "report.md").read_text(encoding="utf-8")
        # point the sub-report's images at its folder
        sections.append(text.replace("](table1_curves.png)", f"]({net}/table1_curves.png)"))
    sections.append(_how_to_run())
    return write_part(
        out_dir,
        name=NAME,
        claims=claims,
        results={"name": NAME, "quick": False, "seed": seed, "nets": results},
        report="\n\n".join(sections),
        figures=figures,
        started=t0,
        extra={"notes": ""},
    )
