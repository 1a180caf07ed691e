"""The minibatches of an :class:`~experiments.loop.task.IndexedGroup`: its shape, checked
against its table on the host, and its rows taken from the table inside a program."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from experiments.loop.task import Array, Batch, IndexedGroup


def index_shape(group: IndexedGroup) -> tuple[int, int]:
    """The index's ``[steps, batch]``; a host index is first checked against the table."""
    if isinstance(group.index, jax.Array):  # already on the devices, checked when sent
        return tuple(group.index.shape)
    index = np.asarray(group.index)
    rows = {np.shape(a)[0] if np.ndim(a) else None for a in jax.tree.leaves(group.table)}
    if len(rows) != 1 or None in rows:
        raise ValueError(
            f"every leaf of an IndexedGroup's table must be [rows, ...] with equal rows; got "
            f"row counts {sorted(rows, key=str)}"
        )
    (n_rows,) = rows
    if index.ndim != 2 or not np.issubdtype(index.dtype, np.integer):
        raise ValueError(
            f"an IndexedGroup's index must be [steps, batch] integers; got {index.dtype} "
            f"{index.shape}"
        )
    if index.size and (index.min() < 0 or index.max() >= n_rows):
        raise ValueError(
            f"an IndexedGroup's index must lie in [0, {n_rows}) (the table's rows); got "
            f"{index.min()}..{index.max()}"
        )
    return index.shape


def take_rows(table: Batch, rows: Array) -> Batch:
    """Every leaf of ``table`` at ``rows``, sharded as ``rows`` is (the table is replicated)."""
    sharding = jax.typeof(rows).sharding
    if not isinstance(sharding, NamedSharding) or sharding.mesh.empty:
        return jax.tree.map(lambda a: jnp.take(a, rows, axis=0), table)
    spec = tuple(sharding.spec) + (None,) * (rows.ndim - len(sharding.spec))

    def take(a: Array) -> Array:
        return a.at[rows].get(out_sharding=P(*spec, *(None,) * (a.ndim - 1)))

    return jax.tree.map(take, table)


def gathered(group: Batch) -> Batch:
    """A group as plain ``[steps, batch, ...]`` arrays (an :class:`IndexedGroup`'s rows taken
    from its table)."""
    if isinstance(group, IndexedGroup):
        return take_rows(group.table, group.index)
    return group


def minibatch(group: Batch, i: Array) -> Batch:
    """Minibatch ``i`` of a group on the devices (inside a program)."""
    if isinstance(group, IndexedGroup):
        return take_rows(group.table, lax.dynamic_index_in_dim(group.index, i, keepdims=False))
    return jax.tree.map(lambda a: lax.dynamic_index_in_dim(a, i, keepdims=False), group)
