"""meProp for Flax Linen: drop-in layers, :func:`sparsify` for stock models, :class:`TrainState`.

* :class:`Dense`, :class:`LSTMCell` and :class:`Conv`: drop-ins for the stock Linen layers,
  with the meProp fields ``k``, ``mode``, ... (:mod:`meprop_jax.linen.layers`,
  :mod:`meprop_jax.linen.conv`).
* :func:`sparsify` and :func:`sparsify_report`: meProp for a stock model's ``apply``
  (:mod:`meprop_jax.linen.sparsify`).
* :class:`TrainState`: compact, column-sparse steps (:mod:`meprop_jax.linen.train_state`).

The collection names (``TAP_COLLECTION``, ...) are those of :mod:`meprop_jax._src.collections`.
"""

from meprop_jax._src.collections import (
    ADAPTIVE_TAP_COLLECTION,
    MESIMP_COLLECTION,
    RECORD_TAP_COLLECTION,
    RNG_COLLECTION,
    TAP_COLLECTION,
    TRANSPOSED_KERNEL,
)
from meprop_jax.linen.conv import Conv
from meprop_jax.linen.layers import Dense, LSTMCell, to_kernel_layout
from meprop_jax.linen.sparsify import SparsifiedLayer, sparsify, sparsify_report
from meprop_jax.linen.train_state import TrainState

__all__ = [
    "ADAPTIVE_TAP_COLLECTION",
    "MESIMP_COLLECTION",
    "RECORD_TAP_COLLECTION",
    "RNG_COLLECTION",
    "TAP_COLLECTION",
    "TRANSPOSED_KERNEL",
    "Conv",
    "Dense",
    "LSTMCell",
    "SparsifiedLayer",
    "TrainState",
    "sparsify",
    "sparsify_report",
    "to_kernel_layout",
]
