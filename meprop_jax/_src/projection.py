"""meProp's backward pass around a layer's own forward expression.

:func:`meprop_jax.multi_linear` computes ``sum_j xs[j] @ kernels[j] + bias`` as one product
per input. A stock layer may write the same sum another way: ``flax.linen.LSTMCell`` and
``flax.nnx.LSTMCell`` run one product per gate, ``nn.DenseGeneral`` keeps several feature
axes. Rounding depends on how the products are split, so a meProp layer that must compute
the stock forward pass bit for bit keeps the stock expression (:func:`project`'s
``forward``) and takes the backward pass of ``multi_linear`` on the concatenation of its
kernel blocks.

With ``kernel_layout="out_in"`` every block is stored transposed, ``[features, in_j]``, and
the blocks join along their first axis into ``multi_linear``'s ``[out, in_j]`` kernel.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from meprop_jax._src import rowwise
from meprop_jax._src.linear import multi_linear

Array = jax.Array

#: ``forward(xs, kernels, biases) -> y``: ``xs`` the inputs, ``kernels[j]`` input ``j``'s
#: blocks, ``biases`` one bias per block (or empty); ``y`` is ``[..., *features]``.
Forward = Callable[[tuple[Array, ...], tuple[tuple[Array, ...], ...], tuple[Array, ...]], Array]


@dataclasses.dataclass(frozen=True)
class _Spec:
    forward: Forward
    feature_ndim: int
    options: tuple[tuple[str, Any], ...]  # static keyword arguments of multi_linear


def _joined(kernels, biases, transposed: bool) -> tuple[tuple[Array, ...], Array | None]:
    """Each input's ``[in_j, *features]`` blocks as one ``[in_j, out]`` kernel; one bias.

    ``transposed`` blocks are ``[features, in_j]`` and join into one ``[out, in_j]`` kernel.
    """
    if transposed:
        joined = tuple(jnp.concatenate(blocks, axis=0) for blocks in kernels)
    else:
        flat = lambda w: w.reshape((w.shape[0], -1))
        joined = tuple(jnp.concatenate([flat(w) for w in blocks], axis=1) for blocks in kernels)
    bias = jnp.concatenate([b.reshape(-1) for b in biases]) if biases else None
    return joined, bias


def _dense_form(spec: _Spec, key, xs, kernels, biases, extras) -> Array:
    """``multi_linear`` on the joined blocks: the function whose backward pass is taken."""
    options = dict(spec.options)
    joined, bias = _joined(kernels, biases, options["kernel_layout"] == "out_in")
    return multi_linear(xs, joined, bias, key=key, **options, **extras)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _project(spec: _Spec, xs, kernels, biases, key, extras):
    return spec.forward(xs, kernels, biases)


def _project_fwd(spec: _Spec, xs, kernels, biases, key, extras):
    return spec.forward(xs, kernels, biases), (xs, kernels, biases, key, extras)


def _project_bwd(spec: _Spec, residuals, g: Array):
    xs, kernels, biases, key, extras = residuals
    g = g.reshape((*g.shape[: g.ndim - spec.feature_ndim], -1))
    # Under jit the product of this forward pass is unused and dropped; only its VJP runs.
    dense_form = functools.partial(_dense_form, spec, key)
    _, vjp = jax.vjp(dense_form, xs, kernels, biases, extras)
    dxs, d_kernels, d_biases, d_extras = vjp(g)
    return dxs, d_kernels, d_biases, None, d_extras


_project.defvjp(_project_fwd, _project_bwd)


def project(
    forward: Forward,
    xs: Sequence[Array],
    kernels: Sequence[Sequence[Array]],
    biases: Sequence[Array] = (),
    *,
    k: int,
    mode: str = "unified",
    key: Array | None = None,
    groups: int = 1,
    feature_ndim: int = 1,
    record: Any = None,
    memory: Array | None = None,
    adaptive_tap: Any = None,
    kernel_layout: str = "in_out",
    **options: Any,
) -> Array:
    """``forward(xs, kernels, biases)``, with the backward pass of :func:`multi_linear`.

    ``forward`` must compute ``sum_j xs[j] @ K_j + b``, where ``K_j`` is the concatenation of
    ``kernels[j]``'s blocks along their (flattened) feature axes and ``b`` that of
    ``biases``; the backward pass is ``multi_linear``'s on ``K_j`` and ``b``, with the blocks
    as ``groups`` when there are several.

    Args:
      forward: the layer's own forward expression (see :data:`Forward`).
      xs: inputs, each ``[..., in_j]``.
      kernels: per input, its blocks, each ``[in_j, *features]``.
      biases: one ``[*features]`` bias per block, or none.
      k, mode, key, groups: as in :func:`multi_linear`.
      feature_ndim: the number of feature axes of the blocks and of ``forward``'s result.
      record, memory, adaptive_tap: as in :func:`multi_linear`; their gradients are its.
      kernel_layout: ``"in_out"`` (blocks ``[in_j, *features]``) or ``"out_in"`` (blocks
        stored transposed, ``[features, in_j]``; one feature axis only), as in
        :func:`multi_linear`.
      **options: the other static keyword arguments of :func:`multi_linear` (``sparse_bias``,
        ``precision``, ``decay``, ``adaptive``, ``feedback_steps``).

    Returns:
      ``forward(xs, kernels, biases)``.
    """
    xs = tuple(xs)
    kernels = tuple(tuple(blocks) for blocks in kernels)
    biases = tuple(biases)
    kernel_layout = rowwise.check_kernel_layout(kernel_layout)
    if kernel_layout == "out_in" and feature_ndim != 1:
        raise ValueError(
            f"kernel_layout='out_in' needs feature_ndim=1 (blocks [features, in]), got "
            f"feature_ndim={feature_ndim}"
        )
    options = {"k": k, "mode": mode, "groups": groups, "kernel_layout": kernel_layout, **options}
    spec = _Spec(forward, feature_ndim, tuple(sorted(options.items())))
    extras = {"record": record, "memory": memory, "adaptive_tap": adaptive_tap}
    # multi_linear's checks now, on shapes, rather than in the backward pass.
    jax.eval_shape(functools.partial(_dense_form, spec, key), xs, kernels, biases, extras)
    key = key if mode == "random" else None
    return _project(spec, xs, kernels, biases, key, extras)
