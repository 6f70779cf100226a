"""A stand-in reproduction part for tests of `stelab reproduce` (counts its runs)."""

from __future__ import annotations

from pathlib import Path

CALLS: list[Path] = []


def run(out_dir: Path, *, quick: bool = False, seed: int = 0, progress: bool = True) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stelab.io import atomic_write_text
    from stelab.plots import save_figure

    CALLS.append(out_dir)
    fig, ax = plt.subplots()
    ax.plot([0, 1], [seed, 1])
    save_figure(fig, out_dir / "curve.png")
    plt.close(fig)
    atomic_write_text(out_dir / "report.md", "# Fake part\n\n![a curve](curve.png)\n")
    return {"claims": [{"id": "a", "text": "the sky | is blue", "verdict": "reproduced",
                        "evidence": f"seed {seed}"}]}  # fmt: skip
