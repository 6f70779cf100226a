"""One process's part of a run: setup, the epoch loop, checkpoints, final metrics.

See :mod:`stelab.train` for the overview and the run-directory layout.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import TrainConfig
from ..errors import ConfigError, StelabError, StelabTypeError
from . import files
from .checkpoint import FORMAT, check_state, load_checkpoint, model_from_checkpoint
from .metrics import finish, step_row, tensorboard, validate
from .parts import (
    TrainingDiverged,
    TrainingInterrupted,
    build_model,
    build_optimizer,
    build_scheduler,
    check_single_row_batches,
    classifier_step,
    determinism,
    load_data,
    log,
    num_steps,
    quiet_lightning,
    run_logging,
    shard_batches,
    torch_threads,
)
from .state import need_bytes, restore, save_checkpoint

#: ``step(model, (x, y))``: the loss (a scalar tensor), or a dict with ``"loss"`` and
#: other scalars (batch means, logged per epoch as ``train_<name>``)
Step = Callable[[nn.Module, tuple[torch.Tensor, torch.Tensor]], Any]
#: ``evaluate(model, split)``: a dict of floats, ``"loss"`` and ``"acc"`` among them
#: (``val_loss``/``val_acc``; ``acc`` picks best.pt), other keys logged as ``val_<name>``
Evaluate = Callable[[nn.Module, Any], Mapping[str, Any]]
#: ``on_step(step, model)``: called after optimizer step ``step`` (counted from 1 over the
#: run); returns None or a dict of floats for that step's row (``fit(on_step=...)``)
OnStep = Callable[[int, nn.Module], Mapping[str, Any] | None]


@dataclass
class Job:
    """What a session trains when it is not the zoo model of its config
    (:func:`stelab.train.fit`): the model, the data, the step, the evaluation, the
    random generators to checkpoint, and a per-epoch callback."""

    model: nn.Module
    data: Any  # a stelab.data.Splits
    step: Step = classifier_step
    evaluate: Evaluate | None = None
    generators: Mapping[str, torch.Generator] = field(default_factory=dict)
    on_epoch: Callable[[dict[str, Any]], Any] | None = None
    param_groups: list[dict[str, Any]] | None = None  # torch's format; None: all parameters
    on_step: OnStep | None = None  # every ``every_n_steps`` steps and after the last
    every_n_steps: int = 1
    shuffle_seed: int | None = None  # seed of the shuffling generator; None: train.seed
    augment_seed: int | None = None  # seed of the augmentation generator; None: from train.seed
    checkpoint_every: int = 1  # epochs between checkpoints; the last epoch always has one


# --- the session --------------------------------------------------------------------


def _mix(seed: int, stream: int, rank: int) -> int:
    """A distinct 63-bit seed per (seed, stream, rank)."""
    return (seed * 0x9E3779B97F4A7C15 + stream * 0xBF58476D1CE4E5B9 + rank * 0x94D049BB133111EB) % (
        2**63
    )


def _loss_and_metrics(out: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """The loss and the other metrics of what a training step returned."""
    if isinstance(out, Mapping):
        if "loss" not in out:
            raise StelabTypeError(
                f"the training step returned a dict without 'loss' (keys: {sorted(out)}); "
                "return the loss tensor, or a dict with 'loss' and other scalars"
            )
        loss, metrics = out["loss"], {k: v for k, v in out.items() if k != "loss"}
    else:
        loss, metrics = out, {}
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        what = (
            f"a tensor of shape {tuple(loss.shape)} (requires_grad={loss.requires_grad})"
            if isinstance(loss, torch.Tensor)
            else type(loss).__name__
        )
        raise StelabTypeError(
            f"the training step must return a scalar loss tensor that requires grad, got {what}"
        )
    return loss.reshape(()), metrics


def optimizer_step(
    s: Session, batch: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, Any]]:
    """One optimizer step; returns the (detached) loss and the step's other metrics."""
    loss, metrics = _loss_and_metrics(s.step(s.step_model, batch))
    s.opt.zero_grad(set_to_none=True)
    s.fabric.backward(loss)
    t = s.cfg.train
    if t.grad_clip is not None:
        s.fabric.clip_gradients(s.model, s.opt, clip_val=t.grad_clip)
    if t.grad_clip_norm is not None:
        s.fabric.clip_gradients(s.model, s.opt, max_norm=t.grad_clip_norm, error_if_nonfinite=False)
    s.opt.step()
    return loss.detach(), metrics


