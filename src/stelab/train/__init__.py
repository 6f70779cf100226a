"""Training on Lightning Fabric: checkpoints every epoch, bit-identical resume, DDP.

Two entry points, one epoch loop (:class:`stelab.train.loop.Session`):

* ``train(cfg, run_dir)`` trains the zoo model of a :class:`~stelab.config.TrainConfig`
  on its dataset (what ``stelab train`` runs), in one process or N (DDP).
* ``fit(model, data, step=..., optimizer=OptimConfig(...), schedule=ScheduleConfig(...),
  run_dir=..., epochs=...)`` trains a model the caller built, on a
  :class:`~stelab.data.Splits`, with a *training step*: ``step(model, (x, y))`` returns
  the loss (or ``{"loss": ..., other batch means}``), as a Lightning
  ``training_step`` does; the loop does ``zero_grad``, ``backward``, clipping, the
  optimizer step and the per-epoch schedule. The default step,
  :func:`classifier_step`, is the cross-entropy of ``train``; an SBN's estimator
  surrogate loss is another::

      noise = torch.Generator().manual_seed(1)
      fit(sbn, data, run_dir="runs/sbn", epochs=20,
          step=lambda m, b: m.surrogate_loss(*b, ce, estimator="psa", generator=noise),
          evaluate=lambda m, split: {"loss": ..., "acc": ...},
          generators={"noise": noise},           # checkpointed, restored on resume
          optimizer=OptimConfig(name="adam", lr=1e-3),
          schedule=ScheduleConfig(name="cosine"))

  ``fit`` runs in one process; checkpoints, resume and the run folder are those of
  ``train``, and the same model, data, optimizer and seed give the same weights.

Both write a run directory::

    config.toml  env.json  metrics.csv  metrics.json  train.log
    checkpoints/last.pt  checkpoints/best.pt
    .stelab-run.json     (the marker: stelab wrote this folder; lists its files)
    .stelab.lock         (while a run writes it)

The run folder (:mod:`stelab.train.files`):

* Set-up first, folder after: the config, the data, the model, ``init_from`` and the
  checkpoint to resume from are loaded and checked before anything is created; a run
  that fails there leaves no folder (and no parent folders) behind.
* One writer: the folder is locked (``fcntl.flock`` on ``.stelab.lock``, which names
  the holder's pid and host) for the whole run; a second ``stelab train`` into it fails
  naming the holder. The kernel drops the lock when its process dies (SIGKILL too), so
  the lock of a killed run never blocks ``--resume``.
* What it deletes: ``--overwrite`` (and restarting a run that never finished an epoch)
  removes only the files stelab writes (``config.toml``, ``env.json``, ``metrics.*``,
  ``train.log``, ``checkpoints/{last,best}.pt``, TensorBoard event files, the marker),
  only in a folder carrying stelab's marker, and only after the new run was set up.
  A user's files there (notes, subfolders) are kept; a folder without the marker is
  never overwritten.
* Every start removes the temporary files of stelab's own naming (``.last.pt.XXXXXXXX.tmp``)
  that a process killed mid-write left, under the lock.
* Whatever ``load_config`` accepts is written to config.toml so that it reads back the
  same (control characters escaped), so every run can be resumed.
* Free space is checked before the folder is made; a write that fails later (disk
  full) stops the run with one error naming the folder and the file.

What it does:

* SGD (momentum, Nesterov), Adam, AdamW; constant, multi-step or cosine learning
  rate set once per epoch; weight decay; element-wise gradient clamp
  (``train.grad_clip``, docs/papers/psa2020.md uses 1e3) and norm clipping.
* Seeds: ``train.seed`` seeds torch (model init), numpy, Python's ``random``, the
  shuffling generator and the augmentation generator; ``train.deterministic`` turns on
  ``torch.use_deterministic_algorithms``. On CPU two runs with one seed are equal
  bit for bit.
* A checkpoint after every epoch (``fit(checkpoint_every=N)``: every N epochs and the
  last), written atomically (temporary file +
  ``os.replace``, file and folder fsynced), holding model, optimizer, scheduler,
  epoch, step count, best-so-far, the RNG states of torch, numpy, Python and of
  the shuffling/augmentation generators (of every process) and of ``fit``'s named
  generators, the resolved config and the metrics history. Only tensors and plain
  containers: it loads with ``torch.load(..., weights_only=True)``.
* ``resume=True`` continues from the last checkpoint; on CPU the result equals an
  uninterrupted run in every field: weights, optimizer, schedule, step count, best
  metric and best.pt, every RNG state, metrics.csv (tests/test_resume_guarantees.py).
  Ctrl-C keeps the last checkpoint and says how to resume; a NaN/inf loss raises
  :class:`TrainingDiverged` and keeps the last good checkpoint.
* Step-based runs: ``train.max_steps`` stops after that many optimizer steps, inside
  an epoch if need be (Lightning's ``max_steps``; the cut epoch gets its row,
  validation and checkpoint like a full one), ``data.drop_last`` drops an epoch's short
  batch, and ``fit(on_step=..., every_n_steps=n)`` calls a hook every n steps and
  after the last, logging its floats with the mean step metrics since the previous
  call (``metrics["steps"]``; Lightning's ``val_check_interval`` counted in steps).
  Checkpoints stay at epoch ends: a resumed run repeats the steps after the last
  one and equals a run that never stopped, step rows included.
* Validation every ``train.eval_every`` epochs, test at the end; metrics.csv per
  epoch (a custom step's or evaluation's other metrics as extra columns
  ``train_<name>``/``val_<name>``), metrics.json at the end, TensorBoard
  (``run_dir/tensorboard``) when ``tensorboard`` or ``tensorboardX`` is importable;
  progress bars on a terminal.
* ``train.init_from``: copy the weights of a trained float model (a run directory
  or checkpoint) into the quantized one ([Y19]).
* ``train.devices = N``: N data-parallel processes (DDP; gloo on CPU, NCCL on
  GPUs). ``data.batch_size`` is the batch of one optimizer step over all processes;
  each takes ``batch_size / N`` rows of the same shuffled order. Processes are
  spawned by :func:`train`, or started by the standard launchers::

      torchrun --nproc-per-node 2 $(which stelab) train cfg.toml --devices 2

Why Fabric and not Lightning's ``Trainer``: the loop here is short and must control
exactly what a checkpoint holds (the shuffling generator's state, per-process RNG
states, plain containers for ``weights_only``) and when it is written (atomically,
after the epoch's metrics), which the Trainer's callbacks and checkpoint format
would hide. Fabric gives the parts that are hard to get right: device placement,
DDP setup and process launching, precision plugins, gradient clipping and
collectives.
"""

from .checkpoint import check_state, load_checkpoint, load_model
from .launch import fit, train
from .loop import Evaluate, OnStep, Step
from .parts import (
    TrainingDiverged,
    TrainingInterrupted,
    build_model,
    build_optimizer,
    build_scheduler,
    classifier_step,
    evaluate,
    load_data,
    lr_factor,
    shard_batches,
)

__all__ = [
    "Evaluate",
    "OnStep",
    "Step",
    "TrainingDiverged",
    "TrainingInterrupted",
    "build_model",
    "classifier_step",
    "build_optimizer",
    "build_scheduler",
    "check_state",
    "evaluate",
    "fit",
    "load_checkpoint",
    "load_data",
    "load_model",
    "lr_factor",
    "shard_batches",
    "train",
]
