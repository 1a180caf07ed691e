"""One training loop for every experiment: jitted scanned epochs, data parallelism, honest
timings, checkpoints that survive interruption, and a ``results.json`` per run.

A task (MNIST's MLP, a POS tagger, ...) plugs in through the small :class:`Task` interface;
the loop never looks inside a batch beyond its leading ``[steps, batch]`` axes.

Timing (what ``forward_s``, ``backward_s`` and ``update_s`` mean)
-----------------------------------------------------------------
A training epoch is one fused XLA program per chunk of minibatches, so forward, backward and
update cannot be timed inside it without changing it. After every epoch the loop therefore
times three separate jitted programs over the same ``S`` minibatches of that epoch (``S`` =
``timing_batches``, default 100, or all of them if the epoch has fewer; with several batch
groups, e.g. length buckets, each group contributes in proportion to its number of steps),
all with the epoch-end parameters and the training step keys:

(a) forward + loss, scanned over the ``S`` minibatches (the losses are summed);
(b) forward + backward, scanned (the gradients are summed across the minibatches, so no
    part of the backward pass can be removed as dead code);
(c) the full training step, forward + backward + optimizer update, scanned on a throwaway
    copy of the state (its result is discarded).

Every program is compiled ahead of time and run once untimed before its first timing; each
timing ends with ``block_until_ready``. Per minibatch, ``forward = a / S``,
``backward = (b - a) / S`` and ``update = (c - b) / S``; these are multiplied by the number
of steps in the epoch to give seconds per epoch. A difference that comes out negative
(timer noise, or XLA fusing differently across programs) is reported as 0; the raw probe
times are stored next to the estimates (``probe_*_s``). "Backward" thus covers the whole
backward pass (loss, activations, top-k selection and the sparse products), the paper's
"overall BP time" (its Table 2), plus one gradient accumulation per minibatch.

Caveats. XLA optimises each program on its own, so work can move between the phases: with
meProp, the dense ``[in, out]`` weight gradient built from ``k`` columns can be fused into the
accumulation in (b) but has to be materialised before the optimizer in (c), where it counts
as update time. Each probe is one measurement, so on a busy machine single epochs are noisy;
the final summary averages the epochs.

Beside the estimates, ``train_wall_s`` is the real wall time of the epoch's training phase
(shuffling and batching on the host, transfer to the devices, all scanned chunks), excluding
XLA compilation, which is reported separately as ``compile_s``; ``eval_s`` is the dev and
test evaluation.

Randomness
----------
Every random number derives from ``seed`` through ``jax.random.fold_in``: the parameters
from ``(seed, 0)``, the epoch ``e`` shuffle, step keys and chunk order from ``(seed, 2, e)``.
Nothing depends on how many epochs ran in the current process, so a run that is
interrupted and resumed gives the same results as an uninterrupted one.

Checkpoints and interruption
----------------------------
``<out>/checkpoints/<epoch>/`` (orbax, the last ``keep_checkpoints`` kept) holds two items:
``state`` = ``{"params", "opt_state"}`` and ``meta`` (JSON) = ``{"epoch", "history",
"config", "rng"}``. A checkpoint is written every ``checkpoint_every`` epochs and after the
last one. SIGINT/SIGTERM only set a flag: the loop stops at the next chunk boundary, drops
the unfinished epoch, checkpoints the last completed one if needed, and the command line
exits with 128 + the signal number (130 for Ctrl-C), printing the ``--resume`` command.
``--resume`` refuses a checkpoint made with other settings (except those in
:data:`RESUMABLE_CHANGES`).

Compact (column-sparse) updates: ``--sparse-update``
----------------------------------------------------
By default a step is the authors' semantics: autodiff hands the optimizer a dense ``[in, out]``
weight gradient that is zero outside the selected columns, and a stock optax optimizer
(:func:`make_optimizer`) updates every weight. With ``sparse_update`` the step instead takes
the meProp kernels' gradients compact (:func:`meprop_jax.optim.value_and_compact_grad`) and
updates only their selected columns with the column-sparse twin of ``--optimizer``
(:func:`make_sparse_optimizer`: lazy Adam, AdaGrad, SGD; ``--clip`` applies), so the update
costs O(k) rather than O(out) per kernel. The task must then build its meProp layers with
``meprop_jax.Dense(..., sparse_update=True)`` and ``Task.init`` must return Flax variables
``{"params": ..., "meprop_taps": ...}`` (what ``model.init`` gives). The zero taps are part
of :class:`TrainState` (``taps``) but never saved: a checkpoint holds the same ``{"params",
"opt_state"}`` as ever, and ``--resume`` rebuilds the taps from the task. A task whose model
has no tap is refused with a :class:`ConfigError` before training (no silent dense run). The
timing probes (b) and (c) then run the compact step too, so ``update_s`` shows the
column-sparse update.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.common import CLI_MODES, ConfigError, add_mode_argument, require
from meprop_jax import optim

__all__ = [
    "CLI_MODES",
    "DEFAULT_LR",
    "OPTIMIZERS",
    "RESULTS_FILE",
    "ConfigError",
    "RunResult",
    "StopFlag",
    "Task",
    "TrainConfig",
    "TrainState",
    "add_mode_argument",
    "add_train_arguments",
    "best_epoch",
    "check_divisible",
    "handle_signals",
    "make_optimizer",
    "make_sparse_optimizer",
    "require",
    "resolve_devices",
    "resolve_eval_batch",
    "restore_params",
    "run_cli",
    "train",
    "train_config_from_args",
]

Array = jax.Array
Batch = Any  # a pytree of arrays, every leaf [steps, batch, ...]
Params = Any

OPTIMIZERS: tuple[str, ...] = ("adam", "adagrad", "sgd")
#: Learning rates used when ``--lr`` is not given. The paper: Adam 1e-3 everywhere; AdaGrad
#: 0.1 for MNIST (0.01 for POS tagging and parsing); SGD has no paper value.
DEFAULT_LR: Mapping[str, float] = {"adam": 1e-3, "adagrad": 0.1, "sgd": 0.1}
SPLITS: tuple[str, ...] = ("dev", "test")
CHECKPOINT_DIR = "checkpoints"
RESULTS_FILE = "results.json"
ACCURACY_PLOT = "accuracy.png"
TIMING_PLOT = "timing.png"
# Config fields that may change between an interrupted run and its --resume: they do not
# change the numbers a run computes (devices: only up to float reassociation).
RESUMABLE_CHANGES = frozenset(
    {
        "epochs",
        "out",
        "resume",
        "overwrite",
        "devices",
        "timing_batches",
        "checkpoint_every",
        "keep_checkpoints",
        "chunk_steps",
        "progress",
        "data_dir",
        "eval_batch_size",
    }
)
_AUTO_CHUNKS = 10  # chunks per epoch when chunk_steps is 0: enough for a progress bar
_INIT, _EVAL, _EPOCH = 0, 1, 2  # fold_in tags of the root key
_SHUFFLE, _STEPS, _ORDER = 0, 1, 2  # fold_in tags of an epoch key


class Task(Protocol):
    """What the loop needs from an experiment.

    Attributes:
      name: short name used for the default output folder and in ``results.json``.

    Batches are pytrees of arrays whose leaves all have the shape ``[steps, batch, ...]``:
    a *group* stacks ``steps`` minibatches of equal shape, so that the loop can scan over
    them on the device. A task with a single shape (MNIST) has one group per epoch; a tagger
    with length buckets has one group per bucket. The batch axis is split across devices, so
    its size must be a multiple of the device count. Padding is the task's business: it
    marks padded examples (or tokens) in the batch and leaves them out of ``correct`` and
    ``count``.

    For ``TrainConfig.sparse_update`` the task's :meth:`init` returns Flax variables with a
    non-empty ``"meprop_taps"`` collection beside ``"params"`` (layers built with
    ``meprop_jax.Dense(..., sparse_update=True)``); the loop keeps the taps apart and passes
    them back inside ``params`` to :meth:`loss_fn` in training steps only.
    """

    name: str

    def init(self, key: Array) -> Params:
        """Fresh parameters (any pytree of arrays)."""
        ...

    def loss_fn(
        self, params: Params, batch: Batch, key: Array, train: bool
    ) -> tuple[Array, Mapping[str, Array]]:
        """Mean loss over the real (unpadded) items of one minibatch, and metrics.

        Args:
          params: as returned by :meth:`init`.
          batch: one minibatch, i.e. a group's leaves without their ``steps`` axis.
          key: PRNG key for this step (dropout, random-k selection).
          train: training mode (dropout on) or evaluation.

        Returns:
          ``(loss, aux)``; ``aux`` has at least ``"correct"`` (number of correct
          predictions) and ``"count"`` (number of real items), both scalars.
        """
        ...

    def train_groups(self, epoch: int, key: Array) -> list[Batch]:
        """The training minibatches of ``epoch`` (1-based), shuffled with ``key``."""
        ...

    def eval_groups(self, split: str) -> list[Batch]:
        """The minibatches of ``split`` (``"dev"`` or ``"test"``), padded as needed."""
        ...

    def config(self) -> dict[str, Any]:
        """The task's hyperparameters (JSON-serialisable), stored with the results."""
        ...


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Settings of the loop (the task's own settings live in the task).

    Attributes:
      out: run folder (``results.json``, plots, ``checkpoints/``).
      epochs: total number of epochs, counting those of a resumed run.
      optimizer: ``"adam"``, ``"adagrad"`` or ``"sgd"``.
      lr: learning rate; None takes :data:`DEFAULT_LR` for the optimizer.
      clip: element-wise gradient clipping bound (``optax.clip``), 0 for none.
      seed: root of all randomness.
      devices: number of local devices for data parallelism; None uses all of them.
      resume: continue from the last checkpoint in ``out``.
      overwrite: delete existing checkpoints in ``out`` and start afresh.
      checkpoint_every: save every this many epochs (the last epoch is always saved).
      keep_checkpoints: how many checkpoints to keep.
      timing_batches: minibatches per timing probe; 0 disables the probes.
      chunk_steps: minibatches per scanned chunk (interrupts and the progress bar act at
        chunk boundaries); 0 picks about a tenth of an epoch.
      progress: show a tqdm bar; None shows one when stderr is a terminal.
      sparse_update: compact meProp gradients and column-sparse optimizer updates (see the
        module docstring); the task's model must have compact-gradient taps.
    """

    out: Path
    epochs: int = 20
    optimizer: str = "adam"
    lr: float | None = None
    clip: float = 0.0
    seed: int = 0
    devices: int | None = None
    resume: bool = False
    overwrite: bool = False
    checkpoint_every: int = 1
    keep_checkpoints: int = 3
    timing_batches: int = 100
    chunk_steps: int = 0
    progress: bool | None = None
    sparse_update: bool = False

    @property
    def learning_rate(self) -> float:
        """``lr``, or the optimizer's default."""
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly copy, with the learning rate resolved."""
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        d["lr"] = self.learning_rate
        return d


class TrainState(NamedTuple):
    """Everything a training step changes, and the zero compact-gradient taps it reads.

    ``taps`` is None unless ``sparse_update``; then it is ``{"params": <the task's
    "meprop_taps" collection>}``, so that every tap sits at the path of its kernel in
    ``params``. The taps are constant zeros and are not checkpointed.
    """

    params: Params
    opt_state: Any
    taps: Any = None


@dataclasses.dataclass
class RunResult:
    """What :func:`train` returns.

    Attributes:
      history: one record per completed epoch (see ``results.json``).
      best: ``{"epoch", "dev_acc", "test_acc"}`` at the best dev epoch, or None.
      status: ``"complete"``, ``"interrupted"`` (by a signal) or ``"stopped"``
        (``max_epochs_this_run`` reached).
      signum: the signal that interrupted the run, if any.
      out: the run folder.
      state: the final training state (of the last completed epoch).
    """

    history: list[dict[str, Any]]
    best: dict[str, Any] | None
    status: str
    signum: int | None
    out: Path
    state: TrainState | None = None


# ---------------------------------------------------------------------------------------------
# Interruption


class StopFlag:
    """Set by a signal handler (or a test); the loop stops at the next chunk boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None

    @property
    def requested(self) -> bool:
        """Whether a stop was asked for."""
        return self.signum is not None

    def request(self, signum: int = signal.SIGINT) -> None:
        """Asks the loop to stop; ``signum`` decides the exit code (128 + signum)."""
        if self.signum is None:
            self.signum = signum


@contextlib.contextmanager
def handle_signals(flag: StopFlag) -> Iterator[StopFlag]:
    """Routes SIGINT and SIGTERM to ``flag`` while the block runs.

    The first signal only sets the flag, so the current chunk ends and a checkpoint of the
    last completed epoch is written; the handler then steps aside, so a second signal acts
    as usual (Ctrl-C twice aborts at once). Outside the main thread nothing is installed.
    """
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def on_signal(signum: int, frame: object) -> None:
        flag.request(signum)
        signal.signal(signum, previous[signum])
        print(
            f"\n{signal.Signals(signum).name} received: stopping at the next chunk boundary "
            "(send it again to abort without saving).",
            file=sys.stderr,
            flush=True,
        )

    for s in previous:
        signal.signal(s, on_signal)
    try:
        yield flag
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


# ---------------------------------------------------------------------------------------------
# Configuration helpers


def make_optimizer(name: str, lr: float, clip: float = 0.0) -> optax.GradientTransformation:
    """The optax optimizer for ``--optimizer``/``--lr``/``--clip``.

    AdaGrad is set up as in the paper and the authors' code: accumulator starting at 0 and
    ``eps = 1e-6`` (``w -= lr * g / sqrt(sum g^2 + eps)``). Adam uses the paper's defaults
    (optax's). ``clip > 0`` first clips every gradient entry to ``[-clip, clip]``, as the
    authors' C# code does with 5.
    """
    if name == "adam":
        tx = optax.adam(lr)
    elif name == "adagrad":
        tx = optax.adagrad(lr, initial_accumulator_value=0.0, eps=1e-6)
    elif name == "sgd":
        tx = optax.sgd(lr)
    else:
        raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    return optax.chain(optax.clip(clip), tx) if clip > 0 else tx


def make_sparse_optimizer(name: str, lr: float, clip: float = 0.0) -> optim.SparseOptimizer:
    """The column-sparse twin of :func:`make_optimizer` for ``--sparse-update``.

    Same hyperparameters (AdaGrad's accumulator from 0 with ``eps = 1e-6``, Adam's optax
    defaults) and the same element-wise clipping; compact meProp kernels are updated in their
    selected columns only (Adam lazily, see :mod:`meprop_jax.optim`), every other parameter
    densely by the same rule.
    """
    bound = clip if clip > 0 else None
    if name == "adam":
        return optim.sparse_adam(lr, clip=bound)
    if name == "adagrad":
        return optim.sparse_adagrad(lr, initial_accumulator_value=0.0, eps=1e-6, clip=bound)
    if name == "sgd":
        return optim.sparse_sgd(lr, clip=bound)
    raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def resolve_devices(requested: int | None) -> int:
    """The number of local devices to use: ``requested`` or all.

    Raises:
      ConfigError: ``requested`` is below 1 or above the number available.
    """
    available = jax.local_device_count()
    if requested is None:
        return available
    if requested < 1 or requested > available:
        raise ConfigError(f"--devices must be between 1 and {available} here, got {requested}")
    return requested


def check_divisible(size: int, devices: int, flag: str = "--batch-size") -> None:
    """Rejects a batch size that cannot be split evenly over the devices.

    Raises:
      ConfigError: naming ``flag`` and ``--devices``.
    """
    if size % devices:
        raise ConfigError(
            f"{flag} {size} cannot be split over {devices} devices: use a multiple of "
            f"{devices} for {flag}, or choose another device count with --devices"
        )


def resolve_eval_batch(
    requested: int | None, default: int, devices: int, flag: str = "--eval-batch-size"
) -> int:
    """The evaluation batch size: ``requested``, or ``default`` rounded up to a multiple of
    ``devices``.

    Raises:
      ConfigError: ``requested`` is below 1 or not a multiple of ``devices`` (naming ``flag``).
    """
    if requested is None:
        return math.ceil(default / devices) * devices
    require(requested >= 1, f"{flag} must be >= 1, got {requested}")
    check_divisible(requested, devices, flag)
    return requested


def validate_config(cfg: TrainConfig) -> None:
    """Checks the loop's settings; raises :class:`ConfigError` naming the flag."""
    require(cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}")
    require(cfg.optimizer in OPTIMIZERS, f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
    require(cfg.learning_rate > 0, f"--lr must be > 0, got {cfg.lr}")
    require(cfg.clip >= 0, f"--clip must be >= 0 (0 disables clipping), got {cfg.clip}")
    require(
        cfg.checkpoint_every >= 1, f"--checkpoint-every must be >= 1, got {cfg.checkpoint_every}"
    )
    require(
        cfg.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {cfg.keep_checkpoints}"
    )
    require(cfg.timing_batches >= 0, f"--timing-batches must be >= 0, got {cfg.timing_batches}")
    require(cfg.chunk_steps >= 0, f"--chunk-steps must be >= 0, got {cfg.chunk_steps}")
    require(not (cfg.resume and cfg.overwrite), "--resume and --overwrite exclude each other")
    resolve_devices(cfg.devices)


def check_out_dir(cfg: TrainConfig) -> None:
    """Refuses to start over existing checkpoints (or to resume without any).

    Raises:
      ConfigError: naming ``--resume``, ``--overwrite`` and ``--out``.
    """
    has_checkpoints = _latest_checkpoint(cfg.out / CHECKPOINT_DIR) is not None
    if cfg.resume and not has_checkpoints:
        raise ConfigError(f"--resume: no checkpoint in {cfg.out / CHECKPOINT_DIR} (check --out)")
    if not cfg.resume and not cfg.overwrite and has_checkpoints:
        raise ConfigError(
            f"{cfg.out} already holds checkpoints: pass --resume to continue that run, "
            "--overwrite to start afresh, or another --out"
        )


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the loop's flags (``--epochs``, ``--optimizer``, ``--out``, ...) to ``parser``."""
    g = parser.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=20, help="epochs in all (default 20)")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default="adam", help="(default adam)")
    g.add_argument(
        "--lr",
        type=float,
        default=None,
        help="learning rate (default: adam 1e-3, adagrad 0.1 as the paper's MNIST runs, sgd 0.1)",
    )
    g.add_argument(
        "--clip",
        type=float,
        default=0.0,
        help="clip every gradient entry to [-CLIP, CLIP] (the authors' C# code used 5); "
        "default 0 = off",
    )
    g.add_argument("--seed", type=int, default=0, help="root of all randomness (default 0)")
    g.add_argument(
        "--devices", type=int, default=None, help="data-parallel devices (default: all local ones)"
    )
    g.add_argument("--out", type=Path, default=None, help="run folder (default runs/<config>)")
    g.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="discard checkpoints already in --out")
    g.add_argument(
        "--checkpoint-every", type=int, default=1, help="epochs between checkpoints (default 1)"
    )
    g.add_argument("--keep-checkpoints", type=int, default=3, help="checkpoints kept (default 3)")
    g.add_argument(
        "--timing-batches",
        type=int,
        default=100,
        help="minibatches per forward/backward/update timing probe; 0 disables (default 100)",
    )
    g.add_argument(
        "--chunk-steps",
        type=int,
        default=0,
        help="minibatches per scanned chunk; 0 = a tenth of an epoch (default)",
    )
    g.add_argument(
        "--sparse-update",
        action="store_true",
        help="keep the meProp kernels' gradients compact and update only their selected "
        "columns with the column-sparse --optimizer (Adam becomes lazy Adam); default: the "
        "authors' masked dense gradient and a stock optimizer. Needs a model with meProp "
        "layers (k > 0)",
    )


