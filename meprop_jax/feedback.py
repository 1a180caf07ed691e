"""Error feedback for unified meProp: the dropped output gradient is memorized and fed back.

Top-k drops most of a layer's output gradient ``g = dL/dy`` at every step; with an adaptive
optimizer (Adam) the dropped part is simply lost. Memorized sparse backpropagation (MSBP,
Zhang et al., Neurocomputing 2020) keeps what was not propagated and adds it to the output
gradient of later steps, so that every column's gradient is eventually propagated.

What is memorized
-----------------
One float32 vector ``m``, ``[out]``, per layer: the column sums (over every leading axis) of
the output gradient that the layer did *not* propagate. A per-column memory rather than a
per-example one, because the examples change from one step to the next while the columns
(the layer's output units) do not; the column sum is also exactly what the bias gradient and
the unified ranking aggregate. At every training step, with ``N`` rows (every position of the
leading axes, padding included) and the layer's ``k`` (per group):

1. Re-entry: ``g' = g + m / N`` (``m`` spread evenly over the rows), ``[..., out]``.
2. Selection: the unified columns ``S`` of ``g'`` (:func:`meprop_jax.unified_columns`).
3. Propagation: meProp's backward pass runs on ``g'`` exactly as it would on ``g``: ``dx``
   and ``dW`` come from ``g'[..., S]``; the dense bias gradient stays ``sum g`` (the bias
   gradient was never dropped), and a sparse bias gradient is ``sum g'[..., S]``.
4. Memory: ``m <- decay * c`` with ``c = sum g'`` over the leading axes and ``c[S] = 0``:
   what ``S`` left out, decayed. A column left out repeatedly accumulates
   ``sum_i decay^i c_i`` and ranks higher and higher (its ``m / N`` enters the ranking),
   until it is selected and its memory is emptied.

``decay = 0`` is plain meProp: the layer ignores the memory and its gradients are bit for bit
those of :func:`meprop_jax.linear`; the new memory is zero. ``decay = 1`` is pure error
feedback. The memory term of ``dW`` is ``mean(x)^T m`` on the selected columns: the stored
column gradient paired with the current batch's mean input.

Cost
----
The update is elementwise and ``O(N * out)``: one add for the re-entry, one column sum, the
ranking of ``g'`` (which meProp's backward pass ranks again, the same way: XLA may share the
two), an ``O(k)`` scatter and an ``O(out)`` scale. No product spans all ``out`` columns: the
products stay meProp's ``[N, k] x [k, in]`` and ``[in, N] x [N, k]``.

State
-----
The memory is explicit and pure. :func:`meprop_jax.linear` (``memory=``, ``decay=``) takes the
current memory as an input whose *cotangent* is the new memory: ``jax.grad`` with respect to
it returns the memory of the next step (the same tap mechanism as ``CompactGrad``). In Flax the
memory is the variable ``"memory"`` of the collection ``"meprop_memory"``
(:data:`MEMORY_COLLECTION`, ``Dense(feedback=decay)``): differentiate the loss with respect to
the whole variables dict and replace the memory by its gradient (:func:`split_memory`,
:func:`merge_memory`). It is a pytree of arrays, so it is checkpointed with the parameters,
and it works under ``jit`` and ``scan``. Under data parallelism the column sums run over the
global batch, as does the unified ranking, so the memory is global and replicated.

Adaptive k
----------
:func:`adaptive_k` (TinyProp-style, lower in this module) keeps, per layer and per step, as
few of a static ``k_max`` columns as hold a given share of the gradient's column mass.

Only ``mode="unified"`` has a memory (a per-example selection has nothing that outlives the
batch). A memory must be used by one call per step: the cotangents of a memory shared by
several calls (weight sharing, a ``scan`` over time steps) add up.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from meprop_jax import _selection

Array = jax.Array

__all__ = [
    "MEMORY_COLLECTION",
    "adaptive_columns",
    "adaptive_k",
    "check_decay",
    "feed_back",
    "init_memory",
    "merge_memory",
    "split_memory",
]

#: Flax variable collection that holds every layer's memory (``Dense(feedback=...)``).
MEMORY_COLLECTION = "meprop_memory"


def check_decay(decay: object) -> float:
    """Validates a memory decay: a static Python number in ``[0, 1]``; returns a ``float``."""
    if isinstance(decay, bool) or not isinstance(decay, (int, float)):
        raise TypeError(f"decay must be a Python float in [0, 1], got {decay!r}")
    if not 0.0 <= float(decay) <= 1.0:
        raise ValueError(f"decay must be in [0, 1] (0 = plain meProp), got {decay}")
    return float(decay)


def init_memory(out_features: int) -> Array:
    """The empty memory of a layer with ``out_features`` outputs: float32 zeros ``[out]``."""
    return jnp.zeros((out_features,), jnp.float32)


def check_memory(memory: Array, out_features: int) -> Array:
    """Raises a ValueError unless ``memory`` is float32 ``[out_features]``."""
    if jnp.shape(memory) != (out_features,) or jnp.result_type(memory) != jnp.float32:
        raise ValueError(
            f"memory must be float32[{out_features}] (one entry per output column); got "
            f"{jnp.result_type(memory)}{list(jnp.shape(memory))}. Build it with init_memory()."
        )
    return memory


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def feed_back(decay: float, k: int, groups: int, y: Array, memory: Array) -> Array:
    """Identity on ``y`` ``[..., out]``; its backward pass feeds ``memory`` back (see module).

    Place it on the output of a unified meProp product with the same ``k`` and ``groups``: the
    cotangent of ``y`` becomes ``g' = g + memory / N`` and the cotangent of ``memory`` is the
    next memory, ``decay`` times the column sums of ``g'`` outside its top-``k`` columns.
    """
    del decay, k, groups, memory
    return y


def _feed_back_fwd(decay, k, groups, y, memory):
    return y, memory


def _feed_back_bwd(decay, k, groups, memory, g):
    out = g.shape[-1]
    rows = max(g.size // out, 1)
    g_fed = g + (memory / rows).astype(g.dtype)
    cols = _selection.unified_columns(g_fed, k, groups)
    sums = jnp.sum(g_fed.astype(jnp.float32), axis=tuple(range(g.ndim - 1)))
    left_out = sums.at[cols].set(0.0, unique_indices=True)
    return g_fed, jnp.asarray(decay, jnp.float32) * left_out


feed_back.defvjp(_feed_back_fwd, _feed_back_bwd)


def split_memory(variables: Any) -> tuple[Any, Any]:
    """``(variables without the memory collection, the memory collection or None)``.

    Works on Flax variables and on their gradients (where the memory's "gradient" is the next
    memory); any other pytree, or variables without a memory, comes back whole with None.
    """
    if not isinstance(variables, Mapping) or MEMORY_COLLECTION not in variables:
        return variables, None
    rest = {name: v for name, v in variables.items() if name != MEMORY_COLLECTION}
    return rest, variables[MEMORY_COLLECTION]


def merge_memory(variables: Any, memory: Any) -> Any:
    """``variables`` with the memory collection set to ``memory`` (unchanged when None)."""
    if memory is None:
        return variables
    rest, _ = split_memory(variables)
    return {**rest, MEMORY_COLLECTION: memory}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def adaptive_k(k_max: int, k_min: int, mass: float, groups: int, y: Array) -> Array:
    """Identity on ``y`` ``[..., out]`` whose backward keeps an adaptive number of columns.

    TinyProp-style adaptive k: at every step, in each of ``groups`` blocks, the columns are
    ranked by ``sum |g|`` over the leading axes (as the unified selection ranks them) and the
    smallest ``k`` in ``[k_min, k_max]`` whose top-``k`` columns hold at least ``mass`` of the
    block's total ``sum |g|`` is kept; the gradient of every other column is zeroed. Put it on
    the output of a unified meProp layer with ``k = k_max``::

        y = adaptive_k(k_max, k_min, 0.9, 1, meprop_jax.linear(x, w, b, k=k_max))

    That layer then selects the same top columns (the zeroed ones rank last) and runs its
    products at the static width ``k_max``; the columns past the adaptive ``k`` are zero.

    What it saves: the update (fewer non-zero weight-gradient columns; with a column-sparse
    optimizer, fewer columns that move) and the gradient passed down is built from fewer
    columns. What it does not: the products still cost ``k_max`` (shapes are static under
    ``jit``), and the ranking adds an ``O(N * out)`` pass and a top-``k_max``. The bias
    gradient, unless ``sparse_bias``, is the sum of the masked gradient.

    Args:
      k_max: static upper bound (the layer's ``k``), per group.
      k_min: static lower bound, ``1 <= k_min <= k_max``.
      mass: fraction in ``(0, 1]`` of the column-score mass to keep.
      groups: equal blocks of the output axis (4 for an LSTM's gates).
      y: the layer's output.
    """
    _check_adaptive(k_max, k_min, mass, groups, y)
    return y


def _check_adaptive(k_max, k_min, mass, groups, y) -> None:
    out = y.shape[-1]
    if not (isinstance(k_min, int) and isinstance(k_max, int) and 1 <= k_min <= k_max):
        raise ValueError(f"need static ints 1 <= k_min <= k_max, got {k_min} and {k_max}")
    if groups < 1 or out % groups or k_max > out // groups:
        raise ValueError(f"k_max={k_max} per group must fit {groups} groups of {out} columns")
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")


def adaptive_columns(g: Array, k_max: int, k_min: int, mass: float, groups: int = 1) -> Array:
    """``[out]`` bool: the columns :func:`adaptive_k` keeps for the output gradient ``g``."""
    out = g.shape[-1]
    scores = _selection.column_scores(g).reshape(groups, out // groups)
    top, idx = jax.lax.top_k(scores, k_max)  # [groups, k_max], descending
    before = jnp.cumsum(top, axis=-1) - top  # mass of the columns ranked above each one
    needed = before < mass * jnp.sum(scores, axis=-1, keepdims=True)
    needed = needed | (jnp.arange(k_max) < k_min)
    keep = jnp.zeros_like(scores, dtype=bool)
    keep = keep.at[jnp.arange(groups)[:, None], idx].set(needed)
    return keep.reshape(out)


def _adaptive_fwd(k_max, k_min, mass, groups, y):
    _check_adaptive(k_max, k_min, mass, groups, y)
    return y, None


def _adaptive_bwd(k_max, k_min, mass, groups, residuals, g):
    del residuals
    keep = adaptive_columns(g, k_max, k_min, mass, groups)
    return (jnp.where(keep, g, jnp.zeros((), g.dtype)),)


adaptive_k.defvjp(_adaptive_fwd, _adaptive_bwd)
