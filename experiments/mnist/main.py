"""MNIST with meProp: an MLP trained by the shared loop (``python -m experiments.mnist``).

The model is the paper's MLP, 784-500-500-10 by default: ``--layers`` hidden layers of
``--hidden`` units, each ``meprop_jax.Dense`` -> ReLU -> optional inverted dropout, then a
10-way output layer. meProp (top-k of the output gradient of each hidden linear layer) is on
by default with ``--k 30 --mode unified`` and minibatches of 50: the unified (batch-shared)
selection is the variant that turns into small dense products on an accelerator, and k = 30
is within the paper's MNIST range (k = 10-30 for h = 500). ``--k 0`` is ordinary backprop;
``--mode per-example`` is the paper's CPU variant (its CPU runs used minibatches of 10);
``--mode random`` the random-k control; ``--kdim`` the "k-dimensional network" baseline, a
dense MLP whose hidden size is k. The output layer stays dense unless ``--k-output`` is set.

``--sparse-update`` (a loop flag, see :mod:`experiments.train`) builds the hidden layers with
``meprop_jax.Dense(sparse_update=True)``: their kernels' gradients stay compact and the
column-sparse ``--optimizer`` updates only the selected columns (Adam becomes lazy Adam). The
output layer (and ``--k-output``) keeps the masked dense gradient. It needs ``--k >= 1``.

Initialisation is Flax's default for ``Dense`` (LeCun-normal kernels, zero biases); the
authors' C# code drew kernels from N(0, sqrt(6 / (fan_in + fan_out))). The data split is the
paper's: the first 5,000 training images are dev, the remaining 55,000 train, plus the
10,000 test images; pixels are scaled to [0, 1].

Examples:
  python -m experiments.mnist --epochs 1 --limit-train 2000
  python -m experiments.mnist --k 0                      # the dense baseline
  python -m experiments.mnist --optimizer adagrad        # lr 0.1, as in the paper
  python -m experiments.mnist --sparse-update            # column-sparse (lazy) Adam
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import loop
from experiments.common import DataError
from experiments.common.models import MLP
from experiments.mnist.data import Mnist, load_mnist, load_mnist_tfds

NUM_CLASSES = 10
MAX_LAYERS = 5
DEFAULT_EVAL_BATCH = 1000


# ---------------------------------------------------------------------------------------------
# Model


# ---------------------------------------------------------------------------------------------
# Batches and the task


def batchify(
    x: np.ndarray, y: np.ndarray, batch_size: int, order: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Stacks examples into ``[steps, batch_size, ...]`` minibatches.

    The last minibatch is padded with zero images whose ``mask`` is 0, so every example is
    used once (like PyTorch's ``DataLoader`` without ``drop_last``) and the padding counts
    for nothing.

    Args:
      x: ``[n, features]`` images.
      y: ``[n]`` labels.
      batch_size: examples per minibatch.
      order: optional permutation of ``range(n)``.

    Returns:
      ``{"x": [steps, batch, features] float32, "y": [steps, batch] int32,
      "mask": [steps, batch] float32}``.
    """
    n = len(x)
    steps = math.ceil(n / batch_size)
    idx = np.arange(n) if order is None else order
    bx = np.zeros((steps * batch_size, x.shape[1]), np.float32)
    by = np.zeros(steps * batch_size, np.int32)
    mask = np.zeros(steps * batch_size, np.float32)
    np.take(x, idx, axis=0, out=bx[:n])
    np.take(y, idx, axis=0, out=by[:n])
    mask[:n] = 1.0
    return {
        "x": bx.reshape(steps, batch_size, -1),
        "y": by.reshape(steps, batch_size),
        "mask": mask.reshape(steps, batch_size),
    }


@dataclasses.dataclass(frozen=True)
class MnistSettings:
    """The MNIST experiment's own settings (validated; see :func:`settings_from_args`)."""

    hidden: int = 500
    layers: int = 2
    k: int = 30
    mode: str = "unified"
    k_output: int = 0
    dropout: float = 0.0
    kdim: bool = False
    batch_size: int = 50
    eval_batch_size: int = DEFAULT_EVAL_BATCH
    limit_train: int | None = None
    source: str = "local"
    data_dir: str | None = None
    sparse_update: bool = False

    def model(self) -> MLP:
        """The MLP these settings describe."""
        return MLP(
            hidden=(self.hidden,) * self.layers,
            k=self.k,
            mode=self.mode.replace("-", "_"),
            k_output=self.k_output,
            dropout=self.dropout,
            sparse_update=self.sparse_update,
        )


