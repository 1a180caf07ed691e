"""meSimp: shrink a network by removing the hidden units meProp's top-k seldom selects.

meSimp (Sun et al. 2017, arXiv 1711.06528) trains with meProp and keeps, for every hidden unit,
an *activity record*: how many examples selected the unit in their top-k since the last prune,
out of how many examples. A prune keeps a unit only if ``hits >= floor(threshold * examples)``
(threshold 0.1 by default) and it survived every earlier prune; then the record restarts.
Pruned units are removed for real: :func:`shrink` gathers the parameters and the optimizer
state to the survivors, and :func:`export` gives a plain parameter tree for a stock
``flax.linen`` MLP of the surviving sizes.

The pieces:

* ``meprop_jax.Dense(..., record=True)`` (and ``meprop_jax.LSTMCell(..., record=True)``) keep
  ``hits``, ``examples`` and ``mask`` in the ``"mesimp"`` collection and a zero
  :class:`RecordTap` in ``"mesimp_taps"``. The gradient with respect to the taps is the step's
  selection counts (see :class:`RecordTap` for what counts as selected in each mode), so a
  jitted step gets them from ``jax.grad`` without side effects; :func:`accumulate` adds them
  to the record. The layer's output is multiplied by ``mask``: a unit with mask 0 outputs 0 and
  its weights get zero gradient.
* :func:`prune_rule` and :func:`prune` apply the authors' ``Record.Update``: the new masks are
  the old ones and'ed with the rule, and the counts reset.
* :func:`shrink` removes the units whose mask is 0 from a chain of Dense layers, in the
  parameters and in every optimizer-state subtree that mirrors them (Adam's ``mu`` and ``nu``,
  ...), and pads each width up to a multiple of ``pad_to`` with masked units, so a schedule of
  prunes compiles a bounded number of shapes. :func:`shrink_lstm` does the same for an LSTM
  cell and the layers it feeds.
* :func:`export` drops the padding and returns the stock model's parameters and sizes.
* :func:`reset_moments` zeroes Adam's moments and AdaGrad's accumulator, keeping the step
  count, as the authors' ``Opt.Prepare`` does at the start of every cycle.

Removing a masked unit leaves the network's function unchanged when the activation maps 0 to
0 (ReLU, tanh): the unit's output, ``act(0)``, then contributes nothing to the next layer.

Layers are named by their path in the parameter tree, ``"/"``-separated (``"hidden_0"``,
``"encoder/hidden_1"``); :func:`keep_sets` uses the same names.

Example (a two-hidden-layer MLP, one step, one prune, one shrink, the export)::

    >>> import jax, jax.numpy as jnp, optax
    >>> from flax import linen as nn
    >>> from meprop_jax import Dense, mesimp
    >>> class MLP(nn.Module):
    ...     hidden: tuple = (32, 32)
    ...     @nn.compact
    ...     def __call__(self, x):
    ...         for i, size in enumerate(self.hidden):
    ...             layer = Dense(size, k=4, mode="per_example", record=True, name=f"hidden_{i}")
    ...             x = nn.relu(layer(x))
    ...         return Dense(3, name="output")(x)
    >>> x, y = jax.random.normal(jax.random.key(0), (64, 8)), jnp.arange(64) % 3
    >>> variables = MLP().init(jax.random.key(1), x)
    >>> params, record = variables["params"], variables[mesimp.COLLECTION]
    >>> taps = variables[mesimp.TAP_COLLECTION]
    >>> opt = optax.adam(1e-3)
    >>> opt_state = opt.init(params)
    >>> def loss_fn(params, taps, record):
    ...     state = {"params": params, mesimp.COLLECTION: record, mesimp.TAP_COLLECTION: taps}
    ...     logits = MLP().apply(state, x)
    ...     return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    >>> grads, tap_grads = jax.grad(loss_fn, argnums=(0, 1))(params, taps, record)
    >>> record = mesimp.accumulate(record, tap_grads)
    >>> int(record["hidden_0"]["examples"]), int(record["hidden_0"]["hits"].sum())  # 64 * k
    (64, 256)
    >>> record = mesimp.prune(record)  # keeps units in >= floor(0.1 * 64) = 6 examples' top-k
    >>> layers = ["hidden_0", "hidden_1", "output"]
    >>> shrunk = mesimp.shrink(params, opt_state, mesimp.keep_sets(record), layers, record=record)
    >>> shrunk.units, shrunk.widths  # survivors, and the padded widths to rebuild the model with
    ((21, 14), (32, 16))
    >>> smaller = MLP(hidden=shrunk.widths)  # trains on with shrunk.params, .opt_state, .record
    >>> stock_params, sizes = mesimp.export(shrunk.params, mesimp.keep_sets(shrunk.record), layers)
    >>> sizes
    (21, 14)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from meprop_jax import optim
from meprop_jax._linear import RecordTap, record_tap
from meprop_jax._trees import _gather_dense, _get, _mirror_map, _path, _replace, _take
from meprop_jax.linen import MESIMP_COLLECTION, RECORD_TAP_COLLECTION

Array = jax.Array
PyTree = Any

#: The variable collection of the record and the mask (``hits``, ``examples``, ``mask``).
COLLECTION = MESIMP_COLLECTION

#: The variable collection of the zero record taps (one ``"record"`` per layer).
TAP_COLLECTION = RECORD_TAP_COLLECTION

#: The authors' prune threshold: a unit must be in at least 10% of the examples' top-k.
DEFAULT_THRESHOLD = 0.1

#: Widths are rounded up to a multiple of this many units by default.
DEFAULT_PAD_TO = 16

__all__ = [
    "COLLECTION",
    "DEFAULT_PAD_TO",
    "DEFAULT_THRESHOLD",
    "TAP_COLLECTION",
    "RecordTap",
    "Shrunk",
    "accumulate",
    "export",
    "keep_sets",
    "padded_width",
    "prune",
    "prune_rule",
    "record_tap",
    "reset_moments",
    "shrink",
    "shrink_lstm",
    "zero_taps",
]


# ------------------------------------------------------------------------------ the record


def _is_record(node: Any) -> bool:
    return isinstance(node, Mapping) and {"hits", "examples", "mask"} <= set(node)


def _is_tap(node: Any) -> bool:
    return isinstance(node, Mapping) and isinstance(node.get("record"), RecordTap)


def _find(tree: PyTree, is_node, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
    """The nodes of nested dicts ``tree`` that satisfy ``is_node``, by path."""
    if is_node(tree):
        return {prefix: tree}
    if not isinstance(tree, Mapping):
        return {}
    found = {}
    for name, child in tree.items():
        found.update(_find(child, is_node, (*prefix, str(name))))
    return found


def _map_records(fn, record: PyTree) -> PyTree:
    """``record`` with ``fn(path, node)`` in place of every layer's node."""

    def walk(node, path):
        if _is_record(node):
            return fn(path, node)
        if isinstance(node, Mapping):
            return {name: walk(child, (*path, str(name))) for name, child in node.items()}
        return node

    return walk(record, ())


