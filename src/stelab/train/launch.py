"""Entry points: :func:`train` in one process, in processes it starts (DDP), or in
processes started by ``torchrun`` / ``fabric run``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import (
    DataConfig,
    LoopConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
    config_to_dict,
    parse_config,
)
from ..errors import ConfigError, DataError, StelabError, StelabTypeError, check_int
from . import files
from .loop import Evaluate, Job, OnStep, Session, Step
from .parts import TrainingDiverged, TrainingInterrupted, classifier_step, quiet_lightning

__all__ = ["fit", "train"]


def _external_launcher() -> bool:
    """Whether processes were started by torchrun / ``fabric run`` / a cluster launcher."""
    env = os.environ
    return bool(
        env.get("TORCHELASTIC_RUN_ID")
        or env.get("LT_CLI_USED")
        or ("LOCAL_RANK" in env and "WORLD_SIZE" in env and int(env["WORLD_SIZE"]) > 1)
    )


def _fabric(t: LoopConfig, external: bool) -> Any:
    from lightning.fabric import Fabric
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    kw: dict[str, Any] = {
        "accelerator": t.accelerator,
        "devices": t.devices,
        "precision": t.precision,
    }
    if external:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if local != t.devices:
            raise ConfigError(
                f"train.devices = {t.devices} but the launcher started {local} processes per "
                f"node; pass --devices {local}"
            )
        kw["num_nodes"] = max(1, world // local)
        kw["strategy"] = "ddp" if world > 1 else "auto"
    elif t.devices == 1:
        kw["strategy"] = "auto"
    else:
        kw["strategy"] = _spawn_strategy(t.accelerator)
    try:
        with quiet_lightning():
            return Fabric(**kw)
    except (ValueError, RuntimeError, TypeError, MisconfigurationException) as e:
        raise ConfigError(
            f"cannot set up train.accelerator = {t.accelerator!r} with train.devices = "
            f"{t.devices} (precision {t.precision!r}): {' '.join(str(e).split())}"
        ) from None


def _spawn_strategy(accelerator: str) -> Any:
    """DDP with processes started here: from a fork server on CPU (which imports torch
    and stelab once, then forks clean workers: fast to start, safe with OpenMP), by
    spawning where a GPU may be used (CUDA cannot be forked)."""
    import multiprocessing

    from lightning.fabric.strategies import DDPStrategy

    cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if not cpu or "forkserver" not in multiprocessing.get_all_start_methods():
        return "ddp_spawn"
    from multiprocessing import forkserver

    if getattr(forkserver._forkserver, "_forkserver_pid", None) is None:
        multiprocessing.set_forkserver_preload(["stelab.train.loop"])
    return DDPStrategy(start_method="forkserver")


_ERRORS: dict[str, type[BaseException]] = {
    c.__name__: c for c in (ConfigError, StelabTypeError, DataError, TrainingDiverged, StelabError)
}


def _worker(
    fabric: Any,
    cfg: TrainConfig | dict[str, Any],
    plan: files.Plan,
    progress: bool,
    capture: bool,
) -> Any:
    """The function every process runs (module level, so it can be sent to spawned
    processes; they get the config as plain data)."""
    from ..plugins import import_from_env

    import_from_env()  # user estimators/models named by --import / STELAB_IMPORT (spawned workers)
    if not isinstance(cfg, TrainConfig):
        from ..config import parse_config

        cfg = parse_config(cfg)
    if not capture:
        return Session(fabric, cfg, plan, progress).run()
    try:
        return ("ok", Session(fabric, cfg, plan, progress).run())
    except TrainingInterrupted as e:
        return ("interrupted", "TrainingInterrupted", str(e))
    except StelabError as e:
        return ("error", type(e).__name__, str(e))


def _unpack(out: Any, run_dir: Path) -> dict[str, Any]:
    status = out[0]
    if status == "ok":
        return out[1]
    if status == "interrupted":
        raise TrainingInterrupted(out[2], run_dir)
    raise _ERRORS.get(out[1], StelabError)(out[2])


def train(
    cfg: TrainConfig,
    run_dir: str | os.PathLike[str],
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the model of ``cfg`` and write the run directory ``run_dir``; returns the metrics.

    Args:
        cfg: a validated config (:func:`stelab.config.load_config`).
        run_dir: where the run is written (see :mod:`stelab.train`). An existing,
            non-empty directory is refused unless ``resume`` or ``overwrite``.
        resume: continue from ``run_dir/checkpoints/last.pt`` (bit-identical on CPU to a
            run that was never stopped). The config may change only in
            ``train.epochs`` and a few other keys (see ``files.RESUMABLE_CHANGES``).
        overwrite: start over in ``run_dir``, a folder stelab marked as its run directory:
            the files the earlier run wrote are removed (only those; a user's own files
            stay), after this run's config, data and model were set up.
        progress: progress bars (on a terminal) and one line per epoch on stderr.

    Returns:
        The final metrics (also written to ``metrics.json``): ``final_val_acc``,
        ``best_val_acc``, ``best_epoch``, ``test_acc``, ``test_loss``,
        ``final_train_loss``, ``wall_time_s``, ``epochs``, ...

    Raises:
        ConfigError: a bad run directory, an unwritable path, a checkpoint that does
            not fit the model, an impossible device setup.
        TrainingDiverged: the loss became NaN/inf (the last good checkpoint is kept).
        TrainingInterrupted: Ctrl-C (a ``KeyboardInterrupt``; the message says how to
            resume).

    With ``train.devices = N > 1`` the run uses N processes (DDP; gloo on CPU): they
    are spawned here, or, when the script was started by ``torchrun`` /
    ``fabric run`` with N processes per node, each of those processes calls
    :func:`train` and they join one process group.
    """
    if not isinstance(cfg, TrainConfig):
        raise StelabTypeError(
            f"cfg must be a stelab.config.TrainConfig (see load_config), got {type(cfg).__name__}"
        )
    run_dir = Path(run_dir)
    if _external_launcher():
        return _train_external(cfg, run_dir, resume, overwrite, progress)
    # read-only checks first; the folder is created only after the run is set up (loop.py)
    plan = files.plan_run(run_dir, cfg, resume=resume, overwrite=overwrite)
    fabric = _fabric(cfg.train, external=False)  # a bad device setup fails before any file
    args = (plan, progress)
    if cfg.train.devices == 1:
        return fabric.launch(_worker, cfg, *args, False)
    try:
        out = fabric.launch(_worker, config_to_dict(cfg), *args, True)
    except KeyboardInterrupt:
        raise TrainingInterrupted(
            f"training interrupted; the last finished epoch's checkpoint is kept in "
            f"{run_dir / files.CKPT_DIR}. Resume with: stelab train {run_dir} --resume",
            run_dir,
        ) from None
    return _unpack(out, run_dir)


