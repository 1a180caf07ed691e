"""meSimp's shrinking: removes pruned units from the parameters and the optimizer state.

The public names (:func:`shrink`, :func:`shrink_lstm`, :func:`export`, :class:`Shrunk`,
:func:`padded_width`) are documented and used as :mod:`meprop_jax.mesimp`'s; see that module
for the record, the prune rule and the whole cycle.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from meprop_jax._src.compact import param_layout
from meprop_jax._src.trees import _gather_dense, _get, _mirror_map, _path, _replace, _take

Array = jax.Array
PyTree = Any

#: Widths are rounded up to a multiple of this many units by default.
DEFAULT_PAD_TO = 16


def _is_record(node: Any) -> bool:
    """A layer's node of the ``"mesimp"`` collection: ``hits``, ``examples`` and ``mask``."""
    return isinstance(node, Mapping) and {"hits", "examples", "mask"} <= set(node)


class Shrunk(NamedTuple):
    """What :func:`shrink` returns.

    Attributes:
      params: the parameters gathered to the surviving units, padded.
      opt_state: the optimizer state, every subtree that mirrors ``params`` gathered alike.
      record: the new ``"mesimp"`` collection of the shrunk layers: ``mask`` 1 for the
        survivors and 0 for the padding, ``hits`` gathered (0 for padding), ``examples`` kept.
        Layers of the old record that were not shrunk are unchanged.
      units: the surviving units of each shrunk layer.
      widths: the padded widths, the ``features`` to rebuild the model with.
    """

    params: PyTree
    opt_state: PyTree
    record: PyTree
    units: tuple[int, ...]
    widths: tuple[int, ...]


def padded_width(units: int, width: int, pad_to: int = DEFAULT_PAD_TO) -> int:
    """``units`` rounded up to a multiple of ``pad_to`` (at least ``pad_to``), at most ``width``.

    Example:
      >>> padded_width(51, 500), padded_width(500, 500), padded_width(0, 500)
      (64, 500, 16)
    """
    if pad_to < 1:
        raise ValueError(f"pad_to must be >= 1, got {pad_to}")
    return min(width, max(pad_to, math.ceil(units / pad_to) * pad_to))


def _unit_index(keep: Any, width: int, pad_to: int | None, name: str) -> tuple[np.ndarray, int]:
    """The gather index of a layer's units: the survivors, then padding slots (``width``)."""
    keep = np.asarray(keep).astype(bool)
    if keep.shape != (width,):
        raise ValueError(f"keep set of {name!r} must be [{width}], got {list(keep.shape)}")
    survivors = np.flatnonzero(keep)
    size = len(survivors) if pad_to is None else padded_width(len(survivors), width, pad_to)
    idx = np.full(size, width, np.int64)
    idx[: len(survivors)] = survivors
    return idx, len(survivors)


def _new_record(record: PyTree, path: tuple[str, ...], idx: np.ndarray, units: int) -> PyTree:
    old = _get(record, path, "record")
    if not _is_record(old):
        raise ValueError(f"record of {'/'.join(path)!r} must hold hits, examples and mask")
    mask = (np.arange(len(idx)) < units).astype(np.float32)
    node = {
        **old,
        "hits": _take(old["hits"], idx, 0),
        "mask": jnp.asarray(mask, old["mask"].dtype),
    }
    return _replace(record, path, node)


