"""Which output columns a meProp backward pass keeps.

Every sparsified layer in the package asks this module, and only this module, which entries
of the output gradient ``g = dL/dy`` survive. Three rules are available:

* ``"unified"``: one set of ``k`` columns for the whole batch, ranked by the column sum of
  ``|g|`` over every leading axis (the paper's GPU setting, §4.8).
* ``"per_example"``: every row (every position of the leading axes) keeps its own ``k``
  largest ``|g|`` entries (the paper's CPU setting).
* ``"random"``: every row keeps ``k`` distinct columns drawn uniformly at random, with no
  rescaling (the paper's control experiment, §4.4).

Ties are broken towards the lower column index. Ranking runs in float32 for float32 and
narrower gradients (so that bfloat16 rounding does not decide it) and in the gradient's own
dtype when it is wider (float64).

Non-finite gradients are never dropped silently. Every rule ranks an entry of ``g`` that is
NaN or ±inf above every finite one (unified: a column holding one ranks above every finite
column sum, even one that overflows), ties among them going to the lower index. A rule keeps
``k`` entries per row (or ``k`` columns per group), so it keeps at most ``k`` of them; the
backward pass of :func:`meprop_jax.linear` accounts for the rest. For finite ``x`` and ``W``,
in every mode:

* ``dW``: column ``j`` of the dense weight gradient (and ``db[j]`` with ``sparse_bias``) is
  non-finite exactly when column ``j`` of ``g`` holds a NaN or ±inf, as in dense backprop
  (NaN where dense backprop may give ±inf, for columns past the selection). A compact
  gradient (``CompactGrad``) has room for its ``K`` columns only: its rows are non-finite
  exactly for those of its columns that hold a NaN or ±inf in ``g``, and whenever ``g`` holds
  one, so does at least one of its columns.
* ``dx``: every row whose row of ``g`` holds a NaN or ±inf is non-finite, as in dense
  backprop. The per-row rules keep that exact (a row keeps its own non-finite entries
  first); the unified rule too, except that when a group holds more than ``k`` non-finite
  columns, every row of ``dx`` is NaN.

``groups`` splits the output axis into equal contiguous blocks and selects ``k`` columns in
each block separately; LSTM cells use ``groups=4`` so that each gate keeps ``k`` columns.

Adaptive k (:func:`adaptive_columns`, the rule in :mod:`meprop_jax._src.adaptive`) refines the
unified rule: of its ``k`` columns per group it keeps the fewest top-ranked that hold a given
share of the group's total score (and every non-finite one).
"""

from __future__ import annotations

import functools
import operator
from typing import Final

import jax
import jax.numpy as jnp
from jax import lax

from meprop_jax._src import adaptive as _adaptive

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


def _ranking_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """float32 for float32 and narrower floats; the dtype itself when wider (float64)."""
    return jnp.dtype(dtype) if jnp.finfo(dtype).bits > 32 else jnp.dtype(jnp.float32)


def _grouped_top_k(scores: jax.Array, k: int, groups: int) -> tuple[jax.Array, jax.Array]:
    """The top ``k`` of each of ``groups`` blocks of ``scores`` ``[out]``: their values,
    ``[groups, k]``, and their indices into ``scores``, ``[groups * k]``."""
    out = scores.shape[-1]
    if groups == 1:
        values, idx = lax.top_k(scores, k)
        return values[None], idx
    width = out // groups
    values, idx = lax.top_k(scores.reshape(groups, width), k)
    idx = idx + (jnp.arange(groups, dtype=jnp.int32) * width)[:, None]
    return values, idx.reshape(groups * k)


