"""Small configs and independent checks shared by the training and report tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from stelab import models
from stelab.config import TrainConfig, load_config

# 256 digits rows, batch 64: 4 steps per epoch, well under a second per epoch
BASE = [
    "data.limit=256",
    "data.batch_size=64",
    "data.augment='flip_crop'",
    "model.name='lenet5'",
    "model.bits=2",
    "model.estimator='clipped_relu'",
    "optim.lr=0.05",
    "optim.momentum=0.9",
    "schedule.name='multistep'",
    "schedule.milestones=[2]",
    "schedule.gamma=0.5",
    "train.epochs=3",
    "train.threads=1",
]


def quick_cfg(*overrides: str) -> TrainConfig:
    """The small test config with ``--set`` style overrides applied after :data:`BASE`."""
    return load_config(None, [*BASE, *overrides])


def ckpt(run_dir: Path, name: str = "last.pt") -> dict[str, Any]:
    """A checkpoint of ``run_dir`` loaded with ``weights_only=True``."""
    return torch.load(Path(run_dir) / "checkpoints" / name, map_location="cpu", weights_only=True)


def assert_same_tensors(a: Any, b: Any, path: str = "") -> None:
    """Recursively: every tensor ``torch.equal``, everything else ``==``."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), path
        assert a.dtype == b.dtype and torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            assert_same_tensors(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{path}[{i}]")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def model_from_state(cfg: TrainConfig, state: dict[str, torch.Tensor], shape, classes: int):
    """A zoo model built directly with stelab.models (not the trainer) holding ``state``."""
    m = cfg.model
    act = None if m.bits is None else {"bits": m.bits, "estimator": m.estimator}
    model = models.build(m.name, num_classes=classes, in_shape=tuple(shape), act=act)
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def accuracy_and_loss(model, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """Accuracy and mean cross-entropy, one plain forward pass over the whole split."""
    out = model(x)
    return float((out.argmax(1) == y).double().mean()), float(
        F.cross_entropy(out.double(), y, reduction="mean")
    )
