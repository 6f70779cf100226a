"""[Y19] Table 1's CIFAR-10 rows (VGG-11, ResNet-20) as a ``stelab reproduce`` part.

The LeNet-5 rows are the ``table1`` part. These two nets need CIFAR-10, which does
not ship with the install, and the paper's 200-epoch schedule (7 runs per net) is
days of CPU time, so the part runs only in full mode and only when CIFAR-10 is on
disk; otherwise it reports itself skipped, with the reason and how to get the data,
and ``stelab reproduce`` tries it again next time (a skipped part is not cached).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DataError
from ..io import atomic_write_text
from . import yin2019_table1 as t1

NAME = "yin2019-table1-cifar10"
NETS = ("vgg11", "resnet20")


def run(out_dir: Path, *, quick: bool = False, seed: int = 0, progress: bool = True) -> dict:
    """Run [Y19] Table 1 for VGG-11 and ResNet-20 on CIFAR-10 into ``out_dir/<net>``.

    Returns ``{"claims", "notes", ...}``, or ``{"claims": [], "skipped": reason}`` in
    quick mode (bundled data only) or when CIFAR-10 is not found.
    """
    if quick:
        return {
            "claims": [],
            "skipped": "quick mode uses only bundled data; VGG-11 and ResNet-20 need CIFAR-10",
        }
    try:
        t1.pick_data("vgg11")
    except DataError as e:
        return {"claims": [], "skipped": f"CIFAR-10 is not available: {e}"}
    out_dir = Path(out_dir)
    claims: list[dict[str, Any]] = []
    sections = []
    for net in NETS:
        r = t1.run(out_dir / net, quick=False, seed=seed, progress=progress, net=net)
        claims += [{**c, "id": f"{net} {c['id']}"} for c in r["claims"]]
        text = Path(r["report"]).read_text(encoding="utf-8")
        # point the sub-report's images at its folder
        sections.append(text.replace("](table1_curves.png)", f"]({net}/table1_curves.png)"))
    atomic_write_text(out_dir / "report.md", "\n\n".join(sections))
    return {"name": NAME, "claims": claims, "notes": ""}
