"""A session's measurements: validation and test metrics, fit's per-step rows, the
final ``metrics.json``, and TensorBoard (when installed). The session is
:class:`stelab.train.loop.Session`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..errors import StelabTypeError
from . import files
from .parts import classifier_step, log
from .state import gather

if TYPE_CHECKING:
    from .loop import OnStep, Session

__all__ = ["evaluate_split", "finish", "ranks_in_sync", "step_row", "tensorboard", "validate"]


def step_row(s: Session, hook: OnStep, epoch: int) -> None:
    """Append fit's row for this step: the means of the step metrics over the steps
    since the last row (``train_<name>``) and what ``on_step`` returns."""
    n = max(s.step_seen, 1)
    row = {"step": s.global_step, "epoch": epoch + 1}
    row.update({f"train_{k}": float(v / n) for k, v in s.step_sums.items()})
    out = hook(s.global_step, s.raw_model)
    if out is not None and not isinstance(out, Mapping):
        raise StelabTypeError(
            f"on_step must return None or a dict of floats, got {type(out).__name__}"
        )
    row.update({str(k): None if v is None else float(v) for k, v in (out or {}).items()})
    s.step_history.append(row)
    s.step_sums, s.step_seen = {}, 0


@torch.no_grad()
def validate(s: Session, split: Any) -> dict[str, Any]:
    """The metrics of ``split``: ``{"loss", "acc"}`` of the classifier (every process
    a share), or what the job's ``evaluate`` returns; ``{}`` for an empty split, and
    for a custom step without ``evaluate``."""
    if len(split) == 0:
        return {}
    if s.job is None or (s.job.evaluate is None and s.job.step is classifier_step):
        loss, acc = evaluate_split(s, split)
        return {"loss": loss, "acc": acc}
    if s.job.evaluate is None:
        return {}
    module = s.raw_model
    was = module.training
    module.eval()
    try:
        out = s.job.evaluate(module, split)
    finally:
        module.train(was)
    if not isinstance(out, Mapping):
        raise StelabTypeError(
            f"evaluate must return a dict of floats (e.g. {{'loss': ..., 'acc': ...}}), "
            f"got {type(out).__name__}"
        )
    return {str(k): None if v is None else float(v) for k, v in out.items()}


@torch.no_grad()
def evaluate_split(s: Session, split: Any) -> tuple[float | None, float | None]:
    """Loss and accuracy on ``split``, each process taking a contiguous share."""
    n = len(split)
    if n == 0:
        return None, None
    f, module = s.fabric, s.raw_model
    lo, hi = n * s.rank // s.world, n * (s.rank + 1) // s.world
    x, y = split.x[lo:hi], split.y[lo:hi]
    dev = f.device
    was = module.training
    module.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    bs = s.cfg.data.eval_batch_size
    convert = f.strategy.precision.convert_input
    try:
        with f.autocast():
            for i in range(0, hi - lo, bs):
                xb = convert(x[i : i + bs].to(dev))
                yb = y[i : i + bs].to(dev)
                out = module(xb).float()
                loss_sum += F.cross_entropy(out, yb, reduction="sum").double()
                correct += (out.argmax(1) == yb).sum()
    finally:
        module.train(was)
    tot = torch.stack([loss_sum, correct.double()])
    if s.world > 1:
        tot = f.all_reduce(tot, reduce_op="sum")
    return float(tot[0]) / n, float(tot[1]) / n


def tensorboard(s: Session, row: dict[str, Any]) -> None:
    """Log ``row`` (an epoch's metrics) to TensorBoard, when it is installed."""
    if not s.tb_tried:
        s.tb_tried = True
        import importlib.util

        if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
            try:
                from lightning.fabric.loggers import TensorBoardLogger

                s.tb = TensorBoardLogger(root_dir=str(s.run_dir), name="tensorboard", version="")
            except Exception as e:  # pragma: no cover - optional dependency
                log.warning("TensorBoard logging is off: %s", e)
    if s.tb is not None:
        metrics = {k: v for k, v in row.items() if k != "epoch" and v is not None}
        s.tb.log_metrics(metrics, step=int(row["epoch"]))


def ranks_in_sync(s: Session) -> bool | None:
    """Whether every process holds the same parameters (None with one process)."""
    if s.world == 1:
        return None
    flat = torch.cat([p.detach().reshape(-1).double() for p in s.raw_model.parameters()])
    g = gather(s, flat)
    return all(torch.equal(g[0], g[i]) for i in range(1, s.world))


def finish(s: Session) -> dict[str, Any]:
    """Evaluate the test split, write metrics.json and return the final metrics."""
    cfg = s.cfg
    test = validate(s, s.data.test)
    test_loss, test_acc = test.get("loss"), test.get("acc")
    in_sync = ranks_in_sync(s)
    last_val = next((r for r in reversed(s.history) if r.get("val_acc") is not None), {})
    final = s.history[-1] if s.history else {}
    metrics = {
        "name": cfg.name or s.run_dir.name,
        "epochs": s.epoch,
        "final_train_loss": final.get("train_loss"),
        "final_train_acc": final.get("train_acc"),
        "final_val_loss": last_val.get("val_loss"),
        "final_val_acc": last_val.get("val_acc"),
        "best_val_acc": s.best["val_acc"],
        "best_epoch": s.best["epoch"],
        "test_loss": test_loss,
        "test_acc": test_acc,
        "wall_time_s": s.elapsed_before + (time.perf_counter() - s.t_start),
        "train_seconds": sum(float(r.get("train_seconds") or 0.0) for r in s.history),
        "world_size": s.world,
        "ranks_in_sync": in_sync,
        "device": str(s.fabric.device),
    }
    if s.job is not None and s.job.on_step is not None:
        metrics["steps"] = [dict(r) for r in s.step_history]
    if s.main:
        with files.writing(s.run_dir):
            files.write_json(s.run_dir / files.METRICS_JSON, metrics)
        tacc = "n/a" if test_acc is None else f"{test_acc:.4f}"
        log.info(
            "finished %d epochs in %.1f s: test acc %s, best val acc %s (epoch %s); %s",
            s.epoch,
            metrics["wall_time_s"],
            tacc,
            "n/a" if s.best["val_acc"] is None else f"{s.best['val_acc']:.4f}",
            s.best["epoch"],
            s.run_dir,
        )
        if s.tb is not None:
            s.tb.finalize("success")
    s.fabric.barrier()
    return metrics
