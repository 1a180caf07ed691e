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
With adaptive k (``adaptive=``, see :class:`meprop_jax.AdaptiveK`) the selection ``S`` is the
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

from meprop_jax._src.feedback import (
    MEMORY_COLLECTION,
    check_decay,
    feed_back,
    init_memory,
    merge_memory,
    split_memory,
)

__all__ = [
    "MEMORY_COLLECTION",
    "check_decay",
    "feed_back",
    "init_memory",
    "merge_memory",
    "split_memory",
]
