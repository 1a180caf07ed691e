"""Which output columns a meProp backward pass keeps.

Every sparsified layer in the package asks this module, and only this module, which entries
of the output gradient ``g = dL/dy`` survive. Three rules are available:

* ``"unified"``: one set of ``k`` columns for the whole batch, ranked by the column sum of
  ``|g|`` over every leading axis (the paper's GPU setting, §4.8).
* ``"per_example"``: every row (every position of the leading axes) keeps its own ``k``
  largest ``|g|`` entries (the paper's CPU setting).
* ``"random"``: every row keeps ``k`` distinct columns drawn uniformly at random, with no
  rescaling (the paper's control experiment, §4.4).

Ties are broken towards the lower column index. Non-finite gradients are never dropped
silently: ``lax.top_k`` ranks NaN above every number and ``|±inf|`` above every finite value,
so a row or column holding a NaN or an infinity is always selected and the non-finite value
reaches ``dx`` and ``dW`` just as it would in dense backprop.

``groups`` splits the output axis into equal contiguous blocks and selects ``k`` columns in
each block separately; LSTM cells use ``groups=4`` so that each gate keeps ``k`` columns.
"""

from __future__ import annotations

import operator
from typing import Final

import jax
import jax.numpy as jnp
from jax import lax

MODES: Final = ("unified", "per_example", "random")


def check_k(k: object) -> int:
    """Validates ``k`` and returns it as a Python ``int``.

    Args:
      k: number of columns to keep; ``0`` means ordinary (dense) backprop.

    Returns:
      ``k`` as an ``int``.

    Raises:
      TypeError: if ``k`` is a bool, a float or not an integer at all.
      ValueError: if ``k`` is negative.
    """
    if isinstance(k, bool):
        raise TypeError(f"k must be a non-negative int, got the bool {k!r}")
    try:
        value = operator.index(k)
    except TypeError:
        raise TypeError(
            f"k must be a non-negative int (a static Python value), got {k!r} of type "
            f"{type(k).__name__}"
        ) from None
    if value < 0:
        raise ValueError(f"k must be >= 0 (use k=0 for ordinary backprop), got k={value}")
    return value


def check_mode(mode: object) -> str:
    """Validates a mode name; ``"per-example"`` is accepted for ``"per_example"``.

    Raises:
      ValueError: naming the valid modes when ``mode`` is not one of them.
    """
    name = mode.replace("-", "_") if isinstance(mode, str) else mode
    if name not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes are {', '.join(MODES)}")
    return name


def check_groups(groups: object, out_features: int) -> int:
    """Validates ``groups``: a positive int that divides ``out_features``."""
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    if out_features % groups:
        raise ValueError(
            f"groups={groups} must divide the number of output features ({out_features})"
        )
    return groups


def is_dense(k: int, out_features: int, groups: int = 1) -> bool:
    """True when ``k`` keeps every column, i.e. backprop is ordinary dense backprop."""
    return k <= 0 or k * groups >= out_features


def _grouped_top_k(scores: jax.Array, k: int, groups: int) -> jax.Array:
    """Indices of the top ``k`` scores in each of ``groups`` blocks of the last axis."""
    out = scores.shape[-1]
    if groups == 1:
        return lax.top_k(scores, k)[1]
    width = out // groups
    blocks = scores.reshape((*scores.shape[:-1], groups, width))
    idx = lax.top_k(blocks, k)[1] + (jnp.arange(groups, dtype=jnp.int32) * width)[:, None]
    return idx.reshape((*scores.shape[:-1], groups * k))


def column_scores(g: jax.Array) -> jax.Array:
    """Column ranking of the unified rule: sum of ``|g|`` over all leading axes.

    Args:
      g: output gradient, ``[..., out]``.

    Returns:
      ``[out]`` float32 scores (float32 even for bfloat16 ``g``, so that ranking is not
      decided by rounding).
    """
    lead = tuple(range(g.ndim - 1))
    return jnp.sum(jnp.abs(g.astype(jnp.float32)), axis=lead)


