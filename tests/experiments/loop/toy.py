"""A tiny synthetic task for the loop's tests.

It has two batch groups of different shapes with padding, like a length-bucketed tagger:
flat examples ``[steps, batch, F]`` and two-token sequences ``[steps, batch, 2, F]``.
"""

import dataclasses
import signal
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

import meprop_jax
from experiments.loop.config import TrainConfig
from experiments.loop.signals import StopFlag
from experiments.loop.task import IndexedGroup

FEATURES, CLASSES, HIDDEN = 6, 3, 16
METRICS = ("epoch", "loss", "dev_acc", "test_acc", "dev_loss", "test_loss", "steps")
SPLIT_SIZES = {"train": (0, 44, 20), "dev": (1, 20, 12), "test": (2, 20, 12)}


class ToyModel(nn.Module):
    k: int
    mode: str
    sparse_update: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dense = meprop_jax.Dense(HIDDEN, k=self.k, mode=self.mode, sparse_update=self.sparse_update)
        x = nn.relu(dense(x))
        return meprop_jax.Dense(CLASSES)(x)


def toy_split(seed: int, n_flat: int, n_seq: int) -> dict[str, np.ndarray]:
    """Inputs with labels from a fixed linear teacher (learnable); a third of the tokens of
    the sequences are padding."""
    rng = np.random.default_rng(seed)
    teacher = np.random.default_rng(99).normal(size=(FEATURES, CLASSES))
    flat = rng.normal(size=(n_flat, FEATURES)).astype(np.float32)
    seq = rng.normal(size=(n_seq, 2, FEATURES)).astype(np.float32)
    seq_mask = np.ones((n_seq, 2), np.float32)
    seq_mask[::3, 1] = 0.0
    return {
        "flat_x": flat,
        "flat_y": np.argmax(flat @ teacher, -1).astype(np.int32),
        "seq_x": seq,
        "seq_y": np.argmax(seq @ teacher, -1).astype(np.int32),
        "seq_mask": seq_mask,
    }


def majority_rate(split: str) -> float:
    """Percent of the real items of ``split`` in its most frequent class: what a model that
    learned nothing but the label prior would score."""
    d = toy_split(*SPLIT_SIZES[split])
    labels = np.concatenate([d["flat_y"], d["seq_y"][d["seq_mask"] > 0]])
    return 100.0 * np.bincount(labels, minlength=CLASSES).max() / len(labels)