def train_config_from_args(args: argparse.Namespace, default_out: Path) -> TrainConfig:
    """Builds and validates a :class:`TrainConfig` from parsed flags."""
    cfg = TrainConfig(
        out=args.out if args.out is not None else default_out,
        epochs=args.epochs,
        optimizer=args.optimizer,
        lr=args.lr,
        clip=args.clip,
        seed=args.seed,
        devices=args.devices,
        resume=args.resume,
        overwrite=args.overwrite,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        timing_batches=args.timing_batches,
        chunk_steps=args.chunk_steps,
        sparse_update=args.sparse_update,
    )
    validate_config(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# Keys, sharding, small pure helpers


def _epoch_key(seed: int, epoch: int) -> Array:
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _EPOCH), epoch)


def _root_subkey(seed: int, tag: int) -> Array:
    return jax.random.fold_in(jax.random.key(seed), tag)


def _numpy_rng(key: Array) -> np.random.Generator:
    """A NumPy generator seeded by a JAX key (host-side shuffles without device work)."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def _put_replicated(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    return jax.device_put(tree, NamedSharding(mesh, P()))


def _put_batches(group: Batch, mesh: jax.sharding.Mesh) -> Batch:
    """Moves a group to the devices, splitting the batch axis (axis 1) over ``data``."""
    return jax.tree.map(lambda a: jax.device_put(a, NamedSharding(mesh, P(None, "data"))), group)


def _group_steps(group: Batch) -> int:
    leaves = jax.tree.leaves(group)
    if not leaves:
        raise ValueError("a batch group has no arrays")
    shapes = {np.shape(a)[:2] for a in leaves}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(
            f"every leaf of a batch group must be [steps, batch, ...] with equal steps and "
            f"batch; got leading shapes {sorted(shapes)}"
        )
    return int(next(iter(shapes))[0])


def _check_group_batches(groups: Sequence[Batch], devices: int) -> None:
    for group in groups:
        batch = int(np.shape(jax.tree.leaves(group)[0])[1])
        check_divisible(batch, devices)


def _chunk_plan(
    steps: Sequence[int], chunk_steps: int, order_key: Array
) -> list[tuple[int, int, int]]:
    """``(group, start, length)`` chunks covering every group's steps.

    With several groups the chunks are interleaved in a random order, so that a tagger does
    not see all its short sentences before its long ones.
    """
    total = sum(steps)
    size = chunk_steps or max(1, math.ceil(total / _AUTO_CHUNKS))
    plan = [
        (g, start, min(size, n - start)) for g, n in enumerate(steps) for start in range(0, n, size)
    ]
    if len(steps) > 1:
        plan = [plan[i] for i in _numpy_rng(order_key).permutation(len(plan))]
    return plan


def _probe_counts(steps: Sequence[int], budget: int) -> list[int]:
    """Minibatches to time per group: ``budget`` in all, in proportion to group sizes."""
    total = sum(steps)
    if budget >= total:
        return list(steps)
    return [min(n, max(1, round(budget * n / total))) if n else 0 for n in steps]


def best_epoch(history: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """The paper's model selection: the epoch with the best dev accuracy (the first one on
    ties), with the test accuracy at that epoch."""
    if not history:
        return None
    best = max(history, key=lambda r: (r["dev_acc"], -r["epoch"]))
    return {"epoch": best["epoch"], "dev_acc": best["dev_acc"], "test_acc": best["test_acc"]}


def _mean_timing(history: Sequence[Mapping[str, Any]], field: str) -> float | None:
    values = [r["timing"][field] for r in history if r["timing"].get(field) is not None]
    return float(np.mean(values)) if values else None


# ---------------------------------------------------------------------------------------------
# The jitted programs


def _optimizer_update(tx: Any, grads, opt_state, params, tap_grads=None):
    # optax mixes Python floats and int32 step counts (Adam's bias correction), which strict
    # dtype promotion rejects; the update is computed in float32 either way.
    with jax.numpy_dtype_promotion("standard"):
        if isinstance(tx, optim.SparseOptimizer):
            return tx.update(grads, opt_state, params, tap_grads)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state


def _aux_value(aux: Mapping[str, Array], name: str) -> Array:
    if name not in aux:
        raise KeyError(f"Task.loss_fn must return aux with {name!r}; got {sorted(aux)}")
    return jnp.asarray(aux[name], jnp.float32)


class _Programs:
    """The jitted programs of one run, built around a task's loss and an optimizer.

    ``tx`` is an optax optimizer (the masked dense gradient) or, for ``sparse_update``, a
    :class:`meprop_jax.optim.SparseOptimizer`, whose steps differentiate compactly.
    """

    #: Programs whose first argument (the training state) is donated: the scatters of the
    #: column-sparse updates then write into the state's own buffers.
    _DONATE: Mapping[str, tuple[int, ...]] = {"train_chunk": (0,)}

    def __init__(self, loss_fn: Callable, tx: Any) -> None:
        self.loss_fn = loss_fn
        self.tx = tx
        self.compact = isinstance(tx, optim.SparseOptimizer)
        self._compiled: dict[Any, Any] = {}

    def _grad(self, params, taps, batch, key):
        """``((loss, aux), grads)``; compact: ``grads = (param grads, tap grads)``, with None
        for every kernel that has a tap (see ``optim.value_and_compact_grad``)."""
        if not self.compact:
            return jax.value_and_grad(self.loss_fn, has_aux=True)(params, batch, key, True)

        def loss(params, taps):
            variables = {**params, optim.TAP_COLLECTION: taps["params"]}
            return self.loss_fn(variables, batch, key, True)

        value, grads = optim.value_and_compact_grad(loss, has_aux=True)(params, taps)
        return value, grads

    def _step(self, state: TrainState, batch, key):
        (loss, aux), grads = self._grad(state.params, state.taps, batch, key)
        if self.compact:
            grads, tap_grads = grads
        else:
            tap_grads = None
        params, opt_state = _optimizer_update(
            self.tx, grads, state.opt_state, state.params, tap_grads
        )
        return TrainState(params, opt_state, state.taps), (loss, _aux_value(aux, "count"))

    def train_chunk(self, state, group, key, start, *, length: int):
        """``length`` training steps from ``start``; returns the state and loss sums."""
        batches = jax.tree.map(lambda a: lax.dynamic_slice_in_dim(a, start, length), group)
        steps = start + jnp.arange(length, dtype=jnp.int32)

        def body(state, xs):
            batch, i = xs
            return self._step(state, batch, jax.random.fold_in(key, i))

        state, (losses, counts) = lax.scan(body, state, (batches, steps))
        return state, jnp.sum(losses * counts), jnp.sum(counts)

    def evaluate(self, params, group, key):
        """Sums of loss x count, correct and count over a group, in evaluation mode."""

        def body(acc, batch):
            loss, aux = self.loss_fn(params, batch, key, False)
            count = _aux_value(aux, "count")
            return acc + jnp.stack([loss * count, _aux_value(aux, "correct"), count]), None

        total, _ = lax.scan(body, jnp.zeros(3, jnp.float32), group)
        return total

    def probe_forward(self, params, group, key, *, n: int):
        """Timing probe (a): forward + loss over the first ``n`` minibatches."""

        def body(acc, xs):
            batch, i = xs
            loss, _ = self.loss_fn(params, batch, jax.random.fold_in(key, i), True)
            return acc + loss, None

        total, _ = lax.scan(body, jnp.zeros((), jnp.float32), _first(group, n))
        return total

    def probe_backward(self, params, taps, group, key, *, n: int):
        """Timing probe (b): forward + backward, gradients summed so none is dead code
        (compact: the ``[K, in]`` blocks and their column indices are summed)."""

        def grads(batch, i):
            return self._grad(params, taps, batch, jax.random.fold_in(key, i))

        def body(acc, xs):
            (loss, _), g = grads(*xs)
            return (acc[0] + loss, jax.tree.map(jnp.add, acc[1], g)), None

        xs = _first(group, n)
        if self.compact:
            shapes = jax.eval_shape(grads, *jax.tree.map(lambda a: a[0], xs))[1]
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        else:
            zeros = jax.tree.map(jnp.zeros_like, params)
        total, _ = lax.scan(body, (jnp.zeros((), jnp.float32), zeros), xs)
        return total

    def probe_step(self, state, group, key, *, n: int):
        """Timing probe (c): full training steps (the new state is thrown away)."""

        def body(state, xs):
            batch, i = xs
            state, (loss, _) = self._step(state, batch, jax.random.fold_in(key, i))
            return state, loss

        return lax.scan(body, state, _first(group, n))

    def compiled(self, name: str, *args: Any, **static: int) -> tuple[Any, float]:
        """The AOT-compiled program ``name`` for these argument types, and the seconds spent
        compiling it now (0 when it was compiled before)."""
        leaves, treedef = jax.tree.flatten(args)
        signature = tuple(
            (np.shape(x), getattr(x, "dtype", type(x)), _sharding_key(x)) for x in leaves
        )
        key = (name, tuple(sorted(static.items())), treedef, signature)
        if key in self._compiled:
            return self._compiled[key], 0.0
        start = time.perf_counter()
        fn = jax.jit(
            functools.partial(getattr(self, name), **static),
            donate_argnums=self._DONATE.get(name, ()),
        )
        self._compiled[key] = fn.lower(*args).compile()
        return self._compiled[key], time.perf_counter() - start


def _sharding_key(x: Any) -> Any:
    """A hashable stand-in for ``x``'s sharding in which equivalent specs are equal: a
    program's outputs come back as ``P(None, None)`` where its inputs were ``P()``."""
    sharding = getattr(x, "sharding", None)
    spec = getattr(sharding, "spec", None)
    if spec is None:
        return sharding
    parts = list(spec)
    while parts and parts[-1] is None:
        parts.pop()
    return (sharding.mesh, tuple(parts))


