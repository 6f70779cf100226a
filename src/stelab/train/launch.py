"""Entry points: :func:`train` in one process, in processes it starts (DDP), or in
processes started by ``torchrun`` / ``fabric run``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..config import LoopConfig, TrainConfig, config_to_dict
from ..errors import ConfigError, DataError, StelabError, StelabTypeError
from . import files
from .loop import _Session
from .parts import TrainingDiverged, TrainingInterrupted, _quiet_lightning

__all__ = ["train"]


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
        with _quiet_lightning():
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
        return _Session(fabric, cfg, plan, progress).run()
    try:
        return ("ok", _Session(fabric, cfg, plan, progress).run())
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
