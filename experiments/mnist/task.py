"""The MNIST task of the shared loop: settings, minibatches, loss and data loading.

:class:`MnistTask` is what :func:`experiments.loop.train` trains: the MLP of
:class:`experiments.common.models.MLP` (or, with ``--model cnn``, the
:class:`experiments.mnist.cnn.CNN`) on the paper's split (the first 5,000 training images
are dev, the remaining 55,000 train, plus the 10,000 test images; pixels in [0, 1]).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments.common import feedback_flags
from experiments.common import mesimp as mesimp_loop
from experiments.common.files import recorded_path
from experiments.common.models import MLP
from experiments.common.state_hooks import StateHooks
from experiments.loop.task import IndexedGroup
from experiments.mnist.cnn import CNN, DEFAULT_CHANNELS
from experiments.mnist.data import Mnist, load_mnist, load_mnist_tfds
from meprop_jax import AdaptiveK
from meprop_jax import mesimp as mesimp_lib

__all__ = [
    "DEFAULT_EVAL_BATCH",
    "NUM_CLASSES",
    "MnistSettings",
    "MnistTask",
    "batchify",
    "load_data",
    "padded_index",
    "padded_table",
]

NUM_CLASSES = 10
DEFAULT_EVAL_BATCH = 1000
_CNN_FIELDS = ("network", "channels", "k_conv")


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

    Example:
      >>> import numpy as np
      >>> b = batchify(np.ones((3, 2), np.float32), np.array([7, 8, 9], np.int32), 2)
      >>> b["x"].shape, b["y"].tolist(), b["mask"].tolist()
      ((2, 2, 2), [[7, 8], [9, 0]], [[1.0, 1.0], [1.0, 0.0]])
    """
    index = padded_index(len(x), batch_size, order)
    return {name: column[index] for name, column in padded_table(x, y).items()}