def _init_state(task: Task, tx: Any, key: Array) -> TrainState:
    params = task.init(key)
    if not isinstance(tx, optim.SparseOptimizer):
        return TrainState(params, tx.init(params))
    params, taps = _split_taps(params)
    return TrainState(params, tx.init(params, taps), taps)


def _split_taps(variables: Any) -> tuple[Any, Any]:
    """``(variables without the taps, {"params": taps})`` (see :class:`TrainState`)."""
    rest = {k: v for k, v in variables.items() if k != optim.TAP_COLLECTION}
    return rest, {"params": variables[optim.TAP_COLLECTION]}


def _check_taps(task: Task, key: Array) -> None:
    """Refuses ``sparse_update`` for a task whose initial variables hold no tap."""
    shapes = jax.eval_shape(task.init, key)
    taps = shapes.get(optim.TAP_COLLECTION) if isinstance(shapes, Mapping) else None
    require(
        isinstance(shapes, Mapping) and "params" in shapes and bool(jax.tree.leaves(taps)),
        f"--sparse-update: the {task.name!r} model has no compact-gradient taps (no "
        "meprop_jax.Dense(sparse_update=True) layer with 0 < k < features, or init does not "
        "return Flax variables); use meProp layers or drop --sparse-update",
    )


def _first(group: Batch, n: int) -> tuple[Batch, Array]:
    return jax.tree.map(lambda a: a[:n], group), jnp.arange(n, dtype=jnp.int32)