def shrink(
    params: PyTree,
    opt_state: PyTree,
    keep: Mapping[str, Any],
    layers: Sequence[str | Sequence[str]],
    *,
    pad_to: int = DEFAULT_PAD_TO,
    record: PyTree | None = None,
) -> Shrunk:
    """Removes the pruned units of a chain of Dense layers, parameters and optimizer state alike.

    ``layers`` is the chain in order, each feeding the next (activations between them map 0 to
    0); every layer but the last is a hidden layer with a keep set. Hidden layer ``i`` keeps
    its kernel columns and bias entries of the kept units, in their original order, and layer
    ``i + 1`` keeps the matching kernel input rows. Each hidden width is rounded up with
    :func:`padded_width`; padding units have zero weights, zero optimizer state and mask 0, so
    they output 0 and stay 0. Runs eagerly (the shapes depend on the keep sets).

    Args:
      params: the parameter tree; ``layers`` name ``{"kernel" [in, out], "bias" [out]}`` nodes.
      opt_state: any optimizer state; every subtree with the structure and shapes of
        ``params`` (``optax.adam``'s ``mu`` and ``nu``, ...) is gathered like the parameters,
        the rest (step counts) is kept. The state of :func:`meprop_jax.optim.compact`, whose
        compact kernels' leaves are stored ``[out, in]``, is gathered in the parameters'
        layout and stored back transposed (not during ``MultiSteps`` accumulation: its
        per-kernel column marks are not gathered).
      keep: ``[features]`` bool keep set of every hidden layer (``layers[:-1]``), by its
        ``"/"``-joined path, e.g. ``keep_sets(prune(record))``.
      layers: the layers' paths in ``params``, e.g. ``["hidden_0", "hidden_1", "output"]``.
      pad_to: round widths up to a multiple of this (1: no padding).
      record: optional ``"mesimp"`` collection; its hidden layers' ``hits`` are gathered and
        their ``mask`` rebuilt. Without it, ``Shrunk.record`` is None.

    Returns:
      a :class:`Shrunk`.
    """
    if pad_to < 1:
        raise ValueError(f"pad_to must be >= 1, got {pad_to}")
    return _shrink(params, opt_state, keep, layers, pad_to, record)


def _shrink(params, opt_state, keep, layers, pad_to: int | None, record) -> Shrunk:
    """:func:`shrink`; ``pad_to=None`` keeps exactly the survivors (:func:`export`)."""
    paths = [_path(layer) for layer in layers]
    names = ["/".join(p) for p in paths]
    missing = [n for n in names[:-1] if n not in keep]
    if len(paths) < 2 or missing:
        raise ValueError(
            f"need a chain of >= 2 layers and a keep set for each hidden layer; "
            f"got layers {names}, no keep set for {missing}"
        )
    plan, units = [], []
    for name, path in zip(names[:-1], paths[:-1], strict=True):
        width = jnp.shape(_get(params, path, "params")["kernel"])[1]
        idx, n = _unit_index(keep[name], width, pad_to, name)
        plan.append(idx)
        units.append(n)

    def gather(tree: PyTree) -> PyTree:
        for i, path in enumerate(paths):
            rows = plan[i - 1] if i > 0 else None
            cols = plan[i] if i < len(plan) else None
            tree = _replace(
                tree, path, _gather_dense(_get(tree, path, "tree"), rows, cols, names[i])
            )
        return tree

    new_record = None
    if record is not None:
        new_record = record
        for path, idx, n in zip(paths[:-1], plan, units, strict=True):
            new_record = _new_record(new_record, path, idx, n)
    widths = tuple(len(idx) for idx in plan)
    return Shrunk(
        gather(params), _gather_state(gather, params, opt_state), new_record, tuple(units), widths
    )


def _gather_state(gather, params: PyTree, opt_state: PyTree) -> PyTree:
    """``opt_state`` with its parameter mirrors gathered, in the parameters' layout."""
    plain, restore = param_layout(opt_state)
    return restore(_mirror_map(gather, params, plain))


