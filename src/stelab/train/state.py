"""What a checkpoint of a training session holds: writing ``last.pt``/``best.pt`` and
restoring a session from one (bit-identical resume). The file format and loading are
:mod:`stelab.train.checkpoint`; the session is :class:`stelab.train.loop.Session`.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from ..config import config_to_dict
from ..errors import ConfigError
from ..io import atomic_open, interrupts_deferred
from . import files
from .checkpoint import (
    FORMAT,
    numpy_rng_state,
    python_rng_state,
    set_numpy_rng_state,
    set_python_rng_state,
)
from .parts import log

if TYPE_CHECKING:
    from .loop import Session

__all__ = ["gather", "restore", "save_checkpoint", "session_state"]


def gather(s: Session, t: torch.Tensor) -> list[torch.Tensor]:
    """``t`` of every process (a collective under DDP), on CPU."""
    if s.world == 1:
        return [t.clone()]
    import torch.distributed as dist

    t = t.to(s.fabric.device)
    out = [torch.empty_like(t) for _ in range(s.world)]
    dist.all_gather(out, t)
    return [o.cpu() for o in out]


def session_state(s: Session) -> dict[str, Any]:
    """The checkpoint of ``s`` (a collective under DDP: every process takes part)."""
    rng: dict[str, Any] = {
        "torch": gather(s, torch.get_rng_state()),
        "shuffle": s.shuffle_gen.get_state(),
        "augment": gather(s, s.aug_gen.get_state()),
        "numpy": gather(s, numpy_rng_state()),
        "python": gather(s, python_rng_state()),
    }
    if s.generators:
        rng["streams"] = {k: g.get_state() for k, g in s.generators.items()}
    if s.fabric.device.type == "cuda":
        rng["cuda"] = gather(s, torch.cuda.get_rng_state(s.fabric.device))
    state = {
        "format": FORMAT,
        "epoch": s.epoch,
        "global_step": s.global_step,
        "model": {k: v.detach().cpu() for k, v in s.raw_model.state_dict().items()},
        "model_args": s.model_args,
        "optimizer": s.opt.state_dict(),
        "scheduler": s.sched.state_dict(),
        "rng": rng,
        "config": config_to_dict(s.cfg),
        "history": [dict(r) for r in s.history],
        "best": dict(s.best),
        "elapsed_s": s.elapsed_before + (time.perf_counter() - s.t_start),
        "world_size": s.world,
        "threads": s.threads,
    }
    if s.model_args is None:
        del state["model_args"]
    if s.job is not None and s.job.on_step is not None:
        state["step_history"] = [dict(r) for r in s.step_history]
        state["step_sums"] = {k: v.detach().cpu() for k, v in s.step_sums.items()}
        state["step_seen"] = s.step_seen
    return state


def save_checkpoint(s: Session, best: bool) -> None:
    """Write ``last.pt`` (and ``best.pt``) and metrics.csv; every process calls it."""
    state = session_state(s)  # collective under DDP: every process takes part
    s.saved_epoch = s.epoch
    if s.main:
        # the checkpoint and metrics.csv describe the same epoch, even after a Ctrl-C
        with files.writing(s.run_dir), interrupts_deferred():
            for name in (files.LAST, files.BEST) if best else (files.LAST,):
                with atomic_open(s.ckpt_dir / name, "wb") as fh:
                    torch.save(state, fh)
            files.write_metrics_csv(s.run_dir, s.history)
    s.fabric.barrier()


def restore(s: Session, ckpt: dict[str, Any]) -> None:
    """Set ``s`` to the state of the checkpoint ``ckpt`` (model, optimizer and schedule
    are loaded by the caller)."""
    s.epoch = s.saved_epoch = int(ckpt["epoch"])
    s.global_step = int(ckpt.get("global_step", 0))
    s.step_history = [dict(r) for r in ckpt.get("step_history", [])]
    s.step_sums = {k: v.clone() for k, v in ckpt.get("step_sums", {}).items()}
    s.step_seen = int(ckpt.get("step_seen", 0))
    s.history = [dict(r) for r in ckpt.get("history", [])]
    s.best = dict(ckpt.get("best", s.best))
    s.elapsed_before = float(ckpt.get("elapsed_s", 0.0))
    rng = ckpt.get("rng", {})
    saved_world = int(ckpt.get("world_size", 1))
    if "shuffle" in rng:
        s.shuffle_gen.set_state(rng["shuffle"])
    for name, gen in s.generators.items():
        if name not in rng.get("streams", {}):
            raise ConfigError(
                f"the checkpoint {s.resume_from!r} has no state of the generator "
                f"{name!r} (it has: {sorted(rng.get('streams', {}))}); resume with the "
                "generators of the run that wrote it"
            )
        gen.set_state(rng["streams"][name])
    if saved_world == s.world:
        if rng.get("torch"):
            torch.set_rng_state(rng["torch"][s.rank])
        if rng.get("numpy"):
            set_numpy_rng_state(rng["numpy"][s.rank])
        if rng.get("python"):
            set_python_rng_state(rng["python"][s.rank])
        if rng.get("augment"):
            s.aug_gen.set_state(rng["augment"][s.rank])
        if rng.get("cuda") and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"][s.rank], s.fabric.device)
    elif s.main:
        log.warning(
            "resuming with %d processes from a checkpoint written by %d: the run continues "
            "but is not bit-identical to an uninterrupted one",
            s.world,
            saved_world,
        )


def need_bytes(s: Session) -> int:
    """About what the run folder needs on disk: last.pt (and best.pt), each with a
    second copy while it is replaced, plus 1 MiB for logs and metrics."""
    model = sum(v.numel() * v.element_size() for v in s.raw_model.state_dict().values())
    o = s.cfg.optim
    slots = 2 if o.name in ("adam", "adamw") else int(o.momentum > 0)
    files_kept = 2 if s.cfg.train.save_best else 1
    return model * (1 + slots) * (files_kept + 1) + 2**20