# ---------------------------------------------------------------------------------------------
# Checkpoints and results


def _latest_checkpoint(directory: Path) -> int | None:
    if not directory.is_dir():
        return None
    steps = [int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(steps) if steps else None


def _checkpoint_manager(directory: Path, keep: int) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(
        directory.absolute(), options=options, item_names=("state", "meta")
    )


def _save_checkpoint(
    run: _Run, epoch: int, state: TrainState, history: Sequence[Mapping[str, Any]]
) -> None:
    """Saves ``state`` as epoch ``epoch``, with the history, config and root key as JSON.

    The root key is all the RNG state there is: every key derives from it and the epoch.
    """
    tree = {"params": state.params, "opt_state": state.opt_state}
    root = np.asarray(jax.random.key_data(jax.random.key(run.cfg.seed)))
    meta = {
        "epoch": epoch,
        "history": list(history),
        "config": dict(run.config),
        "rng": root.ravel().tolist(),
    }
    run.manager.save(
        epoch,
        args=ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)),
        force=True,
    )
    run.manager.wait_until_finished()


def _restore_checkpoint(
    manager: ocp.CheckpointManager, template: TrainState
) -> tuple[TrainState, dict[str, Any]]:
    epoch = manager.latest_step()
    tree = {"params": template.params, "opt_state": template.opt_state}
    restored = manager.restore(
        epoch,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(tree), meta=ocp.args.JsonRestore()),
    )
    state = restored["state"]
    return TrainState(state["params"], state["opt_state"], template.taps), restored["meta"]