def stack(x: np.ndarray, y: np.ndarray, mask: np.ndarray, batch: int) -> dict[str, np.ndarray]:
    """``[n, ...]`` -> ``[steps, batch, ...]``, padding the last minibatch with mask 0."""
    steps = -(-len(x) // batch)
    pad = steps * batch - len(x)

    def padded(a: np.ndarray) -> np.ndarray:
        a = np.concatenate([a, np.zeros((pad, *a.shape[1:]), a.dtype)])
        return a.reshape(steps, batch, *a.shape[1:])

    return {"x": padded(x), "y": padded(y), "mask": padded(mask)}


def indexed(table: dict[str, np.ndarray], order: np.ndarray, batch: int) -> IndexedGroup:
    """The minibatches of ``stack`` over ``table``'s rows in ``order``, as an
    :class:`IndexedGroup` whose last table row (zeros, mask 0) is the padding."""
    table = {k: np.concatenate([a, np.zeros((1, *a.shape[1:]), a.dtype)]) for k, a in table.items()}
    steps = -(-len(order) // batch)
    index = np.full(steps * batch, len(order), np.int32)
    index[: len(order)] = order
    return IndexedGroup(table, index.reshape(steps, batch))


@dataclasses.dataclass(frozen=True, eq=False)
class ToyTask:
    """A :class:`experiments.loop.Task` with two batch groups and no ``metric`` attribute;
    ``stop`` is requested while the minibatches of ``stop_epoch`` are built (a signal
    arriving mid-epoch)."""

    k: int = 4
    mode: str = "unified"
    batch: int = 8
    stop: StopFlag | None = None
    stop_epoch: int = 0
    sparse_update: bool = False
    name: str = "toy"
    indexed: bool = False  # training groups as IndexedGroups of the same minibatches

    def model(self) -> ToyModel:
        return ToyModel(self.k, self.mode, self.sparse_update)

    def _groups(self, d: dict[str, np.ndarray], order: Any = None) -> list[dict[str, np.ndarray]]:
        fo = np.arange(len(d["flat_x"])) if order is None else order[0]
        so = np.arange(len(d["seq_x"])) if order is None else order[1]
        flat_mask = np.ones(len(d["flat_x"]), np.float32)
        if self.indexed and order is not None:
            flat = {"x": d["flat_x"], "y": d["flat_y"], "mask": flat_mask}
            seq = {"x": d["seq_x"], "y": d["seq_y"], "mask": d["seq_mask"]}
            return [indexed(flat, fo, self.batch), indexed(seq, so, self.batch)]
        return [
            stack(d["flat_x"][fo], d["flat_y"][fo], flat_mask[fo], self.batch),
            stack(d["seq_x"][so], d["seq_y"][so], d["seq_mask"][so], self.batch),
        ]

    def init(self, key: jax.Array) -> Any:
        keys = jax.random.split(key)
        x = jnp.zeros((1, FEATURES), jnp.float32)
        return self.model().init({"params": keys[0], "meprop": keys[1]}, x)

    def loss_fn(self, params: Any, batch: Any, key: jax.Array, train: bool) -> Any:
        logits = self.model().apply(params, batch["x"], rngs={"meprop": key})
        mask = batch["mask"]
        count = jnp.sum(mask)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])
        hits = (jnp.argmax(logits, -1) == batch["y"]).astype(jnp.float32)
        return jnp.sum(ce * mask) / jnp.maximum(count, 1.0), {
            "correct": jnp.sum(hits * mask),
            "count": count,
        }

    def train_groups(self, epoch: int, key: jax.Array) -> list[dict[str, np.ndarray]]:
        if self.stop is not None and epoch == self.stop_epoch:
            self.stop.request(signal.SIGINT)
        d = toy_split(*SPLIT_SIZES["train"])
        rng = np.random.default_rng(np.asarray(jax.random.key_data(key)).tolist())
        return self._groups(
            d, (rng.permutation(len(d["flat_x"])), rng.permutation(len(d["seq_x"])))
        )

    def eval_groups(self, split: str) -> list[dict[str, np.ndarray]]:
        return self._groups(toy_split(*SPLIT_SIZES[split]))

    def config(self) -> dict[str, Any]:
        return {"k": self.k, "mode": self.mode, "batch": self.batch}


@dataclasses.dataclass(frozen=True, eq=False)
class TokenToyTask(ToyTask):
    """The toy task under another selection metric (``tok``), with an extra one: ``top2``,
    the label among the two highest logits (so never below ``tok``)."""

    metric: str = "tok"

    def loss_fn(self, params: Any, batch: Any, key: jax.Array, train: bool) -> Any:
        loss, aux = super().loss_fn(params, batch, key, train)
        logits = self.model().apply(params, batch["x"], rngs={"meprop": key})
        label = jnp.take_along_axis(logits, batch["y"][..., None], -1)
        top2 = (jnp.sum(logits > label, -1) < 2).astype(jnp.float32)
        return loss, {**aux, "correct_top2": jnp.sum(top2 * batch["mask"])}


def config(out: Path, **kw: Any) -> TrainConfig:
    """Loop settings for the toy task: Adam's rate 0.03 learns it in three epochs (1e-3, the
    default, stays at the label prior)."""
    base = {
        "epochs": 2,
        "devices": 1,
        "lr": 0.03,
        "timing_batches": 0,
        "chunk_steps": 2,
        "progress": False,
    }
    return TrainConfig(out=out, **{**base, **kw})


def metrics(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The numbers a run computes (everything but the timings)."""
    return [{k: r[k] for k in METRICS} for r in history]


def quiet(_: str) -> None:
    pass


def file_hashes(folder: Path) -> dict[str, bytes]:
    """Every file below ``folder`` (and every folder, as an empty entry) with its bytes."""
    return {
        str(p.relative_to(folder)): p.read_bytes() if p.is_file() else b""
        for p in sorted(folder.rglob("*"))
    }
