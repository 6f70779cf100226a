"""Building blocks of a run: model, optimizer, schedule, data, evaluation, contexts.

Each is usable on its own (e.g. ``build_model(cfg.model, 10, (1, 28, 28))``);
:func:`stelab.train.train` puts them together.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, OptimConfig, ScheduleConfig, TrainConfig
from ..errors import ConfigError, StelabError

log = logging.getLogger("stelab.train")

__all__ = [
    "TrainingDiverged",
    "TrainingInterrupted",
    "build_model",
    "build_optimizer",
    "classifier_step",
    "determinism",
    "quiet_lightning",
    "run_logging",
    "torch_threads",
    "build_scheduler",
    "check_single_row_batches",
    "evaluate",
    "load_data",
    "lr_factor",
    "num_steps",
    "shard_batches",
]


class TrainingDiverged(StelabError, FloatingPointError):
    """The training loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(KeyboardInterrupt):
    """Training was stopped by Ctrl-C; the last checkpoint is kept.

    A ``KeyboardInterrupt`` (so scripts still stop) whose message says how to resume.
    """

    def __init__(self, message: str, run_dir: Path | None = None, epoch: int | None = None):
        super().__init__(message)
        self.run_dir, self.epoch = run_dir, epoch

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "training interrupted"


# --- building blocks ----------------------------------------------------------------


def classifier_step(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, Any]:
    """The default training step of :func:`stelab.train.fit` and of :func:`train`:
    cross-entropy of ``model(x)`` against the labels ``y``; also the batch accuracy
    (``train_acc`` in metrics.csv)."""
    x, y = batch
    out = model(x)
    loss = F.cross_entropy(out.float(), y)
    return {"loss": loss, "acc": (out.detach().argmax(1) == y).double().mean()}


def build_model(
    mcfg: ModelConfig,
    num_classes: int,
    in_shape: tuple[int, ...],
    *,
    init_from: nn.Module | None = None,
) -> nn.Module:
    """The zoo model of ``[model]``; with ``init_from`` its float weights are copied in
    (:func:`stelab.models.transfer_weights`) *before* the weight quantizers are attached,
    so ``step = "auto"`` is computed from the copied weights."""
    from .. import models
    from ..nn import quantize

    act = None
    if mcfg.bits is not None:
        act = {
            "bits": mcfg.bits,
            "estimator": mcfg.estimator,
            "alpha": mcfg.alpha,
            "estimator_params": dict(mcfg.estimator_params),
        }
    kwargs: dict[str, Any] = {} if mcfg.width is None else {"width": mcfg.width}
    weights = dict(mcfg.weights) if isinstance(mcfg.weights, dict) else mcfg.weights
    try:
        model = models.build(
            mcfg.name,
            num_classes=num_classes,
            in_shape=tuple(in_shape),
            act=act,
            weights=None if init_from is not None else weights,
            **kwargs,
        )
    except TypeError as e:
        if isinstance(e, StelabError):
            raise
        raise ConfigError(f"model {mcfg.name!r} cannot be built from [model]: {e}") from None
    if init_from is not None:
        models.transfer_weights(init_from, model)
        if weights is not None:
            model = quantize(model, weights=weights, inplace=True)
    return model


