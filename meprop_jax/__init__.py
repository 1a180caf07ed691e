"""meprop_jax: meProp (minimal-effort back propagation) for JAX and Flax.

The forward pass of every sparsified layer is the ordinary one; in the backward pass only the
``k`` largest-magnitude entries of each linear layer's output gradient are propagated, so the
weight and input gradients come from products ``k / out`` of the dense size.
"""

from meprop_jax import feedback, linen, mesimp, nnx, optim, train_state
from meprop_jax._adaptive import AdaptiveK, AdaptiveTap, adaptive_tap
from meprop_jax._conv import Conv, conv
from meprop_jax._linear import (
    CompactGrad,
    RecordTap,
    compact_tap,
    linear,
    multi_linear,
    record_tap,
)
from meprop_jax._selection import (
    MODES,
    column_scores,
    per_example_mask,
    random_mask,
    top_k_mask,
    unified_columns,
)
from meprop_jax._sparsify import SparsifiedLayer, sparsify, sparsify_report
from meprop_jax.linen import Dense, LSTMCell
from meprop_jax.train_state import TrainState

__version__ = "0.1.0"

__all__ = [
    "MODES",
    "AdaptiveK",
    "AdaptiveTap",
    "CompactGrad",
    "Conv",
    "Dense",
    "LSTMCell",
    "RecordTap",
    "SparsifiedLayer",
    "TrainState",
    "adaptive_tap",
    "column_scores",
    "compact_tap",
    "conv",
    "feedback",
    "linear",
    "linen",
    "mesimp",
    "multi_linear",
    "nnx",
    "optim",
    "per_example_mask",
    "random_mask",
    "record_tap",
    "sparsify",
    "sparsify_report",
    "top_k_mask",
    "train_state",
    "unified_columns",
]
