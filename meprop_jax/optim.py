"""Column-sparse optimizers for meProp layers whose weight gradients stay compact.

Two update rules are available, and they differ for Adam:

* **The authors' rule (the default everywhere in this package).** A meProp layer hands autodiff
  a dense ``[in, out]`` weight gradient that is zero outside the selected columns, and a stock
  optimizer (``optax.adam``, ...) updates every weight densely. With Adam, weights whose
  gradient is zero this step still move through their momentum, exactly as in the authors'
  code (Sun et al. 2017 feed the masked gradient to an unmodified dense Adam). Nothing here is
  needed for it: ``meprop_jax.Dense(k=...)`` plus any optax optimizer.

* **The compact rule (this module, opt-in).** ``meprop_jax.Dense(..., sparse_update=True)``
  keeps its kernel gradient compact, as the selected column indices plus a ``[K, in]`` block
  (a :class:`meprop_jax.CompactGrad`), and the optimizers below update only those
  columns of the kernel and of its optimizer state; nothing of size ``[in, out]`` is built or
  swept in the step. Adam is **lazy**: the moments and weights of unselected columns are left
  untouched (bit-identical), so a column that is not selected does not move, unlike the
  authors' rule. Bias correction uses the global step count (as TensorFlow's ``LazyAdam`` and
  PyTorch's ``SparseAdam`` do), so when every column is selected at every step the lazy update
  is exactly dense ``optax.adam``; a column that is selected rarely gets its moments' bias
  corrected for the global step, not for the number of times it was selected. AdaGrad and SGD
  leave a weight with zero gradient where it is anyway, so for them the two rules agree.

Every leaf that is not a compact meProp kernel (biases, the dense output layer, ``k = 0``
layers) is updated densely by the same rule. ``clip`` clips gradients element-wise to
``[-clip, clip]`` (``optax.clip``), the compact blocks and the dense gradients alike.

``update`` returns new parameters, not updates: optax's ``apply_updates`` is a dense add over
every weight, and avoiding exactly that is the point; the kernels' selected columns are
scattered into the parameters instead. Run the step under ``jax.jit`` with the parameters and
the state donated (or inside ``lax.scan``) so that the scatters update the buffers in place.
The state of a kernel given to :meth:`SparseOptimizer.init` with its tap is stored transposed,
``[out, in]`` (:class:`TransposedSlots`), so that a kernel column is a contiguous row of the
state; on a CPU that makes the state's gathers and scatters several times cheaper.

A whole training step::

    from meprop_jax import optim

    model = MLP(...)  # meprop_jax.Dense(features, k=k, sparse_update=True) hidden layers
    variables = model.init(key, x_batch)  # the training batch shape, for per-example taps
    params, taps = variables["params"], variables[optim.TAP_COLLECTION]
    opt = optim.sparse_adam(1e-3)
    state = opt.init(params, taps)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, state, taps, x, y):
        def loss_fn(params, taps):
            logits = model.apply({"params": params, optim.TAP_COLLECTION: taps}, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, (grads, tap_grads) = optim.value_and_compact_grad(loss_fn)(params, taps)
        params, state = opt.update(grads, state, params, tap_grads)
        return params, state, loss
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from meprop_jax._src.collections import TAP_COLLECTION
from meprop_jax._src.taps import CompactGrad, compact_tap, compact_width

Array = jax.Array
PyTree = Any
ScalarOrSchedule = float | Array | Callable[[Array], Array]

__all__ = [
    "TAP_COLLECTION",
    "CompactGrad",
    "SparseOptimizer",
    "SparseState",
    "TransposedSlots",
    "compact_tap",
    "compact_width",
    "sparse_adagrad",
    "sparse_adam",
    "sparse_sgd",
    "value_and_compact_grad",
]


class TransposedSlots(NamedTuple):
    """Optimizer state of a compact meProp kernel, each array stored ``[out, in]``."""

    arrays: tuple[Array, ...]


class SparseState(NamedTuple):
    """State of a :class:`SparseOptimizer`.

    Attributes:
      count: int32 number of updates made so far (the global step of Adam's bias correction
        and of learning-rate schedules).
      slots: the parameter tree with every leaf replaced by a tuple of its state arrays
        (Adam: ``(mu, nu)``, AdaGrad: ``(sum_of_squares,)``, SGD: ``()``), or by
        :class:`TransposedSlots` for a compact meProp kernel.
    """

    count: Array
    slots: PyTree


class _Rule(NamedTuple):
    """An element-wise update rule, layout-agnostic: it sees matching arrays of any shape."""

    init: Callable[[Array], tuple[Array, ...]]
    # (grad, slots, count after this step) -> (update to add to the parameter, new slots)
    step: Callable[[Array, tuple[Array, ...], Array], tuple[Array, tuple[Array, ...]]]


class SparseOptimizer(NamedTuple):
    """An optimizer that updates compact meProp kernels column by column.

    Attributes:
      init: ``init(params, taps=None) -> SparseState``. ``taps`` (the ``"meprop_taps"``
        collection from ``model.init``) marks the kernels that will receive compact gradients,
        whose state is then stored ``[out, in]``; without it every state array has its
        parameter's layout (still correct, with slower column gathers).
      update: ``update(grads, state, params, taps=None) -> (new_params, new_state)``.
        ``grads`` has the structure of ``params``; its entries for kernels that have a tap
        gradient in ``taps`` are ignored (``None`` from :func:`value_and_compact_grad`).
        ``taps`` holds the taps' gradients, :class:`CompactGrad` leaves at the kernels' paths.
    """

    init: Callable[..., SparseState]
    update: Callable[..., tuple[PyTree, SparseState]]


def _path_key(path) -> str:
    return jax.tree_util.keystr(path)


def _compact_leaves(taps: PyTree) -> dict[str, CompactGrad]:
    if taps is None:
        return {}
    is_tap = lambda x: isinstance(x, CompactGrad)
    leaves = jax.tree_util.tree_flatten_with_path(taps, is_leaf=is_tap)[0]
    bad = [_path_key(p) for p, leaf in leaves if not is_tap(leaf)]
    if bad:
        raise ValueError(f"taps must hold CompactGrad leaves only; got other leaves at {bad}")
    return {_path_key(p): leaf for p, leaf in leaves}


def _learning_rate(learning_rate: ScalarOrSchedule, count: Array, dtype) -> Array | float:
    """``-learning_rate`` as optax's ``scale_by_learning_rate`` applies it."""
    if callable(learning_rate):
        return jnp.asarray(-1 * learning_rate(count), dtype=dtype)
    return -1 * learning_rate