def restore_params(out: Path, template: Params, epoch: int | None = None) -> tuple[Params, int]:
    """The parameters saved in the run folder ``out``, without the optimizer state (for
    inference: the optimizer need not be rebuilt).

    Args:
      out: a run folder (``--out`` of a training run).
      template: the parameter pytree, as arrays or ``jax.ShapeDtypeStruct`` with shardings;
        the restored arrays take their shapes, dtypes and shardings.
      epoch: the checkpoint to read; None, or an epoch whose checkpoint is no longer kept,
        reads the latest.

    Returns:
      ``(params, epoch)``.

    Raises:
      ConfigError: ``out`` holds no checkpoint.
    """
    directory = (out / CHECKPOINT_DIR).absolute()
    latest = _latest_checkpoint(directory)
    if latest is None:
        raise ConfigError(f"--out {out}: no checkpoint in {directory}")
    if epoch is None or not (directory / str(epoch)).is_dir():
        epoch = latest
    item = {"params": template}
    restore = ocp.args.PyTreeRestore(
        item=item,
        restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True,
    )
    with ocp.CheckpointManager(directory, item_names=("state", "meta")) as manager:
        restored = manager.restore(epoch, args=ocp.args.Composite(state=restore))
    return restored["state"]["params"], epoch


def _config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """Differing settings; a loop setting missing from ``saved`` (a checkpoint written before
    the setting existed) counts as its default."""
    keys = (set(saved) | set(current)) - RESUMABLE_CHANGES
    defaults = {
        f.name: f.default
        for f in dataclasses.fields(TrainConfig)
        if f.default is not dataclasses.MISSING
    }
    return sorted(k for k in keys if saved.get(k, defaults.get(k)) != current.get(k))


