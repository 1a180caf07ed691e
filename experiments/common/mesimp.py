"""meSimp in the training loop: the cycle schedule, the record as model state, real shrinking.

meSimp (Sun et al., arXiv 1711.06528) trains with meProp and permanently removes the hidden
units that top-k seldom selects (:mod:`meprop_jax.mesimp` has the record, the prune rule and
the shrinking). This module runs it inside :func:`experiments.loop.train` for a chain of Dense
layers (an MLP's ``hidden_0``, ``hidden_1``, ..., ``output``).

Schedule (the authors' ``Mnist.cs``)
------------------------------------
Training runs in cycles of ``cycle`` epochs (default 5). Even cycles (0-based epochs 0-4,
10-14, ...; the log's 1-based epochs 1-5, 11-15) *simplify*: the scanned epoch is split into
``prunes_per_epoch`` chunks (default 8, the authors' ``IterPerEpoch``) and after every chunk
each hidden layer is pruned. Odd cycles train plain meProp on the shrunk network. The record
keeps counting in odd cycles (the authors' ``Record.Store`` is never paused), so the first
prune of the next even cycle sees the whole odd cycle. The optimizer's moments (Adam's ``mu``
and ``nu``) are zeroed at the start of every cycle, keeping the step count and so Adam's bias
correction (the authors' ``Opt.Prepare``).

The record
----------
Every hidden layer is ``meprop_jax.Dense(record=True)``. Its ``"mesimp"`` collection holds
``hits`` ``[units]`` (examples that updated the unit since the last prune), ``examples``
``[]`` (examples counted) and ``mask`` ``[units]`` (1 for a surviving unit). The training step
takes the cotangents of zero record taps with the gradients and adds them to the record
(:meth:`MesimpSchedule.fold_state`), so the record lives in the training state, is
checkpointed with the parameters and survives ``--resume``. An example updates a unit when
the unit is in its top-k and its gradient there is nonzero (an inactive ReLU unit that fills
a top-k updates nothing; see :class:`meprop_jax.RecordTap`). Which top-k depends on the mode:

* ``per_example`` (the authors'): each example's own ``k`` units, so ``hits / examples`` is
  the fraction of examples whose top-k held the unit with a nonzero gradient.
* ``unified``: the batch's one set of ``k`` units, so ``hits / examples`` is the fraction of
  examples that had a nonzero gradient at the unit in a batch whose shared top-k held it.

Examples whose gradient is all zero (padding) are not counted.

Pruning and shrinking
---------------------
A prune keeps a unit if it survived before and ``hits >= floor(threshold * examples)``
(threshold 0.1 by default), then restarts the counts. When a layer loses units, the network
is made smaller for real: the parameters and the optimizer state are gathered to the
survivors (:func:`meprop_jax.mesimp.shrink`), the next layer's input rows go with them and
every width is rounded up to a multiple of ``pad_to`` (16) with masked padding units, so the
jitted programs recompile for a bounded number of shapes. Forward, backward and update then
run at the new widths. With ``lstm=True`` the first layer is a ``meprop_jax.LSTMCell(record=
True)`` whose hidden unit ties its four gates (:func:`meprop_jax.mesimp.shrink_lstm`) and the
other layers read its hidden state (the tagger's output layer).

The flags (``--mesimp``, ``--mesimp-threshold``, ``--mesimp-cycle``,
``--mesimp-prunes-per-epoch``, ``--export``) are shared by the experiments:
:func:`add_mesimp_arguments` and :func:`mesimp_options`; :func:`prune_events` and
:func:`widths_at` read the resizes back from ``results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from flax import serialization

from experiments.common.cli import flag_group
from experiments.common.errors import require
from meprop_jax import mesimp

__all__ = [
    "DEFAULT_CYCLE",
    "DEFAULT_PRUNES_PER_EPOCH",
    "MesimpSchedule",
    "StockMLP",
    "add_mesimp_arguments",
    "chunk_steps",
    "export_stock",
    "hidden_widths",
    "mesimp_options",
    "out_part",
    "prune_events",
    "prunes_in",
    "record_widths",
    "resets_moments",
    "saved_widths",
    "surviving_units",
    "widths_at",
    "write_export",
]

DEFAULT_CYCLE = 5
DEFAULT_PRUNES_PER_EPOCH = 8


def prunes_in(epoch: int, cycle: int) -> bool:
    """Whether the 1-based ``epoch`` belongs to an even (simplifying) cycle.

    Example:
      >>> [e for e in range(1, 21) if prunes_in(e, 5)]
      [1, 2, 3, 4, 5, 11, 12, 13, 14, 15]
    """
    return ((epoch - 1) // cycle) % 2 == 0


def resets_moments(epoch: int, cycle: int) -> bool:
    """Whether the 1-based ``epoch`` starts a cycle (the optimizer's moments are zeroed).

    Example:
      >>> [e for e in range(1, 21) if resets_moments(e, 5)]
      [1, 6, 11, 16]
    """
    return (epoch - 1) % cycle == 0


def surviving_units(record: Mapping[str, Any], hidden: Sequence[str]) -> tuple[int, ...]:
    """The units of each hidden layer whose mask is 1, in the order of ``hidden``."""
    keep = mesimp.keep_sets(record)
    return tuple(int(np.sum(np.asarray(keep[name]))) for name in hidden)


def hidden_widths(params: Mapping[str, Any], hidden: Sequence[str]) -> tuple[int, ...]:
    """The current (padded) widths of the hidden layers: their bias sizes in ``params``."""
    return tuple(int(np.shape(params[name]["bias"])[0]) for name in hidden)


def record_widths(record: Mapping[str, Any], hidden: Sequence[str]) -> tuple[int, ...]:
    """The current (padded) widths of the recorded layers: their mask sizes in the record
    (Dense layers and LSTM cells alike)."""
    return tuple(int(np.shape(record[name]["mask"])[0]) for name in hidden)


@dataclasses.dataclass(frozen=True)
class MesimpSchedule:
    """The model state and schedule hooks of :class:`experiments.loop.Task` for meSimp.

    Attributes:
      layers: the Dense chain's names in ``params``, hidden layers first, output last; with
        ``lstm``, the LSTM cell first, then the Dense layers that read its hidden state.
      threshold: the prune threshold (fraction of the examples), in (0, 1).
      cycle: epochs per cycle.
      pad_to: widths are rounded up to a multiple of this.
      lstm: ``layers[0]`` is an LSTM cell (its only recorded layer), shrunk with
        :func:`meprop_jax.mesimp.shrink_lstm`.
    """

    layers: tuple[str, ...]
    threshold: float = mesimp.DEFAULT_THRESHOLD
    cycle: int = DEFAULT_CYCLE
    pad_to: int = mesimp.DEFAULT_PAD_TO
    lstm: bool = False

    state_collections: tuple[str, ...] = (mesimp.COLLECTION,)

    @property
    def hidden(self) -> tuple[str, ...]:
        """The recorded (shrinking) layers."""
        return self.layers[:1] if self.lstm else self.layers[:-1]

    def state_taps(self, model_state: Mapping[str, Any]) -> dict[str, Any]:
        """Zero record taps of the record's current widths."""
        return {mesimp.TAP_COLLECTION: mesimp.zero_taps(model_state[mesimp.COLLECTION])}

    def fold_state(self, model_state: Mapping[str, Any], tap_grads: Mapping[str, Any]):
        """The record plus one step's selection counts."""
        record = mesimp.accumulate(model_state[mesimp.COLLECTION], tap_grads[mesimp.TAP_COLLECTION])
        return {**model_state, mesimp.COLLECTION: record}

    def schedule(
        self, state: Any, epoch: int, done: int, chunks: int, log: Callable[[str], None]
    ) -> tuple[Any, list[dict[str, Any]]]:
        """Zeroes the moments at a cycle's start (``done = 0``); prunes and shrinks after
        every chunk of a simplifying epoch. Returns the state and the prune's event
        ``{"epoch", "prune", "sizes", "widths"}`` (sizes: surviving units per hidden layer;
        widths: the padded widths)."""
        del chunks
        if done == 0:
            if resets_moments(epoch, self.cycle):
                state = state._replace(opt_state=mesimp.reset_moments(state.opt_state))
            return state, []
        if not prunes_in(epoch, self.cycle):
            return state, []
        variables = state.params
        before = surviving_units(variables[mesimp.COLLECTION], self.hidden)
        record = mesimp.prune(variables[mesimp.COLLECTION], self.threshold)
        after = surviving_units(record, self.hidden)
        params, opt_state = variables["params"], state.opt_state
        if after != before:
            old_widths = record_widths(variables[mesimp.COLLECTION], self.hidden)
            shrunk = self._shrink(params, opt_state, record)
            params, opt_state, record = shrunk.params, shrunk.opt_state, shrunk.record
            log(
                f"epoch {epoch} prune {done}: hidden sizes {_join(before)} -> {_join(after)} "
                f"(padded {_join(shrunk.widths)}"
                + ("" if shrunk.widths != old_widths else ", same shapes")
                + ")"
            )
        new = {**variables, "params": params, mesimp.COLLECTION: record}
        event = {
            "epoch": epoch,
            "prune": done,
            "sizes": list(after),
            "widths": list(record_widths(record, self.hidden)),
        }
        return state._replace(params=new, opt_state=opt_state), [event]

    def _shrink(self, params: Any, opt_state: Any, record: Any) -> mesimp.Shrunk:
        keep = mesimp.keep_sets(record)
        if self.lstm:
            cell, *readers = self.layers
            return mesimp.shrink_lstm(
                params, opt_state, keep[cell], cell, readers, pad_to=self.pad_to, record=record
            )
        return mesimp.shrink(
            params, opt_state, keep, self.layers, pad_to=self.pad_to, record=record
        )


def _join(sizes: Sequence[int]) -> str:
    return ",".join(str(s) for s in sizes)


class StockMLP(nn.Module):
    """The exported model: a stock ``flax.linen`` ReLU MLP of ``nn.Dense`` layers.

    Attributes:
      hidden: the hidden sizes (meSimp's surviving units).
      num_classes: output size.

    Its layers are named ``hidden_0``, ``hidden_1``, ..., ``output``, like
    :class:`experiments.common.models.MLP`'s, so ``mesimp.export``'s parameters load into it.
    """

    hidden: Sequence[int]
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """Logits ``[batch, num_classes]`` of ``x`` ``[batch, features]``."""
        for i, size in enumerate(self.hidden):
            x = nn.relu(nn.Dense(size, name=f"hidden_{i}")(x))
        return nn.Dense(self.num_classes, name="output")(x)


def export_stock(
    variables: Mapping[str, Any], layers: Sequence[str]
) -> tuple[dict[str, Any], tuple[int, ...]]:
    """The :class:`StockMLP` variables of the surviving units, and their hidden sizes.

    Args:
      variables: the trained model's variables (``"params"`` and ``"mesimp"``).
      layers: the Dense chain, output last.

    Returns:
      ``({"params": stock parameters}, hidden sizes)``, on the host.
    """
    stock, sizes = mesimp.export(
        variables["params"], mesimp.keep_sets(variables[mesimp.COLLECTION]), layers
    )
    stock = {"params": jax.device_get({name: stock[name] for name in layers})}
    return stock, tuple(int(s) for s in sizes)


def write_export(
    directory: Path,
    stock: Mapping[str, Any],
    sizes: Sequence[int],
    layers: Sequence[str],
    input_dim: int,
    num_classes: int,
) -> None:
    """Writes ``directory/params.msgpack`` (``flax.serialization.to_bytes`` of ``stock``, from
    :func:`export_stock`) and ``directory/config.json`` (sizes, activation, layer names)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "params.msgpack").write_bytes(serialization.to_bytes(dict(stock)))
    config = {
        "model": "flax.linen MLP of nn.Dense layers, ReLU after every hidden layer",
        "input_dim": int(input_dim),
        "hidden_sizes": [int(s) for s in sizes],
        "num_classes": int(num_classes),
        "activation": "relu",
        "layers": list(layers),
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")


# ------------------------------------------------------------------------ flags and results

_SCHEDULE_HELP = (
    "meSimp (Sun et al. 2017): train with meProp and permanently remove the hidden units that "
    "top-k seldom selects; the layers shrink for real (forward included), padded to multiples "
    "of 16 with masked units. Training runs in cycles of --mesimp-cycle epochs: even cycles "
    "(epochs 1-5, 11-15, ... with the default 5) prune about --mesimp-prunes-per-epoch times "
    "per epoch, odd cycles train the shrunk net with plain meProp. A prune keeps a unit "
    "updated by at least --mesimp-threshold of the examples counted since the last prune (the "
    "count goes on through odd cycles): an example updates a unit when the unit is in its top-k "
    "(its own with --mode per-example, the batch's with unified) with a nonzero gradient. The "
    "optimizer's moments are zeroed at every cycle start (the step count is kept)."
)


def add_mesimp_arguments(parser: argparse.ArgumentParser, export_help: str) -> None:
    """Adds the ``meSimp`` flag group; ``export_help`` says what ``--export DIR`` writes."""
    g = flag_group(parser, "meSimp", _SCHEDULE_HELP)
    g.add_argument("--mesimp", action="store_true", help="train with meSimp (needs --k >= 1)")
    g.add_argument(
        "--mesimp-threshold",
        type=float,
        default=None,
        help=f"prune threshold in (0, 1) (default {mesimp.DEFAULT_THRESHOLD:g})",
    )
    g.add_argument(
        "--mesimp-cycle", type=int, default=None, help=f"epochs per cycle (default {DEFAULT_CYCLE})"
    )
    g.add_argument(
        "--mesimp-prunes-per-epoch",
        type=int,
        default=None,
        help=f"prunes per epoch of an even cycle, at chunk boundaries (default "
        f"{DEFAULT_PRUNES_PER_EPOCH}; sets the chunks, so not with --chunk-steps)",
    )
    g.add_argument("--export", type=Path, default=None, metavar="DIR", help=export_help)


def out_part(settings: Any) -> str:
    """The run-folder name part of a meSimp run: threshold, cycle and prunes per epoch."""
    s = settings
    return f"mesimp{s.mesimp_threshold:g}c{s.mesimp_cycle}p{s.mesimp_prunes_per_epoch}"


def mesimp_options(args: argparse.Namespace, k: int) -> dict[str, Any]:
    """Validates the shared meSimp flags (and ``--k``, ``--chunk-steps`` against them).

    Returns:
      ``{}`` without ``--mesimp``; else ``{"mesimp": True, "mesimp_threshold",
      "mesimp_cycle", "mesimp_prunes_per_epoch"}`` with the defaults filled in.

    Raises:
      ConfigError: naming the offending flag.
    """
    given = [
        flag
        for flag, value in (
            ("--mesimp-threshold", args.mesimp_threshold),
            ("--mesimp-cycle", args.mesimp_cycle),
            ("--mesimp-prunes-per-epoch", args.mesimp_prunes_per_epoch),
            ("--export", args.export),
        )
        if value is not None
    ]
    if not args.mesimp:
        require(not given, f"{given[0] if given else ''} needs --mesimp")
        return {}
    threshold = mesimp.DEFAULT_THRESHOLD if args.mesimp_threshold is None else args.mesimp_threshold
    cycle = DEFAULT_CYCLE if args.mesimp_cycle is None else args.mesimp_cycle
    prunes = (
        DEFAULT_PRUNES_PER_EPOCH
        if args.mesimp_prunes_per_epoch is None
        else args.mesimp_prunes_per_epoch
    )
    require(0.0 < threshold < 1.0, f"--mesimp-threshold must be in (0, 1), got {threshold:g}")
    require(cycle >= 1, f"--mesimp-cycle must be >= 1, got {cycle}")
    require(prunes >= 1, f"--mesimp-prunes-per-epoch must be >= 1, got {prunes}")
    require(k >= 1, "--mesimp needs meProp hidden layers: --k >= 1 (its top-k drives the pruning)")
    require(
        not getattr(args, "chunk_steps", 0),
        "--mesimp sets the chunks from --mesimp-prunes-per-epoch: drop --chunk-steps",
    )
    return {
        "mesimp": True,
        "mesimp_threshold": float(threshold),
        "mesimp_cycle": int(cycle),
        "mesimp_prunes_per_epoch": int(prunes),
    }


def chunk_steps(total_steps: int, prunes_per_epoch: int) -> int:
    """Minibatches per scanned chunk so that an epoch of ``total_steps`` minibatches has about
    ``prunes_per_epoch`` chunks (with several batch groups, each group's last chunk may be
    shorter, so a few more).

    Example:
      >>> chunk_steps(550, 8), chunk_steps(5, 8)
      (69, 1)
    """
    return max(1, math.ceil(total_steps / prunes_per_epoch))


def prune_events(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every prune's event (``{"epoch", "prune", "sizes", "widths"}``) of ``results.json``."""
    return [e for r in results.get("epochs", []) for e in r.get("events", []) if "sizes" in e]


def widths_at(results: Mapping[str, Any], epoch: int, initial: Sequence[int]) -> tuple[int, ...]:
    """The padded widths of the model saved after ``epoch``: those of the last prune up to
    it, ``initial`` before any."""
    widths = tuple(initial)
    for event in prune_events(results):
        if event["epoch"] <= epoch:
            widths = tuple(event["widths"])
    return widths


def saved_widths(
    run: Path, epoch: int | None, initial: Sequence[int], results_file: str, checkpoint_dir: str
) -> tuple[tuple[int, ...], int | None]:
    """The padded widths of the checkpoint that a restore of ``epoch`` reads from ``run``.

    That is ``epoch``'s checkpoint when it is still kept, otherwise the latest epoch's; the
    widths come from the resizes logged in ``run/results_file``.

    Returns:
      ``(widths, epoch)``: ``initial`` and ``epoch`` unchanged when there are no results.
    """
    path = run / results_file
    if not path.is_file():
        return tuple(initial), epoch
    results = json.loads(path.read_text())
    if epoch is None or not (run / checkpoint_dir / str(epoch)).is_dir():
        epochs = [r["epoch"] for r in results.get("epochs", [])]
        epoch = max(epochs) if epochs else epoch
    if epoch is None:
        return tuple(initial), None
    return widths_at(results, epoch, initial), epoch