def _make(rule: _Rule, learning_rate: ScalarOrSchedule, clip: float | None) -> SparseOptimizer:
    def prepare(g: Array, dtype) -> Array:
        g = g.astype(dtype)
        return g if clip is None else jnp.clip(g, -clip, clip)

    def init(params: PyTree, taps: PyTree = None) -> SparseState:
        compact = _compact_leaves(taps)
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        _check_paths(compact, {_path_key(p) for p, _ in flat})
        slots = [
            TransposedSlots(rule.init(p.T)) if _path_key(path) in compact else rule.init(p)
            for path, p in flat
        ]
        return SparseState(jnp.zeros([], jnp.int32), treedef.unflatten(slots))

    def update(grads, state: SparseState, params, taps=None):
        compact = _compact_leaves(taps)
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        _check_paths(compact, {_path_key(p) for p, _ in flat})
        grads = dict(
            (_path_key(p), g)
            for p, g in jax.tree_util.tree_flatten_with_path(grads, is_leaf=lambda x: x is None)[0]
        )
        slots = treedef.flatten_up_to(state.slots)
        count = optax.safe_increment(state.count)
        after = _after(grads, taps)
        new_params, new_slots = [], []
        for (path, p), s in zip(flat, slots, strict=True):
            key = _path_key(path)
            lr = _learning_rate(learning_rate, state.count, p.dtype)  # optax's count: pre-step
            if key in compact:
                p, s = _column_update(rule, prepare, lr, p, s, compact[key], count, after)
            else:
                g = grads.get(key)
                if g is None:
                    raise ValueError(f"no gradient for {key}, which has no tap either")
                delta, s = rule.step(prepare(g, p.dtype), s, count)
                p = jnp.asarray(p + lr * delta).astype(p.dtype)
            new_params.append(p)
            new_slots.append(s)
        return treedef.unflatten(new_params), SparseState(count, treedef.unflatten(new_slots))

    return SparseOptimizer(init, update)


