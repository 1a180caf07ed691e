"""meprop_jax: meProp (minimal-effort back propagation) for JAX and Flax.

The forward pass of every sparsified layer is the ordinary one; in the backward pass only the
``k`` largest-magnitude entries of each linear layer's output gradient are propagated, so the
weight and input gradients come from products ``k / out`` of the dense size.
"""

from meprop_jax import linen, nnx, optim
from meprop_jax._linear import CompactGrad, compact_tap, linear, multi_linear
from meprop_jax._selection import (
    MODES,
    column_scores,
    per_example_mask,
    random_mask,
    top_k_mask,
    unified_columns,
)
from meprop_jax.linen import Dense, LSTMCell

__version__ = "0.1.0"

__all__ = [
    "MODES",
    "CompactGrad",
    "Dense",
    "LSTMCell",
    "column_scores",
    "compact_tap",
    "linear",
    "linen",
    "multi_linear",
    "nnx",
    "optim",
    "per_example_mask",
    "random_mask",
    "top_k_mask",
    "unified_columns",
]
