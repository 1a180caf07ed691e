"""What the loop needs from an experiment (:class:`Task`) and what it hands back.

A task (MNIST's MLP, a POS tagger, ...) plugs in through the small :class:`Task` interface;
the loop never looks inside a batch beyond its leading ``[steps, batch]`` axes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import jax

Array = jax.Array
Batch = Any  # a pytree of arrays, every leaf [steps, batch, ...]
Params = Any


class Task(Protocol):
    """What the loop needs from an experiment.

    Attributes:
      name: short name used for the default output folder and in ``results.json``.
      metric: optional; the name under which ``100 * correct / count`` is stored: the
        records' ``dev_<metric>`` and ``test_<metric>``, the best epoch (chosen by
        ``dev_<metric>``), the log and the plot. A task without it gets ``"acc"``.
      compiler_options: optional; XLA options for every program compiled for the task
        (``jax.stages.Lowered.compile``'s ``compiler_options``), for example a lower
        backend optimization level where compiling costs more than the code it saves. An
        option that ``XLA_FLAGS`` sets keeps the value given there.

    Extra metrics: every aux entry ``correct_<name>`` that :meth:`loss_fn` returns in
    evaluation is summed over a split like ``correct`` and stored as ``dev_<name>`` and
    ``test_<name>`` (percent of the same ``count``) in every record and in the best epoch;
    a parser, say, selects by ``metric = "uas"`` and reports ``correct_las`` beside it.

    Batches are pytrees of arrays whose leaves all have the shape ``[steps, batch, ...]``:
    a *group* stacks ``steps`` minibatches of equal shape, so that the loop can scan over
    them on the device. A task with a single shape (MNIST) has one group per epoch; a tagger
    with length buckets has one group per bucket. The batch axis is split across devices, so
    its size must be a multiple of the device count. Padding is the task's business: it
    marks padded examples (or tokens) in the batch and leaves them out of ``correct`` and
    ``count``.

    A training group may instead be an :class:`IndexedGroup`: a table of examples that the
    loop sends to the devices once per run, and each epoch's ``[steps, batch]`` rows of it.
    An epoch then transfers its shuffled index, not a shuffled copy of the data set.

    For ``TrainConfig.sparse_update`` the task's :meth:`init` returns Flax variables with a
    non-empty ``"meprop_taps"`` collection beside ``"params"`` (layers built with
    ``meprop_jax.Dense(..., sparse_update=True)``); the loop keeps the taps apart and passes
    them back inside ``params`` to :meth:`loss_fn` in training steps only.

    Model state (optional; meSimp's activity record): a task whose model carries variables
    that change every step but are not trained declares

    * ``state_collections``: names of collections of :meth:`init`'s variables that are model
      state. They stay in ``TrainState.params`` (so evaluation, checkpoints and ``--resume``
      see them) but the optimizer never does.
    * ``state_taps(model_state)``: zero taps (a dict of collections, e.g. meSimp's
      ``"mesimp_taps"``) merged into the variables of every training step; the step
      differentiates them with the parameters.
    * ``fold_state(model_state, tap_grads)``: the next model state from the taps' cotangents
      (pure and jittable, inside the scanned step).

    :meth:`init` returns the variables without the taps. The error-feedback memory
    (``"meprop_memory"``) is the special case whose cotangent *is* the next state; it stays
    inside the trainable variables (:func:`meprop_jax.feedback.split_memory`).

    Schedule (optional): ``schedule(state, epoch, done, chunks, log)`` runs on the host
    before the first of the epoch's ``chunks`` scanned chunks (``done = 0``) and after each
    (``done`` = chunks finished) and returns ``(state, events)``. The state may have new
    shapes (a model that shrinks): the programs recompile, checkpoints store the shapes and
    ``--resume`` rebuilds its template at them. ``events`` (JSON-serialisable) are stored in
    the epoch's record under ``"events"``. The hook must depend only on its arguments, so
    that a resumed run repeats a straight one.
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
          predictions) and ``"count"`` (number of real items), both scalars, and may have
          ``"correct_<name>"`` scalars for extra metrics.
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


class IndexedGroup(NamedTuple):
    """A group whose minibatches are rows of a table that stays on the devices.

    Minibatch ``i`` is every leaf of ``table`` taken at the rows ``index[i]``, so it looks
    exactly like minibatch ``i`` of the plain group ``jax.tree.map(lambda a: a[index],
    table)``. The loop sends a table to the devices the first time a task returns it and
    keeps that copy for as long as the task returns the same object (so the task must not
    change it in place); each epoch sends only its ``index``. Padding is a row of the table
    whose mask is 0.

    Attributes:
      table: pytree of host arrays, every leaf ``[rows, ...]``.
      index: ``[steps, batch]`` integer rows of ``table``, in ``[0, rows)``.
    """

    table: Batch
    index: Any


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
      best: ``{"epoch", "dev_<metric>", "test_<metric>"}`` (and the extra metrics) at the
        best dev epoch, or None.
      status: ``"complete"``, ``"interrupted"`` (by a signal) or ``"stopped"``
        (``max_epochs_this_run`` reached).
      signum: the signal that interrupted the run, if any.
      out: the run folder.
      state: the final training state (of the last completed epoch).
      metric: the task's selection metric (``Task.metric``).
    """

    history: list[dict[str, Any]]
    best: dict[str, Any] | None
    status: str
    signum: int | None
    out: Path
    state: TrainState | None = None
    metric: str = "acc"