def _check_paths(compact: dict[str, CompactGrad], param_keys: set[str]) -> None:
    missing = sorted(set(compact) - param_keys)
    if missing:
        raise ValueError(f"taps at {missing} match no parameter (pass params and taps trees)")


def _after(grads: PyTree, taps: PyTree) -> Array:
    """An int32 zero that XLA cannot tell from data depending on every gradient.

    XLA decides whether a scatter may update a donated kernel in place before it schedules
    the step, from data dependencies alone. The backward pass also reads a meProp kernel (its
    selected columns, for ``dx``), and nothing makes the kernel's own scatter depend on that
    read, so XLA copies the whole kernel first, which costs more than the rest of the update.
    Bounding the scatter indices by ``width + _after(...)`` (a no-op: the indices are below
    ``width``) makes every scatter depend on every gradient, hence on every read before it.
    NaN-safe: the result is a count of NaNs, never NaN itself.
    """
    firsts = [jnp.ravel(a)[0] for a in jax.tree.leaves((grads, taps)) if jnp.size(a)]
    return sum((jnp.isnan(a).astype(jnp.int32) for a in firsts), jnp.zeros([], jnp.int32))


def _column_update(
    rule: _Rule, prepare, lr, p: Array, slots, tap: CompactGrad, count: Array, after: Array
):
    """Updates the columns ``tap.cols`` of ``p`` ``[in, out]`` and of its state only.

    The rule runs on ``[K, in]`` rows (the block's layout). Padding entries of ``cols``
    (``>= out``) gather clamped garbage and are dropped by the scatters; the other indices are
    distinct, so the scatters are plain writes.
    """
    cols = tap.cols.astype(jnp.int32)
    cols = jnp.minimum(cols, p.shape[1] + cols.shape[0] + after)  # no-op; see _after
    g = prepare(tap.block, p.dtype)
    scatter = dict(mode="drop", unique_indices=True)
    if isinstance(slots, TransposedSlots):  # state [out, in]: the columns are its rows
        old = tuple(a.at[cols].get(mode="clip") for a in slots.arrays)
        delta, new = rule.step(g, old, count)
        new = tuple(a.at[cols].set(n, **scatter) for a, n in zip(slots.arrays, new, strict=True))
        slots = TransposedSlots(new)
    else:
        old = tuple(a.at[:, cols].get(mode="clip").T for a in slots)
        delta, new = rule.step(g, old, count)
        slots = tuple(a.at[:, cols].set(n.T, **scatter) for a, n in zip(slots, new, strict=True))
    # p + lr * delta in p's dtype, as optax.apply_updates computes it, column by column.
    return _add_rows_as_columns(p, cols, (lr * delta).astype(p.dtype)), slots


def _add_rows_as_columns(p: Array, cols: Array, rows: Array) -> Array:
    """``p.at[:, cols].add(rows.T)`` without materializing the transpose; drops ``cols >= out``."""
    dnums = jax.lax.ScatterDimensionNumbers(
        update_window_dims=(1,), inserted_window_dims=(1,), scatter_dims_to_operand_dims=(1,)
    )
    return jax.lax.scatter_add(
        p,
        cols[:, None],
        rows,
        dnums,
        indices_are_sorted=False,
        unique_indices=True,
        mode=jax.lax.GatherScatterMode.FILL_OR_DROP,
    )


def _power(decay: float, count: Array) -> Array:
    """``decay**count`` in float32, as optax computes it, under strict dtype promotion too."""
    return jax.lax.pow(jnp.asarray(decay, jnp.float32), count)


