"""The machinery of :func:`meprop_jax.optim.compact`: optax state split into kernel columns.

A lifted step works on a *compact view* of the parameters, the gradients and the optimizer
state: a compact kernel ``[in, out]`` is replaced by its selected columns as ``[K, in]`` rows
(the layout of :class:`CompactGrad` blocks), and so is every state leaf that mirrors it; every
other leaf is kept whole. ``tx.update`` runs on that view and its results are scattered back.

A kernel stored transposed (``kernel_t [out, in]``, ``kernel_layout="out_in"``) already holds
its columns as contiguous rows, and so do its state leaves: they are gathered and scattered as
they are, with no :class:`Transposed` wrapper.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from meprop_jax._src import fused as _fused
from meprop_jax._src.collections import TRANSPOSED_KERNEL
from meprop_jax._src.factored import Factors, as_rows, decode_factored
from meprop_jax._src.taps import CompactGrad, FactoredGrad, decode_columns

Array = jax.Array
PyTree = Any

_SCATTER = dict(mode="drop", unique_indices=True)


class Transposed(NamedTuple):
    """A compact kernel's ``[in, out]`` state leaf stored as ``t``, ``[out, in]``.

    A kernel column is then a contiguous row of the state: on a CPU, gathering and scattering
    rows is several times cheaper than columns.
    """

    t: Array


class SparseState(NamedTuple):
    """State of a :class:`meprop_jax.optim.SparseOptimizer`.

    Attributes:
      inner: the lifted transformation's own state (``optax.adam``'s ``ScaleByAdamState``,
        ...), except that each leaf mirroring a kernel that was given a tap at ``init`` is a
        :class:`Transposed`. :func:`param_layout` gives it in the parameters' layout.
    """

    inner: PyTree


def _is_transposed(node: Any) -> bool:
    return isinstance(node, Transposed)


def param_layout(state: PyTree) -> tuple[PyTree, Callable[[PyTree], PyTree]]:
    """``state`` with every :class:`Transposed` leaf as a plain ``[in, out]`` array.

    Returns ``(plain, restore)``: ``restore(tree)`` transposes back the same positions of a
    tree with ``plain``'s structure (e.g. after gathering units, as meSimp's ``shrink`` does).
    """
    leaves, treedef = jax.tree.flatten(state, is_leaf=_is_transposed)
    marks = [_is_transposed(leaf) for leaf in leaves]
    plain = treedef.unflatten(
        [leaf.t.T if m else leaf for leaf, m in zip(leaves, marks, strict=True)]
    )

    def restore(tree: PyTree) -> PyTree:
        new = treedef.flatten_up_to(tree)
        return treedef.unflatten(
            [Transposed(a.T) if m else a for a, m in zip(new, marks, strict=True)]
        )

    return plain, restore


def _key(path) -> str:
    """A leaf's path as ``"hidden/kernel"``: the name errors give and the key of every map."""
    return jax.tree_util.keystr(path, simple=True, separator="/")


def tap_leaves(taps: PyTree) -> dict[str, CompactGrad | FactoredGrad]:
    """The :class:`CompactGrad` and :class:`FactoredGrad` leaves of ``taps``, by the key string
    of their path."""
    if taps is None:
        return {}
    is_tap = lambda x: isinstance(x, (CompactGrad, FactoredGrad))
    leaves = jax.tree_util.tree_flatten_with_path(taps, is_leaf=is_tap)[0]
    bad = [_key(p) for p, leaf in leaves if not is_tap(leaf)]
    if bad:
        raise ValueError(
            f"taps must hold CompactGrad or FactoredGrad leaves only; got other leaves at {bad}"
        )
    return {_key(p): leaf for p, leaf in leaves}


class _Params(NamedTuple):
    """The parameters' flat layout: key strings, treedef and the shape of every leaf."""

    keys: list[str]
    treedef: Any
    shapes: list[tuple[int, ...]]

    def columns(self, key: str) -> int:
        """``out`` of the kernel at ``key``."""
        shape = self.shapes[self.keys.index(key)]
        return shape[0] if is_row_major(key) else shape[1]


def is_row_major(key: str) -> bool:
    """Whether a parameter key names a transposed kernel, ``.../kernel_t`` ``[out, in]``."""
    return key.rsplit("/", 1)[-1] == TRANSPOSED_KERNEL


