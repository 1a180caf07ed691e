"""The Linen convolution with a meProp backward pass: :class:`Conv`, and the stock call.

:func:`linen_conv_call` is ``flax.linen.Conv.__call__`` with :func:`meprop_jax.conv` as its
convolution; :class:`Conv` and :func:`meprop_jax.sparsify` both run it.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from meprop_jax._src import selection as _selection
from meprop_jax._src.collections import RNG_COLLECTION
from meprop_jax._src.conv import conv, layer_geometry

Array = jax.Array


def linen_conv_call(module: Any, inputs: Array, *, k: int, mode: str, key: Array | None):
    """``flax.linen.Conv.__call__`` of ``module`` with :func:`conv` as its convolution.

    The same steps as the stock layer (batch-axis flattening, padding modes, the mask, dtype
    promotion, the bias), so the parameters and the forward pass are the stock ones. Shared
    weights only (not ``ConvLocal``).
    """
    inputs, batch_shape, kwargs = layer_geometry(module, inputs)
    kernel_size = module.kernel_size
    kernel_size = (kernel_size,) if isinstance(kernel_size, int) else tuple(kernel_size)
    groups = module.feature_group_count
    kernel_shape = (*kernel_size, jnp.shape(inputs)[-1] // groups, module.features)
    if module.mask is not None and module.mask.shape != kernel_shape:
        raise ValueError(
            "Mask needs to have the same shape as weights. "
            f"Shapes are: {module.mask.shape}, {kernel_shape}"
        )
    kernel = module.param("kernel", module.kernel_init, kernel_shape, module.param_dtype)
    if module.mask is not None:
        kernel *= module.mask
    bias = (
        module.param("bias", module.bias_init, (module.features,), module.param_dtype)
        if module.use_bias
        else None
    )
    inputs, kernel, bias = module.promote_dtype(inputs, kernel, bias, dtype=module.dtype)
    y = conv(inputs, kernel, bias, k=k, mode=mode, key=key, **kwargs)
    return y if batch_shape is None else jnp.reshape(y, (*batch_shape, *y.shape[1:]))


class Conv(nn.Conv):
    """A convolution whose backward pass keeps only ``k`` output channels.

    A drop-in for ``flax.linen.Conv``: the same fields and defaults, the same parameters
    (``kernel [*kernel_size, in / feature_group_count, features]``, ``bias [features]``) and,
    for the same key, the same initial values, plus the meProp fields ``k``, ``mode`` and
    ``rng_collection``. The forward pass is the stock one; in the backward pass only ``k``
    output channels (``k`` per group with ``feature_group_count > 1``) of ``dL/dy`` are kept
    and the input and kernel gradients are convolutions over those channels alone (see
    :func:`meprop_jax.conv`). The bias gradient is dense. With ``k = 0`` (the default) or
    ``k * feature_group_count >= features`` the layer *is* the stock layer.

    Attributes:
      k: output channels to keep (per group); ``0`` is ordinary backprop.
      mode: ``"unified"`` (one channel set per batch, ranked by ``sum |dL/dy|`` over batch
        and space), ``"per_example"`` (each example's own channels) or ``"random"``.
      rng_collection: the RNG stream ``mode="random"`` draws from (default ``"meprop"``).

    ``conv_general_dilated`` and ``conv_general_dilated_cls`` are refused with ``k > 0``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = Conv(features=8, kernel_size=(3, 3), k=2)
      >>> x = jnp.ones((2, 6, 6, 3))  # NHWC
      >>> params = layer.init(jax.random.key(0), x)
      >>> jax.tree.map(jnp.shape, params)["params"]
      {'bias': (8,), 'kernel': (3, 3, 3, 8)}
      >>> layer.apply(params, x).shape
      (2, 6, 6, 8)
    """

    k: int = 0
    mode: str = "unified"
    rng_collection: str = RNG_COLLECTION

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        """Applies the layer to ``inputs``, ``[*batch, *spatial, in]``, as ``nn.Conv`` does."""
        k = _selection.check_k(self.k)
        mode = _selection.check_mode(self.mode)
        groups = self.feature_group_count
        if self.features % groups or _selection.is_dense(k, self.features, groups):
            return super().__call__(inputs)
        if self.conv_general_dilated is not None or self.conv_general_dilated_cls is not None:
            raise ValueError("meprop_jax.Conv with k > 0 does not take conv_general_dilated hooks")
        key = self.make_rng(self.rng_collection) if mode == "random" else None
        return linen_conv_call(self, inputs, k=k, mode=mode, key=key)
