"""The NNX convolution with a meProp backward pass: a drop-in for ``flax.nnx.Conv`` (the RNG
convention of ``mode="random"`` is that of :mod:`meprop_jax.nnx.layers`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from meprop_jax._src import conv as _conv
from meprop_jax._src import selection as _selection
from meprop_jax._src.collections import RNG_COLLECTION
from meprop_jax.nnx._settings import RngArg, set_meprop, step_key

Array = jax.Array


class Conv(nnx.Conv):
    """A convolution whose backward pass keeps only ``k`` output channels.

    A drop-in for ``flax.nnx.Conv``: the same arguments, parameters (``kernel [*kernel_size,
    in / feature_group_count, out]``, ``bias [out]``) and, for the same ``rngs``, the same
    initial values. In the backward pass only ``k`` output channels (``k`` per group with
    ``feature_group_count > 1``) of ``dL/dy`` are kept and the input and kernel gradients are
    convolutions over those channels alone (see :func:`meprop_jax.conv`); the bias gradient
    is dense. With ``k = 0`` or ``k * feature_group_count >= out_features`` the layer runs
    exactly as ``flax.nnx.Conv``.

    Args:
      in_features, out_features, kernel_size, strides: as in ``flax.nnx.Conv``.
      k: output channels to keep (per group); ``0`` (the default) is ordinary backprop.
      mode: ``"unified"``, ``"per_example"`` or ``"random"``.
      rngs: initializes the parameters; with ``mode="random"`` a fork of
        ``rngs[rng_collection]`` is also kept as ``self.meprop_rngs``.
      rng_collection: the stream random mode forks (default ``"meprop"``).
      **kwargs: every other argument of ``flax.nnx.Conv`` (``padding``, ``feature_group_count``,
        ``mask``, ...); a custom ``conv_general_dilated`` or a ``preferred_element_type`` is
        refused when ``k`` drops channels.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> layer = Conv(3, 8, (3, 3), k=2, rngs=nnx.Rngs(0))
      >>> layer.kernel.shape
      (3, 3, 3, 8)
      >>> layer(jnp.ones((2, 6, 6, 3))).shape  # NHWC
      (2, 6, 6, 8)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | tuple[int, ...],
        strides: int | tuple[int, ...] | None = 1,
        *,
        k: int = 0,
        mode: str = "unified",
        rngs: nnx.Rngs,
        rng_collection: str = RNG_COLLECTION,
        **kwargs: Any,
    ):
        k = _selection.check_k(k)
        mode = _selection.check_mode(mode)
        groups = kwargs.get("feature_group_count", 1)
        hooked = kwargs.get("conv_general_dilated", lax.conv_general_dilated)
        custom = hooked is not lax.conv_general_dilated or kwargs.get("preferred_element_type")
        if custom and not _selection.is_dense(k, out_features, groups):
            raise ValueError(
                "meprop_jax.nnx.Conv with k > 0 takes no conv_general_dilated hook and no "
                "preferred_element_type"
            )
        super().__init__(in_features, out_features, kernel_size, strides, rngs=rngs, **kwargs)
        set_meprop(self, k, mode, False, rngs, rng_collection)

    def __call__(self, inputs: Array, out_sharding=None, *, rngs: RngArg = None) -> Array:
        """Applies the layer to ``inputs``, ``[*batch, *spatial, in]``, as ``nnx.Conv`` does.

        ``rngs`` overrides ``self.meprop_rngs`` for ``mode="random"``.
        """
        groups = self.feature_group_count
        if self.out_features % groups or _selection.is_dense(self.k, self.out_features, groups):
            return super().__call__(inputs, out_sharding)
        inputs, batch_shape, conv_kwargs = _conv.layer_geometry(self, inputs)
        if self.mask is not None and self.mask.shape != self.kernel_shape:
            raise ValueError(
                "Mask needs to have the same shape as weights. "
                f"Shapes are: {self.mask.shape}, {self.kernel_shape}"
            )
        kernel = self.kernel[...]
        if self.mask is not None:
            kernel *= self.mask
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        key = step_key(self, rngs)
        y = _conv.conv(inputs, kernel, bias, k=self.k, mode=self.mode, key=key, **conv_kwargs)
        if out_sharding is not None:
            y = jax.sharding.reshard(y, out_sharding)
        return y if batch_shape is None else jnp.reshape(y, (*batch_shape, *y.shape[1:]))
