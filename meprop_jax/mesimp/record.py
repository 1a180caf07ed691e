"""meSimp's activity record: accumulate, prune, keep sets and the optimizer reset.

Documented in :mod:`meprop_jax.mesimp`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from meprop_jax._src.collections import MESIMP_COLLECTION, RECORD_TAP_COLLECTION
from meprop_jax._src.taps import RecordTap, record_tap
from meprop_jax.mesimp.shrink import _is_record

Array = jax.Array
PyTree = Any

#: The variable collection of the record and the mask (``hits``, ``examples``, ``mask``).
COLLECTION = MESIMP_COLLECTION

#: The variable collection of the zero record taps (one ``"record"`` per layer).
TAP_COLLECTION = RECORD_TAP_COLLECTION

#: The authors' prune threshold: a unit must be in at least 10% of the examples' top-k.
DEFAULT_THRESHOLD = 0.1


# ------------------------------------------------------------------------------ the record


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
      hits: ``[units]`` examples that updated each unit since the last prune.
      examples: ``[]`` examples counted since the last prune.
      keep: ``[units]`` bool (or 0/1) survivors of the earlier prunes: pruning is permanent.
      threshold: the fraction of the examples a unit must have been updated by.

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


# --------------------------------------------------------------------- optimizer moments


def _zeros(tree: PyTree) -> PyTree:
    return jax.tree.map(jnp.zeros_like, tree)


def _reset(node: Any) -> Any:
    if isinstance(node, optax.ScaleByAdamState):
        return node._replace(mu=_zeros(node.mu), nu=_zeros(node.nu))
    if isinstance(node, optax.ScaleByRssState):
        return node._replace(sum_of_squares=_zeros(node.sum_of_squares))
    return node


def reset_moments(opt_state: PyTree) -> PyTree:
    """Zeroes the optimizer's moments and keeps its step count (the authors' ``Opt.Prepare``).

    Adam's (and AdamW's) ``mu`` and ``nu`` and AdaGrad's ``sum_of_squares`` (to 0, as the
    authors' AdaGrad starts, not to optax's ``initial_accumulator_value``) become zeros,
    wherever they are (inside :func:`meprop_jax.optim.compact`'s state too); step counts, and
    with them Adam's bias correction and learning-rate schedules, carry on. Other states are
    returned unchanged. Pure and jittable.
    """
    moment_states = (optax.ScaleByAdamState, optax.ScaleByRssState)
    return jax.tree.map(_reset, opt_state, is_leaf=lambda n: isinstance(n, moment_states))
