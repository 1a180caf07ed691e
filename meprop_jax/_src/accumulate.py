"""``optax.MultiSteps`` lifted to compact kernel gradients: accumulation by columns.

Each mini-step adds its compact blocks into a ``[out, in]`` sum per kernel and marks their
columns; every ``n``-th step the union of the marked columns is gathered, averaged (or summed)
and given to the lifted inner transformation (see :func:`meprop_jax.optim.compact`), and
those rows of the sum are reset. ``optax.MultiSteps`` itself cannot be lifted by gathering:
its accumulator is parameter-shaped and its reset is a whole-tree reset, so a gather of one
step's columns would lose the other columns' sums or leave them behind.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from meprop_jax._src.compact import (
    _SCATTER,
    SparseState,
    Transposed,
    _add_rows_as_columns,
    _check_state,
    _decode,
    _dense_grad,
    _dtype,
    _flat_grads,
    _is_transposed,
    _params,
    _rows,
    _set_rows,
    _step,
    _transpose_tapped,
    is_row_major,
    lift,
    tap_leaves,
)

Array = jax.Array
PyTree = Any


class AccumulationState(NamedTuple):
    """State of a lifted ``optax.MultiSteps`` (inside :class:`SparseState`).

    Attributes:
      mini_step: int32 mini-steps accumulated since the last update.
      gradient_step: int32 updates made.
      inner: the lifted inner transformation's state (a :class:`SparseState`'s ``inner``).
      acc: the parameters' gradients summed since the last update, in the accumulator dtype;
        a tapped kernel's sum is :class:`Transposed`, ``[out, in]``.
      touched: ``[out]`` bool per tapped kernel (by key string): columns with a sum.
    """

    mini_step: Array
    gradient_step: Array
    inner: PyTree
    acc: PyTree
    touched: dict[str, Array]


def _add_rows(leaf: Any, cols: Array, rows: Array, row_major: bool) -> Any:
    rows = rows.astype(_dtype(leaf))
    if _is_transposed(leaf):
        return Transposed(leaf.t.at[cols].add(rows, **_SCATTER))
    if row_major:  # the sum of a kernel_t [out, in]
        return leaf.at[cols].add(rows, **_SCATTER)
    return _add_rows_as_columns(leaf, cols, rows)


def _union(touched: Array, width: int) -> Array:
    """The touched columns, ascending, padded with distinct out-of-range indices to ``width``."""
    out = touched.shape[0]
    (cols,) = jnp.nonzero(touched, size=width, fill_value=0)
    slots = jnp.arange(width, dtype=cols.dtype)
    return jnp.where(slots < jnp.sum(touched, dtype=cols.dtype), cols, out + slots)


def _every_k(steps: optax.MultiSteps) -> int:
    # optax keeps the int of every_k_schedule behind a lambda; a real schedule gives an array.
    n = steps._every_k_schedule(jnp.zeros([], jnp.int32))
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(
            "compact(optax.MultiSteps(...)) needs an int every_k_schedule: the accumulated "
            "columns need a static bound"
        )
    skip = getattr(steps._should_skip_update_fn, "__qualname__", "")
    if not skip.startswith("MultiSteps.__init__"):
        raise ValueError("compact(optax.MultiSteps(...)) does not support should_skip_update_fn")
    return n


def lift_multi_steps(steps: optax.MultiSteps, bad_taps: str = "nan", lazy: bool = True):
    """``(init, update)`` of ``compact(optax.MultiSteps(inner, n))``: accumulation by columns."""
    n = _every_k(steps)
    mean = steps._use_grad_mean
    acc_dtype = steps._accumulator_dtype
    inner_tx = steps.inner_opt
    inner_init, _ = lift(inner_tx)

    def init(params: PyTree, taps: PyTree = None) -> SparseState:
        compact_keys = tap_leaves(taps)
        layout = _params(params, compact_keys)
        inner = inner_init(params, taps).inner
        acc = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), acc_dtype), params)
        acc = _transpose_tapped(acc, layout, compact_keys)
        touched = {key: jnp.zeros((layout.columns(key),), bool) for key in compact_keys}
        # Two buffers, not one twice: a state given to jit with donation must not alias itself.
        mini_step, gradient_step = jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32)
        return SparseState(AccumulationState(mini_step, gradient_step, inner, acc, touched))

    def update(grads, state: SparseState, params, taps=None):
        _check_state(state)
        s = state.inner
        layout = _params(params, ())
        decoded = _decode(taps, layout, grads, bad_taps)
        if set(decoded) != set(s.touched):
            raise ValueError(
                f"compact(optax.MultiSteps): tap gradients for {sorted(decoded)}, but init had "
                f"taps for {sorted(s.touched)}: pass the same taps to init and update"
            )
        flat = _flat_grads(grads)
        acc = [
            _add_rows(a, *decoded[key][::-1], is_row_major(key))
            if key in decoded
            else a + _dense_grad(flat, key).astype(a.dtype)
            for key, a in zip(layout.keys, layout.treedef.flatten_up_to(s.acc), strict=True)
        ]
        touched = {
            key: t.at[decoded[key][1]].set(True, mode="drop") for key, t in s.touched.items()
        }
        width = {key: min(n * decoded[key][0].shape[0], layout.columns(key)) for key in decoded}

        def emit(args):
            params, inner, acc, touched = args
            scale = 1.0 / n if mean else 1.0
            dtypes = dict(zip(layout.keys, [p.dtype for p in jax.tree.leaves(params)], strict=True))
            union = {key: _union(touched[key], width[key]) for key in touched}
            dense, compact_, sums = {}, {}, {}
            for key, a in zip(layout.keys, acc, strict=True):
                if key in union:
                    sums[key] = _rows(a, union[key], is_row_major(key))
                    compact_[key] = ((sums[key] * scale).astype(dtypes[key]), union[key])
                else:
                    dense[key] = (a * scale).astype(dtypes[key])
            params, inner = _step(inner_tx, layout, dense, compact_, inner, params, lazy=lazy)
            acc = [
                _set_rows(a, union[key], jnp.zeros_like(sums[key]), is_row_major(key))
                if key in union
                else jnp.zeros_like(a)
                for key, a in zip(layout.keys, acc, strict=True)
            ]
            touched = {key: jnp.zeros_like(t) for key, t in touched.items()}
            return params, inner, acc, touched

        done = s.mini_step == n - 1
        params, inner, acc, touched = lax.cond(
            done, emit, lambda args: args, (params, s.inner, acc, touched)
        )
        new = AccumulationState(
            jnp.where(done, 0, s.mini_step + 1).astype(jnp.int32),
            (s.gradient_step + done.astype(jnp.int32)).astype(jnp.int32),
            inner,
            layout.treedef.unflatten(acc),
            touched,
        )
        return params, SparseState(new)

    return init, update