def _write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Writes through a temporary file so a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


def _plot(history: Sequence[Mapping[str, Any]], out: Path) -> None:
    """``accuracy.png`` (dev/test accuracy per epoch) and ``timing.png``."""
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [r["dev_acc"] for r in history], marker="o", label="dev")
    ax.plot(epochs, [r["test_acc"] for r in history], marker="s", label="test")
    ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy per epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / ACCURACY_PLOT, dpi=100)
    plt.close(fig)

    fields = [("forward_s", "forward"), ("backward_s", "backward"), ("update_s", "update")]
    if all(r["timing"].get("forward_s") is None for r in history):
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = np.zeros(len(history))
    for field, label in fields:
        values = np.array([r["timing"].get(field) or 0.0 for r in history])
        ax.bar(epochs, values, bottom=bottom, label=label)
        bottom += values
    ax.plot(epochs, [r["timing"]["train_wall_s"] for r in history], "k.-", label="wall")
    ax.set(xlabel="epoch", ylabel="seconds per epoch", title="training time per epoch")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / TIMING_PLOT, dpi=100)
    plt.close(fig)


def _write_results(run: _Run, history: Sequence[Mapping[str, Any]], status: str) -> None:
    """``results.json``: config, per-epoch metrics, best epoch and the platform."""
    payload = _results_payload(run.config, history, status, run.mesh)
    _write_json(run.cfg.out / RESULTS_FILE, payload)


def _results_payload(
    config: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    status: str,
    mesh: jax.sharding.Mesh,
) -> dict[str, Any]:
    return {
        "config": dict(config),
        "status": status,
        "epochs": list(history),
        "best": best_epoch(history),
        "mean_timing": {
            f: _mean_timing(history, f)
            for f in ("forward_s", "backward_s", "update_s", "train_wall_s", "eval_s")
        },
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in mesh.devices.flat],
        "num_devices": int(mesh.devices.size),
    }


# ---------------------------------------------------------------------------------------------
# The loop


def _log_epoch(record: Mapping[str, Any], epochs: int, log: Callable[[str], None]) -> None:
    t = record["timing"]
    parts = [
        f"epoch {record['epoch']}/{epochs}",
        f"loss {record['loss']:.4f}",
        f"dev {record['dev_acc']:.2f}%",
        f"test {record['test_acc']:.2f}%",
        f"train {t['train_wall_s']:.2f}s",
    ]
    if t.get("forward_s") is not None:
        parts.append(
            f"(est. fwd {t['forward_s']:.2f}s bwd {t['backward_s']:.2f}s upd {t['update_s']:.2f}s)"
        )
    parts.append(f"eval {t['eval_s']:.2f}s")
    if t["compile_s"] > 0:
        parts.append(f"compile {t['compile_s']:.2f}s")
    log("  ".join(parts))


def _run_chunks(
    programs: _Programs,
    state: TrainState,
    groups: Sequence[Batch],
    plan: Sequence[tuple[int, int, int]],
    step_keys: Sequence[Array],
    stop: StopFlag,
    bar: Any,
) -> tuple[TrainState, float, float, float, bool]:
    """Runs the planned chunks; returns state, loss sum, count, compile seconds, and whether
    every chunk ran (False: stopped early).

    The chunks donate their input state; the first gets a copy, so that ``state`` stays
    valid for an epoch that is abandoned part-way.
    """
    loss_sum, count, compile_s = 0.0, 0.0, 0.0
    if plan and not stop.requested:
        state = jax.tree.map(lambda a: a.copy(), state)
    for g, start, length in plan:
        if stop.requested:
            return state, loss_sum, count, compile_s, False
        start_arr = np.int32(start)
        fn, seconds = programs.compiled(
            "train_chunk", state, groups[g], step_keys[g], start_arr, length=length
        )
        compile_s += seconds
        state, chunk_loss, chunk_count = fn(state, groups[g], step_keys[g], start_arr)
        # float() waits for the chunk, so the bar (and a stop request) act on finished work.
        chunk_loss, chunk_count = float(chunk_loss), float(chunk_count)
        loss_sum += chunk_loss
        count += chunk_count
        if bar is not None:
            bar.update(length)
            bar.set_postfix(loss=f"{chunk_loss / max(chunk_count, 1.0):.4f}")
    return state, loss_sum, count, compile_s, True


def _evaluate_split(
    programs: _Programs, params: Params, groups: Sequence[Batch], key: Array
) -> tuple[dict[str, float], float]:
    totals = np.zeros(3)
    compile_s = 0.0
    for group in groups:
        fn, seconds = programs.compiled("evaluate", params, group, key)
        compile_s += seconds
        totals += np.asarray(fn(params, group, key), np.float64)
    loss_sum, correct, count = totals
    denom = max(count, 1.0)
    return {"acc": 100.0 * correct / denom, "loss": loss_sum / denom}, compile_s


