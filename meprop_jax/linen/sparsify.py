"""meProp for stock Flax Linen models, without rewriting them.

:func:`sparsify` wraps a model's ``apply`` function. The wrapped function takes the same
arguments and the same variables (a stock checkpoint works unchanged) and computes the same
forward pass, bit for bit; in the backward pass the selected layers keep only the top-k
entries of their output gradient, as :class:`meprop_jax.Dense`, :class:`meprop_jax.LSTMCell`
and :class:`meprop_jax.Conv` do:

* ``nn.Dense``: ``k`` output columns, see :func:`meprop_jax.linear`.
* ``nn.DenseGeneral`` with any contracted ``axis`` and any ``features`` (no ``batch_dims``):
  the query, key and value projections of ``nn.MultiHeadDotProductAttention``
  (``features = (heads, head_dim)``) and its output projection (contracting ``(heads,
  head_dim)``). ``k`` counts entries of the flattened ``prod(features)`` output gradient, as
  for ``nn.Dense``; ``per_head=True`` keeps ``k`` per head instead (``k`` of ``head_dim`` in
  each). See :func:`meprop_jax.dense_general`.
* ``nn.LSTMCell`` and ``nn.OptimizedLSTMCell``: ``k`` entries per gate of the gate
  pre-activation gradient, at every step.
* ``nn.Conv``: ``k`` output channels (``k`` per group with ``feature_group_count > 1``), see
  :func:`meprop_jax.conv`.

Layers are found with Flax's own method interception (``flax.linen.intercept_methods``): the
interceptor runs the layer's call on the layer's own variables through the meProp ops.
Subclasses that override ``__call__`` (including this package's layers) are left alone.

By default every such layer is sparsified except the model's output layer, the last of them
applied (found by an abstract trace of the call), as in the paper; a layer whose output width
is at most ``k`` stays dense. ``layers=`` selects layers by module path (``"/"``-joined
names, e.g. ``"Encoder_0/Dense_1"``) with glob patterns (``*`` also crosses ``/``) or a
predicate; ``k=`` may map path patterns to ``k`` (the first matching pattern wins; a layer
matching none stays dense). :func:`sparsify_report` lists every candidate layer and its ``k``.

Example: a stock MLP, meProp in one line (the default spares the output layer).

  >>> import jax, jax.numpy as jnp
  >>> from flax import linen as nn
  >>> import meprop_jax
  >>> model = nn.Sequential([nn.Dense(64), nn.relu, nn.Dense(64), nn.relu, nn.Dense(10)])
  >>> x = jnp.ones((8, 20))
  >>> params = model.init(jax.random.key(0), x)
  >>> apply = meprop_jax.sparsify(model.apply, k=16)
  >>> bool(jnp.all(apply(params, x) == model.apply(params, x)))  # forward unchanged
  True
  >>> grads = jax.grad(lambda p: apply(p, x).sum())(params)  # meProp backward
  >>> for layer in meprop_jax.sparsify_report(apply, params, x):
  ...     print(layer.path, layer.kind, layer.features, layer.k)
  layers_0 Dense 64 16
  layers_2 Dense 64 16
  layers_4 Dense 10 0
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.core import meta
from flax.linen.dtypes import promote_dtype

from meprop_jax._src import general as _general
from meprop_jax._src import linear as _linear
from meprop_jax._src import recurrent as _recurrent
from meprop_jax._src.collections import RNG_COLLECTION
from meprop_jax._src.paths import (
    SparsifiedLayer,
    _check_options,
    _Options,
    _plan,
    _Seen,
)
from meprop_jax.linen.conv import linen_conv_call
from meprop_jax.linen.layers import compact_tap_state

Array = jax.Array

__all__ = ["RNG_COLLECTION", "SparsifiedLayer", "sparsify", "sparsify_report"]

# --------------------------------------------------------------------------- layer kinds


def _kind(module: nn.Module) -> str | None:
    """The name of a supported stock layer class, None for anything else.

    Matching the stock ``__call__`` itself (not ``isinstance``) leaves alone every subclass
    that computes something else, this package's own layers included.
    """
    call = type(module).__call__
    for cls in (nn.Dense, nn.DenseGeneral, nn.Conv, nn.LSTMCell, nn.OptimizedLSTMCell):
        if isinstance(module, cls) and call is cls.__call__:
            return cls.__name__
    return None


def _width_and_issue(module: nn.Module, kind: str, per_head: bool) -> tuple[int, int, str | None]:
    """``(features, groups, issue)`` of a Dense, DenseGeneral or Conv layer.

    ``features`` is the width each of the ``groups`` selections ranks (a DenseGeneral's
    flattened features, or one head's with ``per_head``); ``issue`` says why the layer cannot
    be sparsified (None if it can).
    """
    if kind == "Conv":
        groups = module.feature_group_count
        if module.conv_general_dilated is not None or module.conv_general_dilated_cls is not None:
            return module.features, 1, "conv_general_dilated hook"
        if module.features % groups:
            return module.features, 1, "features not divisible by feature_group_count"
        return module.features // groups, groups, None
    hooked = module.dot_general is not None or module.dot_general_cls is not None
    issue = "dot_general hook" if hooked else None
    if kind == "Dense":
        return module.features, 1, issue
    if tuple(_general.as_tuple(module.batch_dims)):
        issue = "batch_dims"
    width, groups = _general.flat_features(_general.as_tuple(module.features), per_head)
    return width, groups, issue


# --------------------------------------------------------------------------- planning


def _path(module: nn.Module) -> str:
    return "/".join(str(p) for p in module.path)


def _record_layers(apply_fn: Callable, per_head: bool, args, kwargs) -> list[_Seen]:
    """Every supported layer call of ``apply_fn(*args, **kwargs)``, by an abstract trace."""
    seen: list[_Seen] = []
    inside_cell = []  # an LSTM cell's own Dense layers are part of the cell

    def recorder(next_fun, call_args, call_kwargs, context):
        module = context.module
        kind = _kind(module) if context.method_name == "__call__" else None
        if kind is None or inside_cell:
            return next_fun(*call_args, **call_kwargs)
        is_cell = kind.endswith("LSTMCell")
        if is_cell:  # k per gate; the hidden width is the carry's last axis
            features, groups, issue = jnp.shape(call_args[0][1])[-1], 4, None
        else:
            features, groups, issue = _width_and_issue(module, kind, per_head)
        seen.append(_Seen(_path(module), kind, features, groups, issue))
        if not is_cell:
            return next_fun(*call_args, **call_kwargs)
        inside_cell.append(True)
        try:
            return next_fun(*call_args, **call_kwargs)
        finally:
            inside_cell.pop()

    with nn.intercept_methods(recorder):
        jax.eval_shape(lambda: apply_fn(*args, **kwargs))
    return seen


def _cache_key(args, kwargs):
    """Shapes, dtypes and static values of the call: the plan depends on nothing else."""

    def leaf(x):
        if hasattr(x, "shape") and hasattr(x, "dtype"):
            return ("array", tuple(x.shape), str(x.dtype))
        hash(x)
        return ("value", type(x).__name__, x)

    leaves, treedef = jax.tree.flatten((args, kwargs))
    try:
        return treedef, tuple(leaf(x) for x in leaves)
    except TypeError:
        return None


# --------------------------------------------------------------------------- the ops


def _key(module: nn.Module, opts: _Options) -> Array | None:
    return module.make_rng(opts.rng_collection) if opts.mode == "random" else None


def _shaped_init(rng, shape, dtype=jnp.float32):
    # Never called for values (the variables exist at apply time); flax checks its shape.
    del rng
    return jnp.zeros(shape, dtype)


def _param(module: nn.Module, name: str, shape, init=_shaped_init) -> Array:
    return module.param(name, init, shape, module.param_dtype)


def _dense(module: nn.Dense, opts: _Options, k: int, inputs: Array) -> Array:
    kernel = _param(module, "kernel", (jnp.shape(inputs)[-1], module.features))
    bias = _param(module, "bias", (module.features,)) if module.use_bias else None
    inputs, kernel, bias = module.promote_dtype(inputs, kernel, bias, dtype=module.dtype)
    tap = compact_tap_state(module, inputs, kernel, k, opts.mode) if opts.sparse_update else None
    return _linear.linear(
        inputs,
        kernel,
        bias,
        k=k,
        mode=opts.mode,
        key=_key(module, opts),
        sparse_bias=opts.sparse_bias,
        precision=module.precision,
        tap=tap,
    )


def _dense_general(module: nn.DenseGeneral, opts: _Options, k: int, inputs: Array) -> Array:
    features = _general.as_tuple(module.features)
    axis = _general.normalize_axes(module.axis, jnp.ndim(inputs))
    in_shape = tuple(jnp.shape(inputs)[a] for a in axis)
    kernel = _param(module, "kernel", (*in_shape, *features))
    bias = _param(module, "bias", features) if module.use_bias else None
    inputs, kernel, bias = module.promote_dtype(inputs, kernel, bias, dtype=module.dtype)
    return _general.dense_general(
        inputs,
        kernel,
        bias,
        axis=axis,
        k=k,
        mode=opts.mode,
        key=_key(module, opts),
        groups=_general.flat_features(features, opts.per_head)[1],
        sparse_bias=opts.sparse_bias,
        precision=module.precision,
    )


def _cell_params(module: nn.Module, prefix: str) -> list[tuple[Array, Array | None]]:
    params = meta.unbox(module.variables["params"])
    out = []
    for gate in "ifgo":
        p = params[f"{prefix}{gate}"]
        out.append((p["kernel"], p.get("bias")))
    return out


def _lstm(module: nn.Module, opts: _Options, k: int, carry, inputs: Array):
    input_gates = [w for w, _ in _cell_params(module, "i")]
    recurrent_gates = _cell_params(module, "h")
    return _recurrent.lstm_step(
        carry,
        inputs,
        input_gates,
        [w for w, _ in recurrent_gates],
        [b for _, b in recurrent_gates],
        promote=lambda arrays: promote_dtype(*arrays, dtype=module.dtype),
        gate_fn=module.gate_fn,
        activation_fn=module.activation_fn,
        fused=isinstance(module, nn.OptimizedLSTMCell),
        k=k,
        mode=opts.mode,
        key=_key(module, opts),
        sparse_bias=opts.sparse_bias,
    )


def _conv_layer(module: nn.Conv, opts: _Options, k: int, inputs: Array) -> Array:
    return linen_conv_call(module, inputs, k=k, mode=opts.mode, key=_key(module, opts))


_SPARSE_CALLS = {
    "Dense": _dense,
    "DenseGeneral": _dense_general,
    "Conv": _conv_layer,
    "LSTMCell": _lstm,
    "OptimizedLSTMCell": _lstm,
}


# --------------------------------------------------------------------------- public API


def sparsify(
    apply_fn: Callable[..., Any],
    *,
    k: int | Mapping[str, int],
    mode: str = "unified",
    layers: str | Sequence[str] | Callable[[str], bool] | None = None,
    sparse_bias: bool = False,
    rng_collection: str = RNG_COLLECTION,
    sparse_update: bool = False,
    per_head: bool = False,
) -> Callable[..., Any]:
    """A meProp version of a Linen ``apply`` function (see the module docstring).

    Args:
      apply_fn: ``model.apply`` (or any function that applies Linen modules).
      k: entries kept per layer, a static int (``0``: dense), or a mapping from path pattern
        to ``k``; the first pattern that matches a layer gives its ``k``.
      mode: ``"unified"``, ``"per_example"`` or ``"random"`` (see :func:`meprop_jax.linear`);
        random mode draws one key per layer call from the ``rng_collection`` stream, so pass
        ``rngs={"meprop": key}`` to the call.
      layers: which layers to sparsify: ``None`` (every supported layer but the output
        layer), a glob pattern or sequence of patterns over module paths, or a predicate
        ``path -> bool``.
      sparse_bias: restrict bias gradients to the kept entries too (Dense, DenseGeneral and
        LSTM cells; convolutions keep a dense bias gradient).
      rng_collection: the RNG stream random mode draws from.
      sparse_update: sparsified ``nn.Dense`` layers keep their kernel gradient compact, as
        ``meprop_jax.Dense(sparse_update=True)`` does (see :mod:`meprop_jax.optim`). Their
        zero taps come from one call with ``mutable=["meprop_taps"]`` (the second result
        holds them, ``apply(variables, x, mutable=["meprop_taps"])[1]``), made with the
        training batch shape; :class:`meprop_jax.TrainState` then takes compact steps.
        Compact gradients need an ``[in, out]`` kernel: a sparsified ``nn.DenseGeneral``
        is refused (select the ``Dense`` layers only with ``layers=``).
      per_head: a ``nn.DenseGeneral`` with several feature axes (the attention projections'
        ``[heads, head_dim]``) keeps ``k`` entries per head instead of ``k`` over the
        flattened ``heads * head_dim`` (see :func:`meprop_jax.dense_general`).

    Returns:
      A function with ``apply_fn``'s signature and results. Its first call with a new
      argument shape runs one extra abstract trace to find the layers (no computation).

    Raises:
      TypeError, ValueError: for a bad ``k``, ``mode`` or ``layers``; at the first call, for
        a pattern that matches no layer.
    """
    opts = _check_options(k, mode, layers, sparse_bias, rng_collection, sparse_update, per_head)
    plans: dict[Any, list[SparsifiedLayer]] = {}

    def plan_for(args, kwargs) -> list[SparsifiedLayer]:
        key = _cache_key(args, kwargs)
        if key is not None and key in plans:
            return plans[key]
        plan = _plan(opts, _record_layers(apply_fn, opts.per_head, args, kwargs))
        if key is not None:
            plans[key] = plan
        return plan

    @functools.wraps(apply_fn)
    def sparse_apply(*args, **kwargs):
        k_of = {layer.path: layer.k for layer in plan_for(args, kwargs) if layer.k}

        def interceptor(next_fun, call_args, call_kwargs, context):
            module = context.module
            if context.method_name != "__call__" or module.is_initializing():
                return next_fun(*call_args, **call_kwargs)
            kind = _kind(module)
            k = k_of.get(_path(module)) if kind else None
            if not k:
                return next_fun(*call_args, **call_kwargs)
            return _SPARSE_CALLS[kind](module, opts, k, *call_args, **call_kwargs)

        with nn.intercept_methods(interceptor):
            return apply_fn(*args, **kwargs)

    sparse_apply.meprop_plan = plan_for  # for sparsify_report
    return sparse_apply


def sparsify_report(sparse_apply: Callable[..., Any], *args, **kwargs) -> list[SparsifiedLayer]:
    """The candidate layers of a sparsified call and the ``k`` each one uses.

    Args:
      sparse_apply: a function returned by :func:`sparsify`.
      *args: the call's arguments (variables first), as for ``sparse_apply``.
      **kwargs: its keyword arguments.

    Returns:
      One :class:`SparsifiedLayer` per supported layer, in order of first use.
    """
    plan_for = getattr(sparse_apply, "meprop_plan", None)
    if plan_for is None:
        raise TypeError("sparsify_report needs a function returned by meprop_jax.sparsify")
    return list(plan_for(args, kwargs))