def unified_columns(g: jax.Array, k: int, groups: int = 1) -> jax.Array:
    """One shared set of columns for the whole batch.

    Args:
      g: output gradient, ``[..., out]``.
      k: columns to keep per group.
      groups: number of equal blocks of the output axis, each keeping ``k`` columns.

    Returns:
      ``[groups * k]`` int32 column indices, distinct.

    Example:
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[1.0, -5.0, 0.0, 2.0], [1.0, 0.0, 0.0, -2.0]])
      >>> unified_columns(g, 2).tolist()
      [1, 3]
    """
    return _grouped_top_k(column_scores(g), k, groups)


def top_k_mask(scores: jax.Array, k: int) -> jax.Array:
    """Boolean mask of the ``k`` largest entries of each row of ``scores``.

    Exactly the entries ``lax.top_k`` would return (ties go to the lower index, NaN ranks
    first), built from the ``k``-th value and the index of the last kept tie rather than from
    a per-row scatter of indices, which XLA:CPU runs slowly.

    Args:
      scores: ``[..., n]`` ranking values.
      k: entries to keep per row, ``1 <= k <= n``.

    Returns:
      ``[..., n]`` bool mask with exactly ``k`` True entries per row.
    """
    # NaN compares false with everything; rank it as +inf (top_k also ranks it first). -0.0
    # becomes +0.0: top_k orders -0.0 below +0.0, the comparisons below do not.
    scores = jnp.where(jnp.isnan(scores), jnp.inf, jnp.where(scores == 0, 0, scores))
    values, idx = lax.top_k(scores, k)
    # top_k returns its values in descending order and its ties by increasing index, so the
    # k-th value is the smallest and the kept ties are those up to the last index returned
    # at that value. Reductions, not the slices [..., -1]: XLA:CPU rewrites a top_k whose
    # values are sliced into a full sort of the row, ten to fifty times slower.
    threshold = jnp.min(values, axis=-1, keepdims=True)
    last = jnp.max(jnp.where(values == threshold, idx, -1), axis=-1, keepdims=True)
    iota = lax.broadcasted_iota(jnp.int32, scores.shape, scores.ndim - 1)
    return (scores > threshold) | ((scores == threshold) & (iota <= last))


def _grouped_mask(scores: jax.Array, k: int, groups: int) -> jax.Array:
    if groups == 1:
        return top_k_mask(scores, k)
    shape = scores.shape
    blocks = scores.reshape((*shape[:-1], groups, shape[-1] // groups))
    return top_k_mask(blocks, k).reshape(shape)


def per_example_mask(g: jax.Array, k: int, groups: int = 1) -> jax.Array:
    """Every row keeps its own ``k`` largest-magnitude entries.

    Args:
      g: output gradient, ``[..., out]``.
      k: entries to keep per row (and per group).
      groups: number of equal blocks of the output axis.

    Returns:
      ``[..., out]`` bool mask, ``groups * k`` True entries per row.

    Example:
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[1.0, -5.0, 0.0, 2.0], [3.0, 0.0, 0.0, -2.0]])
      >>> per_example_mask(g, 1).astype(int).tolist()
      [[0, 1, 0, 0], [1, 0, 0, 0]]
    """
    return _grouped_mask(jnp.abs(g.astype(jnp.float32)), k, groups)


def random_mask(key: jax.Array, shape: tuple[int, ...], k: int, groups: int = 1) -> jax.Array:
    """Every row keeps ``k`` distinct entries drawn uniformly at random.

    The top ``k`` of i.i.d. uniform noise is a uniformly random ``k``-subset.

    Args:
      key: a PRNG key.
      shape: shape of the output gradient, ``[..., out]``.
      k: entries to keep per row (and per group).
      groups: number of equal blocks of the output axis.

    Returns:
      ``[..., out]`` bool mask, ``groups * k`` True entries per row.
    """
    return _grouped_mask(jax.random.uniform(key, shape), k, groups)