class Session:
    """One process's part of a run (built inside the launched process)."""

    def __init__(
        self,
        fabric: Any,
        cfg: TrainConfig,
        plan: files.Plan,
        progress: bool,
        job: Job | None = None,
    ):
        self.fabric, self.cfg, self.plan, self.job = fabric, cfg, plan, job
        self.step: Step = classifier_step if job is None else job.step
        self.generators = {} if job is None else dict(job.generators)
        self.run_dir = Path(plan.run_dir)
        self.resume_from, self.progress = plan.resume_from, progress
        self.rank, self.world = fabric.global_rank, fabric.world_size
        self.main = self.rank == 0
        self.ckpt_dir = self.run_dir / files.CKPT_DIR
        self.history: list[dict[str, Any]] = []
        self.best: dict[str, Any] = {"val_acc": None, "epoch": None}
        self.epoch = 0  # finished epochs
        self.saved_epoch = 0  # the epoch of the last checkpoint (last.pt)
        self.checkpoint_every = 1 if job is None else job.checkpoint_every
        self.global_step = 0
        # fit's on_step rows; the sums of the step metrics and the steps since the last row
        self.step_history: list[dict[str, Any]] = []
        self.step_sums: dict[str, torch.Tensor] = {}
        self.step_seen = 0
        self.elapsed_before = 0.0
        self.t_start = time.perf_counter()
        self.tb: Any = None  # the TensorBoard logger, once tried (tensorboard installed)
        self.tb_tried = False

    # -- setup --

    def run(self) -> dict[str, Any]:
        """Set up everything (data, model, init_from, checkpoint), and only then create or
        take over the run folder (:func:`files.commit`, which locks it), then train."""
        t = self.cfg.train
        with contextlib.ExitStack() as stack:
            stack.enter_context(determinism(t.deterministic))
            stack.enter_context(torch_threads(t.threads))
            stack.enter_context(quiet_lightning())
            self.runlog = stack.enter_context(run_logging(self.main, self.progress and self.main))
            self._setup()
            self._commit(stack)
            return self._run()

    def _commit(self, stack: contextlib.ExitStack) -> None:
        """Rank 0 creates and locks the run folder; every rank learns whether it could."""
        err: tuple[str, str] | None = None
        failure: StelabError | None = None
        if self.main:
            try:
                lock = files.commit(self.plan, self.cfg, need_bytes=need_bytes(self))
            except StelabError as e:
                failure, err = e, (type(e).__name__, str(e))
            else:
                stack.callback(lock.release)
        if self.world > 1:
            err = self.fabric.broadcast(err, src=0)
        if failure is not None:
            raise failure
        if err is not None:
            raise StelabError(err[1])
        if self.runlog is not None:
            self.runlog.open(self.run_dir / files.LOG)

    def _setup(self) -> None:
        f, cfg, t = self.fabric, self.cfg, self.cfg.train
        f.seed_everything(t.seed, verbose=False)
        if self.job is not None:
            self.data = self.job.data
        else:
            with f.rank_zero_first():
                try:
                    self.data = load_data(cfg, progress=self.progress and self.main)
                except StelabError as e:
                    raise type(e)(f"[data] (data.name = {cfg.data.name!r}): {e}") from None
        d = self.data
        n = len(d.train)
        if n == 0 or ((self.world > 1 or cfg.data.drop_last) and n < cfg.data.batch_size):
            raise ConfigError(
                f"the training split has {n} rows; it needs at least data.batch_size = "
                f"{cfg.data.batch_size} with {self.world} processes and data.drop_last = "
                f"{cfg.data.drop_last} (and at least 1 row)"
            )
        self.model_args = None
        if self.job is None:
            self.model_args = {"num_classes": int(d.num_classes), "in_shape": list(d.input_shape)}
        ckpt = load_checkpoint(self.resume_from) if self.resume_from else None
        if ckpt is not None and ckpt.get("format") != FORMAT:
            raise ConfigError(f"{self.resume_from!r} is not a stelab checkpoint; cannot resume")
        init = None
        if ckpt is None and t.init_from is not None:
            try:
                init = self._init_source(t.init_from)
            except StelabError as e:
                raise type(e)(f"train.init_from = {t.init_from!r}: {e}") from None
        if self.job is not None:
            model = self.job.model
        else:
            try:
                model = build_model(cfg.model, d.num_classes, d.input_shape, init_from=init)
            except StelabError as e:
                raise type(e)(f"[model] (model.name = {cfg.model.name!r}): {e}") from None
            check_single_row_batches(cfg, model, d.train.x[:1], n, self.world)
        if ckpt is not None:
            check_state(model, ckpt["model"], str(self.resume_from))
            model.load_state_dict(ckpt["model"])
        self._set_threads(model, ckpt)
        if self.rank > 0:  # different model noise per process (e.g. stochastic estimators)
            torch.manual_seed(_mix(t.seed, 1, self.rank))
        self.raw_model = model
        self.model = f.setup_module(model)
        # fit (one process) hands the step the caller's own module, so methods other than
        # forward (an SBN's surrogate_loss) work on it; train(cfg) the Fabric/DDP wrapper
        self.step_model = self.model if self.job is None else self.raw_model
        params: Any = self.model.parameters()
        if self.job is not None and self.job.param_groups is not None:
            params = [dict(g) for g in self.job.param_groups]
        opt = build_optimizer(cfg.optim, params)
        self.sched = build_scheduler(cfg, opt)
        self.shuffle_gen = torch.Generator().manual_seed(t.seed)
        self.aug_gen = torch.Generator().manual_seed(_mix(t.seed, 2, self.rank))
        if self.job is not None and self.job.shuffle_seed is not None:
            self.shuffle_gen.manual_seed(self.job.shuffle_seed)
        if self.job is not None and self.job.augment_seed is not None:
            self.aug_gen.manual_seed(self.job.augment_seed)
        if ckpt is not None:
            before = ckpt.get("config", {}).get("train", {}).get("epochs")
            if self.main and cfg.schedule.name == "cosine" and before not in (None, t.epochs):
                log.warning(
                    "train.epochs changed from %s to %d: the cosine schedule follows the new "
                    "length from here on",
                    before,
                    t.epochs,
                )
            opt.load_state_dict(ckpt["optimizer"])
            self.sched.load_state_dict(ckpt["scheduler"])
            restore(self, ckpt)
        self.opt = f.setup_optimizers(opt)
        dev = f.device
        self.train_xy = (d.train.x.to(dev), d.train.y.to(dev))
        self.augment = None
        if cfg.data.augment != "none":
            from ..data import FlipCrop

            if d.train.x.dim() != 4:
                raise ConfigError(
                    f"data.augment = {cfg.data.augment!r} needs image data (N, C, H, W); "
                    f"{d.name!r} has inputs of shape {tuple(d.input_shape)}"
                )
            self.augment = FlipCrop(4, generator=self.aug_gen, flip=cfg.data.augment == "flip_crop")

    def _set_threads(self, model: nn.Module, ckpt: dict[str, Any] | None) -> None:
        """Resolve ``train.threads``: an integer as given; ``"auto"`` from the work per step
        (:func:`stelab.threads.resolve_threads`), except on resume, where it takes the
        count the checkpoint was trained with (the thread count can change the order of
        float sums on CPU, so the same count keeps the resumed run bit-identical)."""
        from ..threads import resolve_threads, step_macs

        t = self.cfg.train
        saved = None if ckpt is None else ckpt.get("threads")
        if t.threads == "auto" and saved is not None:
            n = int(saved)
        elif t.threads == "auto":
            rows = max(1, self.cfg.data.batch_size // self.world)
            work = step_macs(model, tuple(self.data.input_shape)) * rows
            n = resolve_threads("auto", work)
        else:
            n = int(t.threads)
            if saved is not None and int(saved) != n and self.main:
                log.warning(
                    "train.threads = %d, but the checkpoint was trained with %d thread(s): the "
                    "run continues but may not be bit-identical to an uninterrupted one",
                    n,
                    int(saved),
                )
        torch.set_num_threads(n)
        self.threads = n

    def _init_source(self, source: str) -> nn.Module:
        """The float model to copy weights from ([Y19]: start from a trained float net)."""
        src = load_checkpoint(source)
        if "config" in src and "model_args" in src:
            model = model_from_checkpoint(src, source)
        else:  # a bare state_dict: assume the float twin of this model
            from dataclasses import replace

            fcfg = replace(self.cfg.model, bits=None, weights=None)
            d = self.data
            model = build_model(fcfg, d.num_classes, d.input_shape)
        check_state(model, src["model"], source)
        model.load_state_dict(src["model"])
        if self.main:
            log.info("initialised from %s (epoch %s)", source, src.get("epoch", "?"))
        return model

    # -- loop --

    def _run(self) -> dict[str, Any]:
        cfg, t = self.cfg, self.cfg.train
        if self.main:
            with files.writing(self.run_dir):
                self._write_env()
            what = f"resuming at epoch {self.epoch + 1}" if self.resume_from else "starting"
            log.info(
                "%s %s: %s on %s (%d train / %d val / %d test), %d epochs, %d process(es) on %s",
                what,
                cfg.name or self.run_dir.name,
                cfg.model.name,
                self.data.name,
                len(self.data.train),
                len(self.data.val),
                len(self.data.test),
                t.epochs,
                self.world,
                self.fabric.device,
            )
        if self.epoch > t.epochs:
            raise ConfigError(
                f"the run already has {self.epoch} epochs, more than train.epochs = {t.epochs}"
            )
        epoch = self.epoch
        try:
            for epoch in range(self.epoch, t.epochs):
                if self._max_steps_reached():
                    break
                self._epoch(epoch)
        except KeyboardInterrupt:
            msg = self._interrupt_message(epoch)
            raise TrainingInterrupted(msg, self.run_dir, self.saved_epoch) from None
        return finish(self)

    def _write_env(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        if self.main:
            files.write_env(
                self.run_dir,
                files.environment(
                    cfg,
                    device=str(self.fabric.device),
                    world_size=self.world,
                    extra={
                        "strategy": type(self.fabric.strategy).__name__,
                        "precision": t.precision,
                        "resumed_from_epoch": self.epoch if self.resume_from else None,
                        "data_source": self.data.source,
                    },
                ),
            )

    def _epoch(self, epoch: int) -> None:
        cfg, f, t = self.cfg, self.fabric, self.cfg.train
        t0, c0 = time.perf_counter(), time.process_time()
        self.model.train()
        lr = float(self.opt.param_groups[0]["lr"])
        x, y = self.train_xy
        steps = num_steps(len(x), cfg.data.batch_size, self.world, cfg.data.drop_last)
        batches = shard_batches(
            x,
            y,
            cfg.data.batch_size,
            self.shuffle_gen,
            rank=self.rank,
            world=self.world,
            augment=self.augment,
            drop_last=cfg.data.drop_last,
        )
        bar = None
        if self.progress and self.main and sys.stderr.isatty():
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc=f"epoch {epoch + 1}/{t.epochs}", unit="batch", leave=False)
        check_every = 1 if f.device.type == "cpu" else 25
        dev = f.device
        sums: dict[str, torch.Tensor] = {}  # row-weighted sums of the step's batch means
        seen = 0
        hook = None if self.job is None else self.job.on_step
        try:
            for i, batch in enumerate(batches):
                loss, metrics = optimizer_step(self, batch)
                self.global_step += 1
                rows = len(batch[1])
                for k, v in {"loss": loss, **metrics}.items():
                    v = torch.as_tensor(v, device=dev).detach().double().reshape(())
                    if k not in sums:  # (not sums.get(k, zeros): no new zeros every step)
                        sums[k] = torch.zeros((), dtype=torch.float64, device=dev)
                    sums[k] += v * rows
                    if hook is not None:
                        if k not in self.step_sums:
                            self.step_sums[k] = torch.zeros_like(sums[k])
                        self.step_sums[k] += v
                seen += rows
                self.step_seen += 1
                stop = self._max_steps_reached()
                if (i + 1) % check_every == 0 or i + 1 == steps or stop:
                    self._check_finite(loss, epoch, i + 1, steps, lr)
                if hook is not None:
                    last = stop or (epoch + 1 == t.epochs and i + 1 == steps)
                    if last or self.global_step % self.job.every_n_steps == 0:
                        step_row(self, hook, epoch)
                if bar is not None:
                    bar.update(1)
                    if i % 10 == 0:
                        bar.set_postfix(loss=f"{float(loss):.4g}")
                if stop:  # max_steps: the run ends inside this epoch
                    break
        finally:
            if bar is not None:
                bar.close()
        train_seconds = time.perf_counter() - t0
        train_cpu_seconds = time.process_time() - c0
        names = list(sums)
        tot = torch.stack([*sums.values(), torch.tensor(float(seen), device=dev)])
        if self.world > 1:
            tot = f.all_reduce(tot, reduce_op="sum")
            self._sync_buffers()
        train = {f"train_{k}": float(tot[i] / tot[-1]) for i, k in enumerate(names)}
        val: dict[str, Any] = {}
        if (epoch + 1) % t.eval_every == 0 or epoch + 1 == t.epochs or self._max_steps_reached():
            val = validate(self, self.data.val)
        val_loss, val_acc = val.get("loss"), val.get("acc")
        self.sched.step()
        row = {
            "epoch": epoch + 1,
            "train_loss": train.pop("train_loss"),
            "train_acc": train.pop("train_acc", None),
            "val_loss": val_loss,
            "val_acc": val_acc,
            "lr": lr,
            "seconds": time.perf_counter() - t0,
            "train_seconds": train_seconds,
            "train_cpu_seconds": train_cpu_seconds,
            **train,
            **{f"val_{k}": v for k, v in val.items() if k not in ("loss", "acc")},
        }
        self.history.append(row)
        self.epoch = epoch + 1
        improved = val_acc is not None and (
            self.best["val_acc"] is None or val_acc > self.best["val_acc"]
        )
        if improved:
            self.best = {"val_acc": val_acc, "epoch": epoch + 1}
        due = (epoch + 1) % self.checkpoint_every == 0 or epoch + 1 == t.epochs
        if due or self._max_steps_reached() or (improved and t.save_best):
            save_checkpoint(self, best=improved and t.save_best)
        if self.job is not None and self.job.on_epoch is not None:
            self.job.on_epoch(dict(row))
        if self.main:
            atxt = "" if row["train_acc"] is None else f", train acc {row['train_acc']:.4f}"
            vtxt = "" if val_loss is None else f", val loss {val_loss:.4f}"
            vtxt += "" if val_acc is None else f", val acc {val_acc:.4f}"
            log.info(
                "epoch %d/%d: train loss %.4f%s%s, lr %.3g, %.1f s",
                epoch + 1,
                t.epochs,
                row["train_loss"],
                atxt,
                vtxt,
                lr,
                row["seconds"],
            )
            tensorboard(self, row)

    def _max_steps_reached(self) -> bool:
        m = self.cfg.train.max_steps
        return m is not None and self.global_step >= m

    def _check_finite(
        self, loss: torch.Tensor, epoch: int, step: int, steps: int, lr: float
    ) -> None:
        if self.world == 1:  # a float is cheaper than tensor ops per step
            if math.isfinite(float(loss)):
                return
        elif not bool(self.fabric.all_reduce((~torch.isfinite(loss)).float(), reduce_op="sum")):
            return
        last = self.ckpt_dir / files.LAST
        kept = (
            f"the last good checkpoint (epoch {self.saved_epoch}) is kept at {last}"
            if self.saved_epoch > 0
            else "no checkpoint was written yet"
        )
        msg = (
            f"training diverged: the loss became {float(loss)} in epoch {epoch + 1}/"
            f"{self.cfg.train.epochs}, step {step}/{steps} (lr {lr:g}); {kept}. Try a smaller "
            "optim.lr, or set train.grad_clip / train.grad_clip_norm"
        )
        if self.main:
            log.error(msg)
        raise TrainingDiverged(msg)

    def _sync_buffers(self) -> None:
        """Copy rank 0's buffers (BN statistics) to every process, so the checkpoint
        holds what was evaluated."""
        import torch.distributed as dist

        for b in self.raw_model.buffers():
            dist.broadcast(b, src=0)

    def _interrupt_message(self, epoch: int) -> str:
        last = self.ckpt_dir / files.LAST
        kept = (
            f"the last checkpoint (epoch {self.saved_epoch}) is kept at {last}"
            if self.saved_epoch > 0
            else "no checkpoint was written yet"
        )
        how = (
            f"stelab train {self.run_dir} --resume (Python: train(cfg, run_dir, resume=True))"
            if self.job is None
            else f"fit(..., run_dir={str(self.run_dir)!r}, resume=True)"
        )
        msg = (
            f"training interrupted in epoch {epoch + 1}/{self.cfg.train.epochs}; {kept}. "
            f"Resume with: {how}"
        )
        if self.main:
            log.warning(msg)
        return msg