def export(
    params: PyTree, keep: Mapping[str, Any], layers: Sequence[str | Sequence[str]]
) -> tuple[PyTree, tuple[int, ...]]:
    """Parameters for a stock ``flax.linen`` MLP of the surviving units, and its hidden sizes.

    Drops every unit outside its keep set (pruned units and padding) from the chain
    ``layers``, exactly as :func:`shrink` does but without padding. The stock model names its
    ``nn.Dense`` layers as ``layers`` does (``nn.Dense(size, name="hidden_0")``, ...) and has
    the returned hidden sizes; ``flax.serialization.to_bytes({"params": exported})`` loads
    into it.

    Args:
      params: the (possibly shrunk) parameter tree.
      keep: the hidden layers' keep sets, e.g. ``keep_sets(record)``.
      layers: the chain's paths, the output layer last.

    Returns:
      ``(params, sizes)``: ``params`` with the chain's layers gathered (other entries kept),
      and the hidden sizes.
    """
    shrunk = _shrink(params, None, keep, layers, None, None)
    return shrunk.params, shrunk.units


# Submodule names of the Linen LSTM cell: input kernels (no bias), then recurrent ones.
_INPUT_GATES = ("ii", "if", "ig", "io")
_RECURRENT_GATES = ("hi", "hf", "hg", "ho")


def shrink_lstm(
    params: PyTree,
    opt_state: PyTree,
    keep: Any,
    cell: str | Sequence[str],
    next_layers: Sequence[str | Sequence[str]] = (),
    *,
    pad_to: int = DEFAULT_PAD_TO,
    record: PyTree | None = None,
) -> Shrunk:
    """Removes the pruned hidden units of a Linen LSTM cell, as :func:`shrink` does for Dense.

    The cell is ``meprop_jax.LSTMCell`` (or ``flax.linen.LSTMCell``): a hidden unit is column
    ``j`` of each of the four gates, so the input kernels ``ii``, ``if``, ``ig``, ``io`` keep
    their kept columns, the recurrent kernels ``hi``, ``hf``, ``hg``, ``ho`` their kept rows
    and columns, and their biases their kept entries. Every layer of ``next_layers`` reads the
    hidden state as its whole input (e.g. the output ``Dense``) and keeps the kept kernel
    rows. Padding units have zero weights and mask 0: with a zero initial carry their ``c``
    and ``h`` stay 0.

    Args:
      params: the parameter tree.
      opt_state: any optimizer state (see :func:`shrink`).
      keep: ``[hidden]`` bool keep set of the cell.
      cell: the cell's path in ``params`` (e.g. ``"LSTMCell_0"`` for a cell built in the
        parent module and handed to ``nn.RNN``).
      next_layers: paths of the Dense layers fed by the hidden state.
      pad_to: round the width up to a multiple of this.
      record: optional ``"mesimp"`` collection holding the cell's record at ``cell``'s path.

    Returns:
      a :class:`Shrunk` with one entry in ``units`` and ``widths``.
    """
    if pad_to < 1:
        raise ValueError(f"pad_to must be >= 1, got {pad_to}")
    path = _path(cell)
    name = "/".join(path)
    node = _get(params, path, "params")
    missing = [g for g in _INPUT_GATES + _RECURRENT_GATES if g not in node]
    if missing:
        raise ValueError(f"LSTM cell {name!r} has no gates {missing}")
    hidden = jnp.shape(node["hi"]["kernel"])[1]
    idx, units = _unit_index(keep, hidden, pad_to, name)
    next_paths = [_path(layer) for layer in next_layers]

    def gather(tree: PyTree) -> PyTree:
        gates = dict(_get(tree, path, "tree"))
        for gate in _INPUT_GATES:
            gates[gate] = _gather_dense(gates[gate], None, idx, f"{name}/{gate}")
        for gate in _RECURRENT_GATES:
            gates[gate] = _gather_dense(gates[gate], idx, idx, f"{name}/{gate}")
        tree = _replace(tree, path, gates)
        for p in next_paths:
            tree = _replace(tree, p, _gather_dense(_get(tree, p, "tree"), idx, None, "/".join(p)))
        return tree

    new_record = None if record is None else _new_record(record, path, idx, units)
    return Shrunk(
        gather(params), _gather_state(gather, params, opt_state), new_record, (units,), (len(idx),)
    )