def column_scores(g: jax.Array) -> jax.Array:
    """Column ranking of the unified rule: sum of ``|g|`` over all leading axes.

    Args:
      g: output gradient, ``[..., out]``.

    Returns:
      ``[out]`` scores, float32 for float32 and narrower ``g`` (so that bfloat16 rounding does
      not decide the ranking), ``g``'s own dtype when it is wider (float64).
    """
    lead = tuple(range(g.ndim - 1))
    return jnp.sum(jnp.abs(g.astype(_ranking_dtype(g.dtype))), axis=lead)


def non_finite_columns(g: jax.Array) -> jax.Array:
    """Which columns of ``g`` hold a NaN or ±inf anywhere in the leading axes.

    Args:
      g: output gradient, ``[..., out]``.

    Returns:
      ``[out]`` bool.
    """
    lead = tuple(range(g.ndim - 1))

    def exact() -> jax.Array:
        return jnp.any(~jnp.isfinite(g), axis=lead)

    def only_if_a_score_is_not_finite() -> jax.Array:
        # Every NaN or inf makes its column's score non-finite (so does a finite sum that
        # overflows), so finite scores, the common case, clear every column.
        scores = column_scores(g)  # under jit, the ranking's own pass over g
        # zeros_like, not zeros: under shard_map the branches must both vary by device.
        no_column = functools.partial(jnp.zeros_like, scores, jnp.bool_)
        return lax.cond(jnp.all(jnp.isfinite(scores)), no_column, exact)

    # XLA:CPU runs a second reduction over g at full cost (half again the CPU time of a
    # unified backward at g [1024, 8192], k=8) but skips an untaken branch almost for free.
    # Elsewhere the reduction can fuse with the scores' and a conditional may wait for its
    # predicate on the host.
    return lax.platform_dependent(cpu=only_if_a_score_is_not_finite, default=exact)


def unified_columns(
    g: jax.Array, k: int, groups: int = 1, *, non_finite: jax.Array | None = None
) -> jax.Array:
    """One shared set of columns for the whole batch.

    Columns holding a NaN or ±inf rank first (ties to the lower index, NaN or not), then the
    largest ``column_scores``.

    Args:
      g: output gradient, ``[..., out]``.
      k: columns to keep per group.
      groups: number of equal blocks of the output axis, each keeping ``k`` columns.
      non_finite: ``non_finite_columns(g)``, when the caller has it already.

    Returns:
      ``[groups * k]`` int32 column indices, distinct: group by group, each group's ``k`` in
      descending rank.

    Example:
      >>> import jax.numpy as jnp
      >>> g = jnp.array([[1.0, -5.0, 0.0, 2.0], [1.0, 0.0, 0.0, -2.0]])
      >>> unified_columns(g, 2).tolist()
      [1, 3]
    """
    return _grouped_top_k(_ranking_scores(g, non_finite), k, groups)[1]


def _ranking_scores(g: jax.Array, non_finite: jax.Array | None) -> jax.Array:
    """``column_scores(g)`` with every non-finite column at ``+inf``, ``[out]``."""
    scores = column_scores(g)
    if non_finite is None:
        non_finite = non_finite_columns(g)
    # A finite column whose sum overflows to inf must not tie with (and, being at a lower
    # index, beat) a column that holds a NaN or an infinity.
    largest = jnp.asarray(jnp.finfo(scores.dtype).max, scores.dtype)
    return jnp.where(non_finite, jnp.inf, jnp.minimum(scores, largest))