def _params(params: PyTree, compact_keys) -> _Params:
    flat, treedef = jax.tree_util.tree_flatten_with_path(params)
    keys = [_key(p) for p, _ in flat]
    missing = sorted(set(compact_keys) - set(keys))
    if missing:
        raise ValueError(f"taps at {missing} match no parameter (pass params and taps trees)")
    for key, (_, p) in zip(keys, flat, strict=True):
        if key in compact_keys and jnp.ndim(p) != 2:
            raise ValueError(
                f"the tapped parameter {key} must be a kernel, [in, out] (or [out, in] named "
                f"{TRANSPOSED_KERNEL}), got shape {list(jnp.shape(p))}"
            )
    return _Params(keys, treedef, [tuple(jnp.shape(p)) for _, p in flat])


def _leaf_shape(leaf: Any) -> tuple[int, ...]:
    return tuple(leaf.t.shape[::-1]) if _is_transposed(leaf) else tuple(jnp.shape(leaf))


def _mirror_test(layout: _Params) -> Callable[[Any], bool]:
    """Whether a state node mirrors the parameters (same structure and shapes)."""

    def is_mirror(node: Any) -> bool:
        if _is_transposed(node):
            return False
        leaves, treedef = jax.tree.flatten(node, is_leaf=_is_transposed)
        return treedef == layout.treedef and [_leaf_shape(x) for x in leaves] == layout.shapes

    return is_mirror


def _split(state: PyTree, layout: _Params):
    """``(outer treedef, items, mirror flags)``: the state cut at its parameter mirrors."""
    is_mirror = _mirror_test(layout)
    outer = jax.tree.structure(state, is_leaf=is_mirror)
    items = outer.flatten_up_to(state)
    return outer, items, [is_mirror(item) for item in items]


def _check_liftable(tx_name: str, state: PyTree, layout: _Params) -> None:
    is_steps = lambda n: isinstance(n, optax.MultiStepsState)
    if any(is_steps(n) for n in jax.tree.leaves(state, is_leaf=is_steps)):
        raise ValueError(
            "compact(tx): tx holds optax.MultiSteps' state; its accumulator and whole-tree "
            "reset cannot be split into columns. Pass the MultiSteps object itself, "
            "compact(optax.MultiSteps(inner, n)), not its gradient_transformation() or a chain"
        )
    is_mirror = _mirror_test(layout)
    for path, item in jax.tree_util.tree_flatten_with_path(state, is_leaf=is_mirror)[0]:
        if not is_mirror(item) and jnp.ndim(item) != 0:
            raise ValueError(
                f"compact({tx_name}): its state leaf {_key(path) or '<state>'} "
                f"of shape {list(jnp.shape(item))} is neither a scalar nor part of a subtree "
                "shaped like the parameters, so its update cannot be split into kernel columns"
            )


def _transpose_tapped(state: PyTree, layout: _Params, compact_keys) -> PyTree:
    outer, items, mirrors = _split(state, layout)

    def transpose(node):
        leaves = layout.treedef.flatten_up_to(node)
        return layout.treedef.unflatten(
            [
                Transposed(a.T) if key in compact_keys and not is_row_major(key) else a
                for key, a in zip(layout.keys, leaves, strict=True)
            ]
        )

    return outer.unflatten([transpose(i) if m else i for i, m in zip(items, mirrors, strict=True)])


def _rows(leaf: Any, cols: Array, row_major: bool) -> Array:
    """The columns ``cols`` of a kernel-shaped leaf as ``[K, in]`` rows; padding gives 0.

    ``row_major``: the leaf is stored ``[out, in]`` (a ``kernel_t`` and its state)."""
    if _is_transposed(leaf):
        return leaf.t.at[cols].get(mode="fill", fill_value=0)
    if row_major:
        return leaf.at[cols].get(mode="fill", fill_value=0)
    return jnp.take(leaf, cols, axis=1, mode="fill", fill_value=0).T


def _set_rows(leaf: Any, cols: Array, rows: Array, row_major: bool) -> Any:
    rows = rows.astype(_dtype(leaf))
    if _is_transposed(leaf):
        return Transposed(leaf.t.at[cols].set(rows, **_SCATTER))
    if row_major:
        return leaf.at[cols].set(rows, **_SCATTER)
    return leaf.at[:, cols].set(rows.T, **_SCATTER)


def _dtype(leaf: Any):
    return leaf.t.dtype if _is_transposed(leaf) else leaf.dtype