def _time(fn: Any, *args: Any) -> float:
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start


def _probe_timings(
    programs: _Programs,
    state: TrainState,
    groups: Sequence[Batch],
    step_keys: Sequence[Array],
    budget: int,
) -> tuple[dict[str, float | int | None], float]:
    """Per-epoch forward/backward/update estimates (see the module docstring)."""
    steps = [_group_steps(g) for g in groups]
    counts = _probe_counts(steps, budget)
    est = np.zeros(3)
    raw = np.zeros(3)
    compile_s = 0.0
    for group, key, n, total in zip(groups, step_keys, counts, steps, strict=True):
        if n == 0:
            continue
        calls = (
            ("probe_forward", (state.params,)),
            ("probe_backward", (state.params, state.taps)),
            ("probe_step", (state,)),
        )
        for j, (name, first) in enumerate(calls):
            fn, seconds = programs.compiled(name, *first, group, key, n=n)
            if seconds:
                compile_s += seconds
                jax.block_until_ready(fn(*first, group, key))  # warm-up run, untimed
            t = _time(fn, *first, group, key)
            raw[j] += t
            est[j] += t / n * total
    fwd, fwd_bwd, full = est
    timing = {
        "forward_s": float(fwd),
        "backward_s": float(max(fwd_bwd - fwd, 0.0)),
        "update_s": float(max(full - fwd_bwd, 0.0)),
        "probe_steps": int(sum(counts)),
        "probe_forward_s": float(raw[0]),
        "probe_forward_backward_s": float(raw[1]),
        "probe_step_s": float(raw[2]),
    }
    return timing, compile_s


_NO_PROBES: dict[str, float | int | None] = {
    "forward_s": None,
    "backward_s": None,
    "update_s": None,
    "probe_steps": 0,
    "probe_forward_s": None,
    "probe_forward_backward_s": None,
    "probe_step_s": None,
}


def _progress_bar(enabled: bool, total: int, epoch: int, epochs: int) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(
        total=total, desc=f"epoch {epoch}/{epochs}", unit="step", leave=False, file=sys.stderr
    )


@dataclasses.dataclass(frozen=True)
class _Run:
    """What stays fixed during a run (everything the epoch loop reads but never changes)."""

    task: Task
    cfg: TrainConfig
    config: Mapping[str, Any]
    mesh: jax.sharding.Mesh
    programs: _Programs
    manager: ocp.CheckpointManager
    eval_groups: Mapping[str, Sequence[Batch]]
    eval_key: Array
    stop: StopFlag
    progress: bool
    log: Callable[[str], None]

    @property
    def n_devices(self) -> int:
        return int(self.mesh.devices.size)


def train(
    task: Task,
    cfg: TrainConfig,
    *,
    stop: StopFlag | None = None,
    max_epochs_this_run: int | None = None,
    log: Callable[[str], None] = print,
) -> RunResult:
    """Trains ``task`` as configured, writing results, plots and checkpoints to ``cfg.out``.

    Args:
      task: the experiment.
      cfg: loop settings.
      stop: checked at every chunk boundary; when set, the partial epoch is dropped, the last
        completed epoch is checkpointed and the run returns with status ``"interrupted"``.
      max_epochs_this_run: stop (status ``"stopped"``, checkpoint saved) after this many
        epochs of this call; for tests and time-limited jobs.
      log: where progress lines go.

    Returns:
      The per-epoch history and the best epoch.

    Raises:
      ConfigError: bad settings, batches that do not split over the devices, or a resume
        whose checkpoint was made with different settings.
    """
    validate_config(cfg)
    check_out_dir(cfg)
    n_devices = resolve_devices(cfg.devices)
    mesh = jax.make_mesh((n_devices,), ("data",), devices=jax.devices()[:n_devices])
    if cfg.sparse_update:
        _check_taps(task, _root_subkey(cfg.seed, _INIT))
        tx = make_sparse_optimizer(cfg.optimizer, cfg.learning_rate, cfg.clip)
    else:
        tx = make_optimizer(cfg.optimizer, cfg.learning_rate, cfg.clip)
    # Through JSON once, so that it compares equal to the copy stored in a checkpoint.
    config = json.loads(
        json.dumps({"task": task.name, **cfg.as_dict(), "num_devices": n_devices, **task.config()})
    )
    cfg.out.mkdir(parents=True, exist_ok=True)
    ckpt_dir = cfg.out / CHECKPOINT_DIR
    if cfg.overwrite and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)

    with jax.set_mesh(mesh):
        eval_groups = {}
        for split in SPLITS:
            host_groups = task.eval_groups(split)
            _check_group_batches(host_groups, n_devices)
            eval_groups[split] = [_put_batches(g, mesh) for g in host_groups]
        # One compiled program: run eagerly, a Flax init dispatches (and compiles) op by op.
        init = jax.jit(
            lambda key: _init_state(task, tx, key), out_shardings=NamedSharding(mesh, P())
        )
        state = init(_root_subkey(cfg.seed, _INIT))
        manager = _checkpoint_manager(ckpt_dir, cfg.keep_checkpoints)
        run = _Run(
            task=task,
            cfg=cfg,
            config=config,
            mesh=mesh,
            programs=_Programs(task.loss_fn, tx),
            manager=manager,
            eval_groups=eval_groups,
            eval_key=_put_replicated(_root_subkey(cfg.seed, _EVAL), mesh),
            stop=stop or StopFlag(),
            progress=sys.stderr.isatty() if cfg.progress is None else cfg.progress,
            log=log,
        )
        try:
            history: list[dict[str, Any]] = []
            if cfg.resume:
                state, history = _resume(run, state)
            return _epochs(run, state, history, max_epochs_this_run)
        finally:
            manager.close()