@dataclasses.dataclass(frozen=True, eq=False)
class MnistTask:
    """MNIST classification as a :class:`experiments.train.Task`."""

    data: Mnist
    settings: MnistSettings
    name: str = "mnist"

    def init(self, key: jax.Array) -> Any:
        """Flax-default initial parameters of the MLP (and, with ``sparse_update``, the zero
        taps, whose width in the per-row modes depends on the training batch size)."""
        k_params, k_meprop = jax.random.split(key)
        rows = self.settings.batch_size if self.settings.sparse_update else 1
        x = jnp.zeros((rows, self.data.train_x.shape[1]), jnp.float32)
        return self.settings.model().init({"params": k_params, "meprop": k_meprop}, x, False)

    def loss_fn(
        self, params: Any, batch: dict[str, jax.Array], key: jax.Array, train: bool
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean cross-entropy over the unpadded examples; correct and count as aux."""
        k_dropout, k_meprop = jax.random.split(key)
        logits = self.settings.model().apply(
            params, batch["x"], train, rngs={"dropout": k_dropout, "meprop": k_meprop}
        )
        mask = batch["mask"]
        count = jnp.sum(mask)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        loss = jnp.sum(ce * mask) / jnp.maximum(count, 1.0)
        hits = (jnp.argmax(logits, axis=-1) == batch["y"]).astype(jnp.float32)
        return loss, {"correct": jnp.sum(hits * mask), "count": count}

    def train_groups(self, epoch: int, key: jax.Array) -> list[dict[str, np.ndarray]]:
        """One group: the training set shuffled by ``key``, in minibatches."""
        del epoch  # the key already depends on it
        seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
        order = np.random.default_rng(seed).permutation(len(self.data.train_x))
        return [batchify(self.data.train_x, self.data.train_y, self.settings.batch_size, order)]

    def eval_groups(self, split: str) -> list[dict[str, np.ndarray]]:
        """One group: ``split`` in padded minibatches of ``eval_batch_size``."""
        x, y = {
            "dev": (self.data.dev_x, self.data.dev_y),
            "test": (self.data.test_x, self.data.test_y),
        }[split]
        return [batchify(x, y, self.settings.eval_batch_size)]

    def config(self) -> dict[str, Any]:
        """The settings plus the data sizes."""
        return {
            **dataclasses.asdict(self.settings),
            "input_dim": int(self.data.train_x.shape[1]),
            "train_size": len(self.data.train_x),
            "dev_size": len(self.data.dev_x),
            "test_size": len(self.data.test_x),
            "data_source": self.data.source,
        }


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m experiments.mnist`` flags."""
    parser = argparse.ArgumentParser(
        prog="python -m experiments.mnist",
        description="Train the paper's MNIST MLP with meProp.",
    )
    m = parser.add_argument_group("model")
    m.add_argument("--hidden", type=int, default=500, help="hidden layer size (default 500)")
    m.add_argument(
        "--layers", type=int, default=2, help=f"hidden layers, 1-{MAX_LAYERS} (default 2)"
    )
    m.add_argument(
        "--k",
        type=int,
        default=30,
        help="meProp k of the hidden layers (default 30); 0 = ordinary backprop",
    )
    loop.add_mode_argument(m)
    m.add_argument(
        "--k-output", type=int, default=0, help="meProp k of the output layer (default 0 = dense)"
    )
    m.add_argument(
        "--kdim",
        action="store_true",
        help="the k-dimensional baseline: a dense MLP with hidden size k (overrides --hidden)",
    )
    m.add_argument(
        "--dropout", type=float, default=0.0, help="dropout rate after each ReLU (default 0)"
    )
    d = parser.add_argument_group("data")
    d.add_argument(
        "--batch-size", type=int, default=50, help="training minibatch, all devices (default 50)"
    )
    d.add_argument(
        "--eval-batch-size",
        type=int,
        default=None,
        help=f"evaluation minibatch (default {DEFAULT_EVAL_BATCH}, rounded up to a multiple "
        "of the device count)",
    )
    d.add_argument(
        "--data-dir",
        default=None,
        help="folder with the MNIST IDX files (default: $MEPROP_DATA_DIR, then the cache)",
    )
    d.add_argument(
        "--limit-train", type=int, default=None, help="use the first N training examples"
    )
    d.add_argument(
        "--source",
        choices=("local", "tfds"),
        default="local",
        help="local IDX files (default) or tensorflow-datasets",
    )
    loop.add_train_arguments(parser)
    return parser


def settings_from_args(args: argparse.Namespace, devices: int) -> MnistSettings:
    """Validates the MNIST flags; ``devices`` is the resolved device count.

    Raises:
      ConfigError: naming the offending flag(s).
    """
    check = loop.require
    check(1 <= args.layers <= MAX_LAYERS, f"--layers must be 1..{MAX_LAYERS}, got {args.layers}")
    check(args.k >= 0, f"--k must be >= 0 (0 = ordinary backprop), got {args.k}")
    check(args.k_output >= 0, f"--k-output must be >= 0, got {args.k_output}")
    check(
        args.k_output < NUM_CLASSES,
        f"--k-output {args.k_output} must be below the {NUM_CLASSES} output units "
        "(0 = dense output layer)",
    )
    check(0.0 <= args.dropout < 1.0, f"--dropout must be in [0, 1), got {args.dropout}")
    check(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    check(
        args.limit_train is None or args.limit_train >= 1,
        f"--limit-train must be >= 1, got {args.limit_train}",
    )
    if args.kdim:
        check(args.k >= 1, "--kdim needs --k >= 1: the hidden size of the dense baseline")
        hidden, k = args.k, 0
    else:
        check(args.hidden >= 1, f"--hidden must be >= 1, got {args.hidden}")
        # The library treats k >= out as dense backprop; here that is surely a mistake.
        check(
            args.k < args.hidden,
            f"--k {args.k} must be smaller than --hidden {args.hidden} "
            "(use --k 0 for ordinary backprop)",
        )
        hidden, k = args.hidden, args.k
    check(
        not args.sparse_update or k >= 1,
        "--sparse-update needs meProp hidden layers: --k >= 1 without --kdim (it updates the "
        "selected columns only; with --k 0 every column is selected)",
    )
    loop.check_divisible(args.batch_size, devices, "--batch-size")
    eval_batch = loop.resolve_eval_batch(args.eval_batch_size, DEFAULT_EVAL_BATCH, devices)
    return MnistSettings(
        hidden=hidden,
        layers=args.layers,
        k=k,
        mode=args.mode,
        k_output=args.k_output,
        dropout=args.dropout,
        kdim=args.kdim,
        batch_size=args.batch_size,
        eval_batch_size=eval_batch,
        limit_train=args.limit_train,
        source=args.source,
        data_dir=args.data_dir,
        sparse_update=args.sparse_update,
    )


def default_out(s: MnistSettings, args: argparse.Namespace) -> Path:
    """``runs/mnist-<config>``: the same flags give the same folder, so ``--resume`` finds it."""
    if s.kdim:
        parts = [f"kdim{s.hidden}"]
    elif s.k == 0:
        parts = ["dense"]
    else:
        parts = [f"k{s.k}", s.mode]
    if s.sparse_update:
        parts.append("sparse")
    parts += [f"h{s.hidden}x{s.layers}", args.optimizer, f"b{s.batch_size}", f"s{args.seed}"]
    if args.lr is not None:
        parts.append(f"lr{args.lr:g}")
    if args.clip > 0:
        parts.append(f"clip{args.clip:g}")
    if s.k_output:
        parts.append(f"ko{s.k_output}")
    if s.dropout:
        parts.append(f"drop{s.dropout:g}")
    if s.limit_train is not None:
        parts.append(f"n{s.limit_train}")
    return Path("runs") / "-".join(["mnist", *parts])


def load_data(s: MnistSettings) -> Mnist:
    """Reads MNIST as ``--source``/``--data-dir``/``--limit-train`` say."""
    if s.source == "tfds":
        return load_mnist_tfds(limit_train=s.limit_train)
    return load_mnist(s.data_dir, limit_train=s.limit_train)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the experiment; returns the exit code (130 after Ctrl-C, with a checkpoint).

    Bad flags and missing data end the program with exit code 2 before any training.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        devices = loop.resolve_devices(args.devices)
        settings = settings_from_args(args, devices)
        cfg = loop.train_config_from_args(args, default_out(settings, args))
        return loop.run_cli(
            lambda: MnistTask(load_data(settings), settings), cfg, "experiments.mnist", argv
        )
    except loop.ConfigError as exc:
        parser.error(str(exc))
    except (DataError, ImportError) as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    return 2  # not reached: parser.error and parser.exit raise SystemExit
