"""Plots shared by the CLI and the reports (matplotlib, Agg backend, imported lazily)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from . import estimators as _est
from .errors import ConfigError
from .io import atomic_open
from .quantizers import Quantizer

# the quantizer each built-in estimator is drawn with
_NATURAL = {
    "ste": dict(fn="sign"),
    "clipped": dict(fn="sign"),
    "approx_sign": dict(fn="sign"),
    "swish_sign": dict(fn="sign"),
    "logistic": dict(fn="sign"),
    "ewgs": dict(fn="uniform", bits=2, step=0.5),
    "relu": dict(fn="heaviside"),
    "clipped_relu": dict(fn="act", bits=2, alpha=0.5),
    "dsq": dict(fn="uniform", bits=2, step=0.5),
}


def _natural(name: str) -> dict[str, Any]:
    if name in _NATURAL:
        return _NATURAL[name]
    serves = _est.get(name).serves
    if serves is None or "sign" in serves:
        return dict(fn="sign")
    if "uniform" in serves:
        return dict(fn="uniform", bits=None, step=0.5)
    return dict(fn=sorted(serves)[0], bits=2, step=0.5)


def check_plot_path(path: str | os.PathLike[str]) -> Path:
    """``path`` as a Path, or a ConfigError unless it ends in .png, .pdf or .svg, is not
    a folder, and its nearest existing parent is a folder (missing ones get created)."""
    path = Path(path)
    if path.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise ConfigError(f"plot file must end in .png, .pdf or .svg, got {str(path)!r}")
    if path.is_dir():
        raise ConfigError(f"plot file {str(path)!r} is a folder; give a file name in it")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise ConfigError(
            f"plot file {str(path)!r} cannot be written: {str(parent)!r} is a file, not a folder"
        )
    return path


def new_folder(path: str | os.PathLike[str]) -> Path | None:
    """The outermost missing folder above the file ``path`` (that writing it creates),
    or None when its folder exists."""
    missing = None
    parent = Path(path).parent
    while not parent.exists() and parent != parent.parent:
        missing = parent
        parent = parent.parent
    return missing


def save_figure(
    fig: Any,
    path: str | os.PathLike[str],
    dpi: int = 120,
    *,
    tight: bool = True,
    close: bool = False,
) -> Path:
    """Save ``fig`` atomically (temp file in the same folder, then rename): the one way
    stelab writes a figure. The format follows the suffix (png, pdf, svg); ``tight``
    crops to the drawn area (``bbox_inches="tight"``); ``close`` closes the figure."""
    path = check_plot_path(path)
    with atomic_open(path, "wb") as f:
        fig.savefig(
            f,
            format=path.suffix.lstrip(".").lower(),
            dpi=dpi,
            **({"bbox_inches": "tight"} if tight else {}),
        )
    if close:
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path


def plot_estimators(path: str | os.PathLike[str]) -> Path:
    """One panel per registered estimator: the forward q(x), the surrogate q̂'(x),
    and its integral (the smooth function the backward pretends the forward is)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for name in _est.names():
        try:
            q = Quantizer(**_natural(name), estimator=name)
        except (ConfigError, TypeError):
            continue  # needs parameters to exist at all (e.g. periodic(fn))
        panels.append(q)
    names = [q.estimator.name for q in panels]
    cols = 3
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    x = torch.linspace(-2.5, 2.5, 2001, dtype=torch.float64)
    for ax, q in zip(axes.flat, panels, strict=False):
        xg = x.clone().requires_grad_(True)
        y = q(xg)
        y.backward(torch.ones_like(x))  # EWGS: drawn for an incoming gradient of +1
        d = xg.grad.detach()
        integral = torch.cumulative_trapezoid(d, x)
        integral = torch.cat([integral.new_zeros(1), integral])
        integral = integral + y.detach()[0]  # anchored to the forward at the left end
        ax.plot(x, y.detach(), color="0.4", lw=1.5, label="forward q(x)")
        ax.plot(x, d, color="C1", lw=1.8, label="surrogate q̂'(x)")
        ax.plot(x, integral, color="C0", ls="--", lw=1.2, label="∫ q̂' (implied)")
        title = repr(q.estimator) + f"  on {q.kind}"
        ax.set_title(title, fontsize=10)
        ax.axhline(0, color="0.85", lw=0.8, zorder=0)
        ax.set_xlabel("x")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle("stelab estimators: forward, surrogate derivative and its integral", y=1.0)
    fig.tight_layout()
    # one legend for every panel (the three curves are the same in each): in the first
    # empty cell of the grid, or under the grid when it is full
    handles, labels = axes.flat[0].get_legend_handles_labels()
    spare = list(axes.flat)[len(names) :]
    if spare:
        spare[0].legend(handles, labels, loc="center", fontsize=11, title="every panel")
    else:
        fig.legend(handles, labels, loc="upper center", ncol=3, fontsize=9,
                   bbox_to_anchor=(0.5, 0.0), frameon=False)  # fmt: skip
    out = save_figure(fig, path)
    plt.close(fig)
    return out
