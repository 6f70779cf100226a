"""One SBN training run of the [S20] learning protocol: :class:`SBNTrainConfig`,
:func:`train_sbn` (the training) and :func:`evaluate_sbn` (evaluation by sampling).

:func:`train_sbn` trains through :func:`stelab.train.fit`, the loop of every stelab
training (checkpoints, bit-identical resume): an SBN's forward pass samples hard states
with no gradient, so its training step is the estimator's surrogate loss
(``surrogate_loss``), with the SBN's noise drawn from a named, checkpointed generator.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ...errors import ConfigError, StelabTypeError, check_int, check_positive

__all__ = ["PRESETS", "SBNTrainConfig", "evaluate_sbn", "train_sbn"]


@dataclass(frozen=True)
class SBNTrainConfig:
    """One SBN training run ([S20] learning protocol); every field is validated.

    The protocol is described in docs/papers/psa2020.md.

    Attributes:
        dataset: a :func:`stelab.data.load` name (digits, fashion-mnist, mnist, cifar10).
        limit: keep at most this many training rows (None: all).
        val_size: validation rows carved from the training data (None: loader default).
        test_limit: evaluate on at most this many test rows (None: all).
        channels: the widths (96, 192) of :func:`stelab.sbn.sbn_conv8`, scaled down.
        padding: padding of the 3x3 convolutions (0 in the paper; 1 for 8x8 inputs).
        estimator: an estimator spec (``psa``, ``dst``, ``concrete:tau=1``, ...).
        samples: noise samples per example and step (1 in the paper).
        epochs, batch_size, lr, momentum, nesterov: SGD (Nesterov momentum 0.9, batch 64).
        schedule: ``constant`` or ``cosine`` (per epoch, to 0).
        grad_clamp: element-wise gradient clamp (1e3 in the paper; None: off).
        augment: random flip + crop(pad 4) per batch (CIFAR-10).
        init_rows: rows of the data-dependent init (:func:`stelab.sbn.data_init`).
        eval_samples: samples of the averaged prediction (10 in the paper).
        eval_batch: rows per evaluation batch.
        seed: init, shuffling, augmentation and noise.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        max_steps: stop after this many SGD steps in all, inside an epoch if need be
            (training ends at ``epochs`` or ``max_steps``, whichever comes first, and is
            validated then); None: whole epochs.
    """

    dataset: str = "digits"
    limit: int | None = None
    val_size: int | None = None
    test_limit: int | None = None
    channels: tuple[int, int] = (16, 32)
    padding: int = 1
    estimator: str = "psa"
    samples: int = 1
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    schedule: str = "constant"
    grad_clamp: float | None = 1e3
    augment: bool = False
    init_rows: int = 512
    eval_samples: int = 10
    eval_batch: int = 500
    seed: int = 0
    device: str = "auto"
    max_steps: int | None = None

    def __post_init__(self) -> None:
        for name in ("limit", "val_size", "test_limit", "max_steps"):
            v = getattr(self, name)
            if v is not None:
                check_int(name, v, 0 if name == "val_size" else 1, 2**40)
        if not isinstance(self.channels, (tuple, list)) or len(self.channels) != 2:
            raise ConfigError(f"channels must be a pair of ints, got {self.channels!r}")
        for i, c in enumerate(self.channels):
            check_int(f"channels[{i}]", c, 1, 4096)
        check_int("padding", self.padding, 0, 16)
        check_int("samples", self.samples, 1, 2**20)
        check_int("epochs", self.epochs, 1, 10**6)
        check_int("batch_size", self.batch_size, 1, 2**24)
        check_positive("lr", self.lr)
        if not 0 <= float(self.momentum) < 1:
            raise ConfigError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ConfigError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if self.grad_clamp is not None:
            check_positive("grad_clamp", self.grad_clamp)
        check_int("init_rows", self.init_rows, 1, 2**24)
        check_int("eval_samples", self.eval_samples, 1, 10**4)
        check_int("eval_batch", self.eval_batch, 1, 2**24)
        check_int("seed", self.seed, 0, 2**63 - 1)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {self.device!r}")
        from ...analysis import parse_estimator

        parse_estimator(self.estimator)  # a bad name fails here, with the closest match


#: ready-made configurations; ``cifar10`` is the paper's
PRESETS: dict[str, SBNTrainConfig] = {
    "digits-quick": SBNTrainConfig(dataset="digits", channels=(16, 32), padding=1, epochs=10),
    "fashion-mnist": SBNTrainConfig(
        dataset="fashion-mnist",
        limit=10_000,
        val_size=2000,
        channels=(16, 32),
        padding=0,
        epochs=5,
    ),
    "cifar10": SBNTrainConfig(
        dataset="cifar10",
        val_size=5000,
        channels=(96, 192),
        padding=0,
        epochs=300,
        augment=True,
        schedule="cosine",
    ),
}


def _ce(eta: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(eta, t, reduction="none")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


@torch.no_grad()
def evaluate_sbn(
    model: Any,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    samples: int = 10,
    batch: int = 500,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Evaluation by sampling ([S20] §5): for every row, ``samples`` forward passes.

    ``acc1``: accuracy of the first sample's argmax; ``acc_avg``: accuracy of the argmax
    of the averaged prediction ``mean_s softmax(eta_s)``; ``nll_avg``: its mean negative
    log-likelihood.
    """
    if len(x) == 0:
        return {"acc1": math.nan, "acc_avg": math.nan, "nll_avg": math.nan}
    dev = next(model.parameters()).device
    c1 = ca = 0
    nll = 0.0
    for s in range(0, len(x), batch):
        xb, yb = x[s : s + batch].to(dev), y[s : s + batch].to(dev)
        eta = model.sample_outputs(xb, samples, generator)  # (S, B, C)
        c1 += int((eta[0].argmax(-1) == yb).sum())
        p = torch.softmax(eta.float(), -1).mean(0)
        ca += int((p.argmax(-1) == yb).sum())
        nll += float(-torch.log(p.gather(1, yb[:, None]).clamp_min(1e-12)).sum())
    n = len(x)
    return {"acc1": c1 / n, "acc_avg": ca / n, "nll_avg": nll / n}