def _add_rows_as_columns(p: Array, cols: Array, rows: Array) -> Array:
    """``p.at[:, cols].add(rows.T)`` without materializing the transpose; drops ``cols >= out``."""
    dnums = lax.ScatterDimensionNumbers(
        update_window_dims=(1,), inserted_window_dims=(1,), scatter_dims_to_operand_dims=(1,)
    )
    return lax.scatter_add(
        p,
        cols[:, None],
        rows,
        dnums,
        indices_are_sorted=False,
        unique_indices=True,
        mode=lax.GatherScatterMode.FILL_OR_DROP,
    )


def _after(trees: PyTree) -> Array:
    """An int32 zero that XLA cannot tell from data depending on every gradient.

    XLA decides whether a scatter may update a donated kernel in place before it schedules
    the step, from data dependencies alone. The backward pass also reads a meProp kernel (its
    selected columns, for ``dx``), and nothing makes the kernel's own scatter depend on that
    read, so XLA copies the whole kernel first, which costs more than the rest of the update.
    Bounding the scatter indices by ``width + _after(...)`` (a no-op: the indices are below
    ``width``) makes every scatter depend on every gradient, hence on every read before it.
    NaN-safe: the result is a count of NaNs, never NaN itself.
    """
    firsts = [jnp.ravel(a)[0] for a in jax.tree.leaves(trees) if jnp.size(a)]
    return sum((jnp.isnan(a).astype(jnp.int32) for a in firsts), jnp.zeros([], jnp.int32))


def _raise_bad_taps(names: tuple[str, ...], ok: Array) -> None:
    bad = [name for name, good in zip(names, ok, strict=True) if not good]
    if bad:
        raise ValueError(
            f"compact gradients of {bad} are a sum or mean of compact gradients with different "
            "columns (a sparse_update layer applied twice, tap gradients added up over "
            "microbatches, or lax.pmean/psum over devices that selected their own columns): "
            "their columns are meaningless. Apply each layer once per step, accumulate with "
            "optim.compact(optax.MultiSteps(...)), or shard the batch under jit (one global "
            "selection) instead of averaging per-device gradients"
        )


def _decode(
    taps: PyTree, layout: _Params, grads: PyTree, bad_taps: str, factors: bool = False
) -> dict[str, tuple[Array, Array] | Factors]:
    """``{key: (block [K, in], cols int32 [K])}`` of every tap gradient, checked.

    A tap gradient whose columns cannot be trusted (see :func:`decode_columns`) gets a NaN
    block on its first ``K`` columns, which its kernel takes (``bad_taps="nan"``), or stops the
    program with an error naming its kernel (``"raise"``: a host callback in a conditional,
    which makes every step wait on the host). A :class:`FactoredGrad` is checked likewise
    (one backward pass, columns in range) and given as :class:`Factors` with ``factors``, as
    its block otherwise.
    """
    found = tap_leaves(taps)
    missing = sorted(set(found) - set(layout.keys))
    if missing:
        raise ValueError(f"taps at {missing} match no parameter (pass params and taps trees)")
    if not found:
        return {}
    after = _after((grads, taps))
    names, decoded, oks = tuple(found), {}, []
    for key, tap in found.items():
        out = layout.columns(key)
        if isinstance(tap, FactoredGrad):
            entry, ok = decode_factored(tap, out, after)
            decoded[key] = entry if factors else as_rows(entry, out)
            oks.append(ok)
            continue
        cols, ok = decode_columns(tap, out)
        # Bad columns may all be out of range: NaN goes to the first K (K <= out) instead.
        cols = jnp.where(ok, cols, jnp.arange(cols.shape[0], dtype=cols.dtype))
        # A no-op bound (the indices are below it) that orders the scatters; see _after.
        cols = jnp.minimum(cols, out + cols.shape[0] + after)
        decoded[key] = (jnp.where(ok, tap.block, jnp.asarray(jnp.nan, tap.block.dtype)), cols)
        oks.append(ok)
    if bad_taps == "raise":
        ok = jnp.stack(oks)
        raise_bad = lambda ok: _raise_bad_taps(names, ok)
        lax.cond(jnp.all(ok), lambda ok: None, lambda ok: jax.debug.callback(raise_bad, ok), ok)
    return decoded


BAD_TAPS = ("nan", "raise")


def check_bad_taps(bad_taps: str) -> str:
    if bad_taps not in BAD_TAPS:
        raise ValueError(f"bad_taps must be one of {BAD_TAPS}, got {bad_taps!r}")
    return bad_taps