def _train_external(
    cfg: TrainConfig, run_dir: Path, resume: bool, overwrite: bool, progress: bool
) -> dict[str, Any]:
    fabric = _fabric(cfg.train, external=True)
    if not os.environ.get("LT_CLI_USED"):
        fabric.launch()
    err, plan = None, None
    if fabric.global_rank == 0:
        try:
            plan = files.plan_run(run_dir, cfg, resume=resume, overwrite=overwrite)
        except StelabError as e:
            err = (type(e).__name__, str(e))
    err, plan = fabric.broadcast((err, plan), src=0)
    if err is not None:
        raise _ERRORS.get(err[0], StelabError)(err[1])
    return _worker(fabric, cfg, plan, progress, False)


def fit(
    model: nn.Module,
    data: Any,
    *,
    epochs: int | None = None,
    run_dir: str | os.PathLike[str] | None = None,
    step: Step = classifier_step,
    evaluate: Evaluate | None = None,
    optimizer: OptimConfig | None = None,
    schedule: ScheduleConfig | None = None,
    batch_size: int = 64,
    eval_batch_size: int = 1000,
    augment: str = "none",
    seed: int = 0,
    shuffle_seed: int | None = None,
    augment_seed: int | None = None,
    threads: int | str = "auto",
    grad_clip: float | None = None,
    grad_clip_norm: float | None = None,
    eval_every: int = 1,
    save_best: bool = True,
    deterministic: bool = False,
    accelerator: str = "cpu",
    generators: Mapping[str, torch.Generator] | None = None,
    param_groups: list[dict[str, Any]] | None = None,
    on_epoch: Callable[[dict[str, Any]], Any] | None = None,
    max_steps: int | None = None,
    drop_last: bool = False,
    on_step: OnStep | None = None,
    every_n_steps: int = 1,
    checkpoint_every: int = 1,
    name: str = "",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Train a model you built with your own training step; the same loop, checkpoints,
    resume and run folder as :func:`train`, in one process.

    Args:
        model: the module to train (trained in place; on resume its weights are replaced
            by the checkpoint's).
        data: a :class:`stelab.data.Splits`; its ``train`` split is shuffled and batched
            (``batch_size`` rows, the shuffling generator seeded by ``seed``), ``val``
            is evaluated every ``eval_every`` epochs and ``test`` at the end (either may
            be empty).
        epochs: epochs in all (a resumed run continues up to this many); None: as many as
            ``max_steps`` needs.
        run_dir: the run folder (layout as :func:`train`); None: a temporary folder,
            removed at the end (no resume).
        step: ``step(model, (x, y))`` returns the loss, a scalar tensor, or a dict with
            ``"loss"`` and other scalar batch means (logged per epoch as
            ``train_<name>``). The trainer does ``zero_grad``, ``backward``, clipping and
            the optimizer step. Default :func:`classifier_step` (cross-entropy;
            ``train_acc``).
        evaluate: ``evaluate(model, split)`` (model in eval mode, under ``no_grad``)
            returns a dict of floats: ``"loss"`` and ``"acc"`` become
            ``val_loss``/``val_acc`` (``acc`` chooses best.pt), other keys ``val_<name>``.
            Default: cross-entropy and accuracy for :func:`classifier_step`, no
            validation for other steps.
        optimizer, schedule: :class:`~stelab.config.OptimConfig` (SGD/Adam/AdamW, lr,
            momentum, weight decay, betas, ...) and
            :class:`~stelab.config.ScheduleConfig` (per epoch); defaults as ``[optim]``
            and ``[schedule]``.
        generators: random generators the step draws from (e.g. an SBN's noise):
            checkpointed by name and restored on resume, like torch's, numpy's and
            Python's global RNGs, which the loop always keeps.
        shuffle_seed, augment_seed: seeds of the generators of the data order and of
            ``augment`` (checkpointed either way); None: derived from ``seed`` as in
            :func:`train`. For a caller whose own loop seeded them differently, so that
            moving onto ``fit`` keeps its numbers.
        param_groups: the optimizer's parameter groups in torch's format (e.g.
            ``[{"params": weights, "lr": 0.01}, {"params": rest}]``; a group without
            ``"lr"`` takes ``optimizer.lr``; the schedule scales every group); None:
            every parameter of ``model`` in one group.
        on_epoch: called with each epoch's metrics row (as in metrics.csv) after its
            checkpoint, if it has one, is written.
        max_steps: stop after this many optimizer steps in all, inside an epoch if need
            be (as Lightning's ``Trainer(max_steps=...)``; training ends at ``epochs`` or
            ``max_steps``, whichever comes first). The epoch it stops in is cut short:
            its row, validation and checkpoint follow as after a full epoch.
        drop_last: leave out the last batch of an epoch when it has fewer than
            ``batch_size`` rows (as a DataLoader's ``drop_last``).
        on_step: ``on_step(step, model)`` after optimizer step ``step`` (1, 2, ... over
            the whole run) when ``step`` is a multiple of ``every_n_steps``, and after the
            last step. It may return a dict of floats (e.g. a test accuracy), logged
            in that step's row: ``{"step", "epoch", "train_<name>": the mean of the step
            metrics over the steps since the previous row, **returned}``. The rows are returned (and
            written to metrics.json) as ``"steps"``, and kept in the checkpoints.
            Checkpoints are written at epoch ends only, so a resumed run repeats the
            steps after the last one, and ``on_step`` is called for them again; the
            rows, like everything else, equal those of a run that never stopped.
        checkpoint_every: write last.pt (and metrics.csv) after every this many epochs,
            after the last epoch, and whenever best.pt is written; 1: after every epoch.
            Each checkpoint holds the whole history, so a long run of short epochs
            spends less time writing with a larger value. A resumed run repeats the
            epochs after the last checkpoint (``on_epoch`` is called for them again)
            and ends as a run that never stopped.
        resume, overwrite, progress: as for :func:`train`. ``batch_size`` ...
            ``accelerator``: the keys of ``[data]`` and ``[train]`` of the same names.

    Returns:
        The final metrics (as :func:`train`; ``metrics.json``).

    The run's config.toml holds ``[optim]``, ``[schedule]``, ``[train]`` and the batch
    keys of ``[data]`` as given here; its ``[model]`` and ``[data]`` names are the
    defaults and do not describe ``model`` and ``data`` (the checkpoint holds no
    ``model_args``: load it with ``load_model(run_dir, model)``).
    """
    from ..data import Splits

    if not isinstance(model, nn.Module):
        raise StelabTypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(data, Splits):
        raise StelabTypeError(
            f"data must be a stelab.data.Splits (train/val/test), got {type(data).__name__}"
        )
    for what, fn in (
        ("step", step),
        ("evaluate", evaluate),
        ("on_epoch", on_epoch),
        ("on_step", on_step),
    ):
        if fn is not None and not callable(fn):
            raise StelabTypeError(f"{what} must be callable, got {type(fn).__name__}")
    gens = dict(generators or {})
    for k, g in gens.items():
        if not isinstance(k, str) or not isinstance(g, torch.Generator):
            raise StelabTypeError(
                f"generators must map names (str) to torch.Generator, got {k!r}: {type(g).__name__}"
            )
    if param_groups is not None and (
        not isinstance(param_groups, (list, tuple))
        or not all(isinstance(g, Mapping) and "params" in g for g in param_groups)
    ):
        raise StelabTypeError(
            "param_groups must be a list of dicts with 'params' (torch's parameter groups), "
            f"got {param_groups!r:.80}"
        )
    for what, obj, cls in (
        ("optimizer", optimizer, OptimConfig),
        ("schedule", schedule, ScheduleConfig),
    ):
        if obj is not None and not isinstance(obj, cls):
            raise StelabTypeError(
                f"{what} must be a stelab.config.{cls.__name__}, got {type(obj).__name__}"
            )
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 1:
        raise ConfigError(f"every_n_steps must be an integer >= 1, got {every_n_steps!r}")
    checkpoint_every = check_int("checkpoint_every", checkpoint_every, 1, 2**31)
    if epochs is None:
        epochs = _epochs_for(max_steps, len(data.train), batch_size, drop_last)
    raw = TrainConfig(
        name=name,
        data=DataConfig(
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            augment=augment,
            drop_last=drop_last,
        ),
        optim=optimizer or OptimConfig(),
        schedule=schedule or ScheduleConfig(),
        train=LoopConfig(
            epochs=epochs,
            seed=seed,
            deterministic=deterministic,
            accelerator=accelerator,
            threads=threads,
            grad_clip=grad_clip,
            grad_clip_norm=grad_clip_norm,
            eval_every=eval_every,
            save_best=save_best,
            max_steps=max_steps,
        ),
    )
    if shuffle_seed is not None:
        shuffle_seed = check_int("shuffle_seed", shuffle_seed, 0, 2**64 - 1)
    if augment_seed is not None:
        augment_seed = check_int("augment_seed", augment_seed, 0, 2**64 - 1)
    cfg = parse_config(config_to_dict(raw))  # the checks of load_config, naming the key
    groups = None if param_groups is None else [dict(g) for g in param_groups]
    job = Job(
        model, data, step, evaluate, gens, on_epoch, groups,
        on_step=on_step, every_n_steps=every_n_steps, checkpoint_every=checkpoint_every,
        shuffle_seed=shuffle_seed, augment_seed=augment_seed,
    )  # fmt: skip
    if run_dir is None:
        import tempfile

        if resume:
            raise ConfigError("resume=True needs the run_dir of the run to continue")
        with tempfile.TemporaryDirectory(prefix="stelab-fit-") as tmp:
            return _fit(cfg, job, Path(tmp) / "run", False, False, progress)
    return _fit(cfg, job, Path(run_dir), resume, overwrite, progress)


def _epochs_for(max_steps: Any, n: int, batch_size: Any, drop_last: bool) -> Any:
    """The epochs ``max_steps`` steps take (fit's ``epochs=None``); bad values are left
    for parse_config to name."""
    if max_steps is None:
        raise ConfigError(
            "fit needs epochs, or max_steps (then epochs=None runs as many as it needs)"
        )
    if not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in (max_steps, batch_size)
    ):
        return 1
    per_epoch = n // batch_size if drop_last else -(-n // batch_size)
    return max(1, -(-max_steps // max(per_epoch, 1)))


def _fit(
    cfg: TrainConfig, job: Job, run_dir: Path, resume: bool, overwrite: bool, progress: bool
) -> dict[str, Any]:
    plan = files.plan_run(run_dir, cfg, resume=resume, overwrite=overwrite)
    fabric = _fabric(cfg.train, external=False)
    return fabric.launch(lambda f: Session(f, cfg, plan, progress, job).run())