def adaptive_columns(
    g: jax.Array,
    k_max: int,
    rule: _adaptive.AdaptiveK,
    groups: int = 1,
    *,
    non_finite: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The unified columns at the width ``k_max`` and which of them adaptive k keeps.

    See :mod:`meprop_jax._src.adaptive` for the rule: in each group, the fewest top-ranked columns
    (at least ``rule.k_min``, at most ``k_max``) whose scores hold ``rule.mass`` of the group's
    total score, plus every column that holds a NaN or ±inf.

    Args:
      g: output gradient, ``[..., out]``.
      k_max: columns selected per group (the layer's ``k``).
      rule: the adaptive-k rule.
      groups: number of equal blocks of the output axis.
      non_finite: ``non_finite_columns(g)``, when the caller has it already.

    Returns:
      ``cols``, exactly ``unified_columns(g, k_max, groups)``, and ``keep``, ``[groups *
      k_max]`` bool: a prefix of each group's ``k_max`` columns.

    Example:
      >>> import jax.numpy as jnp
      >>> from meprop_jax._src.adaptive import AdaptiveK
      >>> g = jnp.array([[8.0, 1.0, 0.0, 1.0]])
      >>> cols, keep = adaptive_columns(g, 3, AdaptiveK(mass=0.8))
      >>> cols.tolist(), keep.tolist()
      ([0, 1, 3], [True, False, False])
    """
    scores = _ranking_scores(g, non_finite)
    ranked, cols = _grouped_top_k(scores, k_max, groups)
    total = jnp.sum(scores.reshape(groups, -1), axis=-1, keepdims=True)
    return cols, _adaptive.kept_ranks(ranked, total, rule).reshape(groups * k_max)


def flag_dropped_non_finite(
    non_finite: jax.Array, g_cols: jax.Array, k: int, groups: int = 1
) -> jax.Array:
    """``g_cols`` with NaN in every row when the unified selection dropped a non-finite column.

    Non-finite columns rank first, so a group drops one only when it holds more than ``k``;
    its ``k`` kept columns are then all non-finite. The NaN goes into that group's first kept
    column, in every row: ``dx`` turns non-finite everywhere (dense backprop would spoil only
    the rows that hold a NaN or ±inf; telling them apart would cost a pass over ``g``) while
    the non-finite columns of ``dW`` stay the same. Otherwise ``g_cols`` comes back unchanged,
    bit for bit.

    Args:
      non_finite: ``[out]`` bool, from :func:`non_finite_columns`.
      g_cols: ``[..., groups * k]``, the columns chosen by :func:`unified_columns`.
      k: columns kept per group.
      groups: number of equal blocks of the output axis.

    Returns:
      ``g_cols``, flagged.
    """
    per_group = jnp.sum(non_finite.reshape(groups, -1), axis=-1, dtype=jnp.int32)
    first = lax.broadcasted_iota(jnp.int32, (groups, k), 1) == 0
    flag = ((per_group > k)[:, None] & first).reshape(groups * k)
    return jnp.where(flag, jnp.nan, g_cols)


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
    # |±inf| = inf and top_k_mask ranks NaN as inf: non-finite entries come first.
    return _grouped_mask(jnp.abs(g.astype(_ranking_dtype(g.dtype))), k, groups)


def random_mask(
    key: jax.Array,
    shape: tuple[int, ...],
    k: int,
    groups: int = 1,
    *,
    g: jax.Array | None = None,
) -> jax.Array:
    """Every row keeps ``k`` distinct entries drawn uniformly at random.

    The top ``k`` of i.i.d. uniform noise is a uniformly random ``k``-subset.

    Args:
      key: a PRNG key.
      shape: shape of the output gradient, ``[..., out]``.
      k: entries to keep per row (and per group).
      groups: number of equal blocks of the output axis.
      g: optional output gradient of that shape; its NaN and ±inf entries rank above every
        draw. A finite ``g`` leaves the mask exactly as without it.

    Returns:
      ``[..., out]`` bool mask, ``groups * k`` True entries per row.

    Raises:
      ValueError: if ``g`` does not have the shape ``shape``.
    """
    noise = jax.random.uniform(key, shape)
    if g is not None:
        if tuple(g.shape) != tuple(shape):
            raise ValueError(f"g must have the shape {tuple(shape)}, got {tuple(g.shape)}")
        # The draws lie in [0, 1): +inf puts every non-finite entry of g first.
        noise = jnp.where(jnp.isfinite(g), noise, jnp.inf)
    return _grouped_mask(noise, k, groups)
