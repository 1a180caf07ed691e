"""meProp for stock Flax NNX models: :func:`meprop_jax.nnx.sparsify`.

The NNX counterpart of :func:`meprop_jax.sparsify`. It returns a sparsified copy of the model
(as ``nnx.clone`` copies it) in which the selected ``nnx.Linear``, ``nnx.LinearGeneral``,
``nnx.Conv`` and ``nnx.LSTMCell`` layers are this package's drop-ins
(:class:`meprop_jax.nnx.Linear`, :class:`~meprop_jax.nnx.LinearGeneral`,
:class:`~meprop_jax.nnx.Conv`, :class:`~meprop_jax.nnx.LSTMCell`) with the same
configuration and parameter values. The model it is given is left as it was, so every
``graphdef`` taken from it still describes it: one taken before the call never turns a
sparsified model back into the dense one behind the user's back. An LSTM cell's own gate
layers are part of the cell and never chosen separately.

``nnx.MultiHeadAttention`` is four ``nnx.LinearGeneral`` layers (query, key and value, and
the output projection contracting ``(heads, head_dim)``), so a stock Transformer block is
converted whole; embeddings and LayerNorms stay dense. ``k`` counts entries of a layer's
flattened output features (``heads * head_dim`` for a query projection), or ``k`` per head
with ``per_head=True`` (see :func:`meprop_jax.dense_general`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

from flax import nnx

import meprop_jax.nnx.layers as mnnx
from meprop_jax._src import general as _general
from meprop_jax._src import paths as _paths
from meprop_jax._src.collections import RNG_COLLECTION
from meprop_jax.nnx._settings import set_meprop
from meprop_jax.nnx.conv import Conv as MepropConv
from meprop_jax.nnx.general import LinearGeneral, general_issue

SparsifiedLayer = _paths.SparsifiedLayer

# The layers sparsify converts, stock or already meProp, and the meProp class of each.
_OURS = {
    nnx.Linear: mnnx.Linear,
    nnx.Conv: MepropConv,
    nnx.LSTMCell: mnnx.LSTMCell,
    nnx.LinearGeneral: LinearGeneral,
    mnnx.Linear: mnnx.Linear,
    MepropConv: MepropConv,
    mnnx.LSTMCell: mnnx.LSTMCell,
    LinearGeneral: LinearGeneral,
}


class SparsifiedModel(NamedTuple):
    """The result of :func:`sparsify`.

    Attributes:
      model: the sparsified copy of the model.
      layers: one :class:`~meprop_jax.SparsifiedLayer` per supported layer, with its ``k``.
    """

    model: nnx.Module
    layers: list[SparsifiedLayer]


def _candidates(
    model: nnx.Module, per_head: bool
) -> dict[str, tuple[nnx.Module, type, _paths._Seen]]:
    """Every supported layer of ``model`` by ``"/"``-joined path (cells' gates excluded)."""
    found = {}
    for path, node in nnx.iter_graph(model):
        ours = _OURS.get(type(node))
        if ours is None:
            continue
        name = "/".join(str(p) for p in path)
        kind = type(node).__name__
        if kind == "Linear":
            hooked = node.dot_general is not nnx.Linear.__init__.__kwdefaults__["dot_general"]
            seen = _paths._Seen(name, kind, node.out_features, 1, hooked and "dot_general hook")
        elif kind == "LinearGeneral":
            width, groups = _general.flat_features(node.out_features, per_head)
            seen = _paths._Seen(name, kind, width, groups, general_issue(node))
        elif kind == "Conv":
            groups = node.feature_group_count
            hooked = (
                node.conv_general_dilated
                is not nnx.Conv.__init__.__kwdefaults__["conv_general_dilated"]
                or node.preferred_element_type is not None
            )
            issue = "conv_general_dilated hook or preferred_element_type" if hooked else None
            if node.out_features % groups:
                issue = "features not divisible by feature_group_count"
            seen = _paths._Seen(name, kind, node.out_features // groups, groups, issue)
        else:
            seen = _paths._Seen(name, kind, node.hidden_features, 4, None)
        found[name] = (node, ours, seen._replace(issue=seen.issue or None))
    cells = [n for n, (_, _, s) in found.items() if s.kind == "LSTMCell"]
    return {n: c for n, c in found.items() if not any(n.startswith(cell + "/") for cell in cells)}


def _call_order(model: nnx.Module, candidates, example_args, example_kwargs) -> list[str]:
    """Paths of the candidate layers in the order one abstract call of ``model`` applies them."""
    order: list[str] = []
    originals = {}

    def recording(cls: type, path: str) -> type:
        def __call__(self, *args, **kwargs):
            order.append(path)
            return cls.__call__(self, *args, **kwargs)

        return type(f"Recording{cls.__name__}", (cls,), {"__call__": __call__})

    try:
        for path, (node, _, _) in candidates.items():
            originals[path] = type(node)
            node.__class__ = recording(type(node), path)
        nnx.eval_shape(lambda m: m(*example_args, **example_kwargs), model)
    finally:
        for path, cls in originals.items():
            candidates[path][0].__class__ = cls
    return order


def sparsify(
    model: nnx.Module,
    *,
    k: int | Mapping[str, int],
    mode: str = "unified",
    layers: str | Sequence[str] | Callable[[str], bool] | None = None,
    sparse_bias: bool = False,
    example_args: Sequence[Any] | None = None,
    example_kwargs: Mapping[str, Any] | None = None,
    rngs: nnx.Rngs | None = None,
    rng_collection: str = RNG_COLLECTION,
    sparse_update: bool = False,
    per_head: bool = False,
) -> SparsifiedModel:
    """A copy of an NNX model whose layers are meProp layers; ``model`` is left unchanged.

    In the copy, the selected ``nnx.Linear``, ``nnx.LinearGeneral``, ``nnx.Conv`` and
    ``nnx.LSTMCell`` layers are :class:`Linear`, :class:`LinearGeneral`, :class:`Conv` and
    :class:`LSTMCell` of :mod:`meprop_jax.nnx` with the given ``k``, the same configuration
    and the same parameter values, so the forward pass is the stock one (the same products,
    bit for bit). Layers that already are meProp layers (hand-built, or from an earlier
    ``sparsify``) take the new ``k`` and mode too, ``0`` where the new plan leaves them dense,
    and are reported like the others; other subclasses of the stock layers are left alone.
    Build optimizers and take ``graphdef``s from the copy.

    Args:
      model: the model; it is not modified.
      k: entries kept per layer (int, ``0`` dense) or a mapping from path pattern to ``k``.
      mode: ``"unified"``, ``"per_example"`` or ``"random"``.
      layers: ``None`` (every supported layer but the output layer, the last one the model
        applies: this needs ``example_args``), glob patterns over ``"/"``-joined attribute
        paths (e.g. ``"encoder/*"``), or a predicate on the path.
      sparse_bias: restrict the bias gradients of linear layers and cells to the kept entries.
      example_args: arguments of one call of ``model`` (arrays or shapes' stand-ins), used
        for an abstract call (no computation) that finds the output layer.
      example_kwargs: keyword arguments of that call.
      rngs: needed for ``mode="random"``: every layer keeps a fork of
        ``rngs[rng_collection]`` and draws one key per call from it.
      rng_collection: the stream random mode forks.
      sparse_update: sparsified ``nnx.Linear`` layers keep their kernel gradient compact, as
        ``meprop_jax.nnx.Linear(sparse_update=True)`` does: :class:`meprop_jax.nnx.Optimizer`
        then takes compact, column-sparse steps (convolutions and cells are unaffected). A
        sparsified ``nnx.LinearGeneral`` (multi-axis kernel) is refused by name.
      per_head: an ``nnx.LinearGeneral`` with several output axes (``(heads, head_dim)``)
        keeps ``k`` per head instead of ``k`` over the flattened ``heads * head_dim``.

    Returns:
      A :class:`SparsifiedModel`: the copy, and one :class:`~meprop_jax.SparsifiedLayer` per
      supported layer, in call order (with ``example_args``) or path order.

    Raises:
      TypeError, ValueError: for a bad ``k``, ``mode`` or ``layers``, a pattern that matches
        no layer, a default layer set without ``example_args``, or random mode without
        ``rngs``.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import meprop_jax
      >>> class MLP(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.hidden = nnx.Linear(20, 64, rngs=rngs)
      ...         self.out = nnx.Linear(64, 10, rngs=rngs)
      ...     def __call__(self, x):
      ...         return self.out(nnx.relu(self.hidden(x)))
      >>> model = MLP(nnx.Rngs(0))
      >>> x = jnp.ones((8, 20))
      >>> sparse, layers = meprop_jax.nnx.sparsify(model, k=16, example_args=(x,))
      >>> for row in layers:
      ...     print(row.path, row.k, row.reason)
      hidden 16 sparsified
      out 0 output layer
      >>> isinstance(sparse.hidden, meprop_jax.nnx.Linear)  # the copy
      True
      >>> isinstance(model.hidden, meprop_jax.nnx.Linear)  # the model, unchanged
      False
      >>> bool((sparse(x) == model(x)).all())  # the same forward pass
      True
    """
    opts = _paths._check_options(
        k, mode, layers, sparse_bias, rng_collection, sparse_update, per_head
    )
    if opts.mode == "random" and rngs is None:
        raise ValueError("sparsify: mode='random' needs rngs=nnx.Rngs(meprop=...)")
    model = nnx.clone(model)
    candidates = _candidates(model, opts.per_head)
    if example_args is not None:
        order = _call_order(model, candidates, tuple(example_args), dict(example_kwargs or {}))
        seen = [candidates[p][2] for p in order]
    elif opts.layers is None:
        raise ValueError(
            "sparsify: the default layer set spares the output layer, which only a call shows: "
            "pass example_args=(x, ...) or choose layers= explicitly"
        )
    else:
        seen = [c[2] for c in candidates.values()]
    plan = _paths._plan(opts, seen)
    for row in plan:
        node, ours, _ = candidates[row.path]
        if type(node) is ours:  # a meProp layer takes the new k, 0 included
            _configure_layer(node, ours, row.k, opts, rngs)
        elif row.k:
            node.__class__ = ours  # a layer of the private copy, in no graphdef yet
            if ours is mnnx.Linear:  # a converted layer keeps no error-feedback memory
                node.feedback, node.meprop_memory = 0.0, None
            if ours is mnnx.LSTMCell:  # the stock cell's products, bit for bit
                node.fused_gates = False
            if ours in (mnnx.Linear, mnnx.LSTMCell):  # a stock layer's kernels: [in, out]
                node.kernel_layout = "in_out"
            _configure_layer(node, ours, row.k, opts, rngs)
    return SparsifiedModel(model, plan)


def _configure_layer(node: nnx.Module, ours: type, k: int, opts: _paths._Options, rngs) -> None:
    sparse_bias = opts.sparse_bias and ours is not MepropConv  # conv bias: dense
    set_meprop(node, k, opts.mode, sparse_bias, rngs, opts.rng_collection)
    if ours is mnnx.Linear:
        node.sparse_update = opts.sparse_update
    if ours is LinearGeneral:
        node.per_head = opts.per_head