def build_optimizer(ocfg: OptimConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov), Adam or AdamW from ``[optim]``."""
    params = list(params)
    if ocfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=ocfg.lr,
            momentum=ocfg.momentum,
            nesterov=ocfg.nesterov,
            weight_decay=ocfg.weight_decay,
        )
    cls = torch.optim.Adam if ocfg.name == "adam" else torch.optim.AdamW
    return cls(
        params, lr=ocfg.lr, betas=tuple(ocfg.betas), eps=ocfg.eps, weight_decay=ocfg.weight_decay
    )


def lr_factor(scfg: ScheduleConfig, epochs: int, epoch: int, base_lr: float) -> float:
    """The learning-rate multiplier during (0-based) ``epoch``.

    constant:  1
    multistep: gamma ** #{m in milestones : m <= epoch}   (lr drops after m epochs,
               as torch's MultiStepLR stepped once per epoch)
    cosine:    r + (1 - r) * (1 + cos(pi * epoch / epochs)) / 2, r = min_lr / base_lr
    """
    if scfg.name == "multistep":
        return scfg.gamma ** sum(1 for m in scfg.milestones if m <= epoch)
    if scfg.name == "cosine":
        r = scfg.min_lr / base_lr
        return r + (1 - r) * (1 + math.cos(math.pi * epoch / epochs)) / 2
    return 1.0


def build_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-epoch ``LambdaLR`` following :func:`lr_factor` (its state_dict is plain data)."""
    s, epochs, base = cfg.schedule, cfg.train.epochs, cfg.optim.lr
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: lr_factor(s, epochs, e, base))


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (in eval mode) on ``(x, y)``."""
    if len(x) == 0:
        raise ConfigError("evaluate needs at least one row, got an empty split")
    was = model.training
    model.eval()
    loss, correct = 0.0, 0
    try:
        for s in range(0, len(x), batch_size):
            out = model(x[s : s + batch_size])
            loss += float(F.cross_entropy(out.float(), y[s : s + batch_size], reduction="sum"))
            correct += int((out.argmax(1) == y[s : s + batch_size]).sum())
    finally:
        model.train(was)
    return loss / len(x), correct / len(x)


def load_data(cfg: TrainConfig, progress: bool = False) -> Any:
    """The dataset of ``[data]`` (see :func:`stelab.data.load`)."""
    from .. import data

    d = cfg.data
    kw: dict[str, Any] = {}
    if not d.standardize:
        kw["standardize"] = False
    splits = data.load(
        d.name,
        data_dir=d.data_dir,
        download=d.download,
        seed=d.seed,
        val_size=d.val_size,
        limit=d.limit,
        progress=progress,
        **kw,
    )
    if splits.num_classes is None:
        raise ConfigError(
            f"data.name = {d.name!r} has regression targets; the trainer fits classifiers "
            "(cross-entropy)"
        )
    return splits


def check_single_row_batches(
    cfg: TrainConfig, model: nn.Module, first_row: torch.Tensor, n: int, world: int
) -> None:
    """A ConfigError if a training batch would hold one row and the model's batch norm
    cannot normalise it (torch: "Expected more than 1 value per channel")."""
    b = cfg.data.batch_size
    sizes = {b // world} if world > 1 else {min(b, n), n % b or b}
    if 1 not in sizes or not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()
    ):
        return
    try:
        probe = copy.deepcopy(model).train()  # a copy: its BN statistics may change
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            probe(first_row)
    except Exception as e:
        if not (isinstance(e, ValueError) and "more than 1 value per channel" in str(e)):
            return  # not this problem: training reports it
        d = cfg.data
        limit = f" (data.limit = {d.limit})" if d.limit is not None else ""
        raise ConfigError(
            f"a training batch would hold a single row: {n} training rows{limit} with "
            f"data.batch_size = {b} and {world} process(es); model {cfg.model.name!r} "
            "has batch norm, which needs at least 2 rows per batch. Raise data.limit or "
            "choose a data.batch_size for which no batch has exactly one row"
        ) from None


def shard_batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    *,
    rank: int = 0,
    world: int = 1,
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of this process's mini-batches.

    ``order = randperm(N, generator)`` (drawn on CPU, the same on every process);
    global batch k is ``order[k·B : (k+1)·B]`` and process ``rank`` takes its
    ``rank``-th slice of ``B / world`` rows. With one process the last batch may be
    smaller; with several, an incomplete last batch is dropped (every process must
    take the same number of steps); ``drop_last`` drops it with one process too.
    """
    n = int(x.shape[0])
    order = torch.randperm(n, generator=generator)
    if order.device != x.device:
        order = order.to(x.device)
    per = batch_size // world
    stop = n if world == 1 and not drop_last else n - n % batch_size
    for start in range(0, stop, batch_size):
        lo = start + rank * per
        idx = order[lo : min(lo + per, n)]
        xb, yb = x.index_select(0, idx), y.index_select(0, idx)
        if augment is not None:
            xb = augment(xb)
        yield xb, yb