def accumulate(record: PyTree, tap_grads: PyTree) -> PyTree:
    """Adds one step's selection counts to the record.

    Args:
      record: the ``"mesimp"`` collection: per layer ``hits`` int32 ``[features]``,
        ``examples`` int32 ``[]`` and ``mask`` float32 ``[features]``.
      tap_grads: the gradient with respect to the ``"mesimp_taps"`` collection: per layer a
        :class:`RecordTap` of float32 counts under ``"record"``.

    Returns:
      ``record`` with every layer's counts increased; masks unchanged. Pure and jittable.

    Raises:
      ValueError: if a layer of ``record`` has no tap gradient.
    """
    taps = {path: node["record"] for path, node in _find(tap_grads, _is_tap).items()}

    def add(path, node):
        if path not in taps:
            raise ValueError(f"no record tap gradient for layer {'/'.join(path)!r}")
        hits, examples = taps[path]
        return {
            **node,
            "hits": node["hits"] + hits.astype(node["hits"].dtype),
            "examples": node["examples"] + examples.astype(node["examples"].dtype),
        }

    return _map_records(add, record)


def zero_taps(record: PyTree) -> PyTree:
    """The ``"mesimp_taps"`` collection that goes with ``record`` (zero taps of its widths)."""
    taps: dict = {}
    for path, node in _find(record, _is_record).items():
        parent = taps
        for name in path:
            parent = parent.setdefault(name, {})
        parent["record"] = record_tap(node["mask"].shape[0])
    return taps