def _flat_grads(grads: PyTree) -> dict[str, Any]:
    flat = jax.tree_util.tree_flatten_with_path(grads, is_leaf=lambda x: x is None)[0]
    return {_key(p): g for p, g in flat}


def _dense_grad(grads: dict[str, Any], key: str) -> Array:
    g = grads.get(key)
    if g is None:
        raise ValueError(
            f"no gradient for {key}, and no tap gradient either: pass update(grads, state, "
            "params, tap_grads) with the taps' gradients of value_and_compact_grad"
        )
    return g


def _step(
    tx,
    layout: _Params,
    grads: dict[str, Any],
    decoded,
    inner: PyTree,
    params: PyTree,
    rule: _fused.AdamRule | None = None,
    lazy: bool = True,
):
    """One lifted ``tx`` step: ``(new params, new inner state)``.

    ``decoded`` maps the compact kernels' keys to ``(block [K, in], cols [K])``; every other
    parameter takes its dense gradient from ``grads``. A :class:`Transposed` state leaf of a
    kernel without a compact gradient this step is updated whole. With ``rule`` (``tx`` is
    ``sparse_adam``'s ``optax.adam``) the kernels that :func:`meprop_jax._src.fused.fusable`
    accepts are given no rows here and take the fused native pass afterwards. With
    ``lazy=False`` every other compact gradient is scattered into a dense masked gradient and
    ``tx`` updates its kernel whole.
    """
    p_leaves = layout.treedef.flatten_up_to(params)
    fused = {
        key: decoded[key]
        for key, p in zip(layout.keys, p_leaves, strict=True)
        if key in decoded and _fused.fusable(rule, is_row_major(key), p, *_arrays(decoded[key]))
    }
    decoded = {k: v if k in fused else as_rows(v, layout.columns(k)) for k, v in decoded.items()}
    if not lazy:
        grads = dict(grads)
        for key, p in zip(layout.keys, p_leaves, strict=True):
            if key in decoded and key not in fused:
                grads[key] = _masked_dense(p, *decoded[key], is_row_major(key))
        decoded = {k: v for k, v in decoded.items() if k in fused}
    decoded = {k: (_no_rows(v) if k in fused else v) for k, v in decoded.items()}
    new_params, new_inner = _lifted(tx, layout, grads, decoded, inner, p_leaves)
    if not fused:
        return new_params, new_inner
    return _fused_pass(rule, layout, fused, new_params, new_inner, lazy)


def _arrays(entry) -> tuple[Array, ...]:
    """The float arrays of a decoded gradient: its block, or the factors' values and inputs."""
    return (entry.values, entry.inputs) if isinstance(entry, Factors) else (entry[0],)


def _no_rows(entry) -> tuple[Array, Array]:
    """An empty ``(block [0, in], cols [0])`` in the shapes of ``entry``'s gradient."""
    block = entry.inputs if isinstance(entry, Factors) else entry[0]
    return block[:0], jnp.zeros((0,), jnp.int32)


def _masked_dense(p: Array, block: Array, cols: Array, row_major: bool) -> Array:
    """The dense gradient of a kernel shaped like ``p``: ``block`` at ``cols``, zero elsewhere.

    A gather of block rows, which XLA fuses into the optimizer's pass over the kernel (a
    scatter into zeros wrote the whole gradient out first)."""
    out = p.shape[0] if row_major else p.shape[1]
    k = cols.shape[0]
    slot = jnp.full((out,), k, jnp.int32).at[cols].set(jnp.arange(k, dtype=jnp.int32), **_SCATTER)
    rows = jnp.take(block, slot, axis=0, mode="fill", fill_value=0)
    return rows if row_major else rows.T


def _fused_pass(rule, layout: _Params, fused, params: PyTree, inner: PyTree, lazy: bool = True):
    """:func:`meprop_jax._src.fused.update_rows` on each kernel of ``fused``."""
    node = _fused.adam_node(inner)
    p_leaves = layout.treedef.flatten_up_to(params)
    mu_leaves = layout.treedef.flatten_up_to(node.mu)
    nu_leaves = layout.treedef.flatten_up_to(node.nu)
    for i, key in enumerate(layout.keys):
        if key in fused:
            p_leaves[i], mu_leaves[i], nu_leaves[i] = _fused.update_rows(
                rule, node.count, p_leaves[i], mu_leaves[i], nu_leaves[i], fused[key], lazy
            )
    node = node._replace(
        mu=layout.treedef.unflatten(mu_leaves), nu=layout.treedef.unflatten(nu_leaves)
    )
    return layout.treedef.unflatten(p_leaves), _fused.replace_adam_node(inner, node)