def train_sbn(
    cfg: SBNTrainConfig,
    data: Any = None,
    *,
    progress: bool = False,
    log: Callable[[str], Any] | None = None,
    evaluate_test: bool = True,
    run_dir: str | Path | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Train ``sbn_conv8`` with ``cfg.estimator`` and evaluate it by sampling.

    The training runs through :func:`stelab.train.fit` (one epoch loop for every
    training in stelab): the step is the estimator's surrogate loss, the SBN's noise a
    named generator, so ``run_dir`` holds a checkpoint per epoch and ``resume=True``
    continues an interrupted run bit for bit (on CPU). The data order, noise,
    augmentation and evaluation draw from their own generators, seeded from
    ``cfg.seed`` (``seed·7919 + 1, 2, 4, 5``; the init ``+ 3``); the validation split
    is evaluated after the last epoch, then the test split (both with the evaluation
    generator, in that order).

    Args:
        cfg: the run (see :class:`SBNTrainConfig`).
        data: a :class:`stelab.data.Splits` to use instead of loading ``cfg.dataset``
            (e.g. random CIFAR-shaped tensors in a smoke test).
        progress: a progress bar and one log line per epoch (on stderr).
        log: receives one line per epoch.
        evaluate_test: also evaluate on the test split.
        run_dir: the run folder of :func:`stelab.train.fit` (checkpoints, metrics.csv);
            None: a temporary one, removed at the end.
        resume: continue the run in ``run_dir``.

    Returns:
        ``{"config", "history": [{"epoch", "train_loss", "lr", "seconds"}], "val", "test",
        "steps", "seconds", "diverged", "params", "model"}`` where ``val``/``test`` are
        :func:`evaluate_sbn` dicts (NaN when diverged) and ``model`` the trained SBN. A
        NaN/inf loss or parameter ends the training with ``diverged`` true; ``history``
        then holds the epochs finished before.
    """
    import tempfile

    from ... import data as _data
    from ...analysis import parse_estimator
    from ...config import OptimConfig, ScheduleConfig
    from ...data import Split, Splits
    from ...sbn import data_init, sbn_conv8, surrogate_loss
    from ...train import TrainingDiverged, fit, load_checkpoint
    from ...train.files import CKPT_DIR, LAST

    if not isinstance(cfg, SBNTrainConfig):
        raise StelabTypeError(f"cfg must be an SBNTrainConfig, got {type(cfg).__name__}")
    if resume and run_dir is None:
        raise ConfigError("resume=True needs the run_dir of the run to continue")
    if data is None:
        kw: dict[str, Any] = {"limit": cfg.limit, "seed": cfg.seed, "progress": False}
        if cfg.val_size is not None:
            kw["val_size"] = cfg.val_size
        data = _data.load(cfg.dataset, **kw)
    if data.num_classes is None or len(data.input_shape) != 3:
        raise ConfigError(
            f"train_sbn needs image classification data (C, H, W), got {data.name!r} with "
            f"input shape {data.input_shape}"
        )
    dev = _device(cfg.device)
    est = parse_estimator(cfg.estimator).estimator
    x, y = data.train
    c, h, w = data.input_shape
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = sbn_conv8(c, (h, w), int(data.num_classes), tuple(cfg.channels), cfg.padding)
    model.to(dev)
    init_gen = torch.Generator(device=dev).manual_seed(cfg.seed * 7919 + 3)
    data_init(model, x[: cfg.init_rows].to(dev), generator=init_gen)
    noise = torch.Generator(device=dev).manual_seed(cfg.seed * 7919 + 2)
    eval_gen = torch.Generator(device=dev).manual_seed(cfg.seed * 7919 + 5)
    params = [p for p in model.parameters() if p.requires_grad]
    steps_per_epoch = _data.num_batches(len(x), cfg.batch_size)
    in_epoch = [0]  # steps of the current epoch, the failing one included

    def step(m: Any, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        in_epoch[0] += 1
        # the loss stays finite when a parameter does not (NaN never crosses a threshold)
        if not all(bool(torch.isfinite(p).all()) for p in params):
            in_epoch[0] -= 1  # the previous step made them so
            raise TrainingDiverged("a parameter of the SBN became NaN/inf")
        return surrogate_loss(m, *batch, _ce, est, cfg.samples, noise)

    def evaluate(m: Any, split: Any) -> dict[str, float]:
        r = evaluate_sbn(
            m, split.x, split.y, samples=cfg.eval_samples, batch=cfg.eval_batch, generator=eval_gen
        )
        return {"loss": r["nll_avg"], "acc": r["acc_avg"], "acc1": r["acc1"]}

    def on_epoch(row: dict[str, Any]) -> None:
        in_epoch[0] = 0
        if log is not None:
            log(
                f"{cfg.estimator} epoch {row['epoch']}/{cfg.epochs}: train loss "
                f"{row['train_loss']:.4f}, {row['seconds']:.1f} s"
            )

    empty = Split(x[:0], y[:0])
    # the test split is evaluated below (fit's test metrics would lack acc1)
    fit_data = Splits(
        data.name, data.train, data.val, empty, data.num_classes, data.input_shape, data.source
    )
    t_start = time.perf_counter()
    diverged = False
    with contextlib.ExitStack() as stack:
        if run_dir is None:
            run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "run"
        run_dir = Path(run_dir)
        stack.enter_context(global_rngs_kept(dev))
        try:
            fit(
                model,
                fit_data,
                run_dir=run_dir,
                resume=resume,
                epochs=cfg.epochs,
                max_steps=cfg.max_steps,
                batch_size=cfg.batch_size,
                step=step,
                evaluate=evaluate,
                eval_every=cfg.epochs,  # the protocol: validation after the last epoch
                save_best=False,
                generators={"noise": noise, "eval": eval_gen},
                optimizer=OptimConfig(
                    name="sgd", lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov
                ),
                schedule=ScheduleConfig(name=cfg.schedule),
                grad_clip=cfg.grad_clamp,
                augment="flip_crop" if cfg.augment else "none",
                seed=cfg.seed,
                shuffle_seed=cfg.seed * 7919 + 1,
                augment_seed=cfg.seed * 7919 + 4,
                threads=torch.get_num_threads(),
                accelerator=dev.type,
                progress=progress,
                on_epoch=on_epoch,
                name=f"sbn-{cfg.estimator}",
            )
        except TrainingDiverged:
            diverged = True
        last_pt = run_dir / CKPT_DIR / LAST
        last_ckpt = load_checkpoint(last_pt) if last_pt.exists() else {}
        rows, steps = last_ckpt.get("history", []), int(last_ckpt.get("global_step", 0))
    diverged = diverged or not all(bool(torch.isfinite(p).all()) for p in params)
    train_seconds = time.perf_counter() - t_start
    history = [
        {"epoch": r["epoch"], "train_loss": r["train_loss"], "lr": r["lr"], "seconds": r["seconds"]}
        for r in rows
    ]
    if diverged:  # the steps before the one that made the loss or a parameter non-finite
        last_epoch = steps - steps_per_epoch * (len(rows) - 1) if rows else 0
        steps += max(in_epoch[0] - 1, 0) - (last_epoch if in_epoch[0] == 0 else 0)
    model.eval()
    nan = {"acc1": math.nan, "acc_avg": math.nan, "nll_avg": math.nan}
    val = test = nan
    if not diverged:
        last = rows[-1] if rows else {}
        if last.get("val_acc") is not None:
            val = {
                "acc1": last["val_acc1"],
                "acc_avg": last["val_acc"],
                "nll_avg": last["val_loss"],
            }
        if evaluate_test:
            xt, yt = data.test
            if cfg.test_limit is not None:
                xt, yt = xt[: cfg.test_limit], yt[: cfg.test_limit]
            test = evaluate_sbn(
                model, xt, yt, samples=cfg.eval_samples, batch=cfg.eval_batch, generator=eval_gen
            )
    return {
        "config": {**asdict(cfg), "channels": list(cfg.channels)},
        "history": history,
        "val": val,
        "test": test,
        "steps": steps,
        "train_rows": len(x),
        "seconds": time.perf_counter() - t_start,
        "train_seconds": train_seconds,
        "diverged": diverged,
        "params": sum(p.numel() for p in params),
        "device": str(dev),
        "model": model,
    }


@contextlib.contextmanager
def global_rngs_kept(dev: torch.device) -> Iterator[None]:
    """torch's, numpy's and Python's global RNG states as before, after the block
    (:func:`stelab.train.fit` seeds them; the [S20] runs draw from their own generators)."""
    import random

    import numpy as np

    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)
