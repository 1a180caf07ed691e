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
With adaptive k (``adaptive=``, see :mod:`meprop_jax._adaptive`) the selection ``S`` is the
adaptive one, the columns the layer actually propagates: the columns of its ``k_max`` that the
rule drops are memorized like every other unselected column.

Scans
-----
An LSTM cell scanned over ``T`` time steps shares one memory: every step re-enters
``m / (N * T)`` per row (``feedback_steps=T`` of :func:`meprop_jax.multi_linear`), so the
whole sequence re-enters ``m`` once, and the memory's cotangents, summed over the steps, make
the next memory: ``decay`` times what the steps left out, together.

Only ``mode="unified"`` has a memory (a per-example selection has nothing that outlives the
batch). Otherwise a memory must be used by one call per step: the cotangents of a memory shared by
several calls (weight sharing) add up.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from meprop_jax import _adaptive, _selection

Array = jax.Array

__all__ = [
    "MEMORY_COLLECTION",
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


def check_steps(steps: object) -> int:
    """Validates the number of calls that share a memory: a static Python int >= 1."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"feedback_steps must be an int >= 1, got {steps!r}")
    return steps


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


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4))
def feed_back(
    decay: float,
    k: int,
    groups: int,
    steps: int,
    adaptive: _adaptive.AdaptiveK | None,
    y: Array,
    memory: Array,
) -> Array:
    """Identity on ``y`` ``[..., out]``; its backward pass feeds ``memory`` back (see module).

    Place it on the output of a unified meProp product with the same ``k``, ``groups`` and
    ``adaptive``: the cotangent of ``y`` becomes ``g' = g + memory / (N * steps)`` and the
    cotangent of ``memory`` is the next memory, ``decay`` times the column sums of ``g'``
    outside the columns the product propagates. ``steps`` is the number of calls (time steps
    of a scan) that share the memory, 1 otherwise.
    """
    del decay, k, groups, steps, adaptive, memory
    return y


def _feed_back_fwd(decay, k, groups, steps, adaptive, y, memory):
    return y, memory


def _feed_back_bwd(decay, k, groups, steps, adaptive, memory, g):
    out = g.shape[-1]
    rows = max(g.size // out, 1) * steps
    g_fed = g + (memory / rows).astype(g.dtype)
    if adaptive is None:
        cols = _selection.unified_columns(g_fed, k, groups)
    else:
        cols, keep = _selection.adaptive_columns(g_fed, k, adaptive, groups)
        cols = jnp.where(keep, cols, out)  # out of range: dropped by the scatter below
    sums = jnp.sum(g_fed.astype(jnp.float32), axis=tuple(range(g.ndim - 1)))
    left_out = sums.at[cols].set(0.0, mode="drop", unique_indices=adaptive is None)
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
