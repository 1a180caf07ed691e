"""Small helpers over nested parameter dicts, for meSimp's shrinking (:mod:`meprop_jax.mesimp`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any


def _path(layer: str | Sequence[str]) -> tuple[str, ...]:
    return tuple(layer.split("/")) if isinstance(layer, str) else tuple(layer)


def _get(tree: PyTree, path: tuple[str, ...], what: str) -> Any:
    node = tree
    for depth, name in enumerate(path):
        if not isinstance(node, Mapping) or name not in node:
            raise ValueError(f"{what} has no {'/'.join(path[: depth + 1])!r}")
        node = node[name]
    return node


def _replace(tree: PyTree, path: tuple[str, ...], value: Any) -> PyTree:
    """A copy of the nested dict ``tree`` with ``value`` at ``path``."""
    if not path:
        return value
    head, *rest = path
    return {**tree, head: _replace(tree[head], tuple(rest), value)}


def _take(a: Array, idx: np.ndarray | None, axis: int) -> Array:
    # Indices >= the axis' size are padding: they gather zeros.
    if idx is None:
        return a
    return jnp.take(a, jnp.asarray(idx, jnp.int32), axis=axis, mode="fill", fill_value=0)


def _gather_dense(node: Mapping, rows: np.ndarray | None, cols: np.ndarray | None, name: str):
    """A Dense layer's ``kernel [in, out]`` and ``bias [out]`` gathered to ``rows``/``cols``."""
    unknown = set(node) - {"kernel", "bias"}
    if unknown:
        raise ValueError(f"layer {name!r} must hold only kernel and bias, also has {unknown}")
    out = dict(node)
    out["kernel"] = _take(_take(node["kernel"], rows, 0), cols, 1)
    if "bias" in node:
        out["bias"] = _take(node["bias"], cols, 0)
    return out


def _mirror_map(fn, params: PyTree, state: PyTree) -> PyTree:
    """``state`` with ``fn(subtree)`` in place of every subtree shaped like ``params``."""
    treedef = jax.tree.structure(params)
    shapes = [jnp.shape(p) for p in jax.tree.leaves(params)]

    def mirrors(node) -> bool:
        return (
            jax.tree.structure(node) == treedef
            and [jnp.shape(x) for x in jax.tree.leaves(node)] == shapes
        )

    return jax.tree.map(lambda n: fn(n) if mirrors(n) else n, state, is_leaf=mirrors)