def _resume(run: _Run, template: TrainState) -> tuple[TrainState, list[dict[str, Any]]]:
    """The last checkpoint's state and history, after checking that the settings match.

    The settings are compared first: a checkpoint of another layout (e.g. ``sparse_update``'s
    optimizer state) is never read into this run's template.
    """
    latest = run.manager.latest_step()
    meta = run.manager.restore(latest, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    meta = meta["meta"]
    changed = _config_changes(meta["config"], run.config)
    if changed:
        raise ConfigError(
            f"--resume: {run.cfg.out} was trained with other settings for "
            + ", ".join(
                f"{k} ({meta['config'].get(k)!r} there, {run.config.get(k)!r} now)" for k in changed
            )
        )
    state, meta = _restore_checkpoint(run.manager, template)
    run.log(f"resuming {run.cfg.out} after epoch {meta['epoch']}")
    return state, list(meta["history"])


def _epochs(
    run: _Run,
    state: TrainState,
    history: list[dict[str, Any]],
    max_epochs_this_run: int | None,
) -> RunResult:
    """Runs the remaining epochs, checkpointing as configured; saves a last checkpoint and
    the results however the loop ends."""
    cfg = run.cfg
    first = len(history) + 1
    saved_epoch = len(history)
    status = "complete"
    for epoch in range(first, cfg.epochs + 1):
        if run.stop.requested:
            status = "interrupted"
            break
        if max_epochs_this_run is not None and epoch - first >= max_epochs_this_run:
            status = "stopped"
            break
        outcome = _train_epoch(run, state, epoch)
        if outcome is None:
            run.log(f"epoch {epoch} abandoned part-way; keeping epoch {epoch - 1}")
            status = "interrupted"
            break
        state, record = outcome
        history.append(record)
        _log_epoch(record, cfg.epochs, run.log)
        if epoch % cfg.checkpoint_every == 0 or epoch == cfg.epochs:
            _save_checkpoint(run, epoch, state, history)
            saved_epoch = epoch
        _write_results(run, history, "running")
    else:
        if run.stop.requested and len(history) < cfg.epochs:
            status = "interrupted"
    if history and saved_epoch != len(history):
        _save_checkpoint(run, len(history), state, history)
    _write_results(run, history, status)
    _plot(history, cfg.out)
    return RunResult(history, best_epoch(history), status, run.stop.signum, cfg.out, state)


def _train_epoch(
    run: _Run, state: TrainState, epoch: int
) -> tuple[TrainState, dict[str, Any]] | None:
    """Trains, evaluates and times one epoch; None when stopped part-way."""
    epoch_key = _epoch_key(run.cfg.seed, epoch)
    wall_start = time.perf_counter()
    host_groups = run.task.train_groups(epoch, jax.random.fold_in(epoch_key, _SHUFFLE))
    steps = [_group_steps(g) for g in host_groups]
    if sum(steps) == 0:
        raise ConfigError("the task produced no training minibatches (see --limit-train)")
    _check_group_batches(host_groups, run.n_devices)
    groups = [_put_batches(g, run.mesh) for g in host_groups]
    steps_key = jax.random.fold_in(epoch_key, _STEPS)
    step_keys = [
        _put_replicated(jax.random.fold_in(steps_key, g), run.mesh) for g in range(len(groups))
    ]
    plan = _chunk_plan(steps, run.cfg.chunk_steps, jax.random.fold_in(epoch_key, _ORDER))
    bar = _progress_bar(run.progress, sum(steps), epoch, run.cfg.epochs)
    try:
        state, loss_sum, count, compile_s, done = _run_chunks(
            run.programs, state, groups, plan, step_keys, run.stop, bar
        )
    finally:
        if bar is not None:
            bar.close()
    if not done:
        return None
    train_wall = time.perf_counter() - wall_start - compile_s

    eval_start = time.perf_counter()
    metrics, eval_compile = {}, 0.0
    for split in SPLITS:
        metrics[split], seconds = _evaluate_split(
            run.programs, state.params, run.eval_groups[split], run.eval_key
        )
        eval_compile += seconds
    eval_wall = time.perf_counter() - eval_start - eval_compile
    probes, probe_compile = dict(_NO_PROBES), 0.0
    if run.cfg.timing_batches > 0:
        probes, probe_compile = _probe_timings(
            run.programs, state, groups, step_keys, run.cfg.timing_batches
        )
    record = {
        "epoch": epoch,
        "loss": loss_sum / max(count, 1.0),
        "dev_acc": metrics["dev"]["acc"],
        "test_acc": metrics["test"]["acc"],
        "dev_loss": metrics["dev"]["loss"],
        "test_loss": metrics["test"]["loss"],
        "steps": int(sum(steps)),
        "timing": {
            **probes,
            "train_wall_s": float(train_wall),
            "eval_s": float(eval_wall),
            "compile_s": float(compile_s + eval_compile + probe_compile),
        },
    }
    return state, record


# ---------------------------------------------------------------------------------------------
# Command line


def resume_command(prog: str, argv: Sequence[str], out: Path) -> str:
    """The command that resumes a run started with ``argv``."""
    args = [a for a in argv if a not in ("--resume", "--overwrite")]
    if not any(a == "--out" or a.startswith("--out=") for a in args):
        args += ["--out", str(out)]
    return shlex.join(["python", "-m", prog, *args, "--resume"])


def summary_line(result: RunResult) -> str:
    """One line: best epoch, its dev and test accuracy, and the mean per-epoch times."""
    if result.best is None:
        return "no epoch completed"
    b = result.best
    text = f"best epoch {b['epoch']}: dev {b['dev_acc']:.2f}% test {b['test_acc']:.2f}%"
    means = {f: _mean_timing(result.history, f) for f in ("forward_s", "backward_s", "update_s")}
    wall = _mean_timing(result.history, "train_wall_s")
    if means["forward_s"] is not None:
        text += (
            f" | mean per epoch: forward {means['forward_s']:.3f}s, backward "
            f"{means['backward_s']:.3f}s, update {means['update_s']:.3f}s (estimated)"
        )
    text += f", train wall {wall:.3f}s"
    return text


def run_cli(
    task_factory: Callable[[], Task],
    cfg: TrainConfig,
    prog: str,
    argv: Sequence[str],
) -> int:
    """Trains under SIGINT/SIGTERM handlers and prints the summary; returns the exit code.

    ``task_factory`` is called after the configuration checks, so that a data error still
    comes before any training; errors (:class:`ConfigError` and the data reader's) propagate.
    """
    check_out_dir(cfg)
    task = task_factory()
    with handle_signals(StopFlag()) as flag:
        result = train(task, cfg, stop=flag)
    print(summary_line(result))
    print(f"results: {result.out / RESULTS_FILE}")
    if result.status != "interrupted":
        return 0
    signum = signal.Signals(result.signum or signal.SIGINT)
    if result.history:
        command = resume_command(prog, argv, result.out)
        print(
            f"interrupted by {signum.name} after epoch {len(result.history)}; checkpoint in "
            f"{result.out / CHECKPOINT_DIR}. Resume with:\n  {command}",
            file=sys.stderr,
        )
    else:
        print(
            f"interrupted by {signum.name} before the first epoch ended: nothing saved; "
            "run the same command again to start afresh.",
            file=sys.stderr,
        )
    return 128 + int(signum)
