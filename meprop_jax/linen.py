"""Flax Linen layers with meProp backward passes.

``Dense`` is a drop-in for ``flax.linen.Dense``: the same fields and defaults, the same
parameter names and shapes (``kernel [in, out]``, ``bias [out]``), so stock checkpoints load,
plus the meProp fields ``k``, ``mode``, ``sparse_bias``, ``rng_collection`` and
``sparse_update``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from meprop_jax import _linear, _selection

Array = jax.Array

#: Name of the Linen RNG stream that ``mode="random"`` draws its keys from.
RNG_COLLECTION = "meprop"

#: Variable collection holding the compact-gradient taps of ``Dense(sparse_update=True)``.
TAP_COLLECTION = "meprop_taps"


class Dense(nn.Dense):
    """A linear layer, ``y = x @ kernel + bias``, whose backward pass keeps only top-k entries.

    Attributes:
      features: number of output features (as in ``flax.linen.Dense``).
      k: output-gradient entries to keep; ``0`` (the default) is ordinary backprop, and so is
        any ``k >= features``.
      mode: ``"unified"`` (one column set for the batch), ``"per_example"`` or ``"random"``;
        see :func:`meprop_jax.linear`.
      sparse_bias: restrict the bias gradient to the kept entries too (default: dense bias
        gradient, as in the authors' code).
      rng_collection: the RNG stream ``mode="random"`` draws from (default ``"meprop"``);
        pass it to ``apply``, e.g. ``rngs={"meprop": key}``.
      sparse_update: keep the kernel's gradient compact (see :mod:`meprop_jax.optim`):
        ``init`` also creates a zero tap ``"kernel"`` in the ``"meprop_taps"`` collection;
        differentiating with respect to it gives the selected columns' ``[K, in]`` gradient
        block and their indices, while the kernel's own gradient is zero. Has no effect when
        the layer is dense (``k = 0`` or ``k >= features``: no tap) or when ``apply`` is given
        no ``"meprop_taps"`` (e.g. at evaluation). For ``"per_example"`` and ``"random"`` the
        tap's width ``min(batch * k, features)`` depends on the batch shape: ``init`` with the
        training batch shape. Apply the layer once per step (no weight sharing or ``scan``
        over a shared tap).

    All other fields (``use_bias``, ``dtype``, ``param_dtype``, ``precision``,
    ``kernel_init``, ``bias_init``, ``promote_dtype``) behave as in ``flax.linen.Dense``.
    ``dot_general`` and ``dot_general_cls`` are not supported with ``k > 0``: meProp supplies
    its own products.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> layer = Dense(features=4, k=2)
      >>> params = layer.init(jax.random.key(0), jnp.ones((3, 5)))
      >>> jax.tree.map(jnp.shape, params)["params"]
      {'bias': (4,), 'kernel': (5, 4)}
    """

    k: int = 0
    mode: str = "unified"
    sparse_bias: bool = False
    rng_collection: str = RNG_COLLECTION
    sparse_update: bool = False

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        """Applies the layer to ``inputs`` of shape ``[..., in]``; returns ``[..., features]``."""
        k = _selection.check_k(self.k)
        mode = _selection.check_mode(self.mode)
        if self.dot_general is not None or self.dot_general_cls is not None:
            if not _selection.is_dense(k, self.features):
                raise ValueError("meprop_jax.Dense with k > 0 does not take dot_general hooks")
            return super().__call__(inputs)
        kernel = self.param(
            "kernel", self.kernel_init, (jnp.shape(inputs)[-1], self.features), self.param_dtype
        )
        bias = (
            self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias
            else None
        )
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        sparse = not _selection.is_dense(k, self.features)
        key = self.make_rng(self.rng_collection) if sparse and mode == "random" else None
        tap = None
        has_tap = self.is_initializing() or self.has_variable(TAP_COLLECTION, "kernel")
        if self.sparse_update and sparse and has_tap:
            make_tap = lambda: _linear.compact_tap(
                *kernel.shape, k=k, mode=mode, batch_shape=inputs.shape[:-1], dtype=kernel.dtype
            )
            tap = self.variable(TAP_COLLECTION, "kernel", make_tap).value
        return _linear.linear(
            inputs,
            kernel,
            bias,
            k=k,
            mode=mode,
            key=key,
            sparse_bias=self.sparse_bias,
            precision=self.precision,
            tap=tap,
        )