def prune_rule(
    hits: Array, examples: Array, keep: Array, threshold: float = DEFAULT_THRESHOLD
) -> Array:
    """The authors' ``Record.Update``: ``keep & (hits >= floor(threshold * examples))``.

    Args:
      hits: ``[units]`` examples that selected each unit since the last prune.
      examples: ``[]`` examples counted since the last prune.
      keep: ``[units]`` bool (or 0/1) survivors of the earlier prunes: pruning is permanent.
      threshold: the fraction of the examples a unit must have been selected by.

    Returns:
      ``[units]`` bool, the new keep set. The product is taken in float32 (as ``int(refer *
      0.1)`` in the authors' C#, up to float32 rounding for counts beyond 2**24).

    Example:
      >>> import jax.numpy as jnp
      >>> hits, keep = jnp.array([0, 1, 2, 5]), jnp.array([True, True, True, False])
      >>> prune_rule(hits, jnp.array(15), keep).tolist()  # floor(1.5) = 1
      [False, True, True, False]
    """
    floor = jnp.floor(jnp.float32(threshold) * jnp.asarray(examples).astype(jnp.float32))
    return jnp.asarray(keep).astype(bool) & (jnp.asarray(hits).astype(jnp.float32) >= floor)


def prune(record: PyTree, threshold: float = DEFAULT_THRESHOLD) -> PyTree:
    """Prunes every layer of the record and restarts its counts.

    Args:
      record: the ``"mesimp"`` collection.
      threshold: see :func:`prune_rule`.

    Returns:
      ``record`` with ``mask`` set to 0 for every pruned unit (it stays 0 for good), and
      ``hits`` and ``examples`` reset to 0. Pure and jittable; the model keeps its shapes
      (the mask hides the pruned units) until :func:`shrink` removes them.
    """

    def update(path, node):
        keep = prune_rule(node["hits"], node["examples"], node["mask"] > 0, threshold)
        return {
            **node,
            "hits": jnp.zeros_like(node["hits"]),
            "examples": jnp.zeros_like(node["examples"]),
            "mask": keep.astype(node["mask"].dtype),
        }

    return _map_records(update, record)


def keep_sets(record: PyTree) -> dict[str, Array]:
    """Every layer's keep set, ``mask > 0`` ``[features]`` bool, by ``"/"``-joined path."""
    return {"/".join(p): node["mask"] > 0 for p, node in _find(record, _is_record).items()}


# ------------------------------------------------------------------------------ shrinking


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
        the rest (step counts) is kept. States that do not mirror the parameters (the
        transposed state of :mod:`meprop_jax.optim`) are not supported.
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
        gather(params), _mirror_map(gather, params, opt_state), new_record, tuple(units), widths
    )


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
        gather(params), _mirror_map(gather, params, opt_state), new_record, (units,), (len(idx),)
    )


# --------------------------------------------------------------------- optimizer moments


def _zeros(tree: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, tree)


def _reset(node: Any) -> Any:
    if isinstance(node, optax.ScaleByAdamState):
        return node._replace(mu=_zeros(node.mu), nu=_zeros(node.nu))
    if isinstance(node, optax.ScaleByRssState):
        return node._replace(sum_of_squares=_zeros(node.sum_of_squares))
    if isinstance(node, optim.SparseState):
        return node._replace(slots=_zeros(node.slots))
    return node


def reset_moments(opt_state: PyTree) -> PyTree:
    """Zeroes the optimizer's moments and keeps its step count (the authors' ``Opt.Prepare``).

    Adam's (and AdamW's) ``mu`` and ``nu``, AdaGrad's ``sum_of_squares`` (to 0, as the
    authors' AdaGrad starts, not to optax's ``initial_accumulator_value``) and the slots of
    :mod:`meprop_jax.optim`'s optimizers become zeros; step counts, and with them Adam's bias
    correction and learning-rate schedules, carry on. Other states are returned unchanged.
    Pure and jittable.
    """
    moment_states = (optax.ScaleByAdamState, optax.ScaleByRssState, optim.SparseState)
    return jax.tree.map(_reset, opt_state, is_leaf=lambda n: isinstance(n, moment_states))
