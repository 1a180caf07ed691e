"""Models more than one experiment trains."""

from collections.abc import Sequence

import jax
from flax import linen as nn

import meprop_jax
from experiments.common.layers import inverted_dropout

__all__ = ["MLP", "EncoderBlock"]


class MLP(nn.Module):
    """ReLU MLP of ``meprop_jax.Dense`` layers.

    Attributes:
      hidden: sizes of the hidden layers.
      k: meProp k of every hidden layer (0 = dense backprop).
      mode: ``"unified"``, ``"per_example"`` or ``"random"``.
      k_output: meProp k of the output layer (0 = dense, the paper's choice).
      dropout: dropout rate after each hidden ReLU (0 = none).
      num_classes: output size.
      sparse_update: hidden layers with compact-gradient taps (``Dense(sparse_update=True)``;
        ``init`` with the training batch shape for the per-row modes).
      feedback: error-feedback decay of the sparse hidden layers (``Dense(feedback=...)``,
        unified mode; 0 = none): their memories live in the ``"meprop_memory"`` collection.
      adaptive: adaptive k of the sparse hidden layers (``Dense(adaptive=...)``, unified
        mode; ``k`` is the upper bound): their chosen-k taps live in ``"meprop_adaptive"``.
      record: keep meSimp's activity record in the hidden layers (``Dense(record=True)``:
        ``"mesimp"`` collection with each layer's ``hits``, ``examples`` and ``mask``, and
        zero taps in ``"mesimp_taps"``; see :mod:`experiments.common.mesimp`). Each hidden
        size of ``hidden`` may differ, as meSimp's shrunk layers do.
      kernel_layout: every layer's ``Dense(kernel_layout=...)``: ``"in_out"`` (stock) or
        ``"out_in"`` (kernels stored ``[out, in]``, the fast layout of the per-row modes).

    Every hidden layer is ``meprop_jax.Dense`` -> ReLU, so its top-k acts on ``dL/dy`` of the
    linear output ``y``, i.e. after the ReLU derivative has zeroed the inactive units.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> model = MLP(hidden=(8, 8), k=2, num_classes=3)
      >>> params = model.init(jax.random.key(0), jnp.ones((4, 5)), False)["params"]
      >>> jax.tree.map(jnp.shape, params)["hidden_1"]
      {'bias': (8,), 'kernel': (8, 8)}
      >>> model.apply({"params": params}, jnp.ones((4, 5)), False).shape
      (4, 3)
    """

    hidden: Sequence[int]
    k: int = 0
    mode: str = "unified"
    k_output: int = 0
    dropout: float = 0.0
    num_classes: int = 10
    sparse_update: bool = False
    feedback: float = 0.0
    adaptive: meprop_jax.AdaptiveK | None = None
    record: bool = False
    kernel_layout: str = "in_out"
    factored_grad: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        """Logits ``[batch, num_classes]`` of ``x`` ``[batch, features]``."""
        for i, size in enumerate(self.hidden):
            x = meprop_jax.Dense(
                size,
                k=self.k,
                mode=self.mode,
                sparse_update=self.sparse_update,
                factored_grad=self.factored_grad,
                feedback=self.feedback,
                adaptive=self.adaptive,
                record=self.record,
                kernel_layout=self.kernel_layout,
                name=f"hidden_{i}",
            )(x)
            x = nn.relu(x)
            if train and self.dropout > 0:
                x = inverted_dropout(x, self.dropout, self.make_rng("dropout"))
        return meprop_jax.Dense(
            self.num_classes,
            k=self.k_output,
            mode=self.mode,
            kernel_layout=self.kernel_layout,
            name="output",
        )(x)


class EncoderBlock(nn.Module):
    """One pre-LayerNorm Transformer encoder block of stock Flax layers (the tagger's
    ``--model transformer`` and the bench's ``--transformer``).

    Attributes:
      d_model: model width.
      heads: attention heads (``d_model`` divisible by it).
      mlp_dim: hidden width of the MLP.
      dropout: inverted-dropout rate on each branch's output before the residual sum.
    """

    d_model: int
    heads: int
    mlp_dim: int
    dropout: float = 0.0

    def _drop(self, x: jax.Array, train: bool) -> jax.Array:
        if train and self.dropout > 0:
            return inverted_dropout(x, self.dropout, self.make_rng("dropout"))
        return x

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array, train: bool = False) -> jax.Array:
        """``x [batch, time, d_model]`` and the attention ``mask [batch, 1, 1, time]``
        (true: a key that may be attended to) -> ``[batch, time, d_model]``."""
        h = nn.LayerNorm(name="attention_norm")(x)
        h = nn.MultiHeadDotProductAttention(
            num_heads=self.heads,
            qkv_features=self.d_model,
            out_features=self.d_model,
            deterministic=True,
            name="attention",
        )(h, mask=mask)
        x = x + self._drop(h, train)
        h = nn.LayerNorm(name="mlp_norm")(x)
        h = nn.gelu(nn.Dense(self.mlp_dim, name="mlp_in")(h))
        h = nn.Dense(self.d_model, name="mlp_out")(h)
        return x + self._drop(h, train)
