"""meProp for Flax NNX: drop-in layers, :func:`sparsify` for stock models, :class:`Optimizer`.

* :class:`Linear`, :class:`LSTMCell` and :class:`Conv`: drop-ins for the stock NNX layers,
  with the meProp arguments ``k``, ``mode``, ... (:mod:`meprop_jax.nnx.layers`, which also
  gives the RNG convention of ``mode="random"``, and :mod:`meprop_jax.nnx.conv`), and
  :class:`LinearGeneral`, the attention projections' layer (:mod:`meprop_jax.nnx.general`).
* :func:`sparsify`: a copy of a stock NNX model with meProp layers
  (:mod:`meprop_jax.nnx.sparsify`).
* :class:`Optimizer` and :class:`CompactGrads`: compact, column-sparse steps
  (:mod:`meprop_jax.nnx.optimizer`).
* :func:`to_kernel_layout`: converts states between the kernel layouts of
  ``kernel_layout="in_out"`` (stock) and ``"out_in"`` (:mod:`meprop_jax.nnx.layout`).
"""

from meprop_jax._src.collections import RNG_COLLECTION
from meprop_jax._src.paths import SparsifiedLayer
from meprop_jax.nnx.conv import Conv
from meprop_jax.nnx.general import LinearGeneral
from meprop_jax.nnx.layers import FeedbackMemory, Linear, LSTMCell
from meprop_jax.nnx.layout import to_kernel_layout
from meprop_jax.nnx.optimizer import CompactGrads, Optimizer
from meprop_jax.nnx.sparsify import SparsifiedModel, sparsify

__all__ = [
    "RNG_COLLECTION",
    "CompactGrads",
    "Conv",
    "FeedbackMemory",
    "LSTMCell",
    "Linear",
    "LinearGeneral",
    "Optimizer",
    "SparsifiedLayer",
    "SparsifiedModel",
    "sparsify",
    "to_kernel_layout",
]