def _lifted(tx, layout: _Params, grads: dict[str, Any], decoded, inner: PyTree, p_leaves):
    """``tx`` on the gathered rows (see :func:`_step`)."""
    p_view, g_view = [], []
    for key, p in zip(layout.keys, p_leaves, strict=True):
        if key in decoded:
            block, cols = decoded[key]
            # Unused (and compiled away) unless tx reads params.
            p_view.append(_rows(p, cols, is_row_major(key)))
            g_view.append(block)
        else:
            p_view.append(p)
            g_view.append(_dense_grad(grads, key))
    outer, items, mirrors = _split(inner, layout)

    def view(node):
        leaves = layout.treedef.flatten_up_to(node)
        return layout.treedef.unflatten(
            [
                _rows(a, decoded[key][1], is_row_major(key))
                if key in decoded
                else (a.t.T if _is_transposed(a) else a)
                for key, a in zip(layout.keys, leaves, strict=True)
            ]
        )

    state_view = outer.unflatten([view(i) if m else i for i, m in zip(items, mirrors, strict=True)])
    with jax.numpy_dtype_promotion("standard"):  # optax mixes Python floats and int32 counts
        updates, new_view = tx.update(
            layout.treedef.unflatten(g_view), state_view, layout.treedef.unflatten(p_view)
        )
    new_params = []
    for key, p, u in zip(layout.keys, p_leaves, layout.treedef.flatten_up_to(updates), strict=True):
        if key in decoded and is_row_major(key):  # p + u in p's dtype, row by row
            new_params.append(p.at[decoded[key][1]].add(u.astype(p.dtype), **_SCATTER))
        elif key in decoded:  # p + u in p's dtype, as optax.apply_updates, column by column
            new_params.append(_add_rows_as_columns(p, decoded[key][1], u.astype(p.dtype)))
        else:
            new_params.append(jnp.asarray(p + u).astype(p.dtype))

    def scatter(old, new):
        olds, news = layout.treedef.flatten_up_to(old), layout.treedef.flatten_up_to(new)
        return layout.treedef.unflatten(
            [
                _set_rows(o, decoded[key][1], n, is_row_major(key))
                if key in decoded
                else (Transposed(n.T.astype(o.t.dtype)) if _is_transposed(o) else n)
                for key, o, n in zip(layout.keys, olds, news, strict=True)
            ]
        )

    new_items = outer.flatten_up_to(new_view)
    new_inner = outer.unflatten(
        [scatter(o, n) if m else n for o, n, m in zip(items, new_items, mirrors, strict=True)]
    )
    return layout.treedef.unflatten(new_params), new_inner


def _name(tx: Any) -> str:
    return getattr(tx, "__name__", type(tx).__name__)


def lift(
    tx: optax.GradientTransformation,
    bad_taps: str = "nan",
    rule: _fused.AdamRule | None = None,
    lazy: bool = True,
):
    """``(init, update)`` of ``compact(tx, lazy=lazy)``; see :func:`meprop_jax.optim.compact`.
    ``rule``: ``tx`` is ``optax.adam`` with these hyperparameters (see
    :mod:`meprop_jax._src.fused`)."""

    def init(params: PyTree, taps: PyTree = None) -> SparseState:
        compact_keys = tap_leaves(taps)
        layout = _params(params, compact_keys)
        with jax.numpy_dtype_promotion("standard"):
            state = tx.init(params)
        _check_liftable(_name(tx), state, layout)
        return SparseState(_transpose_tapped(state, layout, compact_keys))

    def update(grads, state: SparseState, params, taps=None):
        _check_state(state)
        layout = _params(params, ())
        decoded = _decode(taps, layout, grads, bad_taps, factors=rule is not None)
        params, inner = _step(
            tx, layout, _flat_grads(grads), decoded, state.inner, params, rule, lazy
        )
        return params, SparseState(inner)

    return init, update


def _check_state(state: Any) -> None:
    if not isinstance(state, SparseState):
        raise TypeError(
            f"state must be the SparseState of this optimizer's init, got {type(state).__name__}"
        )
