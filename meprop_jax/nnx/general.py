"""A Flax NNX ``LinearGeneral`` with a meProp backward pass.

:class:`LinearGeneral` is a drop-in for ``flax.nnx.LinearGeneral``, the layer of
``nnx.MultiHeadAttention``'s query, key and value projections (``out_features = (heads,
head_dim)``) and of its output projection (``in_features = (heads, head_dim)``, ``axis =
(-2, -1)``). :func:`meprop_jax.nnx.sparsify` converts those layers to it. What ``k`` means
for several contracted or feature axes is documented in :func:`meprop_jax.dense_general`:
``k`` entries of the flattened ``prod(out_features)`` output gradient, or ``k`` per head
with ``per_head=True``.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from meprop_jax._src import general as _general
from meprop_jax._src import selection as _selection
from meprop_jax._src.collections import RNG_COLLECTION
from meprop_jax.nnx._settings import RngArg, set_meprop, step_key

Array = jax.Array


def general_issue(layer: nnx.LinearGeneral) -> str | None:
    """Why a ``LinearGeneral`` cannot take a meProp backward pass, or None if it can."""
    if layer.batch_axis:
        return "batch_axis"
    if layer.dot_general is not None or layer.dot_general_cls is not None:
        return "dot_general hook"
    if layer.preferred_element_type is not None:
        return "preferred_element_type"
    return None


class LinearGeneral(nnx.LinearGeneral):
    """``flax.nnx.LinearGeneral`` whose backward pass keeps only ``k`` output-gradient entries.

    The same constructor arguments, defaults, parameters (``kernel [*in_features,
    *out_features]``, ``bias [*out_features]``) and, for the same ``rngs``, the same initial
    values, plus ``k``, ``mode``, ``sparse_bias``, ``per_head`` and ``rng_collection``. The
    forward pass is the stock one bit for bit; in the backward pass ``k`` entries of the
    flattened ``prod(out_features)`` output gradient are kept (per batch or per row, as for
    :class:`meprop_jax.nnx.Linear`), or ``k`` per head with ``per_head`` (``out_features =
    (heads, head_dim)``: ``k`` of ``head_dim`` in each head). With ``k = 0`` or ``k`` at least
    the width the layer runs exactly as ``flax.nnx.LinearGeneral``.

    Args:
      in_features, out_features: as in ``flax.nnx.LinearGeneral``.
      k: entries kept; ``0`` (the default) is ordinary backprop.
      mode: ``"unified"``, ``"per_example"`` or ``"random"``.
      sparse_bias: restrict the bias gradient to the kept entries too (default: dense).
      per_head: ``k`` per index of the leading output axes instead of over all of them.
      rngs: initializes the parameters; with ``mode="random"`` a fork of
        ``rngs[rng_collection]`` is also kept as ``self.meprop_rngs``.
      rng_collection: the stream random mode forks (default ``"meprop"``).
      **kwargs: every other argument of ``flax.nnx.LinearGeneral``; ``batch_axis``, a
        ``dot_general`` hook and ``preferred_element_type`` are refused when ``k`` drops
        entries.

    Raises:
      TypeError, ValueError: for an invalid ``k`` or ``mode``, or a refused argument.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> layer = LinearGeneral((2, 4), 6, axis=(-2, -1), k=2, rngs=nnx.Rngs(0))
      >>> layer.kernel.shape  # [heads, head_dim, out]
      (2, 4, 6)
      >>> layer(jnp.ones((3, 5, 2, 4))).shape  # [batch, length, heads, head_dim] -> [..., out]
      (3, 5, 6)
    """

    def __init__(
        self,
        in_features: int | tuple[int, ...],
        out_features: int | tuple[int, ...],
        *,
        k: int = 0,
        mode: str = "unified",
        sparse_bias: bool = False,
        per_head: bool = False,
        rngs: nnx.Rngs,
        rng_collection: str = RNG_COLLECTION,
        **kwargs: Any,
    ):
        k = _selection.check_k(k)
        mode = _selection.check_mode(mode)
        super().__init__(in_features, out_features, rngs=rngs, **kwargs)
        issue = general_issue(self)
        if issue and not self._is_dense(k, per_head):
            raise ValueError(f"meprop_jax.nnx.LinearGeneral with k > 0 does not take {issue}")
        set_meprop(self, k, mode, sparse_bias, rngs, rng_collection)
        self.per_head = bool(per_head)

    def _is_dense(self, k: int, per_head: bool) -> bool:
        width, groups = _general.flat_features(self.out_features, per_head)
        return _selection.is_dense(k, width * groups, groups)

    def __call__(self, inputs: Array, out_sharding=None, *, rngs: RngArg = None) -> Array:
        """Applies the layer.

        Args:
          inputs: ``[...]`` whose axes ``axis`` are ``in_features``.
          out_sharding: as in ``flax.nnx.LinearGeneral``; with sparsified backprop the result
            is resharded to it after the product.
          rngs: overrides ``self.meprop_rngs`` for ``mode="random"``.

        Returns:
          ``[*other axes, *out_features]``.
        """
        if self._is_dense(self.k, self.per_head):
            return super().__call__(inputs, out_sharding)
        axis = _general.normalize_axes(self.axis, inputs.ndim)
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        key = step_key(self, rngs)
        y = _general.dense_general(
            inputs,
            kernel,
            bias,
            axis=axis,
            k=self.k,
            mode=self.mode,
            key=key,
            groups=_general.flat_features(self.out_features, self.per_head)[1],
            sparse_bias=self.sparse_bias,
            precision=self.precision,
        )
        if out_sharding is not None:
            y = jax.sharding.reshard(y, out_sharding)
        return y


__all__ = ["LinearGeneral", "general_issue"]
