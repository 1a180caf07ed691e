"""meprop_jax: meProp (minimal-effort back propagation) for JAX and Flax.

The forward pass of every sparsified layer is the ordinary one; in the backward pass only the
``k`` largest-magnitude entries of each linear layer's output gradient are propagated, so the
weight and input gradients come from products ``k / out`` of the dense size.

The package is layered; each layer imports only those beneath it:

* ``meprop_jax._src``: the framework-free ops (selection, linear, general (multi-axis)
  projections, conv, recurrent, taps, feedback, adaptive k), re-exported here
  (:func:`linear`, :func:`dense_general`, :func:`conv`, ...);
* :mod:`meprop_jax.optim`: column-sparse optimizers for compact gradients;
* :mod:`meprop_jax.linen` and :mod:`meprop_jax.nnx`: layers, ``sparsify`` and the train state
  or optimizer of each Flax API;
* :mod:`meprop_jax.mesimp`: meSimp, which shrinks trained models.
"""

import sys

from meprop_jax import feedback, linen, mesimp, nnx, optim
from meprop_jax._src.adaptive import AdaptiveK, AdaptiveTap, adaptive_tap
from meprop_jax._src.conv import conv
from meprop_jax._src.general import dense_general
from meprop_jax._src.linear import linear, multi_linear
from meprop_jax._src.selection import (
    MODES,
    column_scores,
    per_example_mask,
    random_mask,
    top_k_mask,
    unified_columns,
)
from meprop_jax._src.taps import (
    CompactGrad,
    FactoredGrad,
    RecordTap,
    compact_tap,
    record_tap,
)
from meprop_jax.linen import (
    Conv,
    Dense,
    LSTMCell,
    SparsifiedLayer,
    TrainState,
    sparsify,
    sparsify_report,
    to_kernel_layout,
    train_state,
)

# ``meprop_jax.train_state`` is the module of the Linen TrainState, under its older name.
sys.modules[f"{__name__}.train_state"] = train_state

__version__ = "0.1.0"

__all__ = [
    "MODES",
    "AdaptiveK",
    "AdaptiveTap",
    "CompactGrad",
    "Conv",
    "Dense",
    "FactoredGrad",
    "LSTMCell",
    "RecordTap",
    "SparsifiedLayer",
    "TrainState",
    "adaptive_tap",
    "column_scores",
    "compact_tap",
    "conv",
    "dense_general",
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
    "to_kernel_layout",
    "top_k_mask",
    "train_state",
    "unified_columns",
]
