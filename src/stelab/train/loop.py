"""One process's part of a run: setup, the epoch loop, checkpoints, final metrics.

See :mod:`stelab.train` for the overview and the run-directory layout.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TrainConfig, config_to_dict
from ..errors import ConfigError, StelabError, StelabTypeError
from ..io import atomic_open, interrupts_deferred
from . import files
from .checkpoint import (
    FORMAT,
    check_state,
    load_checkpoint,
    model_from_checkpoint,
    numpy_rng_state,
    python_rng_state,
    set_numpy_rng_state,
    set_python_rng_state,
)
from .parts import (
    TrainingDiverged,
    TrainingInterrupted,
    build_model,
    build_optimizer,
    build_scheduler,
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


def _step(
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
        self.global_step = 0
        # fit's on_step rows; the sums of the step metrics and the steps since the last row
        self.step_history: list[dict[str, Any]] = []
        self.step_sums: dict[str, torch.Tensor] = {}
        self.step_seen = 0
        self.elapsed_before = 0.0
        self.t_start = time.perf_counter()

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
                lock = files.commit(self.plan, self.cfg, need_bytes=self._need_bytes())
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

    def _need_bytes(self) -> int:
        """About what the run folder needs on disk: last.pt (and best.pt), each with a
        second copy while it is replaced, plus 1 MiB for logs and metrics."""
        model = sum(v.numel() * v.element_size() for v in self.raw_model.state_dict().values())
        o = self.cfg.optim
        slots = 2 if o.name in ("adam", "adamw") else int(o.momentum > 0)
        files_kept = 2 if self.cfg.train.save_best else 1
        return model * (1 + slots) * (files_kept + 1) + 2**20

    def _check_single_row_batches(self, model: nn.Module, n: int) -> None:
        """A ConfigError if a training batch would hold one row and the model's batch norm
        cannot normalise it (torch: "Expected more than 1 value per channel")."""
        b, world = self.cfg.data.batch_size, self.world
        sizes = {b // world} if world > 1 else {min(b, n), n % b or b}
        if 1 not in sizes or not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
        ):
            return
        try:
            probe = copy.deepcopy(model).train()  # a copy: its BN statistics may change
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                probe(self.data.train.x[:1])
        except Exception as e:
            if not (isinstance(e, ValueError) and "more than 1 value per channel" in str(e)):
                return  # not this problem: training reports it
            d = self.cfg.data
            limit = f" (data.limit = {d.limit})" if d.limit is not None else ""
            raise ConfigError(
                f"a training batch would hold a single row: {n} training rows{limit} with "
                f"data.batch_size = {b} and {world} process(es); model {self.cfg.model.name!r} "
                "has batch norm, which needs at least 2 rows per batch. Raise data.limit or "
                "choose a data.batch_size for which no batch has exactly one row"
            ) from None

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
            self._check_single_row_batches(model, n)
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
            self._restore(ckpt)
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

    def _restore(self, ckpt: dict[str, Any]) -> None:
        self.epoch = int(ckpt["epoch"])
        self.global_step = int(ckpt.get("global_step", 0))
        self.step_history = [dict(r) for r in ckpt.get("step_history", [])]
        self.step_sums = {k: v.clone() for k, v in ckpt.get("step_sums", {}).items()}
        self.step_seen = int(ckpt.get("step_seen", 0))
        self.history = [dict(r) for r in ckpt.get("history", [])]
        self.best = dict(ckpt.get("best", self.best))
        self.elapsed_before = float(ckpt.get("elapsed_s", 0.0))
        rng = ckpt.get("rng", {})
        saved_world = int(ckpt.get("world_size", 1))
        if "shuffle" in rng:
            self.shuffle_gen.set_state(rng["shuffle"])
        for name, gen in self.generators.items():
            if name not in rng.get("streams", {}):
                raise ConfigError(
                    f"the checkpoint {self.resume_from!r} has no state of the generator "
                    f"{name!r} (it has: {sorted(rng.get('streams', {}))}); resume with the "
                    "generators of the run that wrote it"
                )
            gen.set_state(rng["streams"][name])
        if saved_world == self.world:
            if rng.get("torch"):
                torch.set_rng_state(rng["torch"][self.rank])
            if rng.get("numpy"):
                set_numpy_rng_state(rng["numpy"][self.rank])
            if rng.get("python"):
                set_python_rng_state(rng["python"][self.rank])
            if rng.get("augment"):
                self.aug_gen.set_state(rng["augment"][self.rank])
            if rng.get("cuda") and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"][self.rank], self.fabric.device)
        elif self.main:
            log.warning(
                "resuming with %d processes from a checkpoint written by %d: the run continues "
                "but is not bit-identical to an uninterrupted one",
                self.world,
                saved_world,
            )

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
            raise TrainingInterrupted(msg, self.run_dir, self.epoch) from None
        return self._finish()

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
                loss, metrics = _step(self, batch)
                self.global_step += 1
                rows = len(batch[1])
                for k, v in {"loss": loss, **metrics}.items():
                    v = torch.as_tensor(v, device=dev).detach().double().reshape(())
                    sums[k] = sums.get(k, torch.zeros((), dtype=torch.float64, device=dev))
                    sums[k] += v * rows
                    if hook is not None:
                        self.step_sums[k] = self.step_sums.get(k, torch.zeros_like(sums[k]))
                        self.step_sums[k] += v
                seen += rows
                self.step_seen += 1
                stop = self._max_steps_reached()
                if (i + 1) % check_every == 0 or i + 1 == steps or stop:
                    self._check_finite(loss, epoch, i + 1, steps, lr)
                if hook is not None:
                    last = stop or (epoch + 1 == t.epochs and i + 1 == steps)
                    if last or self.global_step % self.job.every_n_steps == 0:
                        self._step_row(hook, epoch)
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
            val = self._validate(self.data.val)
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
        self._save(best=improved and t.save_best)
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
            self._tensorboard(row)

    def _max_steps_reached(self) -> bool:
        m = self.cfg.train.max_steps
        return m is not None and self.global_step >= m

    def _step_row(self, hook: OnStep, epoch: int) -> None:
        """Append fit's row for this step: the means of the step metrics over the steps
        since the last row (``train_<name>``) and what ``on_step`` returns."""
        n = max(self.step_seen, 1)
        row = {"step": self.global_step, "epoch": epoch + 1}
        row.update({f"train_{k}": float(v / n) for k, v in self.step_sums.items()})
        out = hook(self.global_step, self.raw_model)
        if out is not None and not isinstance(out, Mapping):
            raise StelabTypeError(
                f"on_step must return None or a dict of floats, got {type(out).__name__}"
            )
        row.update({str(k): None if v is None else float(v) for k, v in (out or {}).items()})
        self.step_history.append(row)
        self.step_sums, self.step_seen = {}, 0

    def _check_finite(
        self, loss: torch.Tensor, epoch: int, step: int, steps: int, lr: float
    ) -> None:
        bad = ~torch.isfinite(loss)
        if self.world > 1:
            bad = self.fabric.all_reduce(bad.float(), reduce_op="sum") > 0
        if not bool(bad):
            return
        last = self.ckpt_dir / files.LAST
        kept = (
            f"the last good checkpoint (epoch {self.epoch}) is kept at {last}"
            if self.epoch > 0
            else "no checkpoint was written (it diverged in the first epoch)"
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

    @torch.no_grad()
    def _validate(self, split: Any) -> dict[str, Any]:
        """The metrics of ``split``: ``{"loss", "acc"}`` of the classifier (every process
        a share), or what the job's ``evaluate`` returns; ``{}`` for an empty split, and
        for a custom step without ``evaluate``."""
        if len(split) == 0:
            return {}
        if self.job is None or (self.job.evaluate is None and self.job.step is classifier_step):
            loss, acc = self._evaluate(split)
            return {"loss": loss, "acc": acc}
        if self.job.evaluate is None:
            return {}
        module = self.raw_model
        was = module.training
        module.eval()
        try:
            out = self.job.evaluate(module, split)
        finally:
            module.train(was)
        if not isinstance(out, Mapping):
            raise StelabTypeError(
                f"evaluate must return a dict of floats (e.g. {{'loss': ..., 'acc': ...}}), "
                f"got {type(out).__name__}"
            )
        return {str(k): None if v is None else float(v) for k, v in out.items()}

    @torch.no_grad()
    def _evaluate(self, split: Any) -> tuple[float | None, float | None]:
        """Loss and accuracy on ``split``, each process taking a contiguous share."""
        n = len(split)
        if n == 0:
            return None, None
        f, module = self.fabric, self.raw_model
        lo, hi = n * self.rank // self.world, n * (self.rank + 1) // self.world
        x, y = split.x[lo:hi], split.y[lo:hi]
        dev = f.device
        was = module.training
        module.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        bs = self.cfg.data.eval_batch_size
        convert = f.strategy.precision.convert_input
        try:
            with f.autocast():
                for s in range(0, hi - lo, bs):
                    xb = convert(x[s : s + bs].to(dev))
                    yb = y[s : s + bs].to(dev)
                    out = module(xb).float()
                    loss_sum += F.cross_entropy(out, yb, reduction="sum").double()
                    correct += (out.argmax(1) == yb).sum()
        finally:
            module.train(was)
        tot = torch.stack([loss_sum, correct.double()])
        if self.world > 1:
            tot = f.all_reduce(tot, reduce_op="sum")
        return float(tot[0]) / n, float(tot[1]) / n

    # -- checkpoints and outputs --

    def _gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """``t`` of every process (a collective under DDP), on CPU."""
        if self.world == 1:
            return [t.clone()]
        import torch.distributed as dist

        t = t.to(self.fabric.device)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        return [o.cpu() for o in out]

    def _state(self) -> dict[str, Any]:
        rng: dict[str, Any] = {
            "torch": self._gather(torch.get_rng_state()),
            "shuffle": self.shuffle_gen.get_state(),
            "augment": self._gather(self.aug_gen.get_state()),
            "numpy": self._gather(numpy_rng_state()),
            "python": self._gather(python_rng_state()),
        }
        if self.generators:
            rng["streams"] = {k: g.get_state() for k, g in self.generators.items()}
        if self.fabric.device.type == "cuda":
            rng["cuda"] = self._gather(torch.cuda.get_rng_state(self.fabric.device))
        state = {
            "format": FORMAT,
            "epoch": self.epoch,
            "global_step": self.global_step,
            "model": {k: v.detach().cpu() for k, v in self.raw_model.state_dict().items()},
            "model_args": self.model_args,
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": rng,
            "config": config_to_dict(self.cfg),
            "history": [dict(r) for r in self.history],
            "best": dict(self.best),
            "elapsed_s": self.elapsed_before + (time.perf_counter() - self.t_start),
            "world_size": self.world,
            "threads": self.threads,
        }
        if self.model_args is None:
            del state["model_args"]
        if self.job is not None and self.job.on_step is not None:
            state["step_history"] = [dict(r) for r in self.step_history]
            state["step_sums"] = {k: v.detach().cpu() for k, v in self.step_sums.items()}
            state["step_seen"] = self.step_seen
        return state

    def _save(self, best: bool) -> None:
        state = self._state()  # collective under DDP: every process takes part
        if self.main:
            # the checkpoint and metrics.csv describe the same epoch, even after a Ctrl-C
            with files.writing(self.run_dir), interrupts_deferred():
                for name in (files.LAST, files.BEST) if best else (files.LAST,):
                    with atomic_open(self.ckpt_dir / name, "wb") as fh:
                        torch.save(state, fh)
                files.write_metrics_csv(self.run_dir, self.history)
        self.fabric.barrier()

    def _tensorboard(self, row: dict[str, Any]) -> None:
        if not hasattr(self, "_tb"):
            self._tb = None
            import importlib.util

            if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
                try:
                    from lightning.fabric.loggers import TensorBoardLogger

                    self._tb = TensorBoardLogger(
                        root_dir=str(self.run_dir), name="tensorboard", version=""
                    )
                except Exception as e:  # pragma: no cover - optional dependency
                    log.warning("TensorBoard logging is off: %s", e)
        if self._tb is not None:
            metrics = {k: v for k, v in row.items() if k != "epoch" and v is not None}
            self._tb.log_metrics(metrics, step=int(row["epoch"]))

    def _ranks_in_sync(self) -> bool | None:
        if self.world == 1:
            return None
        flat = torch.cat([p.detach().reshape(-1).double() for p in self.raw_model.parameters()])
        g = self._gather(flat)
        return all(torch.equal(g[0], g[i]) for i in range(1, self.world))

    def _finish(self) -> dict[str, Any]:
        cfg = self.cfg
        test = self._validate(self.data.test)
        test_loss, test_acc = test.get("loss"), test.get("acc")
        in_sync = self._ranks_in_sync()
        last_val = next((r for r in reversed(self.history) if r.get("val_acc") is not None), {})
        final = self.history[-1] if self.history else {}
        metrics = {
            "name": cfg.name or self.run_dir.name,
            "epochs": self.epoch,
            "final_train_loss": final.get("train_loss"),
            "final_train_acc": final.get("train_acc"),
            "final_val_loss": last_val.get("val_loss"),
            "final_val_acc": last_val.get("val_acc"),
            "best_val_acc": self.best["val_acc"],
            "best_epoch": self.best["epoch"],
            "test_loss": test_loss,
            "test_acc": test_acc,
            "wall_time_s": self.elapsed_before + (time.perf_counter() - self.t_start),
            "train_seconds": sum(float(r.get("train_seconds") or 0.0) for r in self.history),
            "world_size": self.world,
            "ranks_in_sync": in_sync,
            "device": str(self.fabric.device),
        }
        if self.job is not None and self.job.on_step is not None:
            metrics["steps"] = [dict(r) for r in self.step_history]
        if self.main:
            with files.writing(self.run_dir):
                files.write_json(self.run_dir / files.METRICS_JSON, metrics)
            tacc = "n/a" if test_acc is None else f"{test_acc:.4f}"
            log.info(
                "finished %d epochs in %.1f s: test acc %s, best val acc %s (epoch %s); %s",
                self.epoch,
                metrics["wall_time_s"],
                tacc,
                "n/a" if self.best["val_acc"] is None else f"{self.best['val_acc']:.4f}",
                self.best["epoch"],
                self.run_dir,
            )
            if getattr(self, "_tb", None) is not None:
                self._tb.finalize("success")
        self.fabric.barrier()
        return metrics

    def _interrupt_message(self, epoch: int) -> str:
        last = self.ckpt_dir / files.LAST
        kept = (
            f"the last checkpoint (epoch {self.epoch}) is kept at {last}"
            if self.epoch > 0
            else "no epoch had finished, so there is no checkpoint yet"
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