def padded_table(x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """``{"x", "y", "mask"}`` rows of the examples, and one more row (``len(x)``): a zero image
    of label 0 and ``mask`` 0, the padding of :func:`padded_index`."""
    return {
        "x": np.concatenate([x, np.zeros((1, x.shape[1]), x.dtype)]).astype(np.float32, copy=False),
        "y": np.concatenate([y, np.zeros(1, y.dtype)]).astype(np.int32, copy=False),
        "mask": np.concatenate([np.ones(len(x), np.float32), np.zeros(1, np.float32)]),
    }


def padded_index(n: int, batch_size: int, order: np.ndarray | None = None) -> np.ndarray:
    """``[steps, batch_size]`` rows of :func:`padded_table`: ``order`` (default
    ``range(n)``), the last minibatch filled up with the padding row ``n``."""
    index = np.full(math.ceil(n / batch_size) * batch_size, n, np.int32)
    index[:n] = np.arange(n) if order is None else order
    return index.reshape(-1, batch_size)


@dataclasses.dataclass(frozen=True)
class MnistSettings:
    """The MNIST experiment's own settings (validated by
    :func:`experiments.mnist.cli.settings_from_args`).

    With ``kdim`` (the paper's k-dimensional network) ``hidden`` already holds the command
    line's ``--k`` and ``k`` is 0: the settings describe the dense MLP actually trained.
    """

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
    compact_gradients: bool = False
    # Compact gradients (either rule) as FactoredGrad (per-row modes).
    factored_gradients: bool = False
    feedback: float = 0.0
    adaptive: AdaptiveK | None = None
    mesimp: bool = False
    mesimp_threshold: float = mesimp_lib.DEFAULT_THRESHOLD
    mesimp_cycle: int = mesimp_loop.DEFAULT_CYCLE
    mesimp_prunes_per_epoch: int = mesimp_loop.DEFAULT_PRUNES_PER_EPOCH
    network: str = "mlp"
    channels: tuple[int, ...] = DEFAULT_CHANNELS
    k_conv: int = 0
    kernel_layout: str = "in_out"

    @property
    def taps(self) -> bool:
        """Whether the meProp layers hand compact kernel gradients to the loop (through
        taps): for ``sparse_update`` and for ``compact_gradients``."""
        return self.sparse_update or self.compact_gradients

    @property
    def layer_names(self) -> tuple[str, ...]:
        """The MLP's Dense chain: ``hidden_0``, ..., ``output``."""
        return (*(f"hidden_{i}" for i in range(self.layers)), "output")

    def model(self, widths: tuple[int, ...] | None = None) -> MLP | CNN:
        """The MLP (or CNN) these settings describe; ``widths`` overrides the hidden sizes
        (meSimp's shrunk layers)."""
        if self.network == "cnn":
            return CNN(
                channels=self.channels,
                k_conv=self.k_conv,
                hidden=(self.hidden,) * self.layers,
                k=self.k,
                mode=self.mode.replace("-", "_"),
                k_output=self.k_output,
                dropout=self.dropout,
                num_classes=NUM_CLASSES,
            )
        return MLP(
            hidden=(self.hidden,) * self.layers if widths is None else widths,
            k=self.k,
            mode=self.mode.replace("-", "_"),
            k_output=self.k_output,
            dropout=self.dropout,
            num_classes=NUM_CLASSES,
            sparse_update=self.taps,
            feedback=self.feedback,
            adaptive=self.adaptive,
            record=self.mesimp,
            kernel_layout=self.kernel_layout,
            factored_grad=self.factored_gradients,
        )


@dataclasses.dataclass(frozen=True, eq=False)
class MnistTask(StateHooks):
    """MNIST classification as an :class:`experiments.loop.Task`."""

    data: Mnist
    settings: MnistSettings
    name: str = "mnist"

    @property
    def mesimp(self) -> mesimp_loop.MesimpSchedule | None:
        """The meSimp hooks, or None without ``--mesimp``."""
        s = self.settings
        if not s.mesimp:
            return None
        return mesimp_loop.MesimpSchedule(s.layer_names, s.mesimp_threshold, s.mesimp_cycle)

    def widths(self, variables: Any) -> tuple[int, ...] | None:
        """The hidden widths of ``variables`` (they shrink under meSimp), or None."""
        if not self.settings.mesimp:
            return None
        return mesimp_loop.hidden_widths(variables["params"], self.settings.layer_names[:-1])

    def init(self, key: jax.Array) -> Any:
        """Flax-default initial parameters of the MLP (and, with ``sparse_update``, the zero
        taps, whose width in the per-row modes depends on the training batch size; with
        ``mesimp``, the record, without its taps, which the loop makes each step)."""
        k_params, k_meprop = jax.random.split(key)
        rows = self.settings.batch_size if self.settings.taps else 1
        x = jnp.zeros((rows, self.data.train_x.shape[1]), jnp.float32)
        variables = self.settings.model().init({"params": k_params, "meprop": k_meprop}, x, False)
        if self.settings.mesimp:
            variables = {k: v for k, v in variables.items() if k != mesimp_lib.TAP_COLLECTION}
        if self.settings.adaptive is not None:
            variables = feedback_flags.stats_from_init(variables)
        return variables

    def loss_fn(
        self, params: Any, batch: dict[str, jax.Array], key: jax.Array, train: bool
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Mean cross-entropy over the unpadded examples; correct and count as aux.

        Args:
          params: the variables :meth:`init` made.
          batch: ``{"x": [batch, features], "y": [batch], "mask": [batch]}``.
          key: dropout and random-k randomness of this step.
          train: dropout on (and, in the loop, meProp's backward pass in use).

        Returns:
          The scalar loss and ``{"correct": [], "count": []}``.
        """
        k_dropout, k_meprop = jax.random.split(key)
        logits = self.settings.model(self.widths(params)).apply(
            params, batch["x"], train, rngs={"dropout": k_dropout, "meprop": k_meprop}
        )
        mask = batch["mask"]
        count = jnp.sum(mask)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        loss = jnp.sum(ce * mask) / jnp.maximum(count, 1.0)
        hits = (jnp.argmax(logits, axis=-1) == batch["y"]).astype(jnp.float32)
        return loss, {"correct": jnp.sum(hits * mask), "count": count}

    def __post_init__(self) -> None:
        # Built once, before any epoch (it copies the images): see train_groups.
        table = padded_table(self.data.train_x, self.data.train_y)
        object.__setattr__(self, "train_table", table)

    def train_groups(self, epoch: int, key: jax.Array) -> list[IndexedGroup]:
        """One group: the training set shuffled by ``key``, in minibatches, as rows of
        :attr:`train_table` (the minibatches of :func:`batchify`, without copying the
        images each epoch)."""
        del epoch  # the key already depends on it
        seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
        n = len(self.data.train_x)
        order = np.random.default_rng(seed).permutation(n)
        return [IndexedGroup(self.train_table, padded_index(n, self.settings.batch_size, order))]

    def eval_groups(self, split: str) -> list[dict[str, np.ndarray]]:
        """One group: ``split`` in padded minibatches of ``eval_batch_size``."""
        x, y = {
            "dev": (self.data.dev_x, self.data.dev_y),
            "test": (self.data.test_x, self.data.test_y),
        }[split]
        return [batchify(x, y, self.settings.eval_batch_size)]

    def config(self) -> dict[str, Any]:
        """The settings plus the data sizes (the CNN's fields only for ``--model cnn``, so
        that an MLP run's configuration, which ``--resume`` compares, is as before)."""
        settings = dataclasses.asdict(self.settings)
        if self.settings.adaptive is None:  # as before adaptive k existed, for --resume
            del settings["adaptive"]
        if self.settings.network != "cnn":
            settings = {k: v for k, v in settings.items() if k not in _CNN_FIELDS}
        settings["data_dir"] = recorded_path(settings["data_dir"])  # no machine paths
        return {
            **settings,
            "input_dim": int(self.data.train_x.shape[1]),
            "train_size": len(self.data.train_x),
            "dev_size": len(self.data.dev_x),
            "test_size": len(self.data.test_x),
            "data_source": recorded_path(self.data.source),
        }


def load_data(s: MnistSettings) -> Mnist:
    """Reads MNIST as ``--source``/``--data-dir``/``--limit-train`` say.

    Raises:
      DataError: the IDX files are missing or malformed (see :func:`load_mnist`).
      ImportError: ``--source tfds`` without tensorflow-datasets.
    """
    if s.source == "tfds":
        return load_mnist_tfds(limit_train=s.limit_train)
    return load_mnist(s.data_dir, limit_train=s.limit_train)