def num_steps(n: int, batch_size: int, world: int, drop_last: bool = False) -> int:
    """Optimizer steps per epoch of :func:`shard_batches`."""
    return math.ceil(n / batch_size) if world == 1 and not drop_last else n // batch_size


# --- contexts -----------------------------------------------------------------------


@contextlib.contextmanager
def determinism(on: bool) -> Iterator[None]:
    """``torch.use_deterministic_algorithms`` (and cuDNN's deterministic mode) while
    ``on``; the previous settings are restored on exit."""
    if not on:
        yield
        return
    prev = torch.are_deterministic_algorithms_enabled()
    prev_warn = torch.is_deterministic_algorithms_warn_only_enabled()
    prev_bench = torch.backends.cudnn.benchmark
    prev_det = torch.backends.cudnn.deterministic
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(prev, warn_only=prev_warn)
        torch.backends.cudnn.benchmark = prev_bench
        torch.backends.cudnn.deterministic = prev_det


@contextlib.contextmanager
def torch_threads(n: int | str | None) -> Iterator[None]:
    """Restore torch's thread count on exit; set ``n`` now when it is an integer (``"auto"``
    is resolved once the model exists: :func:`stelab.threads.resolve_threads`)."""
    prev = torch.get_num_threads()
    if isinstance(n, int) and not isinstance(n, bool):
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


@contextlib.contextmanager
def quiet_lightning() -> Iterator[None]:
    """Lightning Fabric's info messages off (warnings stay) for the block."""
    loggers = [logging.getLogger(n) for n in ("lightning.fabric", "lightning_fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover
            self.handleError(record)


class _RunLog(logging.Handler):
    """train.log: keeps the records until the run folder exists (:meth:`open`), then
    appends them and every later one to the file. A failed write (a full disk) raises a
    ConfigError naming the file, where logging's own handlers print a traceback and go on.
    """

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        self.pending: list[logging.LogRecord] = []
        self.stream: Any = None
        self.path: Path | None = None

    def open(self, path: Path) -> None:
        self.path = path
        try:
            self.stream = open(path, "a", encoding="utf-8")
        except OSError as e:
            self._fail(e)
        pending, self.pending = self.pending, []
        for record in pending:
            self.emit(record)

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:
            self.pending.append(record)
            return
        try:
            self.stream.write(self.format(record) + "\n")
            self.stream.flush()
        except OSError as e:
            self._fail(e)

    def _fail(self, e: OSError) -> None:
        stream, self.stream = self.stream, None
        if stream is not None:
            with contextlib.suppress(OSError):
                stream.close()
        self.pending = []
        log.removeHandler(self)  # the error is raised once, not again for its own message
        assert self.path is not None
        raise ConfigError(
            f"cannot write {str(self.path)!r} in the run directory (--out): "
            f"{e.strerror or e}; free some space or choose another output path (--out)"
        ) from None

    def close(self) -> None:
        if self.stream is not None:
            with contextlib.suppress(OSError):
                self.stream.close()
            self.stream = None
        super().close()


@contextlib.contextmanager
def run_logging(file: bool, console: bool) -> Iterator[_RunLog | None]:
    """Log ``stelab.train`` to the console and (``file``) to a :class:`_RunLog` whose
    file the caller opens once the run folder exists."""
    handlers: list[logging.Handler] = []
    runlog = _RunLog() if file else None
    if runlog is not None:
        handlers.append(runlog)
    if console:
        ch = _TqdmHandler()
        ch.setFormatter(logging.Formatter("%(message)s"))
        handlers.append(ch)
    prev = log.level
    log.setLevel(logging.INFO)
    for h in handlers:
        log.addHandler(h)
    try:
        yield runlog
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
        log.setLevel(prev)
