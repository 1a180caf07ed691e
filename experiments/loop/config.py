"""The loop's settings: :class:`TrainConfig`, its flags and checks, optimizers, devices."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import optax

from experiments.common import ConfigError, require
from experiments.common.cli import flag_group
from experiments.common.files import recorded_path
from experiments.loop import distributed
from meprop_jax import optim

OPTIMIZERS: tuple[str, ...] = ("adam", "adagrad", "sgd")


#: Learning rates used when ``--lr`` is not given. The paper: Adam 1e-3 everywhere; AdaGrad
#: 0.1 for MNIST (0.01 for POS tagging and parsing); SGD has no paper value.
DEFAULT_LR: Mapping[str, float] = {"adam": 1e-3, "adagrad": 0.1, "sgd": 0.1}


#: Minibatches per timing probe: enough for a stable estimate, few enough that the probes
#: cost well under a tenth of an epoch (see :mod:`experiments.loop.probes`).
DEFAULT_TIMING_BATCHES = 20
# Config fields that may change between an interrupted run and its --resume: they do not
# change the numbers a run computes (devices: only up to float reassociation).
RESUMABLE_CHANGES = frozenset(
    {
        "epochs",
        "num_devices",
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
        # Where the data was read from, and when to stop: neither changes an epoch's numbers.
        "patience",
        "data_source",
        "train_file",
        "dev_file",
        "test_file",
    }
)


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
      keep_checkpoints: how many of the latest checkpoints to keep (the best dev epoch's is
        kept too).
      timing_batches: minibatches per timing probe; 0 disables the probes.
      chunk_steps: minibatches per scanned chunk (interrupts and the progress bar act at
        chunk boundaries); 0 picks about a tenth of an epoch.
      progress: show a tqdm bar; None shows one when stderr is a terminal.
      sparse_update: compact meProp gradients and column-sparse optimizer updates (see the
        module docstring); the task's model must have compact-gradient taps.
      compact_gradients: compact meProp gradients (the model must have taps, as for
        ``sparse_update``) with the authors' update: the optimizer moves every weight as it
        would on the masked dense gradient (``optim.compact(..., lazy=False)``). The same
        updates, without building the dense kernel gradient.
      patience: early stopping: end the run once the dev metric has not improved for this
        many epochs (the best epoch is at least ``patience`` epochs before the last); 0 runs
        every epoch. The test score is still read at the best dev epoch.
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
    timing_batches: int = DEFAULT_TIMING_BATCHES
    chunk_steps: int = 0
    progress: bool | None = None
    sparse_update: bool = False
    compact_gradients: bool = False
    patience: int = 0

    @property
    def learning_rate(self) -> float:
        """``lr``, or the optimizer's default."""
        return DEFAULT_LR[self.optimizer] if self.lr is None else self.lr

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly copy, with the learning rate resolved."""
        d = dataclasses.asdict(self)
        d["out"] = recorded_path(self.out)
        d["lr"] = self.learning_rate
        return d


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


def make_sparse_optimizer(
    name: str, lr: float, clip: float = 0.0, lazy: bool = True
) -> optim.SparseOptimizer:
    """The twin of :func:`make_optimizer` for compact meProp kernel gradients.

    Same hyperparameters (AdaGrad's accumulator from 0 with ``eps = 1e-6``, Adam's optax
    defaults) and the same element-wise clipping. With ``lazy`` (``--sparse-update``) compact
    meProp kernels are updated in their selected columns only (Adam lazily, see
    :mod:`meprop_jax.optim`), every other parameter densely by the same rule; with
    ``lazy=False`` Adam moves every weight, as :func:`make_optimizer`'s does on the masked
    dense gradient (AdaGrad and SGD move nothing where the gradient is zero, so for them the
    two rules are one).
    """
    bound = clip if clip > 0 else None
    if name == "adam":
        return optim.sparse_adam(lr, clip=bound, lazy=lazy)
    if name == "adagrad":
        return optim.sparse_adagrad(lr, initial_accumulator_value=0.0, eps=1e-6, clip=bound)
    if name == "sgd":
        return optim.sparse_sgd(lr, clip=bound)
    raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def resolve_devices(requested: int | None, batch_sizes: Sequence[int] = ()) -> int:
    """The number of local devices to use: ``requested``, or by default the most local
    devices that divide every one of ``batch_sizes`` (all of them when none is given). A run
    on several processes uses every device of every process.

    Raises:
      ConfigError: ``requested`` is below 1 or above the number available.
    """
    if jax.process_count() > 1:
        return distributed.check_all_devices(requested)
    available = jax.local_device_count()
    if requested is None:
        return _most_devices(available, batch_sizes)
    if requested < 1 or requested > available:
        raise ConfigError(f"--devices must be between 1 and {available} here, got {requested}")
    return requested


def _most_devices(available: int, batch_sizes: Sequence[int]) -> int:
    return max(d for d in range(1, available + 1) if all(b % d == 0 for b in batch_sizes))


def check_divisible(size: int, devices: int, flag: str = "--batch-size") -> None:
    """Rejects a batch size that cannot be split evenly over the devices.

    Raises:
      ConfigError: naming ``flag``, and ``--devices`` with the most devices that would do.
    """
    if size % devices:
        raise ConfigError(
            f"{flag} {size} cannot be split over {devices} devices: pass --devices "
            f"{_most_devices(devices, [size])} (the most that divide {size}), or a multiple "
            f"of {devices} for {flag}"
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
    require(cfg.patience >= 0, f"--patience must be >= 0 (0 disables it), got {cfg.patience}")
    require(not (cfg.resume and cfg.overwrite), "--resume and --overwrite exclude each other")
    resolve_devices(cfg.devices)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds the loop's flags to ``parser``: ``--epochs``, ``--optimizer``, ... under
    "training", ``--out``, ``--resume``, ... under "checkpoints", ``--sparse-update`` under
    "meProp" and the flags of several processes under their own group."""
    g = flag_group(parser, "training")
    g.add_argument("--epochs", type=int, default=20, help="epochs in all (default 20)")
    g.add_argument(
        "--patience",
        type=int,
        default=0,
        metavar="P",
        help="early stopping: end the run once dev has not improved for P epochs; test is "
        "still read at the best dev epoch (default 0 = run every epoch)",
    )
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
    g.add_argument(
        "--timing-batches",
        type=int,
        default=DEFAULT_TIMING_BATCHES,
        help="minibatches per forward/backward/update timing probe; 0 disables (default "
        f"{DEFAULT_TIMING_BATCHES}: under a tenth of an MNIST epoch)",
    )
    g.add_argument(
        "--chunk-steps",
        type=int,
        default=0,
        help="minibatches per scanned chunk; 0 = a tenth of an epoch (default)",
    )
    c = flag_group(parser, "checkpoints")
    c.add_argument("--out", type=Path, default=None, help="run folder (default runs/<config>)")
    c.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last checkpoint (also to more --epochs)",
    )
    c.add_argument(
        "--overwrite",
        action="store_true",
        help="discard the checkpoints already in --out and train afresh (without it, a "
        "finished run asked for again only says where its results are)",
    )
    c.add_argument(
        "--checkpoint-every", type=int, default=1, help="epochs between checkpoints (default 1)"
    )
    c.add_argument(
        "--keep-checkpoints",
        type=int,
        default=3,
        help="latest checkpoints kept, besides the best dev epoch's (default 3)",
    )
    flag_group(parser, "meProp").add_argument(
        "--sparse-update",
        action="store_true",
        help="keep the meProp kernels' gradients compact and update only their selected "
        "columns with the column-sparse --optimizer (Adam becomes lazy Adam); default: the "
        "authors' masked dense gradient and a stock optimizer. Needs a model with meProp "
        "layers (k > 0)",
    )
    distributed.add_distributed_arguments(parser)


def train_config_from_args(args: argparse.Namespace, default_out: Path) -> TrainConfig:
    """Builds and validates a :class:`TrainConfig` from parsed flags (joining the other
    processes first, if the task's command line has not done so)."""
    distributed.setup_processes(args)
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
        patience=args.patience,
    )
    validate_config(cfg)
    return cfg