def sparse_adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    clip: float | None = None,
) -> SparseOptimizer:
    """Adam, lazy on compact meProp kernels and dense elsewhere.

    The same arithmetic as ``optax.adam(learning_rate, b1, b2, eps)`` (identical to it when
    there are no taps or every column is selected at every step), except that a compact
    kernel's unselected columns keep their weights and moments unchanged; bias correction uses
    the global step count (see the module docstring).

    Args:
      learning_rate: a float or an optax schedule (called with the step count, from 0).
      b1: decay of the first moment.
      b2: decay of the second moment.
      eps: added to the denominator.
      clip: clip every gradient entry to ``[-clip, clip]`` first; ``None`` disables.
    """

    def init(p: Array) -> tuple[Array, ...]:
        return jnp.zeros_like(p), jnp.zeros_like(p)

    def step(g: Array, slots, count: Array):
        mu, nu = slots
        mu = (1 - b1) * g + b1 * mu
        nu = (1 - b2) * (g * g) + b2 * nu
        mu_hat = mu / (1 - _power(b1, count)).astype(mu.dtype)
        nu_hat = nu / (1 - _power(b2, count)).astype(nu.dtype)
        return mu_hat / (jnp.sqrt(nu_hat + 0.0) + eps), (mu, nu)

    return _make(_Rule(init, step), learning_rate, clip)


def sparse_adagrad(
    learning_rate: ScalarOrSchedule,
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
    clip: float | None = None,
) -> SparseOptimizer:
    """AdaGrad (``optax.adagrad``'s arithmetic), column-sparse on compact meProp kernels.

    A zero gradient changes neither an AdaGrad accumulator nor its weight, so this equals
    ``optax.adagrad`` on the masked dense gradient, without sweeping the unselected columns.
    """

    def init(p: Array) -> tuple[Array, ...]:
        return (jnp.full_like(p, initial_accumulator_value),)

    def step(g: Array, slots, count: Array):
        del count
        (acc,) = slots
        acc = g * g + acc
        scale = jnp.where(acc > 0, jax.lax.rsqrt(acc + eps), 0.0)
        return scale * g, (acc,)

    return _make(_Rule(init, step), learning_rate, clip)


def sparse_sgd(learning_rate: ScalarOrSchedule, clip: float | None = None) -> SparseOptimizer:
    """Plain SGD (``optax.sgd`` without momentum), column-sparse on compact meProp kernels."""

    def init(p: Array) -> tuple[Array, ...]:
        del p
        return ()

    def step(g: Array, slots, count: Array):
        del count
        return g, slots

    return _make(_Rule(init, step), learning_rate, clip)


def value_and_compact_grad(
    loss_fn: Callable[..., Any], has_aux: bool = False
) -> Callable[..., tuple[Any, tuple[PyTree, PyTree]]]:
    """Like ``jax.value_and_grad`` for ``loss_fn(params, taps, *args, **kwargs)``.

    The returned function gives ``(value, (grads, tap_grads))``: ``grads`` has the structure
    of ``params`` with ``None`` at every kernel that has a tap (those kernels are not
    differentiated at all, so no ``[in, out]`` gradient exists even outside ``jit``), and
    ``tap_grads`` has the structure of ``taps`` with the compact gradients. Both go straight to
    :meth:`SparseOptimizer.update`.

    Args:
      loss_fn: ``loss_fn(params, taps, *args, **kwargs) -> loss`` (or ``(loss, aux)`` with
        ``has_aux``); it applies the model to ``{"params": params, "meprop_taps": taps}``.
      has_aux: as in ``jax.value_and_grad``.
    """

    def wrapped(params, taps, *args, **kwargs):
        compact = _compact_leaves(taps)
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        tapped = [_path_key(path) in compact for path, _ in flat]
        free = [p for (_, p), t in zip(flat, tapped, strict=True) if not t]
        fixed = [p for (_, p), t in zip(flat, tapped, strict=True) if t]

        def merged(free, taps):
            free_it, fixed_it = iter(free), iter(fixed)
            leaves = [next(fixed_it) if t else next(free_it) for t in tapped]
            return loss_fn(treedef.unflatten(leaves), taps, *args, **kwargs)

        value, (g_free, g_taps) = jax.value_and_grad(merged, argnums=(0, 1), has_aux=has_aux)(
            free, taps
        )
        g_it = iter(g_free)
        grads = treedef.unflatten([None if t else next(g_it) for t in tapped])
        return value, (grads, g_taps)

    return wrapped
